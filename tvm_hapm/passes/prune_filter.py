"""Filter (output-channel) pruning that shrinks the tensors of a float Relax CNN.

:func:`FilterPrune` removes whole output channels of conv2d/dense layers and everything that
only exists for them: the matching input channels of every consumer, per-channel constants
(bias, decomposed batch norm), depthwise filters.  Channels are tracked through the graph as
*channel spaces*:

* a conv2d (``groups=1``) or dense layer starts a new space of its output channels;
* element-wise ops, activations, pooling, global average pooling and per-channel constants
  keep the space of their input;
* a residual ``add`` (or any binary op of two activations) merges the spaces of its operands:
  every conv feeding the same add keeps the same channels (coupled channels);
* a depthwise conv (``groups = C_in = C_out``) keeps the space of its input;
* ``concat`` along channels lays the spaces of its inputs side by side;
* ``reshape`` of ``(N, C, H, W)`` to ``(N, C*H*W)`` (ONNX Flatten) keeps the space, each
  channel now owning ``H*W`` consecutive features.

Spaces that reach a function parameter or the function's output (the logits), or pass through a
grouped (non-depthwise) conv, keep all their channels.  Any other operator reading a channel
tensor is refused with a :class:`~tvm_hapm.passes.prune.PruneError` naming it.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from ..target.config import HardwareConfig, get_config
from .prune import (
    REPORT_ATTR,
    PruneError,
    check_criterion,
    check_per_layer,
    check_sparsity,
    layer_name,
)
from .relax_util import const_array, minmax_prim, module_pass, op_name, static_shape

__all__ = ["FilterPrune", "filter_prune"]

_UNARY = {
    "relax.nn.relu",
    "relax.nn.relu6",
    "relax.nn.leakyrelu",
    "relax.nn.gelu",
    "relax.nn.silu",
    "relax.sigmoid",
    "relax.tanh",
    "relax.clip",
    "relax.nn.max_pool2d",
    "relax.nn.avg_pool2d",
    "relax.astype",
    "relax.negative",
}
_BINARY = {
    "relax.add",
    "relax.subtract",
    "relax.multiply",
    "relax.divide",
    "relax.maximum",
    "relax.minimum",
}


def _normalise(mod: tvm.IRModule) -> tvm.IRModule:
    """Decompose batch norm and fold constants in every Relax function: the quantizer's
    normalisation (:func:`tvm_hapm.passes.quantize.normalise`), so that both see one form."""
    from .quantize import normalise

    for gv, _ in list(mod.functions_items()):
        if isinstance(mod[gv], relax.Function):
            mod = normalise(mod, mod.get_global_var(gv.name_hint))
    return mod


class _Spaces:
    """Union-find of channel spaces."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: list[bool] = []
        self.why: list[str] = []

    def new(self, size: int, frozen: bool = False, why: str = "") -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.frozen.append(frozen)
        self.why.append(why)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, op: str) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] != self.size[b]:
            raise PruneError(f"{op}: operands with {self.size[a]} and {self.size[b]} channels")
        lo, hi = min(a, b), max(a, b)
        self.parent[hi] = lo
        if self.frozen[hi]:
            self.frozen[lo], self.why[lo] = True, self.why[hi]

    def freeze(self, s: int, why: str) -> None:
        r = self.find(s)
        if not self.frozen[r]:
            self.frozen[r], self.why[r] = True, why


def _segs_equal_layout(a, b) -> bool:
    return len(a) == len(b) and all(x[1] == y[1] for x, y in zip(a, b))


