"""Closed-form analysis of a convolution's instruction stream (the mid-level cost model).

:func:`analyze` follows the stream of a convolution (as
:func:`tvm_hapm.testing.direct_codegen.conv2d_program` writes it) without generating the program:
it groups the output tiles into classes of equal shape (first / middle / last tile of each
dimension), counts the GEMMs of every (output-channel group, input-channel chunk) *step*
from the non-zero block mask, and prices each step with the costs of ``docs/timing.md``:

* a step's DMA (input chunk, weight chunk unless the weights are resident) is serial with its
  GEMMs for a single-buffered schedule (the dependency tokens order a reload after the GEMMs
  that read the previous contents); with ``double_buffer`` (when the code generator's
  ``fit_double_buffer`` keeps it) the loads overlap the previous step's GEMMs, and a step takes
  no less than its DRAM port beats;
* the GEMMs of a step are dispatched by position ``(cib, kh, kw)`` outer, output block inner,
  and an accumulator region is written by one array at a time: a position with ``n_p``
  non-zero blocks costs one round of ``2R + C + 2 + T`` cycles if ``n_p <= A``, else
  ``n_p / A`` (the arrays pipeline across positions), plus the issue skew
  (``reference.position_rounds``); with pruned blocks, the midpoint of that and the step's
  longest chain / throughput bound;
* the epilogue of a region (one ``ADD_REQUANT`` per output block: bias, requantization and
  ReLU fused by ``schedule.fuse_epilogues``) and the next region's bias LOAD run among the next
  region's GEMMs (``schedule.interleave_epilogues``; the per-range accumulator scoreboard lets
  an ALU wait only for GEMMs into its entries): double buffered, only the part of each
  dispatch's share that outlasts the arrays is exposed (``reference._interleaved_steps``), a region
  lasts no less than the previous region's stores (:func:`store_bound`), and the last
  region's epilogue and stores are a tail; single buffered, a region's GEMMs wait for the
  previous epilogue and its stores, and the loads and GEMMs of a step overlap input block by
  input block;
* all-zero blocks cost nothing (the code generator drops them).

The event counts (MACs, buffer and DRAM bytes, ALU lanes) are exact for the mask given and feed
:class:`tvm_hapm.runtime.energy.EnergyModel`, so the mid energy differs from the simulator's
only through the latency (the static, clock and logic energy).
"""

from __future__ import annotations

import functools
import weakref

import numpy as np

from ...target.config import DMA_REQUEST_CYCLES, LOAD_DONE_CYCLES, HardwareConfig
from ...target.schedule import ConvSchedule
from ..layer import BlockSparsity, ConvLayer
from .common import (
    ROUND_UP,
    Analysis,
    default_schedule,
    energy_model_of,
    fluid_rounds,
    sched_field_names,
    schedule_dict,
    store_bound,
    struct_position_counts,
)
from .plans import (
    BOOL,
    CFG_COLS,
    MAX_PAIRS,
    PAIR_OF_OBJECTS,
    POOL,
    QCOLS,
    LayerPair,
    build_plans,
    cfg_row,
    clear_plan_caches,
    get_pair,
    struct_counts,
    timing_key,
)
from .steps import frac_steps, jit_kernels, mask_steps
from .timing import batch_timing

__all__ = [
    "ROUND_UP",
    "Analysis",
    "BatchAnalysis",
    "analyze",
    "analyze_batch",
    "clear_caches",
    "default_schedule",
    "energy_model_of",
    "fluid_rounds",
    "jit_kernels",
    "schedule_dict",
    "store_bound",
]


class BatchAnalysis:
    """Mid-model quantities of ``n`` queries (see :func:`analyze_batch`).

    ``cycles``, ``energy_uj``: ``(n,)`` float64; ``counts``: the keys of :attr:`Analysis.counts`,
    each an ``(n,)`` array; ``columns``: the queries' layer / config / schedule numbers used by
    the features (``(n,)`` arrays); ``schedules``: the schedule of every query; all in the
    queries' order.  The batch computes them in another order (masks grouped by bucket):
    ``raw`` holds ``(cycles, energy_uj, counts, columns)`` in that order and ``order`` the query
    of each of its rows (``None``: the queries' order); the attributes above are put in the
    queries' order when first read (:meth:`to_query_order`).
    """

    def __init__(self, cycles, energy_uj, counts, columns, schedules, order=None):
        self.raw = (cycles, energy_uj, counts, columns)
        self.order = order
        self.schedules = schedules
        self._inv = None

    def __len__(self) -> int:
        return len(self.schedules)

    def to_query_order(self, a: np.ndarray) -> np.ndarray:
        """The rows of ``a`` (one per query, in ``raw``'s order) in the queries' order."""
        if self.order is None:
            return a
        if self._inv is None:
            self._inv = np.empty(len(self.order), np.int64)
            self._inv[self.order] = np.arange(len(self.order))
        return a[self._inv]

    @functools.cached_property
    def cycles(self) -> np.ndarray:
        return self.to_query_order(self.raw[0])

    @functools.cached_property
    def energy_uj(self) -> np.ndarray:
        return self.to_query_order(self.raw[1])

    @functools.cached_property
    def counts(self) -> dict:
        return {k: self.to_query_order(v) for k, v in self.raw[2].items()}

    @functools.cached_property
    def columns(self) -> dict:
        return {k: self.to_query_order(v) for k, v in self.raw[3].items()}

    def item(self, i: int) -> Analysis:
        """Query ``i`` as an :class:`Analysis` (plain floats)."""
        return Analysis(
            cycles=float(self.cycles[i]),
            energy_uj=float(self.energy_uj[i]),
            counts={k: float(v[i]) for k, v in self.counts.items()},
            schedule=self.schedules[i],
        )


