"""Post-training quantization of a float Relax CNN into the hapm_fpga integer vocabulary.

:func:`quantize` turns a float32 Relax module (typically from
``tvm.relax.frontend.onnx.from_onnx``) into a module with the same signature (float32 in,
float32 out) whose layers are written with the integer operator chains of
:mod:`tvm_hapm.passes.qops`, so that the partitioner can offload them and TVM's llvm build of
the same module is a bit-exact reference of the accelerator.

Scheme
------
* Activations: per-tensor symmetric, ``scale = max|x| / act_hi`` over all calibration samples
  (``act_hi`` is 127 for int8, 32767 for int16); with ``percentile=p`` the ``p``-th percentile
  of ``|x|`` over all calibration elements replaces the maximum.
* Weights: per-output-channel symmetric, ``scale_w[c] = max|W[c]| / weight_hi``; for wide
  configs the scale of a channel is enlarged when its worst-case int32 accumulator
  (``2**(act_bits-1) * sum|Wq[c]| + |bias_q[c]|``) could overflow (never the case for int8).
* Bias: ``round(b / (s_in * s_w[c]))`` in int32; requantization multipliers come from
  :func:`qops.choose_multiplier` applied to ``s_in * s_w / s_out``.
* Residual adds (``fuse_residual=True``, the default): when one operand of an add is a conv2d
  output read by nothing else (no activation in between), the shortcut ``s`` enters that
  conv's int32 accumulator with an integer weight per channel, ``K[c] = floor(s_s / (s_in *
  s_w[c]))``, and the weight scale is widened to ``s_s / (s_in * K[c])`` (at most
  ``1 / RESIDUAL_MIN_K`` wider) so that the shortcut is represented exactly; one requantization
  to the add's output scale follows (``qops.emit_conv2d_residual``).  On hapm_fpga this costs
  an accumulator load and one ALU pass in the conv instead of a separate element-wise program
  (eight passes per element).  Where ``K`` would be below ``RESIDUAL_MIN_K`` or the
  accumulator could overflow, the add stays separate.

Pipeline
--------
1. Normalise: ``DecomposeOpsForInference`` (batch norm becomes subtract/divide/multiply/add by
   per-channel constants), constant folding (NumPy for the few ops batch norm leaves, then
   ``FoldConstant``), ``CanonicalizeBindings``, ``DeadCodeElimination``.  Batch norm and
   conv/Gemm bias adds are folded (in float64) into the weights and bias of the preceding
   conv2d/matmul while planning, by absorbing the chain of per-channel affine ops after it.
2. Plan: every binding becomes an accelerated layer (conv2d, dense, average pooling as an
   all-ones depthwise conv, global average pooling, residual add, a leftover per-channel
   affine chain on an integer tensor as a depthwise 1x1 conv; each with its trailing
   ReLU/ReLU6/Clip folded into the requantization bounds), a scale-preserving integer op (max
   pooling, reshape-like ops, an unfused clip), or a host float op (dequantize -> float op ->
   quantize where an integer consumer needs it).
3. Calibrate: a copy of the float function that also returns every tensor whose scale is
   needed is compiled once for llvm and run on each sample.
4. Emit the quantized function in one dataflow block.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, tirx

from ..target.config import HardwareConfig, get_config
from . import qops
from .relax_util import const_array, minmax_prim, op_name, static_shape

__all__ = [
    "QuantizeError",
    "FLOAT_MODEL_MESSAGE",
    "DEFAULT_PERCENTILE",
    "normalise",
    "RESIDUAL_MIN_K",
    "quantize",
    "Quantize",
    "is_quantized",
    "float_layer_ops",
    "has_float_compute",
]

#: Message of the compiler when it is given a float model.
FLOAT_MODEL_MESSAGE = (
    "hapm_fpga runs integer layers: quantize the model first with "
    "tvm_hapm.quantize(mod, calibration=[...])"
)


class QuantizeError(ValueError):
    """A model or calibration set that :func:`quantize` cannot handle; the message says why."""


# --------------------------------------------------------------------------------------------
# small IR helpers
# --------------------------------------------------------------------------------------------
_CONV = "relax.nn.conv2d"
_MATMUL = "relax.matmul"
_AFFINE_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")
_SHAPE_OPS = (
    "relax.reshape",
    "relax.flatten",
    "relax.squeeze",
    "relax.permute_dims",
    "relax.expand_dims",
)
_INF = math.inf
_NOT_AN_OP = "not an operator call"
#: Steps that emit an accelerated layer (they requantize to a calibrated output scale).
_LAYER_KINDS = ("conv", "dense", "avgpool", "gap", "add")
#: Steps whose result is an integer tensor.
_INT_KINDS = (*_LAYER_KINDS, "int", "clip")
#: Smallest integer shortcut weight of a fused residual add: widening a weight scale to make
#: the shortcut exact costs at most 1/RESIDUAL_MIN_K of the weights' resolution.
RESIDUAL_MIN_K = 16
#: Activation calibration percentile of |x| for ``quantize(percentile=...)``.  On the digits
#: ResNet-56 of ``benchmarks/hwflow.py`` the maximum gave int8 test top-1 97.8% against 99.1%
#: float, the 99.9th percentile 99.1% (and 94.7% instead of 90.0% after 80% HAPM pruning);
#: ResNet-20 is unchanged within one test image.  It is not the default: on the tiny test nets
#: it clips enough of their 8 calibration samples to raise their error (tests/test_quantize.py).
DEFAULT_PERCENTILE = 99.9
_KIND_LABEL = {
    "conv": "conv2d",
    "dense": "dense",
    "avgpool": "avg pool as all-ones depthwise conv",
    "gap": "global avg pool",
    "add": "residual add",
}


def _short(op: str) -> str:
    return op[len("relax.") :] if op.startswith("relax.") else op


def _tensor_ty(expr):
    ty = getattr(expr, "ty", None)
    return ty if isinstance(ty, relax.TensorType) else None


def _dtype(expr) -> str | None:
    ty = _tensor_ty(expr)
    return str(ty.dtype) if ty is not None else None


def _is_f32(expr) -> bool:
    return _dtype(expr) == "float32"


def _shape(expr) -> tuple | None:
    """Shape with ints for static dims and the symbolic expression otherwise (None if unknown)."""
    ty = _tensor_ty(expr)
    if ty is None:
        return None
    values = getattr(ty.shape, "values", None)
    if values is None:
        return None
    return tuple(int(v.value) if isinstance(v, tirx.IntImm) else v for v in values)


def _scalar(expr) -> float | None:
    """Value of a scalar constant or a PrimExpr immediate."""
    arr = const_array(expr)
    if arr is not None:
        return float(arr.reshape(-1)[0]) if arr.size == 1 else None
    value = getattr(expr, "value", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _relax_functions(mod: tvm.IRModule):
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            yield func


def _calls(func: relax.Function) -> list:
    found = []

    def visit(node):
        if isinstance(node, relax.Call) and op_name(node) in (_CONV, _MATMUL):
            found.append(node)

    relax.analysis.post_order_visit(func, visit)
    return found


def is_quantized(mod: tvm.IRModule) -> bool:
    """Whether ``mod`` has an integer conv2d or matmul accumulating in int32.

    Parameters
    ----------
    mod : tvm.IRModule
        Any Relax module.

    Returns
    -------
    bool
        True for the output of :func:`quantize` (and any model with such layers).
    """
    for func in _relax_functions(mod):
        for call in _calls(func):
            data = _dtype(call.args[0]) or ""
            if _dtype(call) == "int32" and data.startswith(("int", "uint")):
                return True
    return False


def float_layer_ops(mod: tvm.IRModule) -> list[str]:
    """The float conv2d calls and float matmuls with a weight operand of ``mod``: the layers
    :func:`quantize` turns into integer ones, which the accelerator cannot run as floats.

    A matmul counts when one of its operands is a constant or a function parameter (a layer
    with weights); a matmul of two computed activations is not a layer :func:`quantize` can
    turn into an integer one, so it stays on the host and does not count.

    Parameters
    ----------
    mod : tvm.IRModule
        Any Relax module.

    Returns
    -------
    list of str
        The operator name of each such call (empty for a quantized model); the compiler refuses
        a model with any, with :data:`FLOAT_MODEL_MESSAGE`.
    """
    found = []
    for func in _relax_functions(mod):
        params = list(func.params)
        for call in _calls(func):
            if not (_dtype(call) or "").startswith(("float", "bfloat")):
                continue
            if op_name(call) == _CONV or any(
                isinstance(arg, tvm.ir.Constant) or any(arg.same_as(p) for p in params)
                for arg in call.args[:2]
            ):
                found.append(op_name(call))
    return found


def has_float_compute(mod: tvm.IRModule) -> bool:
    """Whether ``mod`` has a float layer (:func:`float_layer_ops`)."""
    return bool(float_layer_ops(mod))


# --------------------------------------------------------------------------------------------
# graph view of one function
# --------------------------------------------------------------------------------------------
def _vars_in(expr, out: list) -> None:
    """Append the Relax vars ``expr`` reads (with multiplicity) to ``out``."""
    if isinstance(expr, relax.Var):
        out.append(expr)
    elif isinstance(expr, relax.Call):
        if isinstance(expr.op, relax.Var):
            out.append(expr.op)
        for arg in expr.args:
            _vars_in(arg, out)
    elif isinstance(expr, relax.Tuple):
        for f in expr.fields:
            _vars_in(f, out)
    elif isinstance(expr, relax.TupleGetItem):
        _vars_in(expr.tuple_value, out)
    elif isinstance(expr, (relax.SeqExpr, relax.If, relax.Function)):
        raise QuantizeError(
            f"unsupported control flow or nested function ({type(expr).__name__}) in the "
            "quantized function: quantize() handles straight-line graphs"
        )


class _Graph:
    """Bindings of one function in order, with use counts."""

    def __init__(self, mod: tvm.IRModule, func: relax.Function):
        self.mod = mod
        self.func = func
        self.params = list(func.params)
        body = func.body
        if not isinstance(body, relax.SeqExpr):
            raise QuantizeError("the function body must be a sequence of bindings")
        self.bindings = [b for block in body.blocks for b in block.bindings]
        self.output = body.body
        self.users: dict = {}
        for i, b in enumerate(self.bindings):
            used: list = []
            _vars_in(b.value, used)
            for v in used:
                self.users.setdefault(v, []).append(i)
        out_vars: list = []
        _vars_in(self.output, out_vars)
        self.outputs = set(out_vars)

    def sole_user(self, var) -> int | None:
        """Index of the only binding reading ``var`` (once), if ``var`` is not an output."""
        users = self.users.get(var, [])
        if len(users) != 1 or var in self.outputs:
            return None
        return users[0]


# --------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------
def _apply_affine(op: str, vec: np.ndarray, weight: np.ndarray, bias):
    """Weights and bias of ``layer(x) (op) vec`` for a layer ``x -> layer(x; weight) + bias``
    with output channels on axis 0 (conv OIHW) or 1 (dense (K, M))."""
    if bias is None:
        bias = np.zeros(vec.shape[0], np.float64)
    if op == "relax.add":
        return weight, bias + vec
    if op == "relax.subtract":
        return weight, bias - vec
    scale = vec[:, None, None, None] if weight.ndim == 4 else vec[None, :]
    return weight * scale, bias * vec


@dataclass
class _Step:
    """One unit of the quantized function: an accelerated layer, an integer op or a host op."""

    kind: str  # conv | dense | avgpool | gap | add | int | clip | alias | host
    index: int  # binding of the head op
    out: object  # the Relax var whose value the step produces
    src: list = field(default_factory=list)  # float tensor inputs
    ops: list = field(default_factory=list)  # op names, for the report
    lo: float = -_INF  # activation bounds in the float domain
    hi: float = _INF
    weight: np.ndarray | None = None  # float64, conv OIHW / dense (K, M)
    bias: np.ndarray | None = None  # float64 per output channel
    conv: dict | None = None  # strides, padding, dilation, groups of a conv step
    reason: str = ""
    residual: _Step | None = None  # add step: the conv step fused into it
    fusable: list = field(default_factory=list)  # add step: convs it may fuse, preferred first


class _Planner:
    def __init__(self, graph: _Graph):
        self.g = graph
        self.rep: dict = {}  # var -> "Q" (integer tensor) | "F" (float or other value)
        self.absorbed: set = set()
        self.steps: list[_Step] = []

    # ---------------------------------------------------------------- recognisers
    def _act_bounds(self, value, var) -> tuple[float, float] | None:
        """Bounds of an activation applied to ``var`` (ReLU, ReLU6, clip, max/min by a scalar)."""
        op = op_name(value)
        if op is None or _shape(value) != _shape(var) or _dtype(value) != _dtype(var):
            return None
        args = list(value.args)
        if op in ("relax.nn.relu", "relax.nn.relu6"):
            if args[0].same_as(var):
                return (0.0, _INF) if op == "relax.nn.relu" else (0.0, 6.0)
            return None
        if op == "relax.clip":
            lo, hi = _scalar(args[1]), _scalar(args[2])
            if args[0].same_as(var) and lo is not None and hi is not None:
                return lo, hi
            return None
        if op in ("relax.maximum", "relax.minimum"):
            others = [a for a in args if not a.same_as(var)]
            if len(others) != 1:
                return None
            c = _scalar(others[0])
            if c is None or math.isnan(c):
                return None
            return (c, _INF) if op == "relax.maximum" else (-_INF, c)
        if op == "relax.call_tir" and isinstance(args[0], tvm.ir.GlobalVar):
            fields = list(args[1].fields) if isinstance(args[1], relax.Tuple) else []
            if not fields or not fields[0].same_as(var) or args[0] not in self.g.mod:
                return None
            kind = minmax_prim(self.g.mod[args[0]])
            if kind is None:
                return None
            if kind[1] is not None and len(fields) == 1:
                c = kind[1]
            elif kind[1] is None and len(fields) == 2:
                c = _scalar(fields[1])
            else:
                return None
            if c is None or math.isnan(c):
                return None
            return (c, _INF) if kind[0] == "max" else (-_INF, c)
        return None

    def _act_chain(self, var, ops: list):
        """Follow the activations applied to ``var``; returns ``(last var, lo, hi)``."""
        lo, hi = -_INF, _INF
        while True:
            i = self.g.sole_user(var)
            if i is None:
                break
            b = self.g.bindings[i]
            bounds = self._act_bounds(b.value, var) if isinstance(b, relax.VarBinding) else None
            if bounds is None:
                break
            new_lo, new_hi = max(lo, bounds[0]), min(hi, bounds[1])
            if new_lo > new_hi:
                break
            lo, hi = new_lo, new_hi
            ops.append(self._op_label(b.value))
            self.absorbed.add(i)
            var = b.var
        return var, lo, hi

    def _affine_vec(self, value, var, channels: int, channel_axis: int):
        """``(op, per-channel float64 vector)`` if ``value`` is ``var (+-*/) constant`` with a
        constant that only varies along the channel axis."""
        op = op_name(value)
        if op not in _AFFINE_OPS or _shape(value) != _shape(var) or not _is_f32(value):
            return None
        a, b = value.args
        if a.same_as(var) and not b.same_as(var):
            const = const_array(b)
        elif b.same_as(var) and op in ("relax.add", "relax.multiply"):
            const = const_array(a)
        else:
            return None
        ndim = len(_shape(var))
        if const is None or const.ndim > ndim or not np.issubdtype(const.dtype, np.floating):
            return None
        per_channel = [1] * ndim
        per_channel[channel_axis] = channels
        try:
            if np.broadcast_shapes(const.shape, tuple(per_channel)) != tuple(per_channel):
                return None
        except ValueError:
            return None
        vec = np.broadcast_to(const.astype(np.float64), per_channel).reshape(-1).copy()
        if op == "relax.divide":
            if np.any(vec == 0):
                return None
            vec = 1.0 / vec
        if not np.all(np.isfinite(vec)):
            return None
        return op, vec

    def _affine_chain(self, var, weight, bias, channel_axis: int, ops: list):
        """Fold the per-channel affine ops after a conv/matmul (bias, batch norm) into it."""
        channels = weight.shape[0] if weight.ndim == 4 else weight.shape[1]
        while True:
            i = self.g.sole_user(var)
            if i is None or not isinstance(self.g.bindings[i], relax.VarBinding):
                break
            b = self.g.bindings[i]
            found = self._affine_vec(b.value, var, channels, channel_axis)
            if found is None:
                break
            weight, bias = _apply_affine(*found, weight, bias)
            ops.append(_short(found[0]))
            self.absorbed.add(i)
            var = b.var
        return var, weight, bias

    def _op_label(self, value) -> str:
        op = op_name(value)
        if op == "relax.call_tir" and isinstance(value.args[0], tvm.ir.GlobalVar):
            return f"call_tir({value.args[0].name_hint})"
        if op is not None:
            return _short(op)
        return type(value).__name__.lower()

    # ---------------------------------------------------------------- planning
    def run(self) -> list[_Step]:
        for p in self.g.params:
            self.rep[p] = "F"
        for i, b in enumerate(self.g.bindings):
            if i in self.absorbed:
                continue
            step = self._plan(i, b)
            self.steps.append(step)
            if step.kind == "alias":
                self.rep[step.out] = self.rep.get(step.src[0], "F")
            else:
                self.rep[step.out] = "Q" if step.kind in _INT_KINDS else "F"
        return self.steps

    def _host(self, i, b, reason: str) -> _Step:
        return _Step("host", i, b.var, ops=[self._op_label(b.value)], reason=reason)

    def _plan(self, i, b) -> _Step:
        if not isinstance(b, relax.VarBinding):
            return self._host(i, b, "match_cast")
        value = b.value
        if isinstance(value, relax.Var):
            return _Step("alias", i, b.var, src=[value], ops=["alias"])
        op = op_name(value)
        if op is None:
            return self._host(i, b, _NOT_AN_OP)
        if not _is_f32(b.var):
            return self._host(i, b, "result is not a float32 tensor")
        args = list(value.args)
        x = args[0] if args else None
        x_is_tensor = isinstance(x, relax.Var) and _is_f32(x)
        if op == _CONV and x_is_tensor:
            return self._plan_conv(i, b) or self._host(i, b, "conv2d layout/weights unsupported")
        if op == _MATMUL and x_is_tensor:
            return self._plan_dense(i, b) or self._host(
                i, b, "matmul without a 2-D constant weight"
            )
        if op == "relax.nn.avg_pool2d" and x_is_tensor:
            return self._plan_avgpool(i, b) or self._host(i, b, "avg_pool2d form unsupported")
        if op == "relax.mean" and x_is_tensor:
            return self._plan_gap(i, b) or self._host(i, b, "mean over axes other than [2, 3]")
        if op == "relax.add" and self._is_residual(value):
            if all(self.rep.get(a) == "Q" for a in args):
                ops = ["add"]
                out, lo, hi = self._act_chain(b.var, ops)
                return _Step("add", i, out, src=args, ops=ops, lo=lo, hi=hi)
            return self._host(i, b, "an operand is a float tensor")
        if x_is_tensor and self.rep.get(x) == "Q":
            if op in _AFFINE_OPS:
                step = self._plan_channel_affine(i, b, x)
                if step is not None:
                    return step
            if op == "relax.nn.max_pool2d" or op in _SHAPE_OPS:
                return _Step("int", i, b.var, src=[x], ops=[_short(op)])
            if self._act_bounds(value, x) is not None:
                ops: list = []
                # follow the chain from x so that consecutive activations merge into one clip
                out, lo, hi = self._act_chain(x, ops)
                if out.same_as(x):  # x has other users: clip this binding alone
                    lo, hi = self._act_bounds(value, x)
                    ops, out = [self._op_label(value)], b.var
                return _Step("clip", i, out, src=[x], ops=ops, lo=lo, hi=hi)
        reason = "no integer kernel"
        if x_is_tensor and (
            op == "relax.nn.max_pool2d"
            or op in _SHAPE_OPS
            or self._act_bounds(value, x) is not None
        ):
            reason = "input is a float tensor"
        return self._host(i, b, reason)

    def _is_residual(self, value) -> bool:
        a, b = value.args
        return (
            isinstance(a, relax.Var)
            and isinstance(b, relax.Var)
            and _is_f32(a)
            and _is_f32(b)
            and static_shape(a) is not None
            and static_shape(a) == static_shape(b) == static_shape(value)
        )

    def _plan_channel_affine(self, i, b, x) -> _Step | None:
        """A per-channel affine chain on an integer NCHW tensor that no layer absorbed (e.g. a
        batch norm after a ReLU) becomes a depthwise 1x1 conv rather than a host round trip."""
        xs = static_shape(x)
        if xs is None or len(xs) != 4:
            return None
        found = self._affine_vec(b.value, x, xs[1], 1)
        if found is None:
            return None
        weight, bias = _apply_affine(*found, np.ones((xs[1], 1, 1, 1)), None)
        ops = [_short(found[0])]
        out, weight, bias = self._affine_chain(b.var, weight, bias, 1, ops)
        out, lo, hi = self._act_chain(out, ops)
        conv = {"strides": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], "groups": xs[1]}
        return _Step("conv", i, out, [x], ops, lo, hi, weight, bias, conv)

    def _plan_conv(self, i, b) -> _Step | None:
        call = b.value
        attrs = call.attrs
        w = const_array(call.args[1])
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
        if w is None or w.ndim != 4 or layouts != ("NCHW", "OIHW", "NCHW"):
            return None
        if not np.issubdtype(w.dtype, np.floating) or not np.all(np.isfinite(w)):
            return None
        ops = ["conv2d"]
        out, weight, bias = self._affine_chain(b.var, w.astype(np.float64), None, 1, ops)
        out, lo, hi = self._act_chain(out, ops)
        conv = {
            "strides": _ints(attrs.strides),
            "padding": _ints(attrs.padding),
            "dilation": _ints(attrs.dilation),
            "groups": int(attrs.groups),
        }
        return _Step("conv", i, out, [call.args[0]], ops, lo, hi, weight, bias, conv)

    def _plan_dense(self, i, b) -> _Step | None:
        call = b.value
        x, w_expr = call.args
        w = const_array(w_expr)
        xs = _shape(x)
        if w is None or w.ndim != 2 or xs is None or len(xs) != 2 or xs[1] != w.shape[0]:
            return None
        if not np.issubdtype(w.dtype, np.floating) or not np.all(np.isfinite(w)):
            return None
        ops = ["matmul"]
        out, weight, bias = self._affine_chain(b.var, w.astype(np.float64), None, 1, ops)
        out, lo, hi = self._act_chain(out, ops)
        return _Step("dense", i, out, src=[x], ops=ops, lo=lo, hi=hi, weight=weight, bias=bias)

    def _plan_avgpool(self, i, b) -> _Step | None:
        call = b.value
        a = call.attrs
        x = call.args[0]
        xs, ys = static_shape(x), static_shape(b.var)
        if str(a.layout) != "NCHW" or str(a.out_layout) != "NCHW" or xs is None or ys is None:
            return None
        pad = _ints(a.padding)
        if any(pad) and not bool(a.count_include_pad):
            return None
        if bool(a.ceil_mode):
            # ceil_mode only matters when it adds a partial window, which a conv cannot average
            kh, kw = _ints(a.pool_size)
            sh, sw = _ints(a.strides)
            dh, dw = _ints(a.dilation)
            floor_h = (xs[2] + pad[0] + pad[2] - dh * (kh - 1) - 1) // sh + 1
            floor_w = (xs[3] + pad[1] + pad[3] - dw * (kw - 1) - 1) // sw + 1
            if (floor_h, floor_w) != tuple(ys[2:]):
                return None
        ops = ["avg_pool2d"]
        out, lo, hi = self._act_chain(b.var, ops)
        return _Step("avgpool", i, out, src=[x], ops=ops, lo=lo, hi=hi)

    def _plan_gap(self, i, b) -> _Step | None:
        call = b.value
        x = call.args[0]
        xs = static_shape(x)
        if xs is None or len(xs) != 4 or call.attrs.axis is None:
            return None
        axes = sorted(int(v) % 4 for v in call.attrs.axis)
        if axes != [2, 3]:
            return None
        ops = ["mean"]
        out, lo, hi = self._act_chain(b.var, ops)
        return _Step("gap", i, out, src=[x], ops=ops, lo=lo, hi=hi)


# --------------------------------------------------------------------------------------------
# emission
# --------------------------------------------------------------------------------------------
def fuse_residuals(steps: list[_Step], graph: _Graph) -> int:
    """Mark each residual add whose operand is a conv2d output read by nothing else (and with
    no activation in between) for fusion: the conv becomes a ``fused`` step, emitted by the add
    (see the module docstring).  Of two eligible operands the later conv is preferred.  Returns the
    number of adds marked.  Which conv is fused (if any) is settled when the add is emitted,
    once the scales are known (:meth:`_Emitter.emit_add`)."""
    conv_of = {s.out: s for s in steps if s.kind == "conv" and s.ops[0] == "conv2d"}
    fused = 0
    for step in steps:
        if step.kind != "add" or step.src[0].same_as(step.src[1]):
            continue
        cands = [
            conv_of[v]
            for v in step.src
            if v in conv_of
            and conv_of[v].lo == -_INF
            and conv_of[v].hi == _INF
            and graph.sole_user(v) == step.index
        ]
        if cands:
            step.fusable = sorted(cands, key=lambda c: -c.index)
            for conv in cands:
                conv.kind = "fused"
            fused += 1
    return fused


class _Rebuilder:
    """Re-emits bindings of a graph into a new function, tracking float and integer versions
    of every original var."""

    def __init__(self, graph: _Graph, cfg: HardwareConfig | None = None, scales=None):
        self.g = graph
        self.cfg = cfg
        self.scales = scales or {}
        self.bb = relax.BlockBuilder()
        self.fmap: dict = {}  # original var -> float/other expr in the new function
        self.qmap: dict = {}  # original var -> (integer var, scale)

    # ---------------------------------------------------------------- value access
    def f(self, var):
        if var in self.fmap:
            return self.fmap[var]
        if var in self.qmap:
            q, s = self.qmap[var]
            self.fmap[var] = qops.emit_dequantize(self.bb, q, s)
            return self.fmap[var]
        raise QuantizeError(f"internal error: {var.name} used before its definition")

    def q(self, var):
        if var not in self.qmap:
            s = self.scales[var]
            self.qmap[var] = (qops.emit_quantize(self.bb, self.f(var), s, self.cfg.act_dtype), s)
        return self.qmap[var]

    def sub(self, expr):
        """``expr`` with every var replaced by its float version in the new function."""
        if isinstance(expr, relax.Var):
            return self.f(expr)
        if isinstance(expr, relax.Call):
            args = [self.sub(a) for a in expr.args]
            if all(a.same_as(b) for a, b in zip(args, expr.args, strict=True)):
                return expr
            return relax.Call(expr.op, args, expr.attrs, expr.ty_args)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self.sub(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(self.sub(expr.tuple_value), expr.index)
        return expr

    def emit_binding(self, b) -> None:
        if isinstance(b, relax.MatchCast):
            self.fmap[b.var] = self.bb.match_cast(self.sub(b.value), b.var.ty)
        else:
            self.fmap[b.var] = self.bb.emit(self.sub(b.value))

    def build(self, name: str, emit_body, outputs) -> relax.Function:
        """Build a function with the original params; ``emit_body()`` emits the bindings and
        ``outputs()`` returns the expression to return."""
        func = self.g.func
        attrs = dict(func.attrs) if func.attrs is not None else {}
        private = "global_symbol" not in attrs
        attrs.pop("global_symbol", None)
        for p in self.g.params:
            self.fmap[p] = p
        with self.bb.function(name, self.g.params, attrs=attrs, private=private):
            with self.bb.dataflow():
                emit_body()
                gv = self.bb.emit_output(outputs())
            self.bb.emit_func_output(gv)
        return self.bb.get()[name]


def _replace_function(mod: tvm.IRModule, gvar, func) -> tvm.IRModule:
    """``mod`` with ``gvar`` bound to ``func`` and PrimFuncs no Relax function calls dropped."""
    out = mod.clone()
    out[gvar] = func
    used = set()
    for f in _relax_functions(out):
        used.update(g.name_hint for g in relax.analysis.all_global_vars(f))
    for g, f in list(out.functions.items()):
        if isinstance(f, tirx.PrimFunc) and g.name_hint not in used:
            del out[g]
    return out


class _Emitter(_Rebuilder):
    def __init__(self, graph, cfg, scales, steps, report):
        super().__init__(graph, cfg, scales)
        self.steps = steps
        self.report = report
        lo, hi = cfg.act_range
        self.act_lo, self.act_hi = lo, hi

    def qbounds(self, lo: float, hi: float, scale: float) -> tuple[int, int]:
        """Activation bounds in the quantized domain of ``scale``."""
        qlo = self.act_lo if lo == -_INF else max(self.act_lo, int(np.round(lo / scale)))
        qhi = self.act_hi if hi == _INF else min(self.act_hi, int(np.round(hi / scale)))
        qlo = min(qlo, self.act_hi)
        return qlo, max(qhi, qlo)

    def multiplier(self, real, step, mult_bits=qops.REQUANT_MULT_BITS):
        try:
            return qops.choose_multiplier(real, mult_bits)
        except ValueError as err:
            raise QuantizeError(f"{step.ops[0]} -> {step.out.name}: {err}") from None

    def quantize_weights(self, w: np.ndarray, bias, s_in: float, s_w_min=None):
        """Per-output-channel symmetric weights (channel on axis 0) and int32 bias.

        ``s_w_min`` (per channel) raises the weight scales to at least those values."""
        cfg = self.cfg
        w_hi = cfg.weight_range[1]
        flat = w.reshape(w.shape[0], -1)
        s_w = np.abs(flat).max(axis=1) / w_hi
        zero = s_w == 0
        # an all-zero channel (e.g. pruned) gets the largest scale of the layer, so it neither
        # widens the shared requantization shift nor overflows its (bias-only) accumulator
        s_w[zero] = s_w[~zero].max() if (~zero).any() else 1.0 / w_hi
        # The accumulator of a channel is bounded by in_peak * sum|wq| + |bq| with
        # |wq| <= |w| / s_w + 1/2 and |bq| <= |b| / (s_in * s_w) + 1/2; wide (int16) configs can
        # exceed int32, so the smallest scale keeping that bound below acc_max is enforced
        # (int8 layers never reach it).
        acc_max = float((1 << (cfg.acc_bits - 1)) - 1)
        in_peak = float(1 << (cfg.act_bits - 1))
        room = acc_max - in_peak * 0.5 * flat.shape[1] - 0.5
        if room <= 0:
            raise QuantizeError(
                f"a reduction of {flat.shape[1]} {cfg.act_dtype} products cannot fit the "
                f"int{cfg.acc_bits} accumulator"
            )
        b_abs = np.abs(bias) if bias is not None else 0.0
        s_w = np.maximum(s_w, (in_peak * np.abs(flat).sum(axis=1) + b_abs / s_in) / room)
        if s_w_min is not None:
            s_w = np.maximum(s_w, s_w_min)
        wq = np.clip(np.round(flat / s_w[:, None]), -w_hi, w_hi)
        bq = np.round(bias / (s_in * s_w)) if bias is not None else None
        wq = wq.reshape(w.shape).astype(cfg.weight_dtype)
        return wq, (bq.astype(np.int32) if bq is not None else None), s_w

    # ---------------------------------------------------------------- steps
    def emit_steps(self) -> None:
        for step in self.steps:
            getattr(self, f"emit_{step.kind}")(step)
            self.report_step(step)

    def report_step(self, step: _Step) -> None:
        if self.report is None:
            return
        chain = "+".join(step.ops)
        shape = _shape(step.out)
        where = f"{chain} -> {step.out.name} {tuple(shape) if shape is not None else ''}".rstrip()
        dt = self.cfg.act_dtype
        if step.kind == "alias" or step.reason == _NOT_AN_OP:
            return  # tuples and renames are bookkeeping, not ops
        if step.kind == "host":
            self.report.append(f"{where}: host float ({step.reason})")
        elif step.kind == "fused":
            return  # reported with the residual add that emits it
        elif step.kind in ("int", "clip"):
            self.report.append(f"{where}: quantized ({dt} {step.ops[0]}, scale kept)")
        else:
            label = _KIND_LABEL[step.kind]
            if step.kind == "conv" and step.ops[0] != "conv2d":
                label = "per-channel affine as depthwise 1x1 conv"
            if step.kind == "add" and step.residual is not None:
                conv = step.residual
                where = f"{'+'.join(conv.ops)}+{where}"
                label = "conv2d with the residual add fused"
            self.report.append(f"{where}: quantized ({label}, {dt})")

    def emit_host(self, step) -> None:
        self.emit_binding(self.g.bindings[step.index])

    def emit_alias(self, step) -> None:
        src = step.src[0]
        if src in self.qmap:
            self.qmap[step.out] = self.qmap[src]
        if src in self.fmap:
            self.fmap[step.out] = self.fmap[src]

    def emit_int(self, step) -> None:
        call = self.g.bindings[step.index].value
        xq, s = self.q(step.src[0])
        new = relax.Call(call.op, [xq, *call.args[1:]], call.attrs, call.ty_args)
        self.qmap[step.out] = (self.bb.emit(new), s)

    def emit_clip(self, step) -> None:
        xq, s = self.q(step.src[0])
        lo, hi = self.qbounds(step.lo, step.hi, s)
        self.qmap[step.out] = (self.bb.emit(relax.op.clip(xq, lo, hi)), s)

    def emit_conv(self, step) -> None:
        c = step.conv
        xq, s_in = self.q(step.src[0])
        s_out = self.scales[step.out]
        wq, bq, s_w = self.quantize_weights(step.weight, step.bias, s_in)
        mult, shift = self.multiplier(s_in * s_w / s_out, step)
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        y = qops.emit_conv2d(
            self.bb, xq, wq, bq, c["strides"], c["padding"], c["dilation"], c["groups"],
            mult, shift, lo, hi, self.cfg.act_dtype,
        )  # fmt: skip
        self.qmap[step.out] = (y, s_out)

    def emit_dense(self, step) -> None:
        xq, s_in = self.q(step.src[0])
        s_out = self.scales[step.out]
        # weights are (K, M): quantize per output column with the channel on axis 0
        wq_t, bq, s_w = self.quantize_weights(step.weight.T, step.bias, s_in)
        mult, shift = self.multiplier(s_in * s_w / s_out, step)
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        wq = np.ascontiguousarray(wq_t.T)
        y = qops.emit_dense(self.bb, xq, wq, bq, mult, shift, lo, hi, self.cfg.act_dtype)
        self.qmap[step.out] = (y, s_out)

    def emit_avgpool(self, step) -> None:
        a = self.g.bindings[step.index].value.attrs
        x = step.src[0]
        xq, s_in = self.q(x)
        s_out = self.scales[step.out]
        channels = static_shape(x)[1]
        kh, kw = _ints(a.pool_size)
        ones = np.ones((channels, 1, kh, kw), self.cfg.weight_dtype)
        mult, shift = self.multiplier(np.full(channels, s_in / (s_out * kh * kw)), step)
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        y = qops.emit_conv2d(
            self.bb, xq, ones, None, _ints(a.strides), _ints(a.padding), _ints(a.dilation),
            channels, mult, shift, lo, hi, self.cfg.act_dtype,
        )  # fmt: skip
        self.qmap[step.out] = (y, s_out)

    def emit_gap(self, step) -> None:
        call = self.g.bindings[step.index].value
        x = step.src[0]
        xq, s_in = self.q(x)
        s_out = self.scales[step.out]
        _, _, h, w = static_shape(x)
        mult, shift = self.multiplier(s_in / (s_out * h * w), step)
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        y = qops.emit_global_avg_pool(self.bb, xq, int(mult), shift, lo, hi, self.cfg.act_dtype)
        if not bool(call.attrs.keepdims):
            y = self.bb.emit(relax.op.reshape(y, static_shape(call)))
        self.qmap[step.out] = (y, s_out)

    def emit_fused(self, step) -> None:
        """Nothing here: the residual add that consumes this conv emits it."""

    def _residual_weights(self, conv: _Step, s_in: float, s_s: float):
        """Weights, bias, scales and shortcut weights ``K`` of a conv with a fused residual, or
        None when ``K`` would be below ``RESIDUAL_MIN_K`` or the accumulator could overflow."""
        cfg = self.cfg
        _, _, s_w = self.quantize_weights(conv.weight, conv.bias, s_in)
        k = np.floor(s_s / (s_in * s_w))
        if k.min() < RESIDUAL_MIN_K or k.max() >= 2**31:
            return None
        s_w = s_s / (s_in * k)  # >= the channel's own scale: its weights still fit
        wq, bq, s_w2 = self.quantize_weights(conv.weight, conv.bias, s_in, s_w_min=s_w)
        if not np.array_equal(s_w2, s_w):  # an overflow bound widened a scale: K inexact
            return None
        in_peak = float(1 << (cfg.act_bits - 1))
        flat = np.abs(wq.reshape(wq.shape[0], -1).astype(np.float64)).sum(axis=1)
        b_abs = np.abs(bq).astype(np.float64) if bq is not None else 0.0
        if np.max(in_peak * (flat + k) + b_abs) >= 2.0 ** (cfg.acc_bits - 1):
            return None
        return wq, bq, s_w, k.astype(np.int32)

    def _scale(self, var) -> float:
        return self.qmap[var][1] if var in self.qmap else self.scales[var]

    def emit_add(self, step) -> None:
        found = short = None
        for conv in step.fusable:  # the first whose shortcut weights qualify
            short = step.src[1] if step.src[0].same_as(conv.out) else step.src[0]
            s_in = self._scale(conv.src[0])
            found = self._residual_weights(conv, s_in, self._scale(short))
            if found is not None:
                step.residual = conv
                break
        for conv in step.fusable:  # the others run as ordinary convs, emitted here
            if conv is not step.residual:
                conv.kind = "conv"
                self.emit_conv(conv)
                self.report_step(conv)
        if step.residual is not None:
            self._emit_add_fused(step, short, *found)
            return
        aq, s_a = self.q(step.src[0])
        bq, s_b = self.q(step.src[1])
        s_out = self.scales[step.out]
        mult, shift = self.multiplier(
            [s_a / s_out, s_b / s_out], step, qops.add_mult_bits(self.cfg.act_bits)
        )
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        y = qops.emit_add(
            self.bb, aq, bq, int(mult[0]), int(mult[1]), shift, lo, hi, self.cfg.act_dtype
        )
        self.qmap[step.out] = (y, s_out)

    def _emit_add_fused(self, step, short, wq, bq, s_w, k) -> None:
        conv = step.residual
        xq, s_in = self.q(conv.src[0])
        sq, _ = self.q(short)
        s_out = self.scales[step.out]
        mult, shift = self.multiplier(s_in * s_w / s_out, step)
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        c = conv.conv
        y = qops.emit_conv2d_residual(
            self.bb, xq, wq, bq, c["strides"], c["padding"], c["dilation"], c["groups"],
            sq, k, mult, shift, lo, hi, self.cfg.act_dtype,
        )  # fmt: skip
        self.qmap[step.out] = (y, s_out)


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------
def _data_params(func: relax.Function) -> list:
    params = list(func.params)
    num_input = func.attrs.get("num_input") if func.attrs is not None else None
    if num_input is not None and int(num_input) < len(params):
        extra = ", ".join(p.name for p in params[int(num_input) :])
        raise QuantizeError(
            f"the weights are function parameters ({extra}): quantize() needs them as "
            "constants (import with keep_params_in_input=False or bind them first, e.g. "
            "relax.transform.BindParams)"
        )
    return params


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _normalise_samples(calibration, params) -> list[list[np.ndarray]]:
    """Calibration samples as lists of arrays in parameter order, checked against the types."""
    if isinstance(calibration, (np.ndarray, dict)):
        calibration = [calibration]
    if not isinstance(calibration, (list, tuple)) or len(calibration) == 0:
        raise QuantizeError(
            "calibration must be a non-empty list of input arrays (one per sample) or of "
            "dicts mapping input names to arrays"
        )
    names = [p.name for p in params]
    samples = []
    for i, sample in enumerate(calibration):
        if isinstance(sample, dict):
            missing = [n for n in names if n not in sample]
            unknown = [k for k in sample if k not in names]
            if missing or unknown:
                raise QuantizeError(
                    f"calibration sample {i}: inputs {sorted(sample)} do not match the "
                    f"model's inputs {names}"
                )
            arrays = [sample[n] for n in names]
        elif isinstance(sample, (list, tuple)) and len(params) > 1:
            arrays = list(sample)
        else:
            arrays = [sample]
        if len(arrays) != len(params):
            raise QuantizeError(
                f"calibration sample {i}: {len(arrays)} input(s) given, the model takes "
                f"{len(params)} ({names}); use dicts name -> array for multi-input models"
            )
        checked = []
        for p, given in zip(params, arrays, strict=True):
            expected = _shape(p)
            dtype = _dtype(p)
            try:
                arr = np.asarray(given, dtype=dtype)
            except (TypeError, ValueError) as err:
                raise QuantizeError(
                    f"calibration sample {i}: input '{p.name}' is not a {dtype} array ({err})"
                ) from None
            if expected is not None and (
                arr.ndim != len(expected)
                or any(
                    isinstance(e, int) and e != d for e, d in zip(expected, arr.shape, strict=True)
                )
            ):
                raise QuantizeError(
                    f"calibration sample {i}: input '{p.name}' has shape "
                    f"{_fmt_shape(arr.shape)}, expected {_fmt_shape(expected)}"
                )
            checked.append(np.ascontiguousarray(arr))
        samples.append(checked)
    return samples


def _calibrate(
    mod, gvar, graph: _Graph, calib_vars: list, *, samples, act_hi: int, percentile=None
) -> dict:
    """Scale (``max|x| / act_hi``) of every var in ``calib_vars`` over all samples; with
    ``percentile`` (e.g. 99.99) the ``percentile``-th percentile of ``|x|`` over all the
    samples' elements replaces the maximum."""
    rb = _Rebuilder(graph)

    def body():
        for b in graph.bindings:
            rb.emit_binding(b)

    instrumented = rb.build(
        gvar.name_hint, body, lambda: relax.Tuple([rb.f(v) for v in calib_vars])
    )
    exe = tvm.compile(_replace_function(mod, gvar, instrumented), target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    peak = np.zeros(len(calib_vars), np.float64)
    top: list = [np.zeros(0)] * len(calib_vars)  # percentile: the largest |x| seen so far
    total = [0] * len(calib_vars)
    for sample in samples:
        outs = vm[gvar.name_hint](*[tvm.runtime.tensor(a) for a in sample])
        for k in range(len(calib_vars)):
            val = outs[k].numpy()
            m = float(np.max(np.abs(val))) if val.size else 0.0
            if not math.isfinite(m):
                raise QuantizeError(
                    f"calibration produced non-finite values in {calib_vars[k].name}"
                )
            peak[k] = max(peak[k], m)
            if percentile is not None and val.size:
                # keep enough of the largest magnitudes to read the percentile at the end (the
                # shapes are static, so the final count is known from the first sample)
                total[k] += val.size
                final = val.size * len(samples)
                keep = int(math.ceil(final * (1.0 - percentile / 100.0))) + 2
                both = np.concatenate([top[k], np.abs(val).reshape(-1)])
                top[k] = np.partition(both, both.size - keep)[-keep:] if keep < both.size else both
    if percentile is not None:
        for k in range(len(calib_vars)):
            if total[k]:
                rank = (percentile / 100.0) * (total[k] - 1)  # numpy's linear percentile
                below = total[k] - top[k].size  # elements left out, all smaller
                vals = np.sort(top[k]).astype(np.float64)
                lo = int(math.floor(rank)) - below
                frac = rank - math.floor(rank)
                if lo >= 0:
                    hi = min(lo + 1, vals.size - 1)
                    peak[k] = float(vals[lo] + frac * (vals[hi] - vals[lo]))
    # a tensor that is zero on every sample gets scale 1/act_hi (any scale represents it)
    return {v: (float(p) if p > 0 else 1.0) / act_hi for v, p in zip(calib_vars, peak, strict=True)}


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------
_NUMPY_FOLD = {
    "relax.add": np.add,
    "relax.subtract": np.subtract,
    "relax.multiply": np.multiply,
    "relax.divide": np.divide,
    "relax.power": np.power,
    "relax.maximum": np.maximum,
    "relax.minimum": np.minimum,
    "relax.where": np.where,
    "relax.sqrt": np.sqrt,
    "relax.rsqrt": lambda a: (1 / np.sqrt(a)).astype(a.dtype),
    "relax.negative": np.negative,
    "relax.isnan": np.isnan,
}


def _eval_const(call, var) -> np.ndarray | None:
    """Evaluate a call on constants with NumPy when it is one of the few ops batch norm
    decomposition and the ONNX importer leave behind (None otherwise)."""
    op = op_name(call)
    shape, dtype = static_shape(var), _dtype(var)
    if op is None or shape is None or dtype is None:
        return None
    args = [const_array(a) for a in call.args]
    if not args or args[0] is None:
        return None
    with np.errstate(all="ignore"):
        if op in _NUMPY_FOLD and all(a is not None for a in args):
            out = np.asarray(_NUMPY_FOLD[op](*args))
        elif op == "relax.expand_dims":
            ndim = args[0].ndim + len(call.attrs.axis)
            out = np.expand_dims(args[0], tuple(int(a) % ndim for a in call.attrs.axis))
        elif op == "relax.permute_dims":
            axes = call.attrs.axes
            out = np.transpose(args[0], None if axes is None else [int(a) for a in axes])
        elif op in ("relax.reshape", "relax.flatten") and args[0].size == math.prod(shape):
            out = args[0].reshape(shape)
        else:
            return None
    if out.shape != shape or str(out.dtype) != dtype:
        return None
    return out.copy(order="C")  # (ascontiguousarray would make a 0-d array 1-d)


def _fold_numpy(mod: tvm.IRModule, gvar) -> tvm.IRModule:
    """Fold constant subexpressions with NumPy and drop inference-time dropouts.

    ``FoldConstant`` compiles one kernel per folded op (about 40 ms each), which made the
    normalisation of a batch-norm network slower than compiling it; the ops batch norm leaves
    behind are evaluated here instead and ``FoldConstant`` only sees what is left.
    ``dropout(x)[0]`` (ONNX Dropout) is ``x`` at inference; the dropout itself becomes dead.
    """
    func = mod[gvar]
    try:
        graph = _Graph(mod, func)
    except QuantizeError:
        return mod
    if not any(
        isinstance(b, relax.VarBinding) and op_name(b.value) is not None for b in graph.bindings
    ):
        return mod
    rb = _Rebuilder(graph)

    dropouts = {
        b.var: b.value.args[0]
        for b in graph.bindings
        if isinstance(b, relax.VarBinding) and op_name(b.value) == "relax.nn.dropout"
    }

    def body():
        for b in graph.bindings:
            value = b.value
            if (
                isinstance(value, relax.TupleGetItem)
                and value.index == 0
                and value.tuple_value in dropouts
            ):
                rb.fmap[b.var] = rb.sub(dropouts[value.tuple_value])
                continue
            if isinstance(b, relax.VarBinding):
                value = rb.sub(b.value)
                folded = _eval_const(value, b.var) if isinstance(value, relax.Call) else None
                if folded is not None:
                    rb.fmap[b.var] = relax.const(folded, _dtype(b.var))
                    continue
            rb.emit_binding(b)

    return _replace_function(
        mod, gvar, rb.build(gvar.name_hint, body, lambda: rb.sub(graph.output))
    )


def normalise(mod: tvm.IRModule, gvar) -> tvm.IRModule:
    """The form of ``mod[gvar]`` the quantizer (and filter pruning) analyse: batch norm
    decomposed for inference, constant subexpressions folded (in NumPy, then ``FoldConstant``),
    bindings canonicalised and dead code removed."""
    mod = relax.transform.DecomposeOpsForInference()(mod)
    mod = _fold_numpy(mod, gvar)
    return tvm.transform.Sequential(
        [
            relax.transform.FoldConstant(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.DeadCodeElimination(),
        ]
    )(mod)


def quantize(
    mod: tvm.IRModule,
    calibration,
    config: HardwareConfig | str | None = None,
    *,
    func_name: str = "main",
    report: list | None = None,
    fuse_residual: bool = True,
    percentile: float | None = None,
) -> tvm.IRModule:
    """Post-training quantization of a float32 Relax model for hapm_fpga.

    Parameters
    ----------
    mod : tvm.IRModule
        Float model, e.g. from ``tvm.relax.frontend.onnx.from_onnx`` with weights as constants.
    calibration : list of numpy.ndarray or list of dict
        Representative inputs, one entry per sample, with the batch dimension the model
        expects; a list of dicts ``input name -> array`` for multi-input models.
    config : HardwareConfig or str, optional
        Accelerator config (``act_bits``/``weight_bits`` choose int8 or int16); resolved with
        :func:`tvm_hapm.target.config.get_config`.
    func_name : str
        The function to quantize.
    report : list, optional
        Receives one line per op: ``"... : quantized (...)"`` or ``"...: host float (reason)"``.
    fuse_residual : bool
        Fuse residual adds into the conv2d producing one operand (see the module docstring);
        False keeps every add a separate layer.
    percentile : float or None
        Calibrate each activation scale on this percentile of ``|x|`` over all calibration
        elements instead of the maximum: rare outliers then saturate rather than coarsen every
        other value.  None (the default) uses the maximum; :data:`DEFAULT_PERCENTILE` is the
        value the HW-Flow benchmark uses.

    Returns
    -------
    tvm.IRModule
        A module with the same signature whose layers are :mod:`qops` integer chains and whose
        other ops run in float on the host between dequantize/quantize pairs.  A model with no
        conv2d/matmul/pooling layer to quantize is returned unchanged (with a warning).

    Raises
    ------
    QuantizeError
        If the model is already quantized, the calibration data does not fit the model's
        inputs, or the model has a structure quantize() cannot handle.
    """
    if not isinstance(mod, tvm.IRModule):
        raise QuantizeError(f"quantize() takes a tvm.IRModule, got {type(mod).__name__}")
    cfg = get_config(config)
    if func_name not in mod or not isinstance(mod[func_name], relax.Function):
        raise QuantizeError(f"the module has no Relax function {func_name!r}")
    if percentile is not None and not 0.0 < float(percentile) <= 100.0:
        raise QuantizeError(f"percentile must be in (0, 100], got {percentile}")
    if is_quantized(mod):
        raise QuantizeError(
            "the model is already quantized (it has an integer conv2d/matmul accumulating in "
            "int32); quantize() takes a float32 model"
        )
    norm = normalise(mod, mod.get_global_var(func_name))
    gvar = norm.get_global_var(func_name)
    func = norm[gvar]
    params = _data_params(func)
    graph = _Graph(norm, func)
    planner = _Planner(graph)
    steps = planner.run()
    if fuse_residual:
        fuse_residuals(steps, graph)
    samples = _normalise_samples(calibration, params)

    accel = [s for s in steps if s.kind in (*_LAYER_KINDS, "fused")]
    if not accel:
        msg = (
            f"quantize(): nothing to quantize in {func_name!r} (no float32 conv2d, matmul with "
            "constant weights or pooling layer); the model is returned unchanged"
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
        if report is not None:
            report.append(f"warning: {msg}")
        return mod.clone()

    # every scale a step reads: accelerated outputs and the float tensors they quantize
    needed = set()
    for s in accel:
        needed.add(s.out)
        needed.update(v for v in s.src if planner.rep.get(v) != "Q")
    order = {v: k for k, v in enumerate(graph.params)}
    order.update({b.var: len(graph.params) + k for k, b in enumerate(graph.bindings)})
    calib_vars = sorted(needed, key=lambda v: order[v])
    scales = _calibrate(
        norm, gvar, graph, calib_vars, samples=samples, act_hi=cfg.act_range[1],
        percentile=percentile,
    )  # fmt: skip

    em = _Emitter(graph, cfg, scales, steps, report)
    new_func = em.build(gvar.name_hint, em.emit_steps, lambda: em.sub(graph.output))
    return _replace_function(norm, gvar, new_func)


def Quantize(  # noqa: N802 (TVM pass factories are CamelCase)
    calibration,
    config: HardwareConfig | str | None = None,
    *,
    func_name: str = "main",
    report=None,
    fuse_residual: bool = True,
    percentile: float | None = None,
) -> tvm.transform.Pass:
    """A module pass running :func:`quantize` with the given calibration data.

    Parameters
    ----------
    calibration : list of numpy.ndarray or list of dict
        See :func:`quantize`.
    config : HardwareConfig or str, optional
        See :func:`quantize`.
    func_name : str
        The function to quantize.
    report : list, optional
        See :func:`quantize`.
    fuse_residual, percentile
        See :func:`quantize`.

    Returns
    -------
    tvm.transform.Pass
        The pass ``hapm.Quantize``.
    """

    def _run(mod, _ctx):
        return quantize(
            mod, calibration, config, func_name=func_name, report=report,
            fuse_residual=fuse_residual, percentile=percentile,
        )  # fmt: skip

    return tvm.transform.module_pass(_run, opt_level=0, name="hapm.Quantize")
