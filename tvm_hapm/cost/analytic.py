"""Closed-form analysis of a convolution's instruction stream (the mid-level cost model).

:func:`analyze` follows :func:`tvm_hapm.target.codegen.conv2d_program` without generating the
program: it groups the output tiles into classes of equal shape (first / middle / last tile of
each dimension), counts the GEMMs of every (output-channel group, input-channel chunk) *step*
from the non-zero block mask, and prices each step with the costs of ``docs/timing.md``:

* a step's DMA (input chunk, weight chunk unless the weights are resident) is serial with its
  GEMMs for a single-buffered schedule (the dependency tokens order a reload after the GEMMs
  that read the previous contents); with ``double_buffer`` (when the code generator's
  ``fit_double_buffer`` keeps it) the loads overlap the previous step's GEMMs, and a step takes
  no less than its DRAM port beats;
* the GEMMs of a step are dispatched by position ``(cib, kh, kw)`` outer, output block inner,
  and an accumulator region is written by one array at a time: a position with ``n_p``
  non-zero blocks costs one round of ``2R + C - 2 + T`` cycles if ``n_p <= A``, else
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
only through the latency (static energy).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from functools import lru_cache

import numpy as np

from ..runtime.energy import EnergyModel
from ..target.config import ALU_LATENCY, HardwareConfig, gemm_fixed_cycles
from ..target.isa import MAX_TRANSFER
from ..target.schedule import ConvSchedule, plan_conv
from .layer import BlockSparsity, ConvLayer

__all__ = [
    "ROUND_UP",
    "Analysis",
    "BatchAnalysis",
    "analyze",
    "analyze_batch",
    "clear_caches",
    "default_schedule",
    "fluid_rounds",
    "schedule_dict",
    "store_bound",
]

#: Event counts are truncated to integers (as the timing model's are) after scaling by this, so
#: that a count that is an integer in exact arithmetic stays one whatever the summation order
#: (expected counts of a sparsity fraction are fractional sums).
ROUND_UP = 1.0 + 1e-11


def schedule_dict(schedule) -> dict:
    """The schedule's knobs by field name (read generically: new knobs appear automatically)."""
    return {f.name: getattr(schedule, f.name) for f in dataclasses.fields(schedule)}


