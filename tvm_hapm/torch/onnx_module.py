"""An ONNX CNN as a trainable ``torch.nn.Module`` whose values go back into the same graph.

The pruning flow keeps models as ONNX (:mod:`tvm_hapm.flow`): the Relax passes prune the graph
``from_onnx`` imports, and the initializer names key the masks.  To fine-tune such a model at
PyTorch speed, :class:`OnnxModule` executes the graph node by node with PyTorch operators, with
the trainable initializers (:func:`tvm_hapm.compress.relax_training.trainable_parameters`: conv /
Gemm / MatMul
weights and biases, batch-norm scale and bias) as parameters and every other initializer
(batch-norm running statistics included) as a buffer; :meth:`OnnxModule.to_onnx` writes the
current values back into a copy of the graph, which keeps its structure and names.

Operators: Conv (any groups, strides, pads, dilations), BatchNormalization (batch statistics and
running-statistics update in training mode), Relu, Clip, Add, Mul, MaxPool, AveragePool,
GlobalAveragePool, Flatten, Reshape, Gemm, MatMul: the set
:class:`~tvm_hapm.compress.numpynet.NumpyNet`
runs.  Anything else raises ``NotImplementedError`` when the module is built.
"""

from __future__ import annotations

import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F

__all__ = ["OnnxModule"]

SUPPORTED = (
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Clip",
    "Conv",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "MatMul",
    "MaxPool",
    "Mul",
    "Relu",
    "Reshape",
)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(a: dict) -> tuple[int, int, int, int]:
    """ONNX ``pads`` ``[top, left, bottom, right]`` in ``F.pad``'s order ``(left, right, top,
    bottom)``."""
    auto = a.get("auto_pad", b"NOTSET")
    if auto not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise NotImplementedError(f"auto_pad={auto!r}")
    t, l, b, r = a.get("pads", [0, 0, 0, 0])
    return (l, r, t, b)


