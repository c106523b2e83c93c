"""Planning: which bindings of a float function become which integer layers.

Every binding becomes an accelerated layer (conv2d, dense, average pooling as an all-ones
depthwise conv, global average pooling, residual add, a leftover per-channel affine chain on an
integer tensor as a depthwise 1x1 conv; each with its trailing ReLU/ReLU6/Clip folded into the
requantization bounds), a scale-preserving integer op (max pooling, reshape-like ops, an unfused
clip), or a host float op (dequantize -> float op -> quantize where an integer consumer needs
it).  Batch norm and conv/Gemm bias adds (left as per-channel affine ops by
:func:`~tvm_hapm.passes.quantize.fold.normalise`) are folded, in float64, into the weights and
bias of the preceding conv2d/matmul by absorbing the chain of per-channel affine ops after it.

:class:`Planner` turns a :class:`~tvm_hapm.passes.quantize.graph.Graph` into a list of
:class:`Step`; :func:`fuse_residuals` then marks the residual adds that may absorb the conv2d
producing one of their operands (the scheme is in :mod:`tvm_hapm.passes.quantize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from ...target.schedule import conv_output_size
from ..relax_util import const_array, minmax_prim, op_name, static_shape
from .graph import (
    CONV_OP,
    MATMUL_OP,
    Graph,
    QuantizeError,
    int_list,
    is_f32,
    tensor_dtype,
    tensor_shape,
)

__all__ = ["DENSE_NEEDS_WEIGHT", "LAYER_KINDS", "NOT_AN_OP", "Planner", "Step", "fuse_residuals"]

_AFFINE_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")
_SHAPE_OPS = (
    "relax.reshape",
    "relax.flatten",
    "relax.squeeze",
    "relax.permute_dims",
    "relax.expand_dims",
)
_INF = math.inf
#: Reason of a host step whose binding is not an operator call (a tuple, a tuple item...): the
#: report leaves such bookkeeping out.
NOT_AN_OP = "not an operator call"
#: Reason of a host matmul that is not a layer (no 2-D constant weight, e.g. of two activations).
DENSE_NEEDS_WEIGHT = "matmul without a 2-D constant weight"
#: Steps that emit an accelerated layer (they requantize to a calibrated output scale).
LAYER_KINDS = ("conv", "dense", "avgpool", "gap", "add")
#: Steps whose result is an integer tensor.
_INT_KINDS = (*LAYER_KINDS, "int", "clip")


def _short(op: str) -> str:
    return op[len("relax.") :] if op.startswith("relax.") else op


def _scalar(expr) -> float | None:
    """Value of a scalar constant or a PrimExpr immediate."""
    arr = const_array(expr)
    if arr is not None:
        return float(arr.reshape(-1)[0]) if arr.size == 1 else None
    value = getattr(expr, "value", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


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
class Step:
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
    residual: Step | None = None  # add step: the conv step fused into it
    fusable: list = field(default_factory=list)  # add step: convs it may fuse, preferred first


class Planner:
    """Decides, binding by binding, what each op of ``graph`` becomes (:meth:`run`).

    Parameters
    ----------
    graph : Graph
        The normalised float function.

    Attributes
    ----------
    rep : dict
        Var -> ``"Q"`` (the planned function holds it as an integer tensor) or ``"F"`` (a float
        tensor or another value).
    absorbed : set
        Indices of the bindings folded into an earlier step (affine chains, activations).
    steps : list of Step
        The plan, in binding order.
    """

    def __init__(self, graph: Graph):
        self.g = graph
        self.rep: dict = {}  # var -> "Q" (integer tensor) | "F" (float or other value)
        self.absorbed: set = set()
        self.steps: list[Step] = []

    # ---------------------------------------------------------------- recognisers
    def _act_bounds(self, value, var) -> tuple[float, float] | None:
        """Bounds of an activation applied to ``var`` (ReLU, ReLU6, clip, max/min by a scalar)."""
        op = op_name(value)
        if (
            op is None
            or tensor_shape(value) != tensor_shape(var)
            or tensor_dtype(value) != tensor_dtype(var)
        ):
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
        if op not in _AFFINE_OPS or tensor_shape(value) != tensor_shape(var) or not is_f32(value):
            return None
        a, b = value.args
        if a.same_as(var) and not b.same_as(var):
            const = const_array(b)
        elif b.same_as(var) and op in ("relax.add", "relax.multiply"):
            const = const_array(a)
        else:
            return None
        ndim = len(tensor_shape(var))
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
    def run(self) -> list[Step]:
        """Plan every binding that no earlier step absorbed; returns :attr:`steps`."""
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

    def _host(self, i, b, reason: str) -> Step:
        return Step("host", i, b.var, ops=[self._op_label(b.value)], reason=reason)

    def _plan(self, i, b) -> Step:
        if not isinstance(b, relax.VarBinding):
            return self._host(i, b, "match_cast")
        value = b.value
        if isinstance(value, relax.Var):
            return Step("alias", i, b.var, src=[value], ops=["alias"])
        op = op_name(value)
        if op is None:
            return self._host(i, b, NOT_AN_OP)
        if not is_f32(b.var):
            return self._host(i, b, "result is not a float32 tensor")
        args = list(value.args)
        x = args[0] if args else None
        x_is_tensor = isinstance(x, relax.Var) and is_f32(x)
        if op == CONV_OP and x_is_tensor:
            return self._plan_conv(i, b) or self._host(i, b, "conv2d layout/weights unsupported")
        if op == MATMUL_OP and x_is_tensor:
            return self._plan_dense(i, b) or self._host(i, b, DENSE_NEEDS_WEIGHT)
        if op == "relax.nn.avg_pool2d" and x_is_tensor:
            return self._plan_avgpool(i, b) or self._host(i, b, "avg_pool2d form unsupported")
        if op == "relax.mean" and x_is_tensor:
            return self._plan_gap(i, b) or self._host(i, b, "mean over axes other than [2, 3]")
        if op == "relax.add" and self._is_residual(value):
            if all(self.rep.get(a) == "Q" for a in args):
                ops = ["add"]
                out, lo, hi = self._act_chain(b.var, ops)
                return Step("add", i, out, src=args, ops=ops, lo=lo, hi=hi)
            return self._host(i, b, "an operand is a float tensor")
        if x_is_tensor and self.rep.get(x) == "Q":
            if op in _AFFINE_OPS:
                step = self._plan_channel_affine(i, b, x)
                if step is not None:
                    return step
            if op == "relax.nn.max_pool2d" or op in _SHAPE_OPS:
                return Step("int", i, b.var, src=[x], ops=[_short(op)])
            if self._act_bounds(value, x) is not None:
                ops: list = []
                # follow the chain from x so that consecutive activations merge into one clip
                out, lo, hi = self._act_chain(x, ops)
                if out.same_as(x):  # x has other users: clip this binding alone
                    lo, hi = self._act_bounds(value, x)
                    ops, out = [self._op_label(value)], b.var
                return Step("clip", i, out, src=[x], ops=ops, lo=lo, hi=hi)
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
            and is_f32(a)
            and is_f32(b)
            and static_shape(a) is not None
            and static_shape(a) == static_shape(b) == static_shape(value)
        )

    def _plan_channel_affine(self, i, b, x) -> Step | None:
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
        return Step("conv", i, out, [x], ops, lo, hi, weight, bias, conv)

    def _plan_conv(self, i, b) -> Step | None:
        call = b.value
        attrs = call.attrs
        w = const_array(call.args[1])
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
        if w is None or w.ndim != 4 or layouts != ("NCHW", "OIHW", "NCHW"):
            return None
        if not np.issubdtype(w.dtype, np.floating):
            return None
        _check_finite(w, b.var, "conv2d")
        ops = ["conv2d"]
        out, weight, bias = self._affine_chain(b.var, w.astype(np.float64), None, 1, ops)
        out, lo, hi = self._act_chain(out, ops)
        conv = {
            "strides": int_list(attrs.strides),
            "padding": int_list(attrs.padding),
            "dilation": int_list(attrs.dilation),
            "groups": int(attrs.groups),
        }
        return Step("conv", i, out, [call.args[0]], ops, lo, hi, weight, bias, conv)

    def _plan_dense(self, i, b) -> Step | None:
        call = b.value
        x, w_expr = call.args
        w = const_array(w_expr)
        xs = tensor_shape(x)
        if w is None or w.ndim != 2 or xs is None or len(xs) != 2 or xs[1] != w.shape[0]:
            return None
        if not np.issubdtype(w.dtype, np.floating):
            return None
        _check_finite(w, b.var, "matmul")
        ops = ["matmul"]
        out, weight, bias = self._affine_chain(b.var, w.astype(np.float64), None, 1, ops)
        out, lo, hi = self._act_chain(out, ops)
        return Step("dense", i, out, src=[x], ops=ops, lo=lo, hi=hi, weight=weight, bias=bias)

    def _plan_avgpool(self, i, b) -> Step | None:
        call = b.value
        a = call.attrs
        x = call.args[0]
        xs, ys = static_shape(x), static_shape(b.var)
        if str(a.layout) != "NCHW" or str(a.out_layout) != "NCHW" or xs is None or ys is None:
            return None
        pad = int_list(a.padding)
        if any(pad) and not bool(a.count_include_pad):
            return None
        if bool(a.ceil_mode):
            # ceil_mode only matters when it adds a partial window, which a conv cannot average
            kh, kw = int_list(a.pool_size)
            sh, sw = int_list(a.strides)
            dh, dw = int_list(a.dilation)
            floor_h = conv_output_size(xs[2], pad[0], pad[2], kh, sh, dh)
            floor_w = conv_output_size(xs[3], pad[1], pad[3], kw, sw, dw)
            if (floor_h, floor_w) != tuple(ys[2:]):
                return None
        ops = ["avg_pool2d"]
        out, lo, hi = self._act_chain(b.var, ops)
        return Step("avgpool", i, out, src=[x], ops=ops, lo=lo, hi=hi)

    def _plan_gap(self, i, b) -> Step | None:
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
        return Step("gap", i, out, src=[x], ops=ops, lo=lo, hi=hi)


# --------------------------------------------------------------------------------------------
# residual fusion
# --------------------------------------------------------------------------------------------
def _check_finite(weight: np.ndarray, var, op: str) -> None:
    """Refuse a layer whose weights hold NaN or infinities (no int8 scale represents them)."""
    bad = int(weight.size - np.isfinite(weight).sum())
    if bad:
        raise QuantizeError(
            f"the {op} producing '{var.name}' has {bad} NaN or infinite weight(s) of "
            f"{weight.size}; no integer layer can represent them"
        )


def fuse_residuals(steps: list[Step], graph: Graph) -> int:
    """Mark each residual add whose operand is a conv2d output read by nothing else (and with
    no activation in between) for fusion: the conv becomes a ``fused`` step, emitted by the add
    (see :mod:`tvm_hapm.passes.quantize`).  Of two eligible operands the later conv is
    preferred.  Returns the number of adds marked.  Which conv is fused (if any) is settled when
    the add is emitted, once the scales are known
    (:meth:`tvm_hapm.passes.quantize.emit.Emitter.emit_add`)."""
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
