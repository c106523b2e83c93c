"""Weight pruning of float Relax CNNs, aligned with what the hapm_fpga accelerator skips.

The accelerator drops every all-zero ``R x C`` weight block at compile time (no DRAM bytes, no
LOAD, no GEMM), and one *dispatch* of its ``P`` parallel arrays consumes the blocks of
``cob_group`` output-channel blocks at one ``(input-channel block, kh, kw)``.  Pruning whole
dispatch groups therefore turns sparsity into fewer instructions; unstructured pruning at the
same sparsity almost never empties a block.  See ``docs/pruning.md``.

Three passes, ordinary :class:`tvm.transform.Pass` objects working on the *float* Relax module
(``tvm.relax.frontend.onnx.from_onnx`` output, before :func:`tvm_hapm.quantize`):

* :func:`HardwareAwarePrune`: zeroes whole hardware groups (see :func:`hapm_groups`).
* :func:`MagnitudePrune`: unstructured magnitude pruning (the baseline).
* :func:`FilterPrune` (in :mod:`tvm_hapm.passes.prune_filter`): removes output channels and
  shrinks the tensors, following residual adds, concatenations and depthwise convolutions.

Layers are the ``relax.nn.conv2d`` calls with a constant OIHW weight and the ``relax.matmul``
calls with a constant 2-D weight (directly or behind ``permute_dims`` of a constant); a layer is
named by the Relax variable its call is bound to (e.g. ``"lv5"``; functions other than ``main``
prefix it with ``"<function>/"``).  :func:`prunable_layers` lists them.

Every pass returns a new module (the input is not changed), is deterministic and records what it
did in the module attribute ``"hapm.prune_report"`` (a JSON list, read it with
:func:`prune_report`); :func:`pruning_masks` gives the masks of the pruned layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..target.config import HardwareConfig, get_config
from ..target.schedule import ConvSchedule, ScheduleError, dispatch_group, plan_conv
from .relax_util import const_array, module_pass, op_name, static_shape

__all__ = [
    "REPORT_ATTR",
    "PruneError",
    "HardwareAwarePrune",
    "MagnitudePrune",
    "hapm_groups",
    "Layer",
    "check_cap",
    "check_criterion",
    "check_per_layer",
    "check_skip",
    "check_sparsity",
    "find_layers",
    "layer_name",
    "layer_schedule",
    "prunable_layers",
    "prune_report",
    "pruning_masks",
]

#: IRModule attribute holding the JSON report of the last pruning pass.
REPORT_ATTR = "hapm.prune_report"
CRITERIA = ("l1", "l2")


class PruneError(ValueError):
    """Invalid pruning arguments or a graph a pruning pass cannot analyse.

    Registered with TVM's FFI (:mod:`tvm_hapm._registry`) so that it keeps its type when raised
    inside a pass.
    """


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def check_sparsity(value, what: str = "sparsity") -> float:
    """``value`` as a float in ``[0, 1)``, else :class:`PruneError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise PruneError(f"{what} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise PruneError(f"{what} must be in [0, 1), got {value}")
    return value


def check_criterion(criterion) -> str:
    """The importance criterion (``"l1"`` or ``"l2"``, any case), else :class:`PruneError`."""
    crit = str(criterion).lower() if isinstance(criterion, str) else criterion
    if crit not in CRITERIA:
        raise PruneError(f"unknown importance criterion {criterion!r}; use one of {CRITERIA}")
    return crit


def check_per_layer(per_layer) -> dict:
    """``per_layer`` as ``{layer name: sparsity}`` (empty for None), each sparsity checked."""
    if per_layer is None:
        return {}
    if not isinstance(per_layer, dict):
        raise PruneError("per_layer must be a dict mapping layer name -> sparsity")
    return {str(k): check_sparsity(v, f"per_layer[{k!r}]") for k, v in per_layer.items()}


def check_cap(value) -> float | None:
    """A ``max_layer_sparsity`` in ``(0, 1]`` (or None), else :class:`PruneError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise PruneError(f"max_layer_sparsity must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise PruneError(f"max_layer_sparsity must be in (0, 1], got {value}")
    return float(value)


def check_skip(skip) -> set:
    """``skip`` (a layer name or names) as a set of names."""
    if skip is None:
        return set()
    if isinstance(skip, str):
        return {skip}
    try:
        return {str(s) for s in skip}
    except TypeError:
        raise PruneError("skip must be a layer name or a collection of layer names") from None


def _unknown_layers(names, layers, what: str) -> None:
    known = {lay.name for lay in layers}
    unknown = sorted(set(names) - known)
    if unknown:
        raise PruneError(f"{what} names unknown layers {unknown}; prunable layers: {sorted(known)}")


# --------------------------------------------------------------------------------------------
# finding layers
# --------------------------------------------------------------------------------------------
@dataclass
class Layer:
    """A conv2d or dense layer with a constant weight.

    ``const`` is the weight constant as stored in the module (OIHW for conv2d; for dense the
    ``(K, M)`` matmul operand, or the ``(M, K)`` constant behind ``permute_dims``).
    """

    name: str
    kind: str  # "conv2d" | "dense"
    const: object  # the tvm.ir.GenericConst holding the weight
    weight: np.ndarray  # the stored weight array
    transposed: bool  # dense weight stored (M, K) behind permute_dims
    groups: int
    data_shape: tuple
    out_shape: tuple
    strides: tuple = (1, 1)
    dilation: tuple = (1, 1)

    def oihw(self, arr: np.ndarray | None = None) -> np.ndarray:
        """The weight (or an array of its stored shape) in OIHW layout."""
        arr = self.weight if arr is None else arr
        if self.kind == "conv2d":
            return arr
        mk = arr if self.transposed else arr.T
        return mk.reshape(mk.shape[0], mk.shape[1], 1, 1)

    def stored(self, oihw: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`oihw`."""
        if self.kind == "conv2d":
            return oihw
        mk = oihw.reshape(oihw.shape[0], oihw.shape[1])
        return np.ascontiguousarray(mk if self.transposed else mk.T)


def _relax_functions(mod: tvm.IRModule):
    for gv, func in sorted(mod.functions_items(), key=lambda kv: kv[0].name_hint):
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            yield gv, func


def layer_name(gv, var) -> str:
    """The name of a layer bound to ``var`` in function ``gv``: ``"lv5"`` in ``main``, else
    ``"<function>/lv5"``."""
    return var.name if gv.name_hint == "main" else f"{gv.name_hint}/{var.name}"


def find_layers(mod: tvm.IRModule) -> list[Layer]:
    """The prunable layers of ``mod`` in program order, as :class:`Layer` objects (weight
    constant, stored weight, shapes); :func:`prunable_layers` gives their JSON summary."""
    layers = []
    for gv, func in _relax_functions(mod):
        bound = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    continue
                bound[b.var] = b.value
                layer = _as_layer(gv, b.var, b.value, bound)
                if layer is not None:
                    layers.append(layer)
    return layers


def _as_layer(gv, var, call, bound) -> Layer | None:
    op = op_name(call)
    if op == "relax.nn.conv2d":
        a = call.attrs
        w = const_array(call.args[1])
        layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout))
        data, out = static_shape(call.args[0]), static_shape(var)
        if w is None or w.ndim != 4 or layouts != ("NCHW", "OIHW", "NCHW") or data is None:
            return None
        if not np.issubdtype(w.dtype, np.floating) or out is None:
            return None
        return Layer(
            layer_name(gv, var), "conv2d", call.args[1], w, False, int(a.groups), data, out,
            tuple(int(s) for s in a.strides), tuple(int(d) for d in a.dilation),
        )  # fmt: skip
    if op == "relax.matmul":
        x, w_expr = call.args
        data, out = static_shape(x), static_shape(var)
        transposed = False
        const = w_expr
        w = const_array(w_expr)
        if w is None and isinstance(w_expr, relax.Var) and w_expr in bound:
            src = bound[w_expr]
            axes = getattr(src.attrs, "axes", None) if op_name(src) == "relax.permute_dims" else 0
            if axes is None or (axes != 0 and [int(v) for v in axes] == [1, 0]):
                w = const_array(src.args[0])
                const, transposed = src.args[0], True
        if w is None or w.ndim != 2 or data is None or len(data) != 2 or out is None:
            return None
        if not np.issubdtype(w.dtype, np.floating):
            return None
        return Layer(layer_name(gv, var), "dense", const, w, transposed, 1, data, out)
    return None


def prunable_layers(mod: tvm.IRModule) -> list[dict]:
    """The layers the pruning passes can prune, in program order.

    Parameters
    ----------
    mod : tvm.IRModule
        A float Relax module.

    Returns
    -------
    list of dict
        ``{"layer", "kind", "weight_shape" (OIHW), "groups"}`` per layer; ``layer`` is the name
        ``per_layer`` and ``skip`` take.
    """
    return [
        {
            "layer": lay.name,
            "kind": lay.kind,
            "weight_shape": list(lay.oihw().shape),
            "groups": lay.groups,
        }
        for lay in find_layers(mod)
    ]


# --------------------------------------------------------------------------------------------
# hardware groups
# --------------------------------------------------------------------------------------------
def layer_schedule(cfg: HardwareConfig, layer_or_shapes, **conv) -> ConvSchedule:
    """The schedule :func:`~tvm_hapm.target.schedule.plan_conv` gives a layer on ``cfg``.

    Parameters
    ----------
    cfg : HardwareConfig
        Accelerator config.
    layer_or_shapes : Layer or tuple
        A layer found in a module, or ``(data_shape NCHW, weight_shape OIHW, out_shape NCHW)``.
    **conv
        ``strides``, ``dilation``, ``groups`` when shapes are given (defaults 1).

    Returns
    -------
    ConvSchedule
        The schedule the code generator uses for that layer (its ``cob_group`` is the number of
        output-channel blocks one dispatch computes).  A layer that fits no schedule (it then
        runs on the host) gets ``cob_group = dispatch_group(COB, num_arrays)``.
    """
    if isinstance(layer_or_shapes, Layer):
        lay = layer_or_shapes
        if lay.kind == "dense":
            m, k = lay.oihw().shape[:2]
            data, wshape, out = (1, k, 1, 1), (m, k, 1, 1), (1, m, 1, 1)
        else:
            data, wshape, out = lay.data_shape, lay.weight.shape, lay.out_shape
        strides, dilation, groups = lay.strides, lay.dilation, lay.groups
    else:
        data, wshape, out = layer_or_shapes
        strides = tuple(conv.get("strides", (1, 1)))
        dilation = tuple(conv.get("dilation", (1, 1)))
        groups = int(conv.get("groups", 1))
    cout, cin_g, kh, kw = (int(v) for v in wshape)
    cob = -(-cout // cfg.array_cols)
    cib = -(-(cin_g * groups) // cfg.array_rows)
    try:
        return plan_conv(
            cfg, int(data[2]), int(data[3]), int(out[2]), int(out[3]), kh, kw, strides, dilation,
            cib, cob,
        )  # fmt: skip
    except ScheduleError:
        return ConvSchedule(1, 1, dispatch_group(cob, cfg.num_arrays), 1)


def hapm_groups(
    weight_oihw: np.ndarray, groups: int, config: HardwareConfig | str | None, schedule
) -> np.ndarray:
    """Hardware group of every weight element.

    A group is the set of weight blocks one dispatch of the parallel arrays consumes: the
    ``G = schedule.cob_group`` blocks of ``R = array_rows`` input channels x ``C = array_cols``
    output channels at the same input-channel block ``cib`` and kernel position ``(kh, kw)``,
    for the ``G`` output-channel blocks of one cob group.  Grouped and depthwise convolutions
    are taken on their block-diagonal expansion (only blocks that hold real weights count).

    Parameters
    ----------
    weight_oihw : numpy.ndarray or tuple
        The layer's OIHW weight (or just its shape); dense layers as ``(M, K, 1, 1)``.
    groups : int
        The convolution's ``groups``.
    config : HardwareConfig or str or None
        Accelerator config (resolved with :func:`~tvm_hapm.target.config.get_config`).
    schedule : ConvSchedule or int
        The layer's schedule (see :func:`layer_schedule`) or the ``cob_group`` directly.

    Returns
    -------
    numpy.ndarray
        int64 array of the weight's shape; element ``(o, i, y, x)`` of group ``g`` holds the
        flat index ``((o // C // G * CIB + cib) * KH + y) * KW + x`` with
        ``cib = (g_o * cin_g + i) // R`` for conv group ``g_o = o // (O / groups)``.
    """
    cfg = get_config(config)
    shape = weight_oihw.shape if hasattr(weight_oihw, "shape") else tuple(weight_oihw)
    cout, cin_g, kh, kw = (int(v) for v in shape)
    groups = int(groups)
    if groups < 1 or cout % groups:
        raise PruneError(f"groups={groups} does not divide {cout} output channels")
    G = int(schedule) if isinstance(schedule, (int, np.integer)) else int(schedule.cob_group)
    if G < 1:
        raise PruneError(f"cob_group must be >= 1, got {G}")
    R, C = cfg.array_rows, cfg.array_cols
    cib_n = -(-(cin_g * groups) // R)
    o = np.arange(cout)[:, None]
    i = np.arange(cin_g)[None, :]
    cin_dense = (o // (cout // groups)) * cin_g + i  # (O, I) input channel of the dense weight
    og = np.broadcast_to(o // C // G, cin_dense.shape)
    base = og * cib_n + cin_dense // R  # (O, I)
    y = np.arange(kh)[None, None, :, None]
    x = np.arange(kw)[None, None, None, :]
    return (base[:, :, None, None] * kh + y) * kw + x


def _importance(values: np.ndarray, gid: np.ndarray, criterion: str):
    """Per-group ``(sizes, raw norms, normalised norms)`` of the groups ``gid`` defines."""
    n = int(gid.max()) + 1 if gid.size else 0
    flat = gid.reshape(-1)
    sizes = np.bincount(flat, minlength=n).astype(np.int64)
    v = values.astype(np.float64).reshape(-1)
    if criterion == "l1":
        raw = np.bincount(flat, weights=np.abs(v), minlength=n)
        norm = np.divide(raw, sizes, out=np.zeros(n), where=sizes > 0)
    else:
        sq = np.bincount(flat, weights=v * v, minlength=n)
        raw = np.sqrt(sq)
        norm = np.sqrt(np.divide(sq, sizes, out=np.zeros(n), where=sizes > 0))
    return sizes, raw, norm


def macs_per_weight(layer: Layer) -> int:
    """Multiply-accumulates one weight of ``layer`` performs per image: its output pixels
    (1 for a dense layer).  Every GEMM of a weight block streams that many vectors through an
    array, so it is also the array time one pruned block saves."""
    if layer.kind == "dense":
        return 1
    return int(layer.out_shape[2]) * int(layer.out_shape[3])


def _ranking_name(shared: bool, cost_weighted: bool) -> str:
    if not shared:
        return "layer"
    return "global_per_mac" if cost_weighted else "global"


def _prefix(sizes_sorted: np.ndarray, target: float) -> int:
    """How many of the first groups to prune so that their element count is nearest to
    ``target`` (ties: reach the target)."""
    if target <= 0 or sizes_sorted.size == 0:
        return 0
    csum = np.cumsum(sizes_sorted)
    k = int(np.searchsorted(csum, target, side="left"))
    if k >= csum.size:
        return int(csum.size)
    below = csum[k - 1] if k > 0 else 0
    return k + 1 if csum[k] - target <= target - below else k


# --------------------------------------------------------------------------------------------
# rewriting and reporting
# --------------------------------------------------------------------------------------------
@relax.expr_functor.mutator
class _ConstReplacer(relax.PyExprMutator):
    def __init__(self, table: dict, mod=None):
        super().__init__(mod)
        self.table = table

    def visit_generic_const_(self, op):
        for old, new in self.table.values():
            if op.same_as(old):
                return new
        return op


def with_weights(mod: tvm.IRModule, new_weights: dict, layers, report: list) -> tvm.IRModule:
    """A copy of ``mod`` where each layer's weight constant holds ``new_weights[name]``."""
    by_name = {lay.name: lay for lay in layers}
    table = {}
    for name, arr in new_weights.items():
        lay = by_name[name]
        table[name] = (lay.const, relax.const(arr.astype(lay.weight.dtype), str(lay.weight.dtype)))
    out = mod.clone()
    for gv, func in _relax_functions(mod):
        out[gv] = _ConstReplacer(table).visit_expr(func)
    return out.with_attr(REPORT_ATTR, json.dumps(report, sort_keys=True))


def prune_report(mod: tvm.IRModule) -> list[dict]:
    """The report the last pruning pass recorded on ``mod`` (empty if none).

    Parameters
    ----------
    mod : tvm.IRModule
        Output of a pruning pass.

    Returns
    -------
    list of dict
        One entry per layer (method, sparsity targets and achieved values, group sizes).
    """
    attrs = mod.attrs
    if attrs is None or REPORT_ATTR not in attrs:
        return []
    return json.loads(str(attrs[REPORT_ATTR]))


def pruning_masks(mod: tvm.IRModule) -> dict[str, np.ndarray]:
    """Boolean keep-masks (``True`` = weight kept) of the pruned layers of ``mod``.

    Parameters
    ----------
    mod : tvm.IRModule
        Output of :func:`HardwareAwarePrune`, :func:`MagnitudePrune` or
        :func:`~tvm_hapm.passes.prune_filter.FilterPrune` (any float module: then every layer).

    Returns
    -------
    dict of str to numpy.ndarray
        Layer name -> mask with the shape of the layer's weight constant as stored in the module
        (OIHW for conv2d; the matmul operand or the constant behind its ``permute_dims`` for
        dense).  Multiply the weights by the mask after each fine-tuning step to keep the
        pruned weights at zero.
    """
    names = {entry["layer"] for entry in prune_report(mod) if "layer" in entry}
    return {lay.name: lay.weight != 0 for lay in find_layers(mod) if not names or lay.name in names}


def _layer_entry(lay: Layer, method: str, target: float, new_oihw: np.ndarray, **extra) -> dict:
    zeros = int(np.count_nonzero(new_oihw == 0))
    return {
        "layer": lay.name,
        "kind": lay.kind,
        "method": method,
        "weight_shape": list(lay.oihw().shape),
        "target_sparsity": round(float(target), 6),
        "sparsity": round(zeros / new_oihw.size, 6),
        "zeros": zeros,
        "weights": int(new_oihw.size),
        **extra,
    }


# --------------------------------------------------------------------------------------------
# hardware-aware pruning
# --------------------------------------------------------------------------------------------
def hardware_aware_prune(
    mod: tvm.IRModule,
    sparsity: float,
    config: HardwareConfig | str | None = None,
    criterion: str = "l2",
    per_layer: dict | None = None,
    skip=None,
    global_: bool = False,
    report: list | None = None,
    cost_weighted: bool = False,
    max_layer_sparsity: float | None = None,
) -> tvm.IRModule:
    """Function form of :func:`HardwareAwarePrune` (same parameters, plus ``mod``)."""
    sparsity = check_sparsity(sparsity)
    criterion = check_criterion(criterion)
    per_layer = check_per_layer(per_layer)
    skip = check_skip(skip)
    cap = check_cap(max_layer_sparsity)
    cfg = get_config(config)
    layers = find_layers(mod)
    _unknown_layers(per_layer, layers, "per_layer")
    _unknown_layers(skip, layers, "skip")

    info = {}
    for lay in layers:
        if lay.name in skip:
            continue
        w = lay.oihw()
        sched = layer_schedule(cfg, lay)
        gid = hapm_groups(w, lay.groups, cfg, sched)
        sizes, raw, norm = _importance(w, gid, criterion)
        info[lay.name] = (lay, w, sched, gid, sizes, raw, norm)

    pruned: dict[str, np.ndarray] = {name: np.zeros(0, np.int64) for name in info}
    targets = {name: per_layer.get(name, sparsity) for name in info}
    local = [n for n in info if not global_ or n in per_layer]
    for name in local:
        _, w, _, _, sizes, _, norm = info[name]
        ids = np.flatnonzero(sizes > 0)
        order = ids[np.lexsort((ids, norm[ids]))]
        k = _prefix(sizes[order], targets[name] * w.size)
        pruned[name] = order[:k]
    shared = [n for n in info if n not in local]
    if shared:
        rows = []  # (score, layer position, group id, size)
        for pos, name in enumerate(shared):
            lay, _, _, _, sizes, _, norm = info[name]
            ids = np.flatnonzero(sizes > 0)
            score = norm[ids] / (macs_per_weight(lay) if cost_weighted else 1)
            rows.append(np.stack([score, np.full(ids.size, pos), ids, sizes[ids]], 1))
        table = np.concatenate(rows)
        table = table[np.lexsort((table[:, 2], table[:, 1], table[:, 0]))]
        if cap is not None:
            # A layer's groups appear in its own importance order, so its eligible groups
            # are a prefix of them: those whose running size stays within the cap.
            pos_col = table[:, 1].astype(np.int64)
            size_col = table[:, 3].astype(np.int64)
            running = np.zeros_like(size_col)
            limit = np.array([cap * info[n][1].size for n in shared])
            for pos in range(len(shared)):
                sel = pos_col == pos
                running[sel] = np.cumsum(size_col[sel])
            table = table[running <= limit[pos_col] + 1e-9]
        total = sum(info[n][1].size for n in shared)
        reachable = table[:, 3].sum()
        if reachable < sparsity * total - table[:, 3].max(initial=0) / 2:
            raise PruneError(
                f"sparsity {sparsity} is out of reach with max_layer_sparsity {cap}: at most "
                f"{reachable / total:.4f} of these layers' weights can be pruned; lower the "
                "sparsity, raise the cap or rank layer by layer"
            )
        k = _prefix(table[:, 3].astype(np.int64), sparsity * total)
        for pos, name in enumerate(shared):
            sel = table[:k]
            pruned[name] = np.sort(sel[sel[:, 1] == pos, 2].astype(np.int64))

    new_weights, entries = {}, []
    for name, (lay, w, sched, gid, sizes, _raw, norm) in info.items():
        drop = np.zeros(sizes.size, bool)
        drop[pruned[name]] = True
        new = np.where(drop[gid], np.zeros((), w.dtype), w)
        new_weights[name] = lay.stored(new)
        live = sizes[sizes > 0]
        entries.append(
            _layer_entry(
                lay,
                "hapm",
                targets[name],
                new,
                criterion=criterion,
                ranking=_ranking_name(name in shared, cost_weighted),
                cob_group=int(sched.cob_group),
                schedule=sched.to_dict(),
                array=[cfg.array_rows, cfg.array_cols, cfg.num_arrays],
                groups_total=int(live.size),
                groups_pruned=int(drop.sum()),
                pruned_groups=[int(g) for g in np.flatnonzero(drop)],
                group_size=int(live.max()) if live.size else 0,
                group_size_min=int(live.min()) if live.size else 0,
                threshold=float(norm[drop].max()) if drop.any() else None,
            )  # fmt: skip
        )
    if report is not None:
        report.extend(entries)
    return with_weights(mod, new_weights, layers, entries)


def HardwareAwarePrune(  # noqa: N802 (TVM pass factories are CamelCase)
    sparsity: float,
    config: HardwareConfig | str | None = None,
    criterion: str = "l2",
    per_layer: dict | None = None,
    skip=None,
    *,
    global_: bool = False,
    cost_weighted: bool = False,
    max_layer_sparsity: float | None = None,
    report: list | None = None,
) -> tvm.transform.Pass:
    """Prune whole hardware groups: the weight blocks one dispatch of the parallel arrays uses.

    For every conv2d/dense layer, the groups of :func:`hapm_groups` under the layer's schedule
    (:func:`layer_schedule`) are ranked by importance and the least important are zeroed until
    the fraction of zero weights is nearest to the target.  Groups are whole, so the achieved
    sparsity is quantised by the group size (it is reported).  The accelerator then drops the
    ``G`` weight blocks of each pruned group: ``G`` fewer LOADed blocks and ``G`` fewer GEMMs per
    output tile.

    Parameters
    ----------
    sparsity : float
        Fraction of the weights to zero, in ``[0, 1)``; per layer, or over all layers with
        ``global_=True``.
    config : HardwareConfig or str, optional
        Accelerator config whose arrays and schedules define the groups (default: the current
        ``hapm_fpga`` target's, else the default preset).
    criterion : {"l1", "l2"}
        Group importance: the L1 norm divided by the group's size (mean ``|w|``) or the L2 norm
        divided by the square root of its size (RMS), so that partial groups (channel counts
        that are not multiples of the array) and layers with different group sizes compare
        fairly.
    per_layer : dict, optional
        Layer name -> sparsity overriding ``sparsity`` (these layers are always ranked alone).
    skip : str or iterable of str, optional
        Layers left dense (e.g. the first conv or the classifier).
    global_ : bool
        Rank the groups of all (non-``per_layer``) layers together against one network-wide
        target instead of pruning every layer to ``sparsity``.
    cost_weighted : bool
        With ``global_``: rank a group by its importance divided by the multiply-accumulates
        each of its weights performs per image (:func:`macs_per_weight`), so that the ranking
        removes the least importance per unit of work saved.  A weight of a high-resolution
        layer is applied at many more pixels than one of a low-resolution layer, and every
        GEMM of its dispatch streams that many vectors: the arrays' time follows MACs, not
        parameters.  At a given *weight* sparsity this moves pruning to the layers where it
        saves the most cycles (the HAPM flow's latency-aware allocation).
    max_layer_sparsity : float, optional
        With ``global_``: no layer is pruned beyond this fraction of its weights (in
        ``(0, 1]``; default no cap).  A cost-weighted ranking would otherwise empty the
        cheapest-to-prune layers entirely.
    report : list, optional
        Receives the per-layer report entries (also stored in ``"hapm.prune_report"``).

    Returns
    -------
    tvm.transform.Pass
        The module pass ``hapm.HardwareAwarePrune``.

    Raises
    ------
    PruneError
        (a ``ValueError``) for a sparsity outside ``[0, 1)``, an unknown criterion, an unknown
        layer name, or a ``max_layer_sparsity`` outside ``(0, 1]``.
    """
    check_sparsity(sparsity)
    check_criterion(criterion)
    check_per_layer(per_layer)
    check_cap(max_layer_sparsity)
    skip_set = check_skip(skip)
    cfg = get_config(config)

    def run(mod):
        return hardware_aware_prune(
            mod, sparsity, cfg, criterion, per_layer, skip_set, global_, report,
            cost_weighted, max_layer_sparsity,
        )  # fmt: skip

    return module_pass(run, "hapm.HardwareAwarePrune")


# --------------------------------------------------------------------------------------------
# unstructured magnitude pruning
# --------------------------------------------------------------------------------------------
def magnitude_prune(
    mod: tvm.IRModule,
    sparsity: float,
    criterion: str = "l1",
    per_layer: dict | None = None,
    global_: bool = False,
    skip=None,
    report: list | None = None,
) -> tvm.IRModule:
    """Function form of :func:`MagnitudePrune` (same parameters, plus ``mod``)."""
    sparsity = check_sparsity(sparsity)
    criterion = check_criterion(criterion)
    per_layer = check_per_layer(per_layer)
    skip = check_skip(skip)
    layers = [lay for lay in find_layers(mod) if lay.name not in skip]
    _unknown_layers(per_layer, layers, "per_layer")
    # |w| and w**2 rank the same; the criterion is kept for symmetry with the other passes
    score = {lay.name: np.abs(lay.oihw().astype(np.float64)).reshape(-1) for lay in layers}
    drop = {}
    shared = [lay.name for lay in layers if global_ and lay.name not in per_layer]
    for lay in layers:
        if lay.name in shared:
            continue
        s = score[lay.name]
        k = int(round(per_layer.get(lay.name, sparsity) * s.size))
        drop[lay.name] = np.argsort(s, kind="stable")[:k]
    if shared:
        allv = np.concatenate([score[n] for n in shared])
        k = int(round(sparsity * allv.size))
        chosen = np.argsort(allv, kind="stable")[:k]
        start = 0
        for n in shared:
            size = score[n].size
            sel = chosen[(chosen >= start) & (chosen < start + size)] - start
            drop[n] = np.sort(sel)
            start += size
    new_weights, entries = {}, []
    for lay in layers:
        w = lay.oihw().copy()
        w.reshape(-1)[drop[lay.name]] = 0
        new_weights[lay.name] = lay.stored(w)
        entries.append(
            _layer_entry(
                lay,
                "magnitude",
                per_layer.get(lay.name, sparsity),
                w,
                criterion=criterion,
                ranking="global" if lay.name in shared else "layer",
                group_size=1,
            )  # fmt: skip
        )
    if report is not None:
        report.extend(entries)
    return with_weights(mod, new_weights, layers, entries)


def MagnitudePrune(  # noqa: N802
    sparsity: float,
    criterion: str = "l1",
    per_layer: dict | None = None,
    global_: bool = False,
    *,
    skip=None,
    report: list | None = None,
) -> tvm.transform.Pass:
    """Unstructured magnitude pruning (the baseline of the HAPM paper).

    Zeroes the ``round(sparsity * n)`` weights of smallest magnitude of each layer (or of all
    layers together with ``global_=True``); ties are broken by position, so the result is
    deterministic.  At moderate sparsity almost no ``R x C`` block becomes all-zero, so the
    accelerator runs as many GEMMs as before.

    Parameters
    ----------
    sparsity : float
        Fraction of the weights to zero, in ``[0, 1)``.
    criterion : {"l1", "l2"}
        Magnitude ``|w|`` or ``w**2`` (they rank elements identically).
    per_layer : dict, optional
        Layer name -> sparsity overriding ``sparsity``.
    global_ : bool
        One threshold over all layers instead of one per layer.
    skip : str or iterable of str, optional
        Layers left dense.
    report : list, optional
        Receives the per-layer report entries (also stored in ``"hapm.prune_report"``).

    Returns
    -------
    tvm.transform.Pass
        The module pass ``hapm.MagnitudePrune``.

    Raises
    ------
    PruneError
        (a ``ValueError``) for a sparsity outside ``[0, 1)`` or an unknown criterion.
    """
    check_sparsity(sparsity)
    check_criterion(criterion)
    check_per_layer(per_layer)
    skip_set = check_skip(skip)

    def run(mod):
        return magnitude_prune(mod, sparsity, criterion, per_layer, global_, skip_set, report)

    return module_pass(run, "hapm.MagnitudePrune")