class _Analysis:
    """Channel spaces of every var of one function (segments ``[(space, mult), ...]`` along the
    channel axis, axis 1)."""

    def __init__(self, gv, func: relax.Function, sp: _Spaces, layers: dict):
        self.gv, self.func, self.sp, self.layers = gv, func, sp, layers
        self.segs: dict = {}
        self.bindings = [b for block in func.body.blocks for b in block.bindings]
        for p in func.params:
            shape = static_shape(p)
            if shape is not None and len(shape) >= 2:
                self.segs[p] = [(sp.new(shape[1], True, f"input {p.name}"), 1)]
        for b in self.bindings:
            self.visit(b)
        out_vars: list = []
        _collect_vars(func.body.body, out_vars)
        for v in out_vars:
            for s, _ in self.segs.get(v, []):
                sp.freeze(s, "reaches the output")

    def _in(self, expr):
        return self.segs.get(expr) if isinstance(expr, relax.Var) else None

    def visit(self, b) -> None:
        value = b.value
        if isinstance(value, relax.Var):
            if value in self.segs:
                self.segs[b.var] = self.segs[value]
            return
        op = op_name(value)
        args = list(value.args) if isinstance(value, relax.Call) else []
        in_segs = [self._in(a) for a in args]
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            pass
        elif isinstance(value, (relax.Tuple, relax.TupleGetItem, relax.Call)):
            fields = []
            _collect_vars(value, fields)
            if any(v in self.segs for v in fields):
                raise PruneError(
                    f"FilterPrune cannot follow channels through {_describe(value)} "
                    f"(binding {b.var.name})"
                )
            return
        if not isinstance(b, relax.VarBinding):
            if any(s is not None for s in in_segs):
                raise PruneError(
                    f"FilterPrune cannot follow channels through match_cast ({b.var.name})"
                )
            return
        refs: list = []
        _collect_vars(value, refs)
        if not any(v in self.segs for v in refs):
            return  # shape or constant computation: no channel tensor involved
        out_shape = static_shape(b.var)
        name = layer_name(self.gv, b.var)
        if op == "relax.nn.conv2d":
            self._conv(b, value, in_segs[0], name)
        elif op == "relax.matmul":
            self._dense(b, value, in_segs, name)
        elif op in _UNARY:
            self.segs[b.var] = in_segs[0]
        elif op == "relax.call_tir" and value in _MINMAX_CACHE:
            self.segs[b.var] = self._in(value.args[1].fields[0])
        elif op in _BINARY:
            self._binary(b, value, in_segs, op)
        elif op == "relax.mean":
            axes = sorted(int(a) % len(static_shape(args[0])) for a in (value.attrs.axis or []))
            if axes != [2, 3] or out_shape is None:
                raise PruneError(f"FilterPrune: {op} over axes {axes} of a channel tensor")
            self.segs[b.var] = in_segs[0]
        elif op in ("relax.reshape", "relax.flatten"):
            self._reshape(b, value, in_segs[0], op)
        elif op == "relax.concat" and int(value.attrs.axis) % len(out_shape) == 1:
            fields = value.args[0].fields
            segs = []
            for f in fields:
                s = self._in(f)
                if s is None:
                    raise PruneError("FilterPrune: concat of a channel tensor with a constant")
                segs.extend(s)
            self.segs[b.var] = segs
        else:
            raise PruneError(
                f"FilterPrune cannot follow channels through operator {op or _describe(value)} "
                f"(binding {b.var.name})"
            )

    def _conv(self, b, call, segs, name):
        a = call.attrs
        w = const_array(call.args[1])
        layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout))
        if w is None or layouts != ("NCHW", "OIHW", "NCHW") or any(m != 1 for _, m in segs):
            raise PruneError(f"FilterPrune: conv2d {b.var.name} without a constant OIHW weight")
        cout, cin_g = w.shape[:2]
        groups = int(a.groups)
        cin = cin_g * groups
        if groups == 1:
            out = self.sp.new(cout)
            self.layers[name] = {"kind": "conv2d", "in": segs, "out": out, "var": b.var}
            self.segs[b.var] = [(out, 1)]
        elif groups == cin == cout:
            self.layers[name] = {"kind": "depthwise", "in": segs, "out": None, "var": b.var}
            self.segs[b.var] = segs
        else:
            for s, _ in segs:
                self.sp.freeze(s, f"grouped conv {name}")
            out = self.sp.new(cout, True, f"grouped conv {name}")
            self.layers[name] = {"kind": "frozen", "in": segs, "out": out, "var": b.var}
            self.segs[b.var] = [(out, 1)]

    def _dense(self, b, call, in_segs, name):
        w = const_array(call.args[1])
        if w is None or w.ndim != 2 or in_segs[1] is not None or len(static_shape(b.var)) != 2:
            raise PruneError(
                f"FilterPrune: matmul {b.var.name} needs a constant 2-D weight "
                "(run FoldConstant first)"
            )
        out = self.sp.new(w.shape[1])
        self.layers[name] = {"kind": "dense", "in": in_segs[0], "out": out, "var": b.var}
        self.segs[b.var] = [(out, 1)]

    def _binary(self, b, call, in_segs, op):
        x, y = in_segs
        if x is not None and y is not None:
            if not _segs_equal_layout(x, y):
                raise PruneError(f"FilterPrune: {op} {b.var.name} of differently laid out channels")
            for (s, _), (t, _) in zip(x, y):
                self.sp.union(s, t, f"{op} {b.var.name}")
            self.segs[b.var] = x
            return
        segs = x if x is not None else y
        other = call.args[1] if x is not None else call.args[0]
        if const_array(other) is None and isinstance(other, relax.Var):
            raise PruneError(f"FilterPrune: {op} {b.var.name} with an operand of unknown channels")
        self.segs[b.var] = segs

    def _reshape(self, b, call, segs, op):
        src = static_shape(call.args[0])
        dst = static_shape(b.var)
        if src is None or dst is None:
            raise PruneError(f"FilterPrune: {op} {b.var.name} with a dynamic shape")
        if len(dst) == 2 and dst[0] == src[0] and len(src) >= 2:
            inner = int(np.prod(src[2:], dtype=np.int64))
            self.segs[b.var] = [(s, m * inner) for s, m in segs]
        elif (
            tuple(dst[:2]) == tuple(src[:2])
            and np.prod(dst[2:]) == np.prod(src[2:])
            and all(m == 1 for _, m in segs)
        ):
            self.segs[b.var] = segs
        else:
            raise PruneError(f"FilterPrune: {op} {b.var.name} {src} -> {dst} mixes channels")