class OnnxModule(nn.Module):
    """Run (and train) the ONNX graph of ``model`` with PyTorch; see the module docstring.

    Parameters
    ----------
    model : onnx.ModelProto
        A float CNN with one input and one output.
    trainable : iterable of str, optional
        Initializers to train (default:
        :func:`tvm_hapm.compress.relax_training.trainable_parameters`).
    """

    def __init__(self, model: onnx.ModelProto, trainable=None):
        super().__init__()
        from ..compress.relax_training import trainable_parameters

        self.model = model
        graph = model.graph
        for node in graph.node:
            if node.op_type not in SUPPORTED:
                raise NotImplementedError(f"OnnxModule: ONNX op {node.op_type} is not supported")
        trainable = set(trainable_parameters(model) if trainable is None else trainable)
        self.values = nn.Module()  # holds one parameter or buffer per initializer
        self._attr: dict[str, str] = {}
        for k, init in enumerate(graph.initializer):
            attr = f"i{k}"
            tensor = torch.from_numpy(numpy_helper.to_array(init).copy())
            if init.name in trainable and tensor.is_floating_point():
                self.values.register_parameter(attr, nn.Parameter(tensor))
            else:
                self.values.register_buffer(attr, tensor)
            self._attr[init.name] = attr
        inits = set(self._attr)
        self.input = next(i.name for i in graph.input if i.name not in inits)
        self.output = graph.output[0].name
        self.nodes = [(n.op_type, list(n.input), n.output[0], _attrs(n)) for n in graph.node]

    # -- names ------------------------------------------------------------------------------
    def resolve(self, name: str) -> tuple[nn.Module, str]:
        """``(owner module, attribute)`` of the initializer ``name`` (where a mask goes)."""
        if name not in self._attr:
            raise KeyError(f"{name!r} is not an initializer of the model")
        return self.values, self._attr[name]

    def value(self, name: str) -> torch.Tensor:
        """The current value of the initializer ``name`` (masks applied)."""
        return getattr(self.values, self._attr[name])

    # -- running ----------------------------------------------------------------------------
    def forward(self, x):
        env = {self.input: x}

        def get(name):
            if not name:
                return None
            return env[name] if name in env else self.value(name)

        for op, ins, out, a in self.nodes:
            args = [get(i) for i in ins]
            env[out] = self._run(op, args, a, ins)
        return env[self.output]

    def _run(self, op, args, a, ins):
        if op == "Conv":
            left, right, top, bottom = _pads(a)
            x, padding = args[0], (top, left)
            if (left, top) != (right, bottom):  # conv2d pads symmetrically; an explicit pad is a
                x, padding = F.pad(x, (left, right, top, bottom)), 0  # copy (~15% of a step)
            return F.conv2d(
                x, args[1], args[2] if len(args) > 2 else None, a.get("strides", [1, 1]),
                padding, a.get("dilations", [1, 1]), a.get("group", 1),
            )  # fmt: skip
        if op == "BatchNormalization":
            x, scale, bias = args[:3]
            mean, var = self.value(ins[3]), self.value(ins[4])
            # ONNX momentum weighs the old statistics (0.9); PyTorch's the new batch (0.1)
            return F.batch_norm(
                x, mean, var, scale, bias, self.training, 1.0 - a.get("momentum", 0.9),
                a.get("epsilon", 1e-5),
            )  # fmt: skip
        if op == "Relu":
            return F.relu(args[0])
        if op == "Clip":
            lo = args[1] if len(args) > 1 and args[1] is not None else a.get("min")
            hi = args[2] if len(args) > 2 and args[2] is not None else a.get("max")
            lo = float(lo) if lo is not None else None
            hi = float(hi) if hi is not None else None
            return torch.clamp(args[0], lo, hi)
        if op == "Add":
            return args[0] + args[1]
        if op == "Mul":
            return args[0] * args[1]
        if op == "GlobalAveragePool":
            return args[0].mean(dim=(2, 3), keepdim=True)
        if op in ("MaxPool", "AveragePool"):
            return self._pool(op, args[0], a)
        if op == "Flatten":
            return torch.flatten(args[0], a.get("axis", 1))
        if op == "Reshape":
            shape = [int(s) for s in args[1]]
            shape[0] = args[0].shape[0] if shape[0] in (0, -1, 1) else shape[0]
            return args[0].reshape(shape)
        if op == "Gemm":
            x = args[0].T if a.get("transA", 0) else args[0]
            w = args[1].T if a.get("transB", 0) else args[1]
            y = a.get("alpha", 1.0) * (x @ w)
            if len(args) > 2 and args[2] is not None:
                y = y + a.get("beta", 1.0) * args[2]
            return y
        if op == "MatMul":
            return args[0] @ args[1]
        raise NotImplementedError(op)  # unreachable: checked in __init__

    @staticmethod
    def _pool(op, x, a):
        k, s = a["kernel_shape"], a.get("strides", [1, 1])
        ceil = bool(a.get("ceil_mode", 0))
        if op == "MaxPool":
            x = F.pad(x, _pads(a), value=float("-inf"))
            return F.max_pool2d(x, k, s, 0, a.get("dilations", [1, 1]), ceil_mode=ceil)
        if a.get("count_include_pad", 0) or not any(a.get("pads", [0])):
            return F.avg_pool2d(F.pad(x, _pads(a)), k, s, 0, ceil_mode=ceil)
        ones = F.pad(torch.ones_like(x[:1, :1]), _pads(a))
        total = F.avg_pool2d(F.pad(x, _pads(a)), k, s, 0, ceil_mode=ceil)
        return total / F.avg_pool2d(ones, k, s, 0, ceil_mode=ceil)

    # -- back to ONNX -----------------------------------------------------------------------
    def to_onnx(self) -> onnx.ModelProto:
        """A copy of the model whose initializers hold the current values (masks applied,
        running statistics included); the graph is unchanged."""
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        with torch.no_grad():
            for init in out.graph.initializer:
                arr = self.value(init.name).detach().contiguous().numpy()
                init.CopyFrom(numpy_helper.from_array(arr.astype(arr.dtype), init.name))
        return out