def analyze(
    layer: ConvLayer,
    cfg: HardwareConfig,
    schedule: ConvSchedule | None = None,
    sparsity: BlockSparsity | float | np.ndarray | None = None,
) -> Analysis:
    """Mid-level analysis of one layer: cycles, energy and the counts behind them (a batch of
    one of :func:`analyze_batch`)."""
    return analyze_batch([(layer, cfg, schedule, sparsity)]).item(0)


def clear_caches() -> None:
    """Empty the caches of :func:`analyze_batch` (the per (layer, config) constants, the
    compiler's schedules and the plans of every schedule seen): the next batch runs cold, as in
    a fresh process (for timing)."""
    from ..layer import structural_blocks

    clear_plan_caches()
    POOL.reset()
    _CFG_INFO.clear()
    for f in (struct_position_counts, struct_counts, structural_blocks):
        f.cache_clear()


def analyze_batch(queries) -> BatchAnalysis:
    """Mid-level analysis of many ``(layer, config, schedule, sparsity)`` queries at once.

    The same model as :func:`analyze_reference` (``schedule=None``: ``plan_conv``'s;
    ``sparsity``: a :class:`BlockSparsity`, a fraction or a block mask), evaluated over the
    whole batch with numpy and two compiled loops (:mod:`tvm_hapm.cost._jit`: the mask
    reduction and the timing / energy arithmetic, :func:`jit_kernels`): the per-query Python
    work is reading the query and counting the mask's non-zero blocks (on which the compiler's
    schedule depends).
    """
    queries = list(queries)
    n = len(queries)
    if n == 0:
        raise ValueError("analyze_batch needs at least one query")
    layers, cfgs, scheds, sps = zip(*queries)
    pending: list = []  # plans to build
    # ---- (layer, config) pairs, once per distinct pair of objects
    keys = list(zip(map(id, layers), map(id, cfgs)))
    cfg_ids: dict = {}  # id(config) -> (index into cfg_rows, timing key)
    cfg_rows: list = []
    pair_of: dict = {}
    cidx_of: dict = {}
    for k, i in dict(zip(keys, range(n))).items():
        cfg = cfgs[i]
        ck = cfg_ids.get(id(cfg))
        if ck is None:
            tkey, row = _cfg_info(cfg)
            ck = cfg_ids[id(cfg)] = (len(cfg_rows), tkey)
            cfg_rows.append(row)
        seen = PAIR_OF_OBJECTS.get(k)
        if seen is not None and seen[0]() is layers[i] and seen[1]() is cfg:
            pair = seen[2]
        else:
            pair = get_pair(layers[i], cfg, ck[1], pending)
            if len(PAIR_OF_OBJECTS) > MAX_PAIRS:
                PAIR_OF_OBJECTS.clear()
            PAIR_OF_OBJECTS[k] = (weakref.ref(layers[i]), weakref.ref(cfg), pair)
        pair_of[k] = pair
        cidx_of[k] = ck[0]
    pairs = list(map(pair_of.__getitem__, keys))
    # ---- sparsity: a block mask (checked, structural blocks only) or a fraction
    masks = [s.mask if s.__class__ is BlockSparsity else _mask_of(s) for s in sps]
    fix = [
        i
        for i, m, pair in zip(range(n), masks, pairs)
        if m is not None and (m.dtype is not BOOL or m.shape != pair.shape or not pair.full)
    ]
    for i in fix:
        masks[i] = _checked_mask(masks[i], pairs[i])
    nnzs = [None if m is None else _count_nonzero(m) for m in masks]
    # ---- plans: the schedule given (read once per object), or the compiler's, planned for
    # the non-zero blocks it is given
    # mask queries (all but the full masks), then the fraction queries
    given: dict = {}
    plans = []
    mi, fi = [], []
    for i, (sched, pair, z) in enumerate(zip(scheds, pairs, nnzs)):
        if sched is not None:
            sk = (id(pair), id(sched))
            plan = given.get(sk)
            if plan is None:
                plan = given[sk] = pair.plan(sched, pending)
        elif z is None or z == pair.itot:
            plan = pair.dplan
        else:
            plan = pair.nnz_plans.get(z) or pair.mask_plan(cfgs[i], z, pending)
        plans.append(plan)
        if z is None or z == pair.itot:
            fi.append(i)
        else:
            mi.append(i)
    gen = POOL.gen
    if pending:
        build_plans(pending)
    if POOL.gen != gen:  # the pools started again while this batch's plans were built
        POOL.current(plans)
    kern = jit_kernels()
    order = mi + fi
    nm = len(mi)
    plans_o = [plans[i] for i in order]
    cidx = np.array(list(map(cidx_of.__getitem__, keys)), np.int64)[order]

    # ---- per query (in that order) and per step: non-zero blocks, chains, rounds
    Q = POOL.Q[:, [p.qi for p in plans_o]]  # a row per column
    q = dict(zip(QCOLS, Q))
    tot = q["tot"]
    # each query's steps (in that order): non-zero blocks, longest chain, position rounds
    S = np.empty((3, int(q["nst"].sum())))
    empty = np.empty(n)  # output blocks without a non-zero block
    exact = np.ones(n, bool)
    nnz = np.empty(n)
    frac = np.empty(n)
    ns_m = int(q["nst"][:nm].sum())
    if nm:
        masks_m = [masks[i] for i in mi]
        mask_steps(masks_m, plans_o[:nm], q, S[:, :ns_m], empty[:nm])
        nnz[:nm] = [nnzs[i] for i in mi]
        frac[:nm] = 1.0 - nnz[:nm] / np.maximum(tot[:nm], 1)
    if fi:
        fq = [(plans[i], 0.0 if nnzs[i] is not None else _frac_of(sps[i])) for i in fi]
        S[:, ns_m:], empty[nm:], exact[nm:] = frac_steps(fq)
        frac[nm:] = [f for _, f in fq]
        nnz[nm:] = tot[nm:] * (1.0 - frac[nm:])
    steps, chain, rounds = S
    cfa = np.array(cfg_rows, np.float64)[cidx]
    cycles, energy, counts = batch_timing(kern, Q, q, plans_o, steps, chain, rounds, empty, exact,
                                          nnz, frac, tot, cfa)  # fmt: skip
    columns = {
        "n": q["n"], "cin": q["cin"], "h": q["h"], "w": q["w"], "cout": q["cout"],
        "kh": q["kh"], "kw": q["kw"], "stride": q["stride"], "groups": q["groups"],
        "oh": q["oh"], "ow": q["ow"], "cob": q["cob"], "cib": q["cib"], "arrays": q["A"],
        "rows": q["R"], "cols": q["C"], "inp_depth": q["inp_depth"],
        "wgt_depth": q["wgt_depth"], "acc_depth": q["acc_depth"], "bytes_per_cycle": q["B"],
        # the plans carry a transfer's fixed cycles, HardwareConfig.load_fixed_cycles
        "dram_latency": q["L"] - (DMA_REQUEST_CYCLES + LOAD_DONE_CYCLES),
        "act_bits": cfa[:, CFG_COLS.index("act_bits")],
        "weight_bits": cfa[:, CFG_COLS.index("weight_bits")],
        "macs_per_cycle": cfa[:, CFG_COLS.index("macs_per_cycle")],
    }  # fmt: skip
    nq = len(QCOLS)
    sfields = sched_field_names(plans_o[0].sched)
    columns.update({f"sched_{k}": Q[nq + j] for j, k in enumerate(sfields)})
    schedules = [p.sched for p in plans]
    perm = None if nm == 0 or order == list(range(n)) else np.array(order, np.int64)
    return BatchAnalysis(cycles, energy, counts, columns, schedules, perm)