def _collect_vars(expr, out: list) -> None:
    if isinstance(expr, relax.Var):
        out.append(expr)
    elif isinstance(expr, relax.Tuple):
        for f in expr.fields:
            _collect_vars(f, out)
    elif isinstance(expr, relax.TupleGetItem):
        _collect_vars(expr.tuple_value, out)
    elif isinstance(expr, relax.Call):
        for a in expr.args:
            _collect_vars(a, out)


def _describe(value) -> str:
    op = op_name(value)
    if op == "relax.call_tir" and isinstance(value.args[0], tvm.ir.GlobalVar):
        return f"call_tir({value.args[0].name_hint})"
    return op or type(value).__name__


#: call_tir node -> ("max" | "min", bound): the Clip kernels from_onnx emits (see _scan_minmax)
_MINMAX_CACHE: dict = {}


def _scan_minmax(mod: tvm.IRModule) -> None:

    _MINMAX_CACHE.clear()
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue

        def visit(node):
            if op_name(node) != "relax.call_tir" or not isinstance(node.args[0], tvm.ir.GlobalVar):
                return
            fields = list(node.args[1].fields) if isinstance(node.args[1], relax.Tuple) else []
            kind = minmax_prim(mod[node.args[0]]) if node.args[0] in mod else None
            if kind is None or not fields:
                return
            if kind[1] is not None and len(fields) == 1:
                bound = relax.const(kind[1], _static_dtype(fields[0]))
            elif kind[1] is None and len(fields) == 2 and const_array(fields[1]) is not None:
                bound = fields[1]
            else:
                return
            _MINMAX_CACHE[node] = (kind[0], bound)

        relax.analysis.post_order_visit(func, visit)


