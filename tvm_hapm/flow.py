"""End-to-end flows on ONNX models: prune with a Relax pass, keep the result as ONNX.

The pruning passes (:mod:`tvm_hapm.passes.prune`) work on the float Relax module that TVM's ONNX
frontend produces, whose weight constants are the ONNX initializers unchanged (convolution
weights as OIHW, Gemm weights as stored).  :func:`prune_onnx` runs a pass and writes the zeros
back into the matching initializers, so the pruned model stays an ONNX file that fine-tuning
(:mod:`tvm_hapm.train`), other tools and ``hapm compile`` can use.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["PRUNE_METHODS", "prune_onnx", "sparsity_of"]

PRUNE_METHODS = ("hapm", "unstructured")


def _pass(method: str, sparsity: float, config, criterion: str):
    from .passes import HardwareAwarePrune, MagnitudePrune  # noqa: PLC0415

    if method == "hapm":
        return HardwareAwarePrune(sparsity, config=config, criterion=criterion)
    if method == "unstructured":
        return MagnitudePrune(sparsity, criterion=criterion)
    raise ValueError(f"unknown pruning method {method!r}; choose from {PRUNE_METHODS}")


def prune_onnx(
    model: onnx.ModelProto, method: str, sparsity: float, config=None, criterion: str = "l2"
) -> tuple[onnx.ModelProto, list]:
    """Prune ``model`` with ``method`` (``"hapm"`` or ``"unstructured"``) at ``sparsity``.

    Returns the pruned ONNX model (a copy; the input is not changed) and the pass's report.
    Each pruned Relax weight is matched to the ONNX initializer it came from by value.
    """
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415

    from .passes import prune_report, pruning_masks  # noqa: PLC0415
    from .passes.prune import _find_layers  # noqa: PLC0415

    mod = from_onnx(model)
    pruned = _pass(method, sparsity, config, criterion)(mod)
    masks = pruning_masks(pruned)
    originals = {lay.name: lay.weight for lay in _find_layers(mod)}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_name = {i.name: i for i in out.graph.initializer}
    used = set()
    for layer, mask in masks.items():
        weight = originals[layer]
        match = [
            n
            for n, a in inits.items()
            if n not in used and a.shape == weight.shape and np.array_equal(a, weight)
        ]
        if len(match) != 1:
            raise ValueError(
                f"pruned layer {layer}: {len(match)} ONNX initializers match its weight"
            )
        used.add(match[0])
        by_name[match[0]].CopyFrom(
            numpy_helper.from_array(np.where(mask, inits[match[0]], 0), match[0])
        )
    return out, prune_report(pruned)


def sparsity_of(model: onnx.ModelProto) -> float:
    """Fraction of zeros over the conv and Gemm weights (initializers of rank 2 or 4)."""
    total = zeros = 0
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.ndim in (2, 4):
            total += a.size
            zeros += int((a == 0).sum())
    return zeros / max(total, 1)