def default_schedule(layer: ConvLayer, cfg: HardwareConfig, mask=None) -> ConvSchedule:
    """``plan_conv``'s schedule of the layer (what the compiler picks)."""
    R, C = cfg.array_rows, cfg.array_cols
    cob, cib = -(-layer.cout // C), -(-layer.cin // R)
    return plan_conv(
        cfg, layer.h, layer.w, layer.oh, layer.ow, layer.kh, layer.kw, layer.strides,
        layer.dilation, cib, cob, mask,
    )  # fmt: skip


_ENERGY_MODELS: dict = {}


def energy_model_of(cfg: HardwareConfig) -> EnergyModel:
    key = (
        cfg.act_bits, cfg.weight_bits, cfg.inp_buffer_bytes, cfg.wgt_buffer_bytes,
        cfg.acc_buffer_bytes, cfg.macs_per_cycle, tuple(sorted(cfg.energy.items())),
    )  # fmt: skip
    em = _ENERGY_MODELS.get(key)
    if em is None:
        if len(_ENERGY_MODELS) > 256:
            _ENERGY_MODELS.clear()
        em = _ENERGY_MODELS[key] = EnergyModel(cfg)
    return em


@dataclasses.dataclass
class Analysis:
    """Quantities of one layer on one config and schedule (see :func:`analyze`)."""

    cycles: float
    energy_uj: float
    counts: dict  # event counts and structural quantities (features of the fine model)
    schedule: ConvSchedule


def fluid_rounds(n_p: np.ndarray, frac: float, A: int) -> np.ndarray:
    """Rounds of positions of ``n_p`` (structural, of which a fraction ``frac`` is expected
    zero) non-zero blocks on ``A`` arrays (see :func:`tvm_hapm.cost.reference.position_rounds`)."""
    if frac:
        return np.maximum(n_p * (1.0 - frac), A) / A * (1.0 - frac**n_p)
    return np.where(n_p > 0, np.maximum(n_p, A), 0) / A


def store_bound(g_prev, st, A, gemm_one):
    """The fewest cycles of a double-buffered region whose previous region has ``g_prev`` output
    blocks, each stored in ``st`` cycles (latency and beats), on ``A`` arrays whose GEMMs take
    ``gemm_one`` cycles each.

    The store module stores one block at a time, so a region lasts at least its predecessor's
    stores.  And the stores cannot start early: the first ALU pass of the previous region's
    epilogue comes after the region's first dispatch, and its token (the one the store pops) is
    released only when the GEMMs issued before it are done; those GEMMs write the accumulator
    half of the region before, so each waits for that region's store of its output block.  A
    region therefore also lasts the stores of the ``min(g_prev, A)`` blocks of a dispatch plus a
    GEMM.  Either bound exceeds the GEMMs when a block's GEMMs are few (a small input-channel
    count, 1x1 kernels, small tiles): there the stores, not the ALU, pace the layer.
    """
    return np.maximum(g_prev * st, np.minimum(g_prev, A) * st + gemm_one)


@lru_cache(maxsize=4096)
def _struct_position_counts(cout, cin, groups, kh, kw, R, C, G, K):
    """``n_p`` of the structural blocks per (group, input block) ``(n_cg, n_kc, K)`` (equal
    at every kernel position)."""
    from .layer import structural_blocks

    s = structural_blocks(cout, cin, groups, 1, 1, R, C)[:, :, 0, 0]
    cob, cib = s.shape
    n_cg, n_kc = -(-cob // G), -(-cib // K)
    cnt = np.zeros((n_cg * G, n_kc * K))
    cnt[:cob, :cib] = s
    out = cnt.reshape(n_cg, G, n_kc, K).sum(axis=1)
    out.flags.writeable = False
    return out


# ------------------------------------------------------------------------------ batched model
# The same model as ``analyze_reference`` over a batch of queries, in two parts (see
# ``docs/cost_model.md``, "Batched evaluation"):
#
# * a *plan* per (layer, timing constants of the config, schedule), cached: whatever does not
#   depend on the weight-block mask (tile classes, steps, the (tile class, step) pairs with their
#   DMA, ALU and DRAM-port costs, and the indices that reduce a mask's prefix sums onto the
#   steps).  The new plans of a batch are built together with numpy over flat "ragged" arrays
#   (a segment id per plan) and kept as row blocks, and appended to the pools (``_Pools``);
# * per batch, what depends on the masks: all masks in one flat byte array.  The compiled path
#   (``_jit.mask_steps``, queries in their order) sweeps each mask once for every step's
#   non-zero blocks, longest chain and GEMM rounds, and ``_jit.timing`` runs the timing and
#   energy arithmetic query by query, reading the plans' pair columns in the pools.  The numpy
#   path (without numba; the tests' reference for the compiled one) orders the masks by bucket
#   (kernel size, trailing shape, output-channel group, arrays) so that the group reduction of
#   a bucket is one reshape + max / sum; the per-(output block, input block) non-zero counts and
#   the per-(group, input block) GEMM rounds become prefix sums, and each step's non-zero
#   blocks, longest chain and rounds are differences of them at the plans' indices; then the
#   timing and energy arithmetic over the concatenated plan rows.  Either way the mask queries
#   come first and the rows are put back in the caller's order at the end.


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


#: (layer, timing key of the config) -> _Pair (the plans of its schedules hang off it)
_PAIRS: dict = {}
_PAIRS_BY_ID: dict = {}  # id(layer) -> (weak reference to the layer, {timing key: pair})
_PAIR_OF_OBJECTS: dict = {}  # (id(layer), id(config)) -> (weak refs to both, pair)
_MAX_PAIRS = 4096
_MAX_PLANS = 8192  # per pair (schedules, and the compiler's schedule per non-zero count)
_TSHAPES: dict = {}  # trailing mask shape (CIB, KH, KW) -> bucket id


def clear_caches() -> None:
    """Empty the caches of :func:`analyze_batch` (the per (layer, config) constants, the
    compiler's schedules and the plans of every schedule seen): the next batch runs cold, as in
    a fresh process (for timing)."""
    from .layer import structural_blocks

    _clear_plan_caches()
    _POOL.reset()
    _TSHAPES.clear()
    _CFG_INFO.clear()
    _BUCKETS.clear()
    for f in (_struct_position_counts, _struct_counts, structural_blocks):
        f.cache_clear()


def _clear_plan_caches() -> None:
    """Forget the pairs (and the plans they hold)."""
    _PAIRS.clear()
    _PAIRS_BY_ID.clear()
    _PAIR_OF_OBJECTS.clear()


def _timing_key(cfg: HardwareConfig) -> tuple:
    """What a pair's plans depend on: the array shape, the buffer depths, what ``plan_conv``'s
    estimate reads (bandwidth, widths) and the DRAM latency."""
    return (cfg.array_rows, cfg.array_cols, cfg.num_arrays, cfg.inp_depth, cfg.wgt_depth,
            cfg.acc_depth, cfg.dram_bytes_per_cycle, cfg.act_bytes, cfg.weight_bytes,
            cfg.acc_bytes, cfg.dram_latency_cycles)  # fmt: skip


class _Pair:
    """Constants of one (layer, config timing key): the structural blocks, the compiler's
    schedule (``dplan``) and the plans of the schedules seen."""

    __slots__ = ("cib", "cob", "dplan", "full", "itot", "kk", "layer", "lrow", "nnz_plans",
                 "per", "plans", "shape", "struct", "tid", "tot", "trow", "uniq")  # fmt: skip

    def __init__(self, layer: ConvLayer, cfg: HardwareConfig, pending: list):
        R, C = cfg.array_rows, cfg.array_cols
        struct, per, tot, full, uniq = _struct_counts(
            layer.cout, layer.cin, layer.groups, layer.kh, layer.kw, R, C
        )
        cob, cib = struct.shape[:2]
        (sh, sw), (dh, dw), (pt, pl, _, _) = layer.strides, layer.dilation, layer.padding
        self.layer = layer
        self.lrow = (layer.n, layer.cin, layer.h, layer.w, layer.cout, layer.kh, layer.kw, sh,
                     sw, dh, dw, pt, pl, layer.groups, layer.oh, layer.ow, cob, cib)  # fmt: skip
        self.trow = (R, C, cfg.num_arrays, cfg.dram_bytes_per_cycle, cfg.dram_latency_cycles,
                     cfg.act_bytes, cfg.weight_bytes, cfg.inp_depth, cfg.wgt_depth,
                     cfg.acc_depth)  # fmt: skip
        self.struct, self.per, self.tot, self.full, self.uniq = struct, per, tot, full, uniq
        self.itot = int(tot)
        self.shape = struct.shape
        self.cob, self.cib, self.kk = cob, cib, layer.kh * layer.kw
        tshape = struct.shape[1:]
        self.tid = _TSHAPES.setdefault(tshape, len(_TSHAPES))
        self.plans: dict = {}
        self.nnz_plans: dict = {}
        sched = plan_conv(
            cfg, layer.h, layer.w, layer.oh, layer.ow, layer.kh, layer.kw, layer.strides,
            layer.dilation, cib, cob, struct,
        )  # fmt: skip
        self.dplan = self.plan(sched, pending)

    def plan(self, schedule, pending: list) -> _Plan:
        p = self.plans.get(schedule)
        if p is None:
            if len(self.plans) > _MAX_PLANS:
                self.plans.clear()
                self.nnz_plans.clear()
            p = self.plans[schedule] = _Plan(self, schedule)
            pending.append(p)
        return p

    def mask_plan(self, cfg: HardwareConfig, nnz: int, pending: list) -> _Plan:
        """The plan of ``plan_conv``'s schedule given ``nnz`` non-zero blocks (the compiler
        plans for the blocks it is given; only their number counts)."""
        p = self.nnz_plans.get(nnz)
        if p is None:
            layer = self.layer
            stand_in = np.ones(nnz, bool)  # plan_conv reads only the count of a mask
            sched = plan_conv(
                cfg, layer.h, layer.w, layer.oh, layer.ow, layer.kh, layer.kw, layer.strides,
                layer.dilation, self.cib, self.cob, stand_in,
            )  # fmt: skip
            p = self.nnz_plans[nnz] = self.plan(sched, pending)
        return p


def _pair(layer: ConvLayer, cfg: HardwareConfig, tkey: tuple, pending: list) -> _Pair:
    # by the layer object first (a weak reference tells a reused id), else by value
    seen = _PAIRS_BY_ID.get(id(layer))
    if seen is not None and seen[0]() is layer:
        pair = seen[1].get(tkey)
        if pair is not None:
            return pair
    key = (layer, tkey)
    pair = _PAIRS.get(key)
    if pair is None:
        if len(_PAIRS) > _MAX_PAIRS:
            _PAIRS.clear()
            _PAIRS_BY_ID.clear()
            _PAIR_OF_OBJECTS.clear()
        pair = _PAIRS[key] = _Pair(layer, cfg, pending)
    if seen is None or seen[0]() is not layer:
        seen = _PAIRS_BY_ID[id(layer)] = (weakref.ref(layer), {})
    seen[1][tkey] = pair
    return pair


class _Plan:
    """The mask-independent part of one (layer, config timing key, schedule); its arrays are
    filled by :func:`_build_plans`.

    ``q``: the query row (``_QCOLS`` then the schedule's fields); ``P`` and ``P64``: the
    ``_PCOLS32`` and ``_PCOLS64`` columns of each (tile class, step) pair; ``qi`` and ``pe``: the
    query row's column and the first pair's column in the pools of ``_POOL`` (generation
    ``gen``); ``RS``:
    ranges ``[lo, hi)`` of the query's flat per-(output block, input block) counts: each output
    block's whole row, then for every step each output block of its group over the step's
    input chunk; ``RR``: per step, its rows ``[lo, hi)`` in ``RS`` and its range ``[lo, hi)``
    of the per-(group, input block) rounds.
    """

    __slots__ = ("G", "K", "P", "P64", "RR", "RS", "bid", "bkey", "csize", "dbs", "frac_arrays",
                 "gen", "nbytes", "pair", "pe", "q", "qi", "sched", "srow", "tile",
                 "zpad")  # fmt: skip

    def __init__(self, pair: _Pair, schedule):
        self.pair, self.sched = pair, schedule
        self.srow = tuple(getattr(schedule, f) for f in _sched_field_names(schedule))
        self.G, self.K = max(1, schedule.cob_group), max(1, schedule.cib_chunk)
        self.tile = (schedule.tile_h, schedule.tile_w)
        self.dbs = bool(getattr(schedule, "double_buffer", False))
        A = pair.trow[2]
        G = self.G
        pad = -pair.cob % G  # zero output blocks completing the last group
        self.zpad = np.zeros((pad, *pair.shape[1:]), bool) if pad else None
        self.csize = (pair.cob + pad) * pair.cib  # its per-(output, input block) counts
        self.nbytes = self.csize * pair.kk
        # masks reduced alike: kernel size, trailing shape, group; arrays only when G > A
        self.bkey = (pair.kk, pair.tid, G, 0 if G <= A else A)
        self.bid = _bucket_id(self.bkey)
        self.frac_arrays = None


_BUCKETS: dict = {}  # bucket key -> id


def _bucket_id(bkey: tuple) -> int:
    """An integer per bucket key, kernel size first: sorting mask queries by it puts each
    kernel size together and each bucket in one run."""
    bid = _BUCKETS.get(bkey)
    if bid is None:
        bid = _BUCKETS[bkey] = bkey[0] * (1 << 24) + len(_BUCKETS)
    return bid


_QCOLS = ("nst", "npairs", "n_cg", "n_kc", "n_tiles", "pix", "fits_res", "fits_non", "dbs",
          "st_last", "g_last", "tail_alu", "sa", "cnt_pad", "cnt_data", "partial", "ncls",
          "tile", "G", "K", "tot", "rsize", "nrow", "share", "n", "cin", "h", "w", "cout", "kh",
          "kw", "stride", "groups", "oh", "ow", "cob", "cib", "R", "C", "A", "B", "L", "ab",
          "wb", "inp_depth", "wgt_depth", "acc_depth", "ld_first", "g0t_first")  # fmt: skip
_QI = {k: i for i, k in enumerate(_QCOLS)}
# (tile class, step) pair columns: small integers (exact in float32, half the bytes to copy
# per batch) and those that are not (a DMA time or a store chain can pass 2**24 cycles, port
# beats and the store bound are fractional)
_PCOLS32 = ("es", "cnt", "g0t", "w_alu", "fk", "bias", "bst", "mab", "A", "kb")
_PCOLS64 = ("in_dma", "port", "sbound", "ld1", "schain")
#: ALU passes of an output block's epilogue: one ADD_REQUANT (bias ADD, REQUANT and the ReLU's
#: MAX #0 fused by ``schedule.fuse_epilogues``; the dataset's clip is a ReLU, nothing is left)
_N_ALU = 1
_BOOL = np.dtype(bool)


class _Pools:
    """The built plans' query rows (a column per plan) and (tile class, step) pair columns, one
    plan after the other in growing arrays: a batch gathers its query rows with one fancy index
    and the compiled kernel reads its pairs in place (instead of concatenating a few hundred
    small arrays per batch).

    Plans dropped from the caches leave their columns behind; past ``max_plans`` plans or
    ``max_pairs`` pair columns (~40 MB each), or on :func:`clear_caches`, the pools start again
    empty (generation ``gen`` + 1) and the caches of plans are emptied with them, so that no
    cached plan points into old pools; the plans of the batch under way are added again
    (:meth:`current`, past the limits if need be)."""

    def __init__(self, max_plans: int = 1 << 16, max_pairs: int = 1 << 20):
        self.max_plans, self.max_pairs = max_plans, max_pairs
        self.gen = 0
        self.reset()

    def reset(self) -> None:
        self.gen += 1
        self.Q = self.P32 = self.P64 = None
        self.nq = self.ne = 0

    def add(self, Q: np.ndarray, P32: np.ndarray, P64: np.ndarray, start_again: bool = True):
        """Append query rows ``Q`` ``(columns, plans)`` and pair columns; the first index of
        each (``start_again``: empty the pools first if they are full)."""
        nq, ne = Q.shape[1], P32.shape[1]
        if self.Q is not None and (
            self.Q.shape[0] != Q.shape[0]
            or start_again
            and (self.nq + nq > self.max_plans or self.ne + ne > self.max_pairs)
        ):
            _clear_plan_caches()
            self.reset()
        if self.Q is None:
            self.Q = np.empty((Q.shape[0], max(64, 2 * nq)))
            self.P32 = np.empty((P32.shape[0], max(1024, 2 * ne)), np.float32)
            self.P64 = np.empty((P64.shape[0], max(1024, 2 * ne)))
        self.Q = _room(self.Q, self.nq + nq)
        self.P32 = _room(self.P32, self.ne + ne)
        self.P64 = _room(self.P64, self.ne + ne)
        qi, pe = self.nq, self.ne
        self.Q[:, qi : qi + nq] = Q
        self.P32[:, pe : pe + ne] = P32
        self.P64[:, pe : pe + ne] = P64
        self.nq, self.ne = qi + nq, pe + ne
        return qi, pe

    def current(self, plans: list) -> None:
        """Add again the plans of an older generation (the pools were emptied while their
        batch was under way)."""
        for p in plans:
            if p.gen != self.gen:
                p.qi, p.pe = self.add(p.q[:, None], p.P, p.P64, start_again=False)
                p.gen = self.gen


def _room(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` with at least ``n`` columns (doubling)."""
    if a.shape[1] >= n:
        return a
    b = np.empty((a.shape[0], max(n, 2 * a.shape[1])), a.dtype)
    b[:, : a.shape[1]] = a
    return b


_POOL = _Pools()


def _build_plans(plans: list) -> None:
    """Fill the arrays of new plans, all at once (numpy over the plans' steps, tile classes
    and (tile class, step) pairs)."""
    m = len(plans)
    lay = np.array([p.pair.lrow for p in plans], np.int64).reshape(m, -1)
    nb, cin, h, w, cout, kh, kw, sh, sw, dh, dw, pt, pl, groups, oh, ow, cob, cib = lay.T
    tr = np.array([p.pair.trow for p in plans], np.float64).reshape(m, -1)
    R, C, A, B, L, ab, wb, inp_depth, wgt_depth, acc_depth = tr.T
    sc = np.array([(*p.tile, p.G, p.K, p.dbs) for p in plans], np.int64).reshape(m, -1)
    TH, TW, G, K, dbs = sc.T
    n_cg, n_kc = -(-cob // G), -(-cib // K)
    nst = n_cg * n_kc
    inp_b = R * ab
    # the code generator's fit_double_buffer (both halves must fit), resident weights or not
    th_in = (TH - 1) * sh + (kh - 1) * dh + 1
    tw_in = (TW - 1) * sw + (kw - 1) * dw + 1
    fit = (2 * K * th_in * tw_in <= inp_depth) & (2 * G * TH * TW + 2 * G <= acc_depth)
    wk = G * K * kh * kw
    fits_res, fits_non = fit & (wk <= wgt_depth), fit & (2 * wk <= wgt_depth)

    # ---- steps (group g, chunk k) of every plan
    st_off = _excl_cumsum(nst)
    seg_s, loc_s = _ragged_arange(nst)
    nk = n_kc[seg_s]
    g_s, k_s = loc_s // nk, loc_s % nk
    Gs, Ks, cibs = G[seg_s], K[seg_s], cib[seg_s]
    gsz = np.minimum(Gs, cob[seg_s] - g_s * Gs)  # output blocks of the group
    ksz = np.minimum(Ks, cibs - k_s * Ks)  # input blocks of the chunk
    first_k = k_s == 0
    bias_beats = np.ceil(2 * gsz * C[seg_s] * 4 / B[seg_s])
    bias = (L[seg_s] + bias_beats) * first_k
    gsz_prev = gsz[st_off[seg_s] + ((g_s - 1) % n_cg[seg_s]) * nk + k_s].astype(float)
    loaded = np.where(nk > 1, 1.0, (g_s == 0).astype(float))  # input chunk loaded by the step
    lk = loaded * ksz
    # mask reduction indices: each (step, output block of its group) row of counts
    seg_j, j = _ragged_arange(gsz)
    lo = (g_s[seg_j] * Gs[seg_j] + j) * cibs[seg_j] + k_s[seg_j] * Ks[seg_j]
    rs = np.stack([lo, lo + ksz[seg_j]])
    rs_first = _excl_cumsum(gsz)
    nrs = cob * n_kc
    rs_plan = _excl_cumsum(nrs)
    r_lo = g_s * cibs + k_s * Ks
    # a plan's RS: each output block's whole row first (is it empty), then the step rows
    # (with one chunk the step rows are the whole rows); RR: each step's rows [lo, hi) in RS
    # and [lo, hi) in the per-(group, input block) rounds
    n_eb = np.where(n_kc > 1, cob, 0)
    rs_lo = rs_first - rs_plan[seg_s] + n_eb[seg_s]
    rr = np.stack([rs_lo, rs_lo + gsz, r_lo, r_lo + ksz])
    seg_o, co = _ragged_arange(n_eb)
    eb = np.stack([co * cib[seg_o], (co + 1) * cib[seg_o]])
    # per step: arrays, latency, weight bytes / beat, the next step (cyclically: the next
    # tile's first) and the share of the load charged to it (the last tile has no next)

    # ---- tile classes
    _, th, thi, rows, hc, nh, th_last = _dim_classes(oh, TH, sh, kh, dh, pt, h)
    _, tw, twi, cols, wc, nw, tw_last = _dim_classes(ow, TW, sw, kw, dw, pl, w)
    seg_c, ia, ib = _ragged_outer(nh, nw)
    t = (th[ia] * tw[ib]).astype(float)
    data = (rows[ia] * cols[ib]).astype(float)
    padded = (thi[ia] * twi[ib]).astype(float)
    cnt = (hc[ia] * wc[ib] * nb[seg_c]).astype(float)
    n_tiles = _bsum(seg_c, cnt, m)
    pix = _bsum(seg_c, cnt * t, m)
    Lc, Bc = L[seg_c], B[seg_c]
    beats_in = np.ceil(data * inp_b[seg_c] / Bc) + (padded - data)  # one input-block load
    sb = np.ceil(t * C[seg_c] * ab[seg_c] / Bc)  # one output-block store
    alu_one = ALU_LATENCY + t
    g0 = gemm_fixed_cycles(R, C)
    st1 = Lc + sb  # one output-block store (latency and beats)
    ncls = nh * nw
    share = 1.0 - 1.0 / (n_tiles * n_cg)  # regions that follow another (double buffered)
    # the first (top-left) tile: its input block's load and a GEMM's cycles (the fill)
    th0, tw0 = np.minimum(TH, oh), np.minimum(TW, ow)
    thi0 = (th0 - 1) * sh + (kh - 1) * dh + 1
    twi0 = (tw0 - 1) * sw + (kw - 1) * dw + 1
    rows0 = thi0 - np.maximum(0, pt) - np.maximum(0, thi0 - pt - h)
    cols0 = twi0 - np.maximum(0, pl) - np.maximum(0, twi0 - pl - w)
    data0 = (rows0 * cols0).astype(float)
    ld_first = L + np.ceil(data0 * inp_b / B) + (thi0 * twi0 - data0)

    # ---- (tile class, step) pairs
    seg_e, ec, es = _ragged_outer(ncls, nst)
    fk = first_k[es]
    lke = lk[es]
    bias_e = bias[es]
    gp_e, st_e = gsz_prev[es], st1[ec]
    pcols = {
        "es": es - st_off[seg_e],
        "cnt": cnt[ec],
        "g0t": g0[seg_e] + t[ec],
        "w_alu": alu_one[ec],
        "fk": fk,
        "in_dma": (Lc + beats_in)[ec] * lke,
        "bias": bias_e,
        "bst": np.maximum(bias_e, fk * (Lc + sb)[ec]),
        "port": beats_in[ec] * lke + fk * (share[seg_e] * gsz_prev[es] * sb[ec] + bias_beats[es]),
        "mab": gsz_prev[es] * _N_ALU,
        "A": A[seg_e],
        "kb": ksz[es],
        "sbound": fk * share[seg_e] * store_bound(gp_e, st_e, A[seg_e], g0[seg_e] + t[ec]),
        "ld1": (Lc + beats_in)[ec] * loaded[es],
        "schain": fk * (_N_ALU * alu_one[ec] + gp_e * st_e),
    }
    P32 = np.stack([np.asarray(pcols[k], np.float32) for k in _PCOLS32])  # column-major
    P64 = np.stack([np.asarray(pcols[k], np.float64) for k in _PCOLS64])

    qcols = {
        "nst": nst, "npairs": ncls * nst, "n_cg": n_cg, "n_kc": n_kc, "n_tiles": n_tiles,
        "pix": pix, "fits_res": fits_res, "fits_non": fits_non, "dbs": dbs,
        "st_last": L + np.ceil((th_last * tw_last) * C * ab / B), "g_last": cob - (n_cg - 1) * G,
        "tail_alu": ALU_LATENCY + th_last * tw_last, "sa": _bsum(seg_c, cnt * alu_one, m),
        "cnt_pad": _bsum(seg_c, cnt * padded, m), "cnt_data": _bsum(seg_c, cnt * data, m),
        "partial": _bsum(seg_c, cnt * (t < (TH * TW)[seg_c]), m), "ncls": ncls,
        "tile": TH * TW, "G": G, "K": K, "tot": [p.pair.tot for p in plans],
        "rsize": n_cg * cib, "nrow": n_eb + nrs, "share": share,
        "n": nb, "cin": cin, "h": h, "w": w, "cout": cout, "kh": kh, "kw": kw, "stride": sh,
        "groups": groups, "oh": oh, "ow": ow, "cob": cob, "cib": cib, "R": R, "C": C, "A": A,
        "B": B, "L": L, "ab": ab, "wb": wb, "inp_depth": inp_depth, "wgt_depth": wgt_depth,
        "acc_depth": acc_depth, "ld_first": ld_first, "g0t_first": g0 + th0 * tw0,
    }  # fmt: skip
    Q = np.stack([np.asarray(qcols[k], np.float64) for k in _QCOLS], axis=1)
    S = np.array([p.srow for p in plans], np.float64).reshape(m, -1)
    Q = np.concatenate([Q, S], axis=1)
    pe, se, re, oe = np.cumsum(ncls * nst), np.cumsum(nst), np.cumsum(nrs), np.cumsum(n_eb)
    qi, p0 = _POOL.add(Q.T, P32, P64)
    for k, p in enumerate(plans):
        p.q = Q[k]
        p.P = P32[:, pe[k] - (ncls[k] * nst[k]) : pe[k]]
        p.P64 = P64[:, pe[k] - (ncls[k] * nst[k]) : pe[k]]
        p.qi, p.pe, p.gen = qi + k, p0 + int(pe[k] - ncls[k] * nst[k]), _POOL.gen
        p.RR = rr[:, se[k] - nst[k] : se[k]].astype(np.int32)
        p.RS = np.concatenate([eb[:, oe[k] - n_eb[k] : oe[k]], rs[:, re[k] - nrs[k] : re[k]]],
                              axis=1).astype(np.int32)  # fmt: skip


def _frac_arrays(plan: _Plan) -> tuple:
    """Per step ``(non-zero blocks, longest chain, GEMM rounds)`` of the structural blocks (a
    fraction query scales them, see ``reference.analyze_reference``), the structural ``n_p`` per
    (group, chunk, input block), the structural blocks of each output block and how many of
    those are empty (cached on the plan)."""
    if plan.frac_arrays is None:
        pair = plan.pair
        cob, cib, G, K = pair.cob, pair.cib, plan.G, plan.K
        n_cg, n_kc = -(-cob // G), -(-cib // K)
        blk = np.zeros((n_cg * G, n_kc * K))
        blk[:cob, :cib] = pair.per.reshape(cob, cib)
        b4 = blk.reshape(n_cg, G, n_kc, K)
        lay = pair.layer
        R, C, A = pair.trow[:3]
        n_p = _struct_position_counts(lay.cout, lay.cin, lay.groups, lay.kh, lay.kw, R, C, G, K)
        rounds = (fluid_rounds(n_p, 0.0, A).sum(axis=2) * pair.kk).ravel()
        scr = np.stack([b4.sum(axis=(1, 3)).ravel(), b4.sum(axis=3).max(axis=1).ravel(), rounds],
                       axis=1)  # fmt: skip
        rowsum = pair.per.reshape(cob, cib).sum(axis=1)
        plan.frac_arrays = (scr, n_p, rowsum, float((rowsum == 0).sum()))
    return plan.frac_arrays


@lru_cache(maxsize=4096)
def _struct_counts(cout, cin, groups, kh, kw, R, C):
    """The structural mask, its flat ``(COB * CIB,)`` block counts (over KH x KW), their total,
    whether every block is structural and the distinct counts."""
    from .layer import structural_blocks

    s = structural_blocks(cout, cin, groups, kh, kw, R, C)
    per = s.sum(axis=(2, 3)).astype(float).ravel()
    per.flags.writeable = False
    return s, per, float(s.sum()), bool(s.all()), tuple(float(v) for v in np.unique(per))


def _cfg_row(cfg: HardwareConfig) -> tuple:
    em = energy_model_of(cfg)
    t = em.table
    return (
        cfg.clock_mhz, em.mac_pj, t["add32"], t["mult32"],
        em.sram_pj_per_byte(cfg.inp_buffer_bytes), em.sram_pj_per_byte(cfg.wgt_buffer_bytes),
        em.sram_pj_per_byte(cfg.acc_buffer_bytes), em.dram_pj_per_byte, t["static_mw"],
        cfg.act_bits, cfg.weight_bits, cfg.macs_per_cycle,
    )  # fmt: skip


_CFG_COLS = ("clock", "mac_pj", "add32", "mult32", "e_inp", "e_wgt", "e_acc", "e_dram",
             "static_mw", "act_bits", "weight_bits", "macs_per_cycle")  # fmt: skip


def _excl_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros(len(a), dtype=np.int64)
    if len(a) > 1:
        np.cumsum(a[:-1], out=out[1:])
    return out


def _ragged_arange(sizes: np.ndarray):
    """``(segment, local index)`` of the concatenation of ``arange(s)`` for every size."""
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    seg = np.repeat(np.arange(len(sizes)), sizes)
    local = np.arange(total, dtype=np.int64) - np.repeat(_excl_cumsum(sizes), sizes)
    return seg, local


def _ragged_outer(na: np.ndarray, nb: np.ndarray):
    """Every (a, b) pair of each segment: ``(segment, index into a, index into b)`` where the
    a's (b's) of the segments are stored one segment after the other."""
    seg, local = _ragged_arange(na * nb)
    nbs = nb[seg]
    ia = _excl_cumsum(na)[seg] + local // nbs
    ib = _excl_cumsum(nb)[seg] + local % nbs
    return seg, ia, ib


def _dim_classes(out, tile, stride, k, dil, pad_lo, size):
    """Tile classes of one dimension for every query (arrays ``(n,)``), as ``_positions``.

    Returns per class ``(segment, t, t_in, in_bounds, count)``, the number of classes of each
    query and the size of each query's last tile.
    """
    nt = -(-out // tile)
    seg, j = _ragged_arange(nt)
    T, s = tile[seg], stride[seg]
    o0 = j * T
    t = np.minimum(T, out[seg] - o0)
    t_in = (t - 1) * s + (k[seg] - 1) * dil[seg] + 1
    i0 = o0 * s - pad_lo[seg]
    lo = np.maximum(0, -i0)
    hi = np.maximum(0, i0 + t_in - size[seg])
    valid = t_in - lo - hi
    vmax = int(valid.max()) + 1 if len(valid) else 1
    tmax = int(t.max()) + 1 if len(t) else 1
    key = (seg * tmax + t) * vmax + valid
    uniq, count = np.unique(key, return_counts=True)
    cseg = uniq // (tmax * vmax)
    ct = (uniq // vmax) % tmax
    cvalid = uniq % vmax
    ct_in = (ct - 1) * stride[cseg] + (k[cseg] - 1) * dil[cseg] + 1
    ncls = np.bincount(cseg, minlength=len(out))
    t_last = out - (nt - 1) * tile
    return cseg, ct, ct_in, cvalid, count, ncls, t_last


def _bsum(seg, weights, n):
    return np.bincount(seg, weights=weights, minlength=n)


def _mask_steps(masks: list, plans: list, q: dict):
    """Per-step non-zero blocks, longest chain and GEMM rounds, and the empty output blocks,
    of mask queries (``masks`` and their ``plans``, in bucket order; ``q``: their query rows
    first).

    The masks go into one flat byte array in that order (each padded with zero output blocks
    to whole groups); per kernel size one ``einsum`` gives the non-zero positions of every
    (output block, input block), per bucket one reshape + ``max`` (``G <= A``: a position costs
    a round when any of its group's blocks is non-zero) or sum + ceil division by ``A`` gives
    the GEMM rounds of every (group, input block, position), summed per kernel size by one more
    ``einsum``.  Prefix sums of both and the plans' ``[lo, hi)`` indices give every step's
    sums (as :func:`tvm_hapm.cost.reference.position_rounds` and the reshapes of
    :func:`tvm_hapm.cost.reference.analyze_reference`).
    """
    parts = []
    kk_ranges = []  # (kk, [(first byte, last byte, G, A, W)])
    pos = 0
    for plan, mask in zip(plans, masks):
        kk, _, G, A = plan.bkey  # A = 0: G <= A
        parts.append(mask)
        if plan.zpad is not None:
            parts.append(plan.zpad)
        end = pos + plan.nbytes
        if not kk_ranges or kk_ranges[-1][0] != kk:
            kk_ranges.append((kk, []))
        bl = kk_ranges[-1][1]
        if bl and bl[-1][2] == G and bl[-1][3] == A and bl[-1][4] == plan.pair.cib * kk:
            bl[-1][1] = end
        else:
            bl.append([pos, end, G, A, plan.pair.cib * kk])
        pos = end
    F = np.concatenate(parts, axis=None) if len(parts) > 1 else parts[0].reshape(-1)
    F = F.view(np.uint8)
    pcc_parts, r_parts = [], []
    for kk, bl in kk_ranges:
        a, b = bl[0][0], bl[-1][1]
        pcc_parts.append(sum_rows(F[a:b], kk))
        S = np.empty(sum((hi - lo) // G for lo, hi, G, _, _ in bl), np.uint8)
        o = 0
        for lo, hi, G, A, W in bl:
            n_s = (hi - lo) // G
            out = S[o : o + n_s]
            o += n_s
            if G == 1:
                out[:] = F[lo:hi]
                continue
            Y = F[lo:hi].reshape(-1, G, W)
            if not A:  # at most A blocks: a round when any is non-zero
                if G == 2:
                    np.bitwise_or(Y[:, 0], Y[:, 1], out=out.reshape(-1, W))
                else:
                    np.max(Y, axis=1, out=out.reshape(-1, W))
            else:  # max(n_p, A) A-ths of a round (counted exactly below past 255)
                # sum_rows adds a position's rounds in uint8: they must fit with every
                # position's (ceil(n_p / A) of a 7x7 kernel with G >= 6 A overflowed before)
                if G * kk > 255:
                    S = None
                    break
                c = Y.sum(axis=1, dtype=np.int32)
                out[:] = np.where(c > 0, np.maximum(c, A), 0).reshape(-1)
        if S is None:  # past 255 an input block: the slow exact path
            S = np.concatenate([group_rounds(F[lo:hi], G, A, W) for lo, hi, G, A, W in bl])
        r_parts.append(sum_rows(S, kk))
    pcc = np.concatenate(pcc_parts) if len(pcc_parts) > 1 else pcc_parts[0]
    rnd = np.concatenate(r_parts) if len(r_parts) > 1 else r_parts[0]
    cp = np.zeros(len(pcc) + 1, np.int32)
    np.cumsum(pcc, out=cp[1:])
    cr = np.zeros(len(rnd) + 1, np.int32)
    np.cumsum(rnd, out=cr[1:])

    nm = len(plans)
    nst = q["nst"][:nm].astype(np.int64)
    cob = q["cob"][:nm].astype(np.int64)
    nrow = q["nrow"][:nm].astype(np.int64)
    c_off = _excl_cumsum(np.array([p.csize for p in plans], np.int64))  # each query's counts
    r_off = _excl_cumsum(q["rsize"][:nm].astype(np.int64))  # and rounds
    RS = np.concatenate([p.RS for p in plans], axis=1) if nm > 1 else plans[0].RS
    RR = np.concatenate([p.RR for p in plans], axis=1) if nm > 1 else plans[0].RR
    off = np.repeat(c_off, nrow).astype(np.int32)
    d = np.zeros(RS.shape[1] + 1, np.int32)  # (and a last row: reduceat's segments end before it)
    np.subtract(cp[RS[1] + off], cp[RS[0] + off], out=d[:-1])  # non-zero blocks of each row
    base = _excl_cumsum(nrow)
    b_s = np.repeat(base, nst)
    seg = np.empty(2 * len(b_s), np.int64)  # [lo, hi) of every step
    seg[0::2] = RR[0] + b_s
    seg[1::2] = RR[1] + b_s
    steps = np.add.reduceat(d, seg)[0::2]
    chain = np.maximum.reduceat(d, seg)[0::2]
    r_s = np.repeat(r_off, nst)
    # rounds (A-ths of rounds when G > A: see group_rounds)
    unit = np.where(q["G"][:nm] > q["A"][:nm], q["A"][:nm], 1.0)
    rounds = (cr[RR[3] + r_s] - cr[RR[2] + r_s]) / np.repeat(unit, nst)
    rows = np.empty(2 * len(plans), np.int64)  # [first row, first step row) of each query
    rows[0::2], rows[1::2] = base, base + cob
    empty = np.add.reduceat(d == 0, rows, dtype=np.int64)[0::2]
    return steps, chain, rounds, empty


def _mask_steps_jit(masks: list, plans: list, q: dict, S: np.ndarray, empty: np.ndarray):
    """:func:`_mask_steps` by the compiled kernel (:func:`tvm_hapm.cost._jit.mask_steps`: one
    sweep over each mask, any query order; the masks are concatenated without padding), into
    the rows of ``S`` (non-zero blocks, longest chain, rounds of every step) and ``empty``."""
    nm = len(plans)
    F = np.concatenate(masks, axis=None).view(np.uint8)
    cob, cib, kh, kw, G, K, A, nst = np.array(
        [q[k][:nm] for k in ("cob", "cib", "kh", "kw", "G", "K", "A", "nst")], np.int64
    )
    kk = kh * kw
    jit_kernels().mask_steps(F, _excl_cumsum(cob * cib * kk), cob, cib, kk, G, K, A,
                          _excl_cumsum(nst), S[0], S[1], S[2], empty)  # fmt: skip


def group_rounds(Y: np.ndarray, G: int, A: int, W: int) -> np.ndarray:
    """GEMM rounds of every (group, input block, position) of masks whose rows ``Y`` form
    whole groups of ``G`` output blocks of ``W`` positions: with ``G <= A`` (``A = 0``) a round
    where any block is non-zero; else ``max(n_p, A)`` A-ths of a round for the ``n_p > 0``
    non-zero blocks (integers: sums stay exact and in any order, the caller divides by ``A``,
    see :func:`position_rounds`)."""
    if G == 1:
        return Y.astype(np.int64)
    Y = Y.reshape(-1, G, W)
    if not A:
        return Y.max(axis=1).reshape(-1).astype(np.int64)
    n_p = Y.sum(axis=1, dtype=np.int64)
    return np.where(n_p > 0, np.maximum(n_p, A), 0).reshape(-1)


def sum_rows(x: np.ndarray, kk: int) -> np.ndarray:
    """Sums of consecutive runs of ``kk`` elements."""
    if kk == 1:
        return x
    x = x.reshape(-1, kk)
    if kk < 256 and x.dtype == np.uint8:
        return np.einsum("ij->i", x)
    return x.sum(axis=1, dtype=np.int64)


def _frac_steps(fq: list):
    """:func:`_mask_steps` of the fraction queries (``(plan, fraction)``): the structural
    blocks scaled by ``1 - f``, rounds ``max(n_p (1 - f), A) / A * (1 - f ** n_p)``, as rows
    ``(3, steps)`` (non-zero blocks, longest chain, rounds); the empty output blocks; whether
    the scaled counts are integers (exact)."""
    mats, empty, exact = [], [], []
    for plan, f in fq:
        scr, n_p, rowsum, empty0 = plan.frac_arrays or _frac_arrays(plan)
        if f == 0.0:
            mats.append(scr)
            empty.append(empty0)
            exact.append(True)
            continue
        keep = 1.0 - f
        pair = plan.pair
        ex = not (f > 0 and any(abs(v * keep - round(v * keep)) >= 1e-9 for v in pair.uniq))
        r = fluid_rounds(n_p, f, pair.trow[2])
        rounds = (r.sum(axis=2) * pair.kk).ravel()
        mats.append(np.stack([scr[:, 0] * keep, scr[:, 1] * keep, rounds], axis=1))
        empty.append(float((rowsum * keep == 0).sum()) if ex else 0.0)
        exact.append(ex)
    M = np.concatenate(mats) if len(mats) > 1 else mats[0]
    return M.T, empty, exact


_KERNELS: list = []  # [the compiled kernels' module, or None without numba], once imported


def jit_kernels():
    """The compiled kernels (:mod:`tvm_hapm.cost._jit`), imported on first use: numba's import
    and the kernels' load from numba's disk cache (~0.6 s; their compilation when the cache is
    empty, ~4-5 s) are paid by the first batch of a process, not by importing ``tvm_hapm``.
    ``None`` if numba cannot be imported: the numpy path (:func:`_mask_steps`, :func:`_timing`)
    computes the same numbers, bit for bit, about twice as slowly."""
    if not _KERNELS:
        try:
            from . import _jit
        except ImportError:  # pragma: no cover - numba is a dependency
            _jit = None
        _KERNELS.append(_jit)
    return _KERNELS[0]


def analyze_batch(queries) -> BatchAnalysis:
    """Mid-level analysis of many ``(layer, config, schedule, sparsity)`` queries at once.

    The same model as :func:`analyze_reference` (``schedule=None``: ``plan_conv``'s;
    ``sparsity``: a :class:`BlockSparsity`, a fraction or a block mask), evaluated over the
    whole batch with numpy and two compiled loops (:mod:`tvm_hapm.cost._jit`: the mask
    reduction and the timing / energy arithmetic; without numba, numpy, :func:`jit_kernels`): the
    per-query Python work is reading the query and counting the mask's non-zero blocks (on
    which the compiler's schedule depends).
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
        seen = _PAIR_OF_OBJECTS.get(k)
        if seen is not None and seen[0]() is layers[i] and seen[1]() is cfg:
            pair = seen[2]
        else:
            pair = _pair(layers[i], cfg, ck[1], pending)
            if len(_PAIR_OF_OBJECTS) > _MAX_PAIRS:
                _PAIR_OF_OBJECTS.clear()
            _PAIR_OF_OBJECTS[k] = (weakref.ref(layers[i]), weakref.ref(cfg), pair)
        pair_of[k] = pair
        cidx_of[k] = ck[0]
    pairs = list(map(pair_of.__getitem__, keys))
    # ---- sparsity: a block mask (checked, structural blocks only) or a fraction
    masks = [s.mask if s.__class__ is BlockSparsity else _mask_of(s) for s in sps]
    fix = [
        i
        for i, m, pair in zip(range(n), masks, pairs)
        if m is not None and (m.dtype is not _BOOL or m.shape != pair.shape or not pair.full)
    ]
    for i in fix:
        masks[i] = _checked_mask(masks[i], pairs[i])
    nnzs = [None if m is None else _count_nonzero(m) for m in masks]
    # ---- plans: the schedule given (read once per object), or the compiler's, planned for
    # the non-zero blocks it is given
    # mask queries (all but the full masks; by bucket for the numpy path), then the fraction
    # queries
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
    gen = _POOL.gen
    if pending:
        _build_plans(pending)
    if _POOL.gen != gen:  # the pools started again while this batch's plans were built
        _POOL.current(plans)
    kern = jit_kernels()
    if mi and kern is None:  # the numpy reduction runs bucket by bucket
        mi.sort(key=lambda i: plans[i].bid)
    order = mi + fi
    nm = len(mi)
    plans_o = [plans[i] for i in order]
    cidx = np.array(list(map(cidx_of.__getitem__, keys)), np.int64)[order]

    # ---- per query (in that order) and per step: non-zero blocks, chains, rounds
    Q = _POOL.Q[:, [p.qi for p in plans_o]]  # a row per column
    q = dict(zip(_QCOLS, Q))
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
        if kern is None:
            steps_m, chain_m, rounds_m, empty[:nm] = _mask_steps(masks_m, plans_o[:nm], q)
            S[:, :ns_m] = steps_m, chain_m, rounds_m
        else:
            _mask_steps_jit(masks_m, plans_o[:nm], q, S[:, :ns_m], empty[:nm])
        nnz[:nm] = [nnzs[i] for i in mi]
        frac[:nm] = 1.0 - nnz[:nm] / np.maximum(tot[:nm], 1)
    if fi:
        fq = [(plans[i], 0.0 if nnzs[i] is not None else _frac_of(sps[i])) for i in fi]
        S[:, ns_m:], empty[nm:], exact[nm:] = _frac_steps(fq)
        frac[nm:] = [f for _, f in fq]
        nnz[nm:] = tot[nm:] * (1.0 - frac[nm:])
    steps, chain, rounds = S
    cfa = np.array(cfg_rows, np.float64)[cidx]
    if kern is None:
        cycles, energy, counts = _timing(q, plans_o, steps, chain, rounds, empty, exact, nnz,
                                         frac, tot, cfa)  # fmt: skip
    else:
        cycles, energy, counts = _timing_jit(kern, Q, q, plans_o, steps, chain, rounds, empty,
                                             exact, nnz, frac, tot, cfa)  # fmt: skip
    columns = {
        "n": q["n"], "cin": q["cin"], "h": q["h"], "w": q["w"], "cout": q["cout"],
        "kh": q["kh"], "kw": q["kw"], "stride": q["stride"], "groups": q["groups"],
        "oh": q["oh"], "ow": q["ow"], "cob": q["cob"], "cib": q["cib"], "arrays": q["A"],
        "rows": q["R"], "cols": q["C"], "inp_depth": q["inp_depth"],
        "wgt_depth": q["wgt_depth"], "acc_depth": q["acc_depth"], "bytes_per_cycle": q["B"],
        "dram_latency": q["L"], "act_bits": cfa[:, _CFG_COLS.index("act_bits")],
        "weight_bits": cfa[:, _CFG_COLS.index("weight_bits")],
        "macs_per_cycle": cfa[:, _CFG_COLS.index("macs_per_cycle")],
    }  # fmt: skip
    nq = len(_QCOLS)
    sfields = _sched_field_names(plans_o[0].sched)
    columns.update({f"sched_{k}": Q[nq + j] for j, k in enumerate(sfields)})
    schedules = [p.sched for p in plans]
    perm = None if nm == 0 or order == list(range(n)) else np.array(order, np.int64)
    return BatchAnalysis(cycles, energy, counts, columns, schedules, perm)


_CFG_INFO: dict = {}  # id(config) -> (weak reference, timing key, energy / width row)


def _cfg_info(cfg: HardwareConfig) -> tuple:
    """A config's timing key and its row of ``_CFG_COLS`` (kept per config object)."""
    seen = _CFG_INFO.get(id(cfg))
    if seen is not None and seen[0]() is cfg:
        return seen[1], seen[2]
    if len(_CFG_INFO) > 256:
        _CFG_INFO.clear()
    _BUCKETS.clear()
    tkey, row = _timing_key(cfg), _cfg_row(cfg)
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


def _checked_mask(mask, pair: _Pair) -> np.ndarray:
    """A query's block mask as bool, of the layer's shape, on its structural blocks."""
    m = np.asarray(mask, bool)
    if m.shape != pair.shape:
        raise ValueError(f"block mask of shape {m.shape}, expected {pair.shape}")
    return m if pair.full else m & pair.struct


try:  # numpy's count without the argument handling of np.count_nonzero (numpy >= 2)
    from numpy._core.multiarray import count_nonzero as _count_nonzero
except ImportError:  # pragma: no cover
    _count_nonzero = np.count_nonzero


def _timing(q, plans, steps, chain, rounds, empty, exact, nnz, frac, tot, cfa):
    """Cycles, energy (uJ) and the counts of the queries (rows of ``q``, plans ``plans``),
    given each step's non-zero blocks, longest chain and position rounds and each query's
    empty output blocks, non-zero blocks and zero fraction (see
    :func:`tvm_hapm.cost.reference.analyze_reference`)."""
    n = len(plans)
    cf = dict(zip(_CFG_COLS, cfa.T))
    nst = q["nst"].astype(np.int64)
    npairs = q["npairs"].astype(np.int64)
    R, C, A, B, L = q["R"], q["C"], q["A"], q["B"], q["L"]
    ab, wb = q["ab"], q["wb"]
    inp_b, wgt_b, acc_b = R * ab, R * C * wb, C * 4
    n_cg, n_tiles, pix = q["n_cg"], q["n_tiles"], q["pix"]
    cob, cib = q["cob"], q["cib"]
    st_off = _excl_cumsum(nst)
    A_s, L_s, wB_s = np.repeat(np.stack([A, L, wgt_b / B]), nst, axis=1)
    # pruned blocks: the midpoint of the position rounds and the chain / throughput bound
    lower = np.minimum(rounds, np.maximum(chain, np.ceil(steps / A_s - 1e-9)))
    pruned = np.repeat(frac > 0, nst)
    rounds = np.where(pruned, 0.5 * (rounds + lower), rounds)
    has = steps > 0
    skew = np.where(has, np.minimum(steps, A_s) - 1, 0.0)
    resident = nnz <= q["wgt_depth"]
    one_step = nst == 1
    dbuf = (q["dbs"] != 0) & (np.where(resident, q["fits_res"], q["fits_non"]) != 0)
    beats = np.ceil(steps * wB_s - 1e-7)  # robust to summation order
    w_all = beats + L_s * (has + (steps > MAX_TRANSFER).astype(np.float64))  # (2 DMAs past X)
    w_once = np.where(resident, _wload(nnz, B, L, wgt_b), 0.0)
    w_once = np.where(~resident & one_step, w_all[st_off], w_once)
    no_w = np.repeat(resident | one_step, nst)  # no weight load per step
    w_step = np.where(no_w, 0.0, w_all)
    w_beats = np.where(no_w, 0.0, beats)
    # the next weight chunk's load (see analyze_reference): the next step's (the next tile's
    # first after the last), unless some step loads nothing
    if (has | no_w).all():
        last = st_off + nst - 1
        nxt = np.append(w_step[1:], 0.0)
        nxt[last] = w_step[st_off] * (1.0 - 1.0 / n_tiles)
    else:
        nxt = _next_loads(w_step, st_off, nst, n_tiles)

    # ---- (tile class, step) pairs
    P32 = np.concatenate([p.P for p in plans], axis=1) if n > 1 else plans[0].P
    P64 = np.concatenate([p.P64 for p in plans], axis=1) if n > 1 else plans[0].P64
    pc = dict(zip(_PCOLS32, P32))
    pc.update(zip(_PCOLS64, P64))
    seg_e = np.repeat(np.arange(n), npairs)
    es = pc["es"].astype(np.int64) + st_off[seg_e]
    e_q = empty / np.maximum(n_cg, 1)  # MUL of empty output blocks per group (rough)
    m_alu = pc["mab"] + e_q[seg_e]
    w_alu, fk = pc["w_alu"], pc["fk"]
    load_seq = pc["in_dma"] + w_step[es]
    steps_e = steps[es]
    has_e = has[es]
    gemm = rounds[es] * pc["g0t"] + skew[es]
    pre_c = np.maximum(m_alu * w_alu * fk + pc["bst"], pc["schain"])
    pre = np.maximum(np.where(has_e, load_seq, 0.0), pre_c)
    # double buffered (_interleaved_steps, the same arithmetic with fewer temporaries)
    A_e = pc["A"]
    m = m_alu * q["share"][seg_e] + 1.0
    d = np.ceil(steps_e / A_e)
    np.maximum(d, 1.0, out=d)
    period = gemm / d
    ps = np.ceil(m / d)
    n_sl1 = np.ceil(m / ps) - 1.0
    arw = A_e + (m - n_sl1 * ps - 1.0) * w_alu  # A + (rest - 1) * w_alu
    full = A_e + ps * w_alu
    exposed = n_sl1 * np.maximum(full - period, 0.0)
    wait = nxt[es] - n_sl1 * np.maximum(period, full) - arw
    np.maximum(wait, 0.0, out=wait)
    wait += arw + pc["bias"] - period
    np.maximum(wait, 0.0, out=wait)
    exposed += wait
    exposed *= fk
    exposed += gemm
    run = np.maximum(exposed, pc["port"] + w_beats[es], out=exposed)
    np.maximum(run, pc["sbound"], out=run)
    step_db = np.where(has_e, np.maximum(load_seq, run), run)
    # single buffered: loads and GEMMs overlap input block by input block
    ld1 = pc["ld1"]
    step_sb = np.maximum(pre_c + gemm, w_step[es] + ld1 + gemm)
    step_sb = np.where(
        (ld1 > 0) & has_e,
        np.maximum(step_sb, load_seq + gemm / pc["kb"]),
        np.maximum(step_sb, load_seq),
    )
    step = np.where(np.repeat(dbuf, npairs), step_db, step_sb)
    ce = pc["cnt"]
    weighted = np.empty((4, len(ce)))
    for k, x in enumerate((step, load_seq, gemm, pre)):
        np.multiply(x, ce, out=weighted[k])
    sums = np.add.reduceat(weighted, _excl_cumsum(npairs), axis=1)
    # the last region's ALU passes and stores, and the pipeline's fill (analyze_reference)
    st_last, g_last, alu_l = q["st_last"], q["g_last"], q["tail_alu"]
    end = np.maximum((g_last * _N_ALU + e_q) * alu_l + st_last, _N_ALU * alu_l + g_last * st_last)
    fill = np.minimum(
        q["ld_first"] + w_step[st_off], rounds[st_off] * q["g0t_first"] + skew[st_off]
    )
    end = np.where(dbuf, end + fill, st_last)
    cycles = sums[0] + w_once + end + 1.0
    load_total = sums[1] + w_once
    cycles = np.maximum(cycles, load_total + st_last + 1.0)

    # ---- event counts (exact for an exact mask)
    n_kc = q["n_kc"]
    multi = np.where(n_kc > 1, n_cg, 1.0)
    macs = nnz * R * C * pix
    gemms = nnz * n_tiles
    w_blocks_loaded = np.where(resident | one_step, nnz, gemms)
    bias_bytes = 2 * cob * C * 4 * n_tiles
    out_bytes = cob * C * ab * pix
    dram_read = q["cnt_data"] * inp_b * (cib * multi) + w_blocks_loaded * wgt_b + bias_bytes
    cpa = cob * pix * acc_b
    epa = empty * pix * acc_b
    # GEMMs that accumulate, the ALU passes' destinations, ADD_REQUANT's bias and multiplier,
    # the STORE
    acc_reads = (nnz - cob + empty) * pix * acc_b + cpa * (_N_ALU + 3) + epa
    acc_writes = nnz * pix * acc_b + cpa * _N_ALU + bias_bytes + epa
    cpc = cob * pix * C
    latency_ms = cycles / cf["clock"] / 1e3
    energy = (
        np.trunc(macs * ROUND_UP) * cf["mac_pj"]
        + np.trunc(cpc * ROUND_UP) * cf["add32"]  # ADD_REQUANT's add (the ReLU is fused)
        + np.trunc((cpc + empty * pix * C) * ROUND_UP) * cf["mult32"]
        + (pix * nnz + q["cnt_pad"] * cib * multi) * inp_b * cf["e_inp"]
        + (gemms + w_blocks_loaded) * wgt_b * cf["e_wgt"]
        + (acc_reads + acc_writes) * cf["e_acc"]
        + (np.trunc(dram_read * ROUND_UP) + np.trunc(out_bytes * ROUND_UP)) * cf["e_dram"]
    ) * 1e-6 + cf["static_mw"] * latency_ms

    st_sums = np.add.reduceat(np.stack([rounds, steps, steps == 0]), st_off, axis=1)
    rsum, ssum = st_sums[0], st_sums[1]
    smean = ssum / nst
    sstd = np.sqrt(np.add.reduceat((steps - np.repeat(smean, nst)) ** 2, st_off) / nst)
    macs_per_cycle = cf["macs_per_cycle"]
    counts = {
        "macs_dense": q["n"] * q["oh"] * q["ow"] * q["cout"] * (q["cin"] // q["groups"])
        * q["kh"] * q["kw"],
        "macs": macs,
        "struct_blocks": tot,
        "nnz_blocks": nnz,
        "sparsity": frac,
        "n_tiles": n_tiles,
        "tile_classes": q["ncls"],
        "n_cg": n_cg,
        "n_kc": n_kc,
        "steps": q["nst"],
        "resident": resident.astype(float),
        "gemms": gemms,
        "gemm_rounds": rsum * n_tiles,
        "round_efficiency": ssum / np.maximum(A * rsum, 1e-9),
        "empty_steps": st_sums[2] / nst,
        "step_nnz_cv": sstd / np.maximum(smean, 1e-9),
        "empty_cob": np.where(exact, empty, 0.0),
        "mean_tile": pix / np.maximum(n_tiles, 1),
        "partial_tile_frac": q["partial"] / np.maximum(n_tiles, 1),
        "pad_frac": (q["cnt_pad"] - q["cnt_data"]) / np.maximum(q["cnt_pad"], 1),
        "dram_read": dram_read,
        "dram_write": out_bytes,
        "gemm_cycles": sums[2],
        "load_cycles": load_total,
        "epi_cycles": (_N_ALU * cob + e_q) * q["sa"],
        "pre_cycles": sums[3],
        "compute_bound": macs / macs_per_cycle,
        "memory_bound": (dram_read + out_bytes) / B,
        "instructions": n_tiles * (cib * multi + cob * (_N_ALU + 1) + n_cg) + gemms,
        "mid_cycles": cycles,
        "mid_energy_uj": energy,
    }  # fmt: skip
    return cycles, energy, counts


_COUNT_KEYS = ("macs_dense", "macs", "struct_blocks", "nnz_blocks", "sparsity", "n_tiles",
               "tile_classes", "n_cg", "n_kc", "steps", "resident", "gemms", "gemm_rounds",
               "round_efficiency", "empty_steps", "step_nnz_cv", "empty_cob", "mean_tile",
               "partial_tile_frac", "pad_frac", "dram_read", "dram_write", "gemm_cycles",
               "load_cycles", "epi_cycles", "pre_cycles", "compute_bound", "memory_bound",
               "instructions", "mid_cycles", "mid_energy_uj")  # fmt: skip
_KERNEL_ROWS: dict = {}  # the kernel's input rows in Q and in the config rows (index arrays)


def _timing_jit(kern, Q, q, plans, steps, chain, rounds, empty, exact, nnz, frac, tot, cfa):
    """:func:`_timing` by the compiled kernel (:func:`tvm_hapm.cost._jit.timing`, bit for bit
    the same numbers; ``Q``: the query rows as one array, ``q`` by name)."""
    rows = _KERNEL_ROWS.get(kern)
    if rows is None:
        rows = _KERNEL_ROWS[kern] = (
            np.array([_QI[k] for k in kern.IN_ROWS], np.int64),
            np.array([_CFG_COLS.index(k) for k in kern.CFG_ROWS], np.int64),
        )
    c = np.ascontiguousarray
    out = np.empty((len(kern.OUT_ROWS), len(plans)))
    kern.timing(
        Q[rows[0]], c(cfa.T[rows[1]]), np.array([p.pe for p in plans], np.int64),
        c(nnz, np.float64), c(frac, np.float64), c(empty, np.float64), c(exact, bool),
        c(steps, np.float64), c(chain, np.float64), c(rounds, np.float64), _POOL.P32, _POOL.P64,
        out,
    )  # fmt: skip
    o = dict(zip(kern.OUT_ROWS, out))
    o.update(struct_blocks=tot, nnz_blocks=nnz, sparsity=frac, n_tiles=q["n_tiles"],
             tile_classes=q["ncls"], n_cg=q["n_cg"], n_kc=q["n_kc"], steps=q["nst"])  # fmt: skip
    return o["mid_cycles"], o["mid_energy_uj"], {k: o[k] for k in _COUNT_KEYS}


def _wload(nblocks, B, L, wgt_b):
    """Cycles of loading ``nblocks`` weight blocks (one DMA, a second past the X field)."""
    beats = np.ceil(nblocks * wgt_b / B - 1e-7)  # robust to summation order
    return beats + L * ((nblocks > 0).astype(float) + (nblocks > MAX_TRANSFER))


def _next_loads(w_step, st_off, nst, n_tiles):
    """Each step's next weight load (see analyze_reference): the query's next step with one,
    else (cyclically) its first, which is the next tile's."""
    ns = len(w_step)
    seg_s = np.repeat(np.arange(len(nst)), nst)
    pos = np.where(w_step > 0, np.arange(ns), ns)
    first_at = np.minimum.accumulate(pos[::-1])[::-1]  # first step with a load at or after
    after = np.append(first_at[1:], ns)
    end_s = (st_off + nst)[seg_s]
    wrap = after >= end_s
    idx = np.where(wrap, first_at[st_off][seg_s], after)
    nxt = np.where(idx < end_s, w_step[np.minimum(idx, ns - 1)], 0.0)
    return nxt * np.where(wrap, 1.0 - 1.0 / n_tiles[seg_s], 1.0)


@lru_cache(maxsize=16)
def _sched_fields_of(cls) -> tuple:
    return tuple(f.name for f in dataclasses.fields(cls))


def _sched_field_names(schedule) -> tuple:
    return _sched_fields_of(type(schedule))
