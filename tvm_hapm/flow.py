"""End-to-end flows on ONNX models: prune with a Relax pass, keep the result as ONNX.

The pruning passes (:mod:`tvm_hapm.passes.prune`) work on the float Relax module that TVM's ONNX
frontend produces, whose weight constants are the ONNX initializers unchanged (convolution
weights as OIHW, Gemm weights as stored).  :func:`prune_onnx` runs a pass and writes the zeros
back into the matching initializers, so the pruned model stays an ONNX file that fine-tuning
(:mod:`tvm_hapm.train`), other tools and ``hapm compile`` can use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "PRUNE_METHODS",
    "DeployedResult",
    "evaluate_deployed",
    "prune_onnx",
    "sparsity_of",
]

PRUNE_METHODS = ("hapm", "unstructured")


def _pass(method: str, sparsity: float, config, criterion: str, skip):
    from .passes import HardwareAwarePrune, MagnitudePrune  # noqa: PLC0415

    if method == "hapm":
        return HardwareAwarePrune(sparsity, config=config, criterion=criterion, skip=skip)
    if method == "unstructured":
        return MagnitudePrune(sparsity, criterion=criterion, skip=skip)
    raise ValueError(f"unknown pruning method {method!r}; choose from {PRUNE_METHODS}")


def prune_onnx(
    model: onnx.ModelProto,
    method: str,
    sparsity: float,
    config=None,
    criterion: str = "l2",
    keep_first_last: bool = True,
) -> tuple[onnx.ModelProto, list]:
    """Prune ``model`` with ``method`` (``"hapm"`` or ``"unstructured"``) at ``sparsity``.

    Returns the pruned ONNX model (a copy; the input is not changed) and the pass's report.
    Each pruned Relax weight is matched to the ONNX initializer it came from by value.  With
    ``keep_first_last`` (the usual practice, e.g. AMC) the first and the last layer stay dense:
    the first sees only a few input channels, so one hardware group there is a whole kernel tap,
    and the last produces the logits.
    """
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415

    from .passes import prune_report, pruning_masks  # noqa: PLC0415
    from .passes.prune import _find_layers, prunable_layers  # noqa: PLC0415

    mod = from_onnx(model)
    names = [d["layer"] for d in prunable_layers(mod)]
    skip = [names[0], names[-1]] if keep_first_last and len(names) > 2 else []
    pruned = _pass(method, sparsity, config, criterion, skip)(mod)
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


@dataclass
class DeployedResult:
    """A float ONNX classifier deployed as int8 on hapm_fpga."""

    accuracy: float  # int8 top-1 in %, on the given test set
    latency_ms: float  # one image on the simulated accelerator
    energy_uj: float
    gemms: int  # GEMM instructions of one image
    cycles: int


def evaluate_deployed(model, target, x_cal, x_test, y_test, batch: int = 150) -> DeployedResult:
    """Quantize ``model`` (calibrated on ``x_cal``), measure its int8 top-1 on the test set and
    its accelerator latency and energy for one image.

    The accuracy uses TVM's llvm build of the quantized module, which the accelerator equals bit
    for bit (``tests/test_onnx_e2e.py``) and which runs much faster than the simulator.
    """
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415

    from . import quantize  # noqa: PLC0415
    from .data import set_batch  # noqa: PLC0415
    from .runtime import last_run_stats  # noqa: PLC0415

    batch = min(batch, len(x_test))
    qmod = quantize(from_onnx(set_batch(model, batch)), calibration=[x_cal[:batch]])
    vm = relax.VirtualMachine(tvm.compile(qmod, target="llvm"), tvm.cpu())
    correct = 0
    n = (len(x_test) // batch) * batch
    for k in range(0, n, batch):
        logits = vm["main"](tvm.runtime.tensor(x_test[k : k + batch])).numpy()
        correct += int((logits.argmax(1) == y_test[k : k + batch]).sum())
    q1 = quantize(from_onnx(set_batch(model, 1)), calibration=list(x_cal[:8, None]))
    ex = tvm.compile(q1, target=target)
    relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x_test[:1]))
    stats = last_run_stats()
    return DeployedResult(
        100.0 * correct / n,
        stats.latency_ms,
        stats.energy_uj,
        stats.by_opcode.get("GEMM", 0),
        stats.cycles,
    )
