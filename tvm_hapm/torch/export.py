"""Export a ``torch.nn.Module`` to the ONNX graph the rest of tvm-hapm works on.

The graph keeps BatchNormalization as its own node and names every initializer after the
module's parameter or buffer (``"stages.0.0.conv1.conv.weight"``), so a mask or a value found on
the ONNX side maps back to the module by name.  Masks applied with
:func:`tvm_hapm.torch.apply_masks` are baked into the exported weights (the zeros are written, no
``Mul`` by a mask is left in the graph).
"""

from __future__ import annotations

import copy
import io
import warnings

import onnx
import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import atomic
from ..models.zoo import OPSET

__all__ = ["ExportError", "baked", "export_onnx", "load_onnx_weights"]


class ExportError(ValueError):
    """The module cannot be exported into a graph tvm-hapm can prune and compile."""


def baked(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode with every parametrization (pruning mask) removed
    and its current value kept as a plain parameter."""
    out = copy.deepcopy(module)
    for sub in out.modules():
        if parametrize.is_parametrized(sub):
            values = {name: getattr(sub, name).detach().clone() for name in sub.parametrizations}
            # parametrize gives each module a class of its own, which a deep copy shares with
            # the original: remove_parametrizations would delete the original's properties, so
            # the copy gets its plain class back by hand
            del sub.parametrizations
            sub.__class__ = type(sub).__bases__[0]
            for name, value in values.items():
                sub.register_parameter(name, nn.Parameter(value))
    return out.eval()


def export_onnx(module: nn.Module, input_shape, path=None, opset: int = OPSET) -> onnx.ModelProto:
    """Export ``module`` (its current weights, masks baked in, eval mode) to ONNX.

    Parameters
    ----------
    module : torch.nn.Module
        A float CNN with one NCHW input and one logits output.
    input_shape : tuple of int
        ``(batch, channels, height, width)`` of the input; the batch is written into the graph
        (``tvm_hapm.data.set_batch`` changes it later).
    path : str or Path, optional
        Also write the model there (atomically: a temporary file renamed into place).
    opset : int
        ONNX opset (the project's :data:`~tvm_hapm.models.zoo.OPSET` by default).

    Returns
    -------
    onnx.ModelProto
        Input ``"input"``, output ``"output"``; initializers named by the module's state-dict
        keys; BatchNormalization not folded (the quantizer folds it at compile time).

    Raises
    ------
    ExportError
        The exporter failed, or a weight of a Conv/Gemm node is not a parameter of the module.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ExportError(
            f"input_shape must be (batch, channels, height, width), got {input_shape}"
        )
    model = baked(module)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter's deprecation notice: dynamo=True needs onnxscript
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (torch.zeros(shape),), buf, input_names=["input"],
                output_names=["output"], opset_version=opset, dynamo=False,
                # PRESERVE (the module is in eval mode) folds constants without the eval-mode
                # peephole that fuses BatchNormalization into the conv weights; initializers as
                # inputs keep one initializer per parameter (no deduplication of equal values)
                training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                keep_initializers_as_inputs=True,
            )  # fmt: skip
    except Exception as err:
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from err
    out = _plain_graph(onnx.load_from_string(buf.getvalue()))
    out.producer_name = "tvm_hapm.torch"
    onnx.checker.check_model(out)
    params = dict(model.named_parameters())
    inits = {t.name for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            w = node.input[1]
            if w in inits and w not in params:
                raise ExportError(
                    f"the weight {w!r} of ONNX node {node.name} is not a parameter of the module "
                    "(computed weights cannot be pruned through the exported graph)"
                )
    if path is not None:
        atomic.write_bytes(path, out.SerializeToString())
    return out


def load_onnx_weights(module: nn.Module, model: onnx.ModelProto) -> nn.Module:
    """Load into ``module`` (in place) the weights of ``model``, an ONNX graph exported from a
    module of the same structure (its initializers are named by the state-dict keys, as
    :func:`export_onnx` writes them; e.g. the bundled ``load_fashion_resnet`` models).

    Every parameter and buffer of the module must be found with its shape, except batch-norm
    ``num_batches_tracked`` counters; raises ``KeyError`` / ``ValueError`` otherwise.
    """
    inits = {t.name: t for t in model.graph.initializer}
    state = {}
    for name, value in module.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = value
            continue
        if name not in inits:
            raise KeyError(f"{name!r} is not an initializer of the ONNX model")
        arr = onnx.numpy_helper.to_array(inits[name])
        if tuple(arr.shape) != tuple(value.shape):
            raise ValueError(f"{name}: ONNX {arr.shape}, module {tuple(value.shape)}")
        state[name] = torch.from_numpy(arr.copy()).to(value.dtype)
    module.load_state_dict(state)
    return module


def _plain_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph as the project's own builders write it: initializers are not graph inputs, and
    ``Constant`` nodes (e.g. the bounds of a ReLU6's ``Clip``) are initializers."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = []
    for node in graph.node:
        attrs = node.attribute
        if node.op_type == "Constant" and len(attrs) == 1 and attrs[0].name == "value":
            value = onnx.numpy_helper.to_array(node.attribute[0].t)
            graph.initializer.append(onnx.numpy_helper.from_array(value, node.output[0]))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model