_CFG_INFO: dict = {}  # id(config) -> (weak reference, timing key, energy / width row)


def _cfg_info(cfg: HardwareConfig) -> tuple:
    """A config's timing key and its row of ``CFG_COLS`` (kept per config object)."""
    seen = _CFG_INFO.get(id(cfg))
    if seen is not None and seen[0]() is cfg:
        return seen[1], seen[2]
    if len(_CFG_INFO) > 256:
        _CFG_INFO.clear()
    tkey, row = timing_key(cfg), cfg_row(cfg)
    _CFG_INFO[id(cfg)] = (weakref.ref(cfg), tkey, row)
    return tkey, row


def _mask_of(sparsity):
    """The block mask of a query's sparsity, or None (a fraction)."""
    if isinstance(sparsity, BlockSparsity):
        return sparsity.mask
    if isinstance(sparsity, np.ndarray):
        return sparsity
    return None


def _frac_of(sparsity) -> float:
    if isinstance(sparsity, BlockSparsity):
        return float(sparsity.fraction)
    return float(sparsity or 0.0)


def _checked_mask(mask, pair: LayerPair) -> np.ndarray:
    """A query's block mask as bool, of the layer's shape, on its structural blocks."""
    m = np.asarray(mask, bool)
    if m.shape != pair.shape:
        raise ValueError(f"block mask of shape {m.shape}, expected {pair.shape}")
    return m if pair.full else m & pair.struct


try:  # numpy's count without the argument handling of np.count_nonzero (numpy >= 2)
    from numpy._core.multiarray import count_nonzero as _count_nonzero
except ImportError:  # pragma: no cover
    _count_nonzero = np.count_nonzero