def _static_dtype(expr) -> str:
    return str(expr.ty.dtype)


# --------------------------------------------------------------------------------------------
def _kept_index(sp: _Spaces, kept: dict, segs) -> np.ndarray:
    """Indices kept along a channel axis laid out as ``segs``."""
    out, base = [], 0
    for s, m in segs:
        r = sp.find(s)
        k = kept.get(r)
        n = sp.size[r]
        idx = np.arange(n) if k is None else k
        out.append(base + (idx[:, None] * m + np.arange(m)[None, :]).reshape(-1))
        base += n * m
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _axis_len(sp: _Spaces, segs) -> int:
    return sum(sp.size[sp.find(s)] * m for s, m in segs)


def filter_prune(
    mod: tvm.IRModule,
    sparsity: float,
    config: HardwareConfig | str | None = None,
    criterion: str = "l2",
    round_to: int | None = None,
    per_layer: dict | None = None,
    shrink: bool = True,
    report: list | None = None,
) -> tvm.IRModule:
    """Function form of :func:`FilterPrune` (same parameters, plus ``mod``)."""
    sparsity = check_sparsity(sparsity)
    criterion = check_criterion(criterion)
    per_layer = check_per_layer(per_layer)
    cfg = get_config(config)
    if round_to is None:
        round_to = cfg.array_cols
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise PruneError(f"round_to must be a positive integer, got {round_to!r}")
    mod = _normalise(mod)
    _scan_minmax(mod)
    try:
        return _filter_prune(mod, sparsity, criterion, int(round_to), per_layer, shrink, report)
    finally:
        _MINMAX_CACHE.clear()


def _filter_prune(mod, sparsity, criterion, round_to, per_layer, shrink, report):
    sp = _Spaces()
    analyses = []
    layers: dict = {}
    for gv, func in sorted(mod.functions_items(), key=lambda kv: kv[0].name_hint):
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            analyses.append(_Analysis(gv, func, sp, layers))
    unknown = sorted(set(per_layer) - set(layers))
    if unknown:
        raise PruneError(f"per_layer names unknown layers {unknown}; layers: {sorted(layers)}")

    # channel importance per root space, from the layers producing it
    weights = {}
    for a in analyses:
        for b in a.bindings:
            name = layer_name(a.gv, b.var)
            if name in layers:
                weights[name] = const_array(b.value.args[1])
    score: dict = {}
    producers: dict = {}
    for name, lay in layers.items():
        if lay["kind"] not in ("conv2d", "dense"):
            continue
        w = weights[name]
        per_out = w.reshape(w.shape[0], -1) if lay["kind"] == "conv2d" else w.T
        v = np.abs(per_out) if criterion == "l1" else per_out.astype(np.float64) ** 2
        r = sp.find(lay["out"])
        score[r] = score.get(r, 0.0) + v.sum(axis=1)
        producers.setdefault(r, []).append(name)

    kept: dict = {}
    spaces = []
    for r in sorted(producers):
        n = sp.size[r]
        names = producers[r]
        target = max([per_layer[nm] for nm in names if nm in per_layer], default=sparsity)
        entry = {"space": len(spaces), "layers": names, "channels": n, "target_sparsity": target}
        if sp.frozen[r]:
            entry.update(kept_channels=n, reason=sp.why[r])
        else:
            keep = n - int(round(target * n))
            keep = max(round_to, int(round(keep / round_to)) * round_to)
            if keep >= n:
                entry.update(kept_channels=n, reason=f"{n} channels: nothing to round to")
            else:
                imp = score[r] if criterion == "l1" else np.sqrt(score[r])
                order = np.lexsort((np.arange(n), -imp))
                kept[r] = np.sort(order[:keep])
                entry.update(
                    kept_channels=keep,
                    removed=[int(i) for i in np.setdiff1d(np.arange(n), kept[r])],
                )
        spaces.append(entry)

    out = mod.clone()
    entries = []
    for a in analyses:
        out[a.gv] = _rewrite(a, sp, kept, layers, shrink, entries, out)
    summary = [
        {"method": "filter", "round_to": round_to, "criterion": criterion, **s} for s in spaces
    ]
    rep = summary + entries
    if report is not None:
        report.extend(rep)
    return out.with_attr(REPORT_ATTR, json.dumps(rep, sort_keys=True))


def _slice(arr: np.ndarray, axis: int, idx: np.ndarray, shrink: bool) -> np.ndarray:
    if shrink:
        return np.take(arr, idx, axis=axis)
    keep = np.zeros(arr.shape[axis], bool)
    keep[idx] = True
    shape = [1] * arr.ndim
    shape[axis] = -1
    return np.where(keep.reshape(shape), arr, np.zeros((), arr.dtype))


def _rewrite(a: _Analysis, sp, kept, layers, shrink, entries, mod) -> relax.Function:
    func = a.func
    bb = relax.BlockBuilder()
    vmap: dict = {}

    def sub(expr):
        if isinstance(expr, relax.Var):
            return vmap.get(expr, expr)
        if isinstance(expr, relax.Call):
            return relax.Call(expr.op, [sub(x) for x in expr.args], expr.attrs, expr.ty_args)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([sub(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(sub(expr.tuple_value), expr.index)
        return expr

    def idx(segs):
        return _kept_index(sp, kept, segs)

    def rebuilt(b):
        value = b.value
        op = op_name(value)
        name = layer_name(a.gv, b.var)
        if name in layers:
            lay = layers[name]
            w = const_array(value.args[1])
            in_idx = idx(lay["in"])
            new_attrs = None
            if lay["kind"] == "conv2d" or lay["kind"] == "frozen":
                out_idx = idx([(lay["out"], 1)])
                if lay["kind"] == "conv2d":
                    w = _slice(_slice(w, 1, in_idx, shrink), 0, out_idx, shrink)
            elif lay["kind"] == "depthwise":
                out_idx = in_idx
                w = _slice(w, 0, in_idx, shrink)
                if shrink:
                    new_attrs = len(in_idx)
            else:  # dense
                out_idx = idx([(lay["out"], 1)])
                w = _slice(_slice(w, 0, in_idx, shrink), 1, out_idx, shrink)
            entries.append(
                {
                    "layer": name,
                    "kind": lay["kind"],
                    "method": "filter",
                    "in_channels": [int(_axis_len(sp, lay["in"])), int(len(in_idx))],
                    "out_channels": [int(static_shape(b.var)[1]), int(len(out_idx))],
                    "sparsity": round(1 - w.size / const_array(value.args[1]).size, 6)
                    if shrink
                    else round(float(np.mean(w == 0)), 6),
                }
            )
            x = sub(value.args[0])
            wc = relax.const(w, str(w.dtype))
            if op == "relax.matmul":
                return relax.op.matmul(x, wc, out_dtype=_out_dtype(value.attrs))
            at = value.attrs
            return relax.op.nn.conv2d(
                x, wc,
                strides=[int(v) for v in at.strides],
                padding=[int(v) for v in at.padding],
                dilation=[int(v) for v in at.dilation],
                groups=new_attrs if new_attrs is not None else int(at.groups),
                data_layout=str(at.data_layout),
                kernel_layout=str(at.kernel_layout),
                out_layout=str(at.out_layout),
                out_dtype=_out_dtype(at),
            )  # fmt: skip
        if op == "relax.call_tir" and value in _MINMAX_CACHE:
            kind, bound = _MINMAX_CACHE[value]
            x = sub(value.args[1].fields[0])
            fn = relax.op.maximum if kind == "max" else relax.op.minimum
            return fn(x, bound)
        if op in _BINARY and shrink:
            args = list(value.args)
            for k in (0, 1):
                c = const_array(args[k])
                other = a.segs.get(args[1 - k]) if isinstance(args[1 - k], relax.Var) else None
                if c is not None and other is not None:
                    ndim = len(static_shape(args[1 - k]))
                    axis = c.ndim - (ndim - 1)  # channel axis 1 aligned from the right
                    if 0 <= axis < c.ndim and c.shape[axis] > 1:
                        c = _slice(c, axis, idx(other), shrink)
                        args[k] = relax.const(c, str(c.dtype))
            return relax.Call(value.op, [sub(x) for x in args], value.attrs, value.ty_args)
        if op in ("relax.reshape", "relax.flatten") and b.var in a.segs and shrink:
            dst = list(static_shape(b.var))
            dst[1] = len(idx(a.segs[b.var]))
            return relax.op.reshape(sub(value.args[0]), dst)
        return sub(value)

    attrs = dict(func.attrs) if func.attrs is not None else {}
    private = "global_symbol" not in attrs
    attrs.pop("global_symbol", None)
    for p in func.params:
        vmap[p] = p
    name = a.gv.name_hint
    with bb.function(name, list(func.params), attrs=attrs, private=private):
        with bb.dataflow():
            for b in a.bindings:
                if isinstance(b, relax.MatchCast):
                    vmap[b.var] = bb.match_cast(sub(b.value), b.var.ty)
                else:
                    new = bb.emit(rebuilt(b), name_hint=b.var.name)
                    vmap[b.var] = new
            gv = bb.emit_output(sub(func.body.body))
        bb.emit_func_output(gv)
    return bb.get()[name]


def _out_dtype(attrs):
    dt = str(getattr(attrs, "out_dtype", "") or "")
    return None if dt in ("", "void", "None") else dt


def FilterPrune(  # noqa: N802 (TVM pass factories are CamelCase)
    sparsity: float,
    config: HardwareConfig | str | None = None,
    criterion: str = "l2",
    round_to: int | None = None,
    *,
    per_layer: dict | None = None,
    shrink: bool = True,
    report: list | None = None,
) -> tvm.transform.Pass:
    """Remove output channels (filters) and shrink the tensors that carried them.

    The module is first normalised (batch norm decomposed into per-channel constants, constants
    folded, ``permute_dims`` of weights folded).  Channels are grouped into spaces (see the
    module docstring); each prunable space keeps its most important channels, where a channel's
    importance is the L1 or L2 norm of its filters summed over every conv/dense layer producing
    the space (all convs feeding a residual add).  The kept count is
    ``n - round(sparsity * n)`` rounded to the nearest multiple of ``round_to`` (at least
    ``round_to``); a space of at most ``round_to`` channels keeps them all.

    Parameters
    ----------
    sparsity : float
        Fraction of each space's channels to remove, in ``[0, 1)``.
    config : HardwareConfig or str, optional
        Accelerator config; ``round_to`` defaults to its ``array_cols``.
    criterion : {"l1", "l2"}
        Filter importance.
    round_to : int, optional
        Kept channel counts are multiples of this.
    per_layer : dict, optional
        Layer name -> sparsity for the space that layer produces (the largest given wins for
        coupled layers).
    shrink : bool
        ``True`` removes the channels; ``False`` keeps the shapes and zeroes the removed
        channels' filters and the consumers' weights reading them (same function, for
        fine-tuning with fixed masks or for checking).
    report : list, optional
        Receives one entry per space and per layer (also in ``"hapm.prune_report"``).

    Returns
    -------
    tvm.transform.Pass
        The module pass ``hapm.FilterPrune``.

    Raises
    ------
    PruneError
        (a ``ValueError``) for bad arguments or an operator the channel analysis cannot follow
        (the message names it).
    """
    check_sparsity(sparsity)
    check_criterion(criterion)
    check_per_layer(per_layer)
    cfg = get_config(config)

    def run(mod):
        return filter_prune(mod, sparsity, cfg, criterion, round_to, per_layer, shrink, report)

    return module_pass(run, "hapm.FilterPrune")
