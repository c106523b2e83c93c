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
  non-zero blocks costs ``ceil(n_p / A)`` rounds of ``2R + C - 2 + T`` cycles, plus the issue
  skew (:func:`_position_rounds`); with pruned blocks, the midpoint of that and the step's
  longest chain / throughput bound;
* the epilogue of a region (bias ADD, REQUANT, clip) and the next region's bias LOAD run among
  the next region's GEMMs (``schedule.interleave_epilogues``; the per-range accumulator
  scoreboard lets an ALU wait only for GEMMs into its entries): double buffered, only the part
  of each dispatch's share that outlasts the arrays is exposed (:func:`_interleaved_steps`),
  and the last region's epilogue is a tail; single buffered, a region's GEMMs wait for the
  previous epilogue, which overlaps the region's loads;
* all-zero blocks cost nothing (the code generator drops them).

The event counts (MACs, buffer and DRAM bytes, ALU lanes) are exact for the mask given and feed
:class:`tvm_hapm.runtime.energy.EnergyModel`, so the mid energy differs from the simulator's
only through the latency (static energy).
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

import numpy as np

from ..runtime.energy import EnergyModel
from ..runtime.timing import ALU_LATENCY, TimingResult
from ..target.config import HardwareConfig
from ..target.schedule import ConvSchedule, fit_double_buffer, plan_conv
from .layer import BlockSparsity, ConvLayer, structural_mask

__all__ = [
    "Analysis",
    "BatchAnalysis",
    "analyze",
    "analyze_batch",
    "analyze_reference",
    "clear_caches",
    "default_schedule",
    "schedule_dict",
]

_MAX_X = (1 << 12) - 1


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


def _positions(out: int, tile: int, stride: int, k: int, dil: int, pad_lo: int, size: int):
    """Tile classes of one dimension: {(t, t_in, in_bounds): count}."""
    classes: dict = {}
    for o0 in range(0, out, tile):
        t = min(tile, out - o0)
        t_in = (t - 1) * stride + (k - 1) * dil + 1
        i0 = o0 * stride - pad_lo
        lo = max(0, -i0)
        hi = max(0, i0 + t_in - size)
        key = (t, t_in, t_in - lo - hi)
        classes[key] = classes.get(key, 0) + 1
    return classes


@lru_cache(maxsize=4096)
def _positions_cached(out, tile, stride, k, dil, pad_lo, size):
    return tuple(_positions(out, tile, stride, k, dil, pad_lo, size).items())


_ENERGY_MODELS: dict = {}


def _energy_model(cfg: HardwareConfig) -> EnergyModel:
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


def analyze_reference(
    layer: ConvLayer,
    cfg: HardwareConfig,
    schedule: ConvSchedule | None = None,
    sparsity: BlockSparsity | float | np.ndarray | None = None,
) -> Analysis:
    """The per-layer formulation of the mid model, kept as its readable specification.

    :func:`analyze` / :func:`analyze_batch` compute the same quantities with numpy over a whole
    batch of queries (tile classes and steps of all layers in flat arrays); the tests check that
    both agree to float rounding.  Slow (about 0.3 ms a layer): use :func:`analyze_batch`.
    """
    R, C, A = cfg.array_rows, cfg.array_cols, cfg.num_arrays
    B, L = cfg.dram_bytes_per_cycle, cfg.dram_latency_cycles
    ab, wb = cfg.act_bytes, cfg.weight_bytes
    inp_b, wgt_b, acc_b = R * ab, R * C * wb, C * 4
    struct = structural_mask(layer, cfg)
    cob, cib = struct.shape[:2]

    # ---- non-zero blocks per (cob, cib): exact from a mask, else expected from a fraction
    pmask, pfrac = struct, 0.0  # the blocks of the dispatch rounds, and their zero fraction
    if isinstance(sparsity, np.ndarray):
        pmask = np.asarray(sparsity, bool) & struct
        per_cc = pmask.sum(axis=(2, 3)).astype(float)
        frac = 1.0 - per_cc.sum() / max(struct.sum(), 1)
    elif isinstance(sparsity, BlockSparsity) and sparsity.mask is not None:
        pmask = np.asarray(sparsity.mask, bool) & struct
        per_cc = pmask.sum(axis=(2, 3)).astype(float)
        frac = 1.0 - per_cc.sum() / max(struct.sum(), 1)
    else:
        if isinstance(sparsity, BlockSparsity):
            frac = float(sparsity.fraction)
        else:
            frac = float(sparsity or 0.0)
        per_cc = struct.sum(axis=(2, 3)).astype(float) * (1.0 - frac)
        pfrac = frac
    exact = not (frac > 0 and per_cc is not None and not _is_int(per_cc))
    if schedule is None:  # the compiler's: planned for the non-zero blocks it is given
        schedule = default_schedule(layer, cfg, pmask)
    knobs = schedule_dict(schedule)
    TH, TW = schedule.tile_h, schedule.tile_w
    G, K = max(1, schedule.cob_group), max(1, schedule.cib_chunk)
    dbuf = bool(knobs.get("double_buffer", False))

    # ---- steps: (cg, kc) chunk sums
    n_cg, n_kc = -(-cob // G), -(-cib // K)
    pad_cob, pad_cib = n_cg * G - cob, n_kc * K - cib
    blk = np.pad(per_cc, ((0, pad_cob), (0, pad_cib)))
    steps = blk.reshape(n_cg, G, n_kc, K).sum(axis=(1, 3))  # non-zero blocks per step
    gsz = np.minimum(G, cob - np.arange(n_cg) * G)  # output blocks per group
    ksz = np.minimum(K, cib - np.arange(n_kc) * K)  # input blocks per chunk
    nnz = float(blk.sum())
    rounds = _position_rounds(pmask, pfrac, A, G, K)
    # with pruned blocks dropped the GEMMs no longer line up by position and a region may move
    # to a free array: the arrays run the step in no fewer rounds than its longest chain (GEMMs
    # into one output block) or its GEMMs over the arrays, and the position rounds are the
    # upper bound: take the midpoint (structural zeros alone keep the position order)
    if frac > 0:
        chain = blk.reshape(n_cg, G, n_kc, K).sum(axis=3).max(axis=1)
        lower = np.minimum(rounds, np.maximum(chain, np.ceil(steps / A - 1e-9)))
        rounds = 0.5 * (rounds + lower)
    skew = np.where(steps > 0, np.minimum(steps, A) - 1, 0)
    # output blocks whose every weight is zero (an extra MUL by 0 each tile)
    empty_cob = float((per_cc.sum(axis=1) == 0).sum()) if exact else 0.0
    resident = nnz <= cfg.wgt_depth
    one_step = n_cg * n_kc == 1
    if dbuf:  # the code generator's fit_double_buffer: both halves must fit
        dbuf = fit_double_buffer(
            cfg, schedule, layer.kh, layer.kw, layer.strides, layer.dilation, nnz
        ).double_buffer

    # weight DMA cycles of each step (non-resident) and of the resident load
    def wload(nblocks):
        nblocks = np.asarray(nblocks, float)
        first = np.minimum(nblocks, _MAX_X)
        rest = nblocks - first
        beats = np.ceil(nblocks * wgt_b / B - 1e-7)  # robust to summation order
        return beats + L * ((nblocks > 0).astype(float) + (rest > 0))

    w_step = wload(steps) if not resident else np.zeros_like(steps)
    w_once = float(wload(nnz)) if resident else 0.0
    if not resident and one_step:
        w_once, w_step = float(w_step[0, 0]), np.zeros_like(steps)

    # ---- tile classes
    pt, pl, pb, pr = layer.padding
    hcl = _positions_cached(
        layer.oh, TH, layer.strides[0], layer.kh, layer.dilation[0], pt, layer.h
    )
    wcl = _positions_cached(
        layer.ow, TW, layer.strides[1], layer.kw, layer.dilation[1], pl, layer.w
    )
    th = np.array([k[0] for k, _ in hcl], float)
    thi = np.array([k[1] for k, _ in hcl], float)
    rows = np.array([k[2] for k, _ in hcl], float)
    hc = np.array([c for _, c in hcl], float)
    tw = np.array([k[0] for k, _ in wcl], float)
    twi = np.array([k[1] for k, _ in wcl], float)
    cols = np.array([k[2] for k, _ in wcl], float)
    wc = np.array([c for _, c in wcl], float)
    t = np.outer(th, tw).ravel()
    data = np.outer(rows, cols).ravel()
    padded = np.outer(thi, twi).ravel()
    cnt = np.outer(hc, wc).ravel() * layer.n
    n_tiles = float(cnt.sum())
    pix = float((cnt * t).sum())  # = n * oh * ow

    ld_in = L + np.ceil(data * inp_b / B) + (padded - data)  # one input-block load
    st = L + np.ceil(t * C * ab / B)  # one output-block store
    clip_ops = 1  # ReLU: MAX only (the dataset's convention)
    n_alu = 2 + clip_ops
    alu_one = ALU_LATENCY + t
    g0 = 2 * R + C - 2

    # ---- per tile: sum over steps (vectorised over tile classes x steps)
    ks = ksz[None, :]  # (1, n_kc)
    inp_loaded = np.ones((n_cg, n_kc)) if n_kc > 1 else np.r_[1.0, np.zeros(n_cg - 1)][:, None]
    in_dma = ld_in[:, None, None] * (inp_loaded * ks)[None]  # (classes, n_cg, n_kc)
    wdma = w_step[None]
    first_k = (np.arange(n_kc) == 0)[None, None, :]
    bias = (L + np.ceil(2 * gsz * C * 4 / B))[None, :, None] * first_k
    gemm = rounds[None] * (g0 + t[:, None, None]) + skew[None]
    load_seq = in_dma + wdma
    has_gemm = steps[None] > 0
    # the epilogue of the region before each region (group g - 1, or the previous tile's last
    # group: taken cyclically, so the layer's first region stands for its last one)
    w_alu = alu_one[:, None, None]
    m_alu = (np.roll(gsz, 1) * n_alu + empty_cob / max(n_cg, 1))[None, :, None]
    epi_prev = m_alu * w_alu * first_k
    st_prev = st[:, None, None] * first_k
    # single buffered: the region's GEMMs overwrite the previous region's accumulators, so they
    # wait for its epilogue, its last store and the bias LOAD behind the epilogue; the loads
    # (load module) overlap the epilogue
    pre = np.maximum(np.where(has_gemm, load_seq, 0.0), epi_prev + np.maximum(bias, st_prev))
    if dbuf:
        # of the layer's n regions, n - 1 follow another (the last epilogue is the tail below)
        share = 1.0 - 1.0 / (n_tiles * n_cg)
        m_alu = m_alu * share
        # DRAM port beats of a step: its loads, and on the first chunk the bias and the
        # previous region's stores
        stb = share * np.roll(gsz, 1)[None, :, None] * np.ceil(t * C * ab / B)[:, None, None]
        beats_in = np.ceil(data * inp_b / B) + (padded - data)
        port = (
            beats_in[:, None, None] * (inp_loaded * ks)[None]
            + (np.ceil(steps * wgt_b / B - 1e-7)[None] if not resident and not one_step else 0.0)
            + first_k * (stb + np.ceil(2 * gsz * C * 4 / B)[None, :, None])
        )
        # the next weight chunk's load (after the tile's last: the next tile's first, if any)
        ns = n_cg * n_kc
        order = np.flatnonzero(w_step.ravel() > 0)
        nxt = np.zeros(ns)
        if len(order):
            j = np.searchsorted(order, np.arange(ns), side="right")
            wrap = j >= len(order)
            nxt_j = order[np.where(wrap, 0, np.minimum(j, len(order) - 1))]
            nxt = w_step.ravel()[nxt_j] * np.where(wrap, 1.0 - 1.0 / n_tiles, 1.0)
        step = _interleaved_steps(
            gemm, load_seq, nxt.reshape(1, n_cg, n_kc), steps[None], first_k, bias, m_alu,
            w_alu, A, port, (gsz < A)[None, :, None],
        )  # fmt: skip
    else:
        step = pre + gemm
    epi = (gsz[None, :] * n_alu * alu_one[:, None]).sum(axis=1)  # ALU over groups
    epi = epi + (empty_cob / max(n_cg, 1)) * alu_one  # MUL of empty output blocks (rough)
    tile_cycles = step.sum(axis=(1, 2))
    # the last region's epilogue runs after the last GEMM (double buffered; single buffered it
    # is the cyclic stand-in of the first region's)
    th_l = layer.oh - (-(-layer.oh // TH) - 1) * TH
    tw_l = layer.ow - (-(-layer.ow // TW) - 1) * TW
    g_l = cob - (n_cg - 1) * G
    tail = (g_l * n_alu + empty_cob / max(n_cg, 1)) * (ALU_LATENCY + th_l * tw_l) if dbuf else 0.0
    cycles = float((cnt * tile_cycles).sum()) + w_once + tail + float(st[-1]) + 1.0
    # the load module alone (its loads are serial) bounds the run from below
    load_module = float((cnt[:, None, None] * load_seq).sum()) + w_once
    cycles = max(cycles, load_module + float(st[-1]) + 1.0)

    # ---- event counts (exact for an exact mask)
    macs = nnz * R * C * pix
    gemms = nnz * n_tiles
    inp_loads = float((cnt * padded).sum()) * (ksz.sum() if n_kc > 1 else cib)
    inp_loads *= n_cg if n_kc > 1 else 1
    inp_dram = float((cnt * data).sum()) * inp_b * (cib * (n_cg if n_kc > 1 else 1))
    if resident or one_step:
        w_blocks_loaded = nnz
    else:
        w_blocks_loaded = nnz * n_tiles
    bias_bytes = 2 * cob * C * 4 * n_tiles
    out_bytes = cob * C * ab * pix
    dram_read = inp_dram + w_blocks_loaded * wgt_b + bias_bytes
    started = cob - empty_cob
    acc_reads = (nnz - started) * pix * acc_b  # GEMMs that accumulate
    acc_reads += cob * pix * acc_b * (n_alu + 2)  # ALU dst reads + ADD/REQUANT operands
    acc_reads += cob * pix * acc_b  # STORE
    acc_writes = nnz * pix * acc_b + cob * pix * acc_b * n_alu + bias_bytes
    acc_reads += empty_cob * pix * acc_b
    acc_writes += empty_cob * pix * acc_b
    add_lanes = cob * pix * C * (1 + clip_ops)
    mul_lanes = cob * pix * C + empty_cob * pix * C
    latency_ms = cycles / cfg.clock_mhz / 1e3
    tr = TimingResult(
        cycles=int(cycles), latency_ms=latency_ms, macs=_int(macs),
        dram_bytes_read=_int(dram_read), dram_bytes_written=_int(out_bytes),
        buffer_reads={"inp": pix * nnz * inp_b, "wgt": gemms * wgt_b, "acc": acc_reads},
        buffer_writes={"inp": inp_loads * inp_b, "wgt": w_blocks_loaded * wgt_b, "acc": acc_writes},
        alu_add_lanes=_int(add_lanes), alu_mul_lanes=_int(mul_lanes),
    )  # fmt: skip
    energy = _energy_model(cfg).estimate(tr).total_uj

    gemm_total = float((cnt[:, None, None] * gemm).sum())
    load_total = float((cnt[:, None, None] * load_seq).sum()) + w_once
    epi_total = float((cnt * epi).sum())
    struct_blocks = float(struct.sum())
    counts = {
        "macs_dense": float(layer.macs),
        "macs": macs,
        "struct_blocks": struct_blocks,
        "nnz_blocks": nnz,
        "sparsity": float(frac),
        "n_tiles": n_tiles,
        "tile_classes": float(len(t)),
        "n_cg": float(n_cg),
        "n_kc": float(n_kc),
        "steps": float(n_cg * n_kc),
        "resident": float(resident),
        "gemms": gemms,
        "gemm_rounds": float(rounds.sum()) * n_tiles,
        "round_efficiency": float(steps.sum() / max(A * rounds.sum(), 1e-9)),
        "empty_steps": float((steps == 0).sum()) / (n_cg * n_kc),
        "step_nnz_cv": float(steps.std() / max(steps.mean(), 1e-9)),
        "empty_cob": empty_cob,
        "mean_tile": pix / max(n_tiles, 1),
        "partial_tile_frac": float((cnt * (t < TH * TW)).sum()) / max(n_tiles, 1),
        "pad_frac": float((cnt * (padded - data)).sum() / max((cnt * padded).sum(), 1)),
        "dram_read": dram_read,
        "dram_write": out_bytes,
        "gemm_cycles": gemm_total,
        "load_cycles": load_total,
        "epi_cycles": epi_total,
        "pre_cycles": float((cnt[:, None, None] * pre).sum()),
        "compute_bound": float(macs / cfg.macs_per_cycle),
        "memory_bound": float((dram_read + out_bytes) / B),
        "instructions": float(
            n_tiles * (cib * (n_cg if n_kc > 1 else 1) + cob * (n_alu + 1) + n_cg) + gemms
        ),
        "mid_cycles": cycles,
        "mid_energy_uj": energy,
    }
    return Analysis(cycles=cycles, energy_uj=energy, counts=counts, schedule=schedule)


#: Event counts are truncated to integers (as the timing model's are) after scaling by this, so
#: that a count that is an integer in exact arithmetic stays one whatever the summation order
#: (expected counts of a sparsity fraction are fractional sums).
_ROUND_UP = 1.0 + 1e-11


def _int(x: float) -> int:
    return int(x * _ROUND_UP)


def _is_int(a: np.ndarray) -> bool:
    return bool(np.all(np.abs(a - np.round(a)) < 1e-9))


def _position_rounds(m: np.ndarray, frac: float, A: int, G: int, K: int) -> np.ndarray:
    """GEMM rounds of every step ``(n_cg, n_kc)``: the code generator dispatches a step's GEMMs
    by position ``(cib, kh, kw)`` outer and output block inner, and a GEMM waits for the
    previous GEMM into its accumulator region (the same output block at an earlier position),
    so each position of ``n_p`` non-zero blocks costs ``ceil(n_p / A)`` rounds.  ``m``: the
    non-zero blocks ``(COB, CIB, KH, KW)`` (a mask, or the structural blocks of which a
    fraction ``frac`` is expected zero: then ``ceil(n_p / A) * (1 - frac ** n_p)``, exact
    for ``n_p <= A``)."""
    cob, cib = m.shape[:2]
    kk = m.shape[2] * m.shape[3]
    n_cg, n_kc = -(-cob // G), -(-cib // K)
    cnt = np.zeros((n_cg * G, n_kc * K, kk))
    cnt[:cob, :cib] = m.reshape(cob, cib, kk)
    n_p = cnt.reshape(n_cg, G, n_kc * K, kk).sum(axis=1)
    r = np.ceil(n_p / A)
    if frac:
        r = r * (1.0 - frac**n_p)
    return r.reshape(n_cg, n_kc, K * kk).sum(axis=2)


def _interleaved_steps(  # noqa: PLR0917
    gemm, load_seq, nxt, nsteps, first_k, bias, m_alu, w_alu, A, port, chained
):
    """Cycles of double-buffered steps whose first chunk carries the previous region's epilogue
    (``schedule.interleave_epilogues``), element-wise over broadcastable arrays.

    The loads of a step overlap the previous step's GEMMs (``max(load_seq, run)``).  The
    ``m_alu`` ALU instructions of the previous region's epilogue (``w_alu`` cycles each) and
    the region's bias LOAD (``bias`` cycles) are issued ``ps = ceil(m / D)`` per dispatch among
    the first chunk's ``D = ceil(gemms / A)`` dispatches (``m = m_alu + 1``).  The accumulator
    scoreboard lets them run beside the GEMMs into other entries, so a dispatch costs
    ``max(P, A + its share)``, ``P = gemm / D`` the arrays' period and ``A`` the issue
    cycles: only the excess over ``P`` is exposed.  The bias LOAD queues on the DRAM port
    behind the next weight chunk's load (``nxt``: the compute token that frees its half is
    pushed by the first moved instruction, so it starts with the step), less the time before
    the bias LOAD issues.  A step also takes no less than its DRAM
    port beats ``port`` (its loads, and on a first chunk the bias and the previous region's
    stores).
    """
    m = m_alu + 1.0
    d = np.maximum(1.0, np.ceil(nsteps / A))
    period = gemm / d
    ps = np.ceil(m / d)
    n_sl = np.ceil(m / ps)
    rest = m - (n_sl - 1.0) * ps  # moved instructions of the last slot (the bias LOAD last)
    full = A + ps * w_alu
    # a group smaller than the arrays puts two GEMMs of one output block in a dispatch: the
    # second waits for the first, so the slot's work only starts after a whole round
    period = np.where(chained, 0.0, period)
    exposed = (n_sl - 1.0) * np.maximum(0.0, full - period)
    # the load module's next loads start with the step (their half is free) and take the DRAM
    # port ahead of the bias LOAD, less the time before the LOAD issues
    before = (n_sl - 1.0) * np.maximum(period, full) + A + (rest - 1.0) * w_alu
    wait = np.maximum(0.0, nxt - before)
    exposed = exposed + np.maximum(0.0, A + (rest - 1.0) * w_alu + bias + wait - period)
    run = np.maximum(gemm + np.where(first_k, exposed, 0.0), port)
    return np.where(nsteps > 0, np.maximum(load_seq, run), run)


@lru_cache(maxsize=4096)
def _struct_position_counts(cout, cin, groups, kh, kw, R, C, G, K):
    """``n_p`` of the structural blocks per (group, input block) ``(n_cg, n_kc, K)`` (equal
    at every kernel position)."""
    from .layer import _structural

    s = _structural(cout, cin, groups, 1, 1, R, C)[:, :, 0, 0]
    cob, cib = s.shape
    n_cg, n_kc = -(-cob // G), -(-cib // K)
    cnt = np.zeros((n_cg * G, n_kc * K))
    cnt[:cob, :cib] = s
    out = cnt.reshape(n_cg, G, n_kc, K).sum(axis=1)
    out.flags.writeable = False
    return out


def _struct_rounds(layer_key, frac: float, A: int, G: int, K: int) -> np.ndarray:
    """:func:`_position_rounds` of the structural blocks (``layer_key``: cout, cin, groups,
    kh, kw, R, C), flat ``(n_cg * n_kc,)``."""
    if not frac:
        return _dense_struct_rounds(layer_key, A, G, K)
    n_p = _struct_position_counts(*layer_key, G, K)
    r = np.ceil(n_p / A)
    if frac:
        r = r * (1.0 - frac**n_p)
    return (r.sum(axis=2) * (layer_key[3] * layer_key[4])).ravel()


@lru_cache(maxsize=4096)
def _dense_struct_rounds(layer_key, A: int, G: int, K: int) -> np.ndarray:
    n_p = _struct_position_counts(*layer_key, G, K)
    out = (np.ceil(n_p / A).sum(axis=2) * (layer_key[3] * layer_key[4])).ravel()
    out.flags.writeable = False
    return out


def log2p(x: float) -> float:
    return math.log2(1.0 + max(float(x), 0.0))


# ------------------------------------------------------------------------------ batched model
# The same model as ``analyze_reference``, evaluated over a batch of queries at once.  Every
# layer's (output-channel block, input-channel block) pairs, schedule steps, tile classes and
# (tile class, step) pairs live in flat "ragged" arrays with a segment id (the query index);
# per-query sums are ``np.bincount(segment, weights)``.


@dataclasses.dataclass
class BatchAnalysis:
    """Mid-model quantities of ``n`` queries (see :func:`analyze_batch`).

    ``cycles``, ``energy_uj``: ``(n,)`` float64; ``counts``: the keys of :attr:`Analysis.counts`,
    each an ``(n,)`` array; ``columns``: the queries' layer / config / schedule numbers used by
    the features (``(n,)`` arrays); ``schedules``: the schedule of every query.
    """

    cycles: np.ndarray
    energy_uj: np.ndarray
    counts: dict
    columns: dict
    schedules: list

    def __len__(self) -> int:
        return len(self.schedules)

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


_LAYER_INFO: dict = {}
_SCHED_ROWS: dict = {}


def clear_caches() -> None:
    """Empty the per-layer caches of :func:`analyze_batch` (the compiler's schedule, the
    structural blocks and the schedule rows of each layer and config seen): the next batch
    runs cold, as in a fresh process (for timing)."""
    from .layer import _structural

    _LAYER_INFO.clear()
    _SCHED_ROWS.clear()
    _MASK_SCHED.clear()
    for f in (_positions_cached, _struct_position_counts, _dense_struct_rounds, _struct_counts,
              _structural):  # fmt: skip
        f.cache_clear()


def _cfg_key(cfg: HardwareConfig) -> tuple:
    """What the per-layer constants depend on: the array shape, the buffer depths and what
    ``plan_conv``'s estimate reads (bandwidth, widths)."""
    return (cfg.array_rows, cfg.array_cols, cfg.num_arrays, cfg.inp_depth, cfg.wgt_depth,
            cfg.acc_depth, cfg.dram_bytes_per_cycle, cfg.act_bytes, cfg.weight_bytes,
            cfg.acc_bytes)  # fmt: skip


def _layer_info(layer: ConvLayer, cfg: HardwareConfig, key) -> tuple:
    """Per (layer, config shape) constants of :func:`analyze_batch` (cached: the compiler's
    schedule, the structural blocks, the layer's numbers)."""
    R, C = cfg.array_rows, cfg.array_cols
    struct, per, tot, full, uniq = _struct_counts(
        layer.cout, layer.cin, layer.groups, layer.kh, layer.kw, R, C
    )
    cob, cib = struct.shape[:2]
    oh, ow = layer.oh, layer.ow
    (sh, sw), (dh, dw), (pt, pl, _, _) = layer.strides, layer.dilation, layer.padding
    lrow = (layer.n, layer.cin, layer.h, layer.w, layer.cout, layer.kh, layer.kw, sh, sw, dh, dw,
            pt, pl, layer.groups, oh, ow, cob, cib)  # fmt: skip
    sched = plan_conv(
        cfg, layer.h, layer.w, oh, ow, layer.kh, layer.kw, layer.strides, layer.dilation, cib,
        cob, struct,
    )  # fmt: skip
    srow = tuple(getattr(sched, f) for f in _sched_field_names(sched))
    info = (lrow, struct, per, tot, full, uniq, layer.kh * layer.kw, sched, srow)
    if len(_LAYER_INFO) > 8192:
        _LAYER_INFO.clear()
    _LAYER_INFO[key] = info
    return info


_MASK_SCHED: dict = {}


def _mask_schedule(layer: ConvLayer, cfg: HardwareConfig, info: tuple, nnz: int) -> ConvSchedule:
    """``plan_conv``'s schedule of a layer given ``nnz`` non-zero blocks (it depends on the
    mask only through their number), cached per (layer, config shape, count)."""
    key = (info[0], _cfg_key(cfg), nnz)
    sched = _MASK_SCHED.get(key)
    if sched is None:
        lrow = info[0]
        cob, cib = lrow[16], lrow[17]
        stand_in = np.ones(nnz, bool)  # plan_conv reads only the count of a mask
        sched = plan_conv(
            cfg, layer.h, layer.w, layer.oh, layer.ow, layer.kh, layer.kw, layer.strides,
            layer.dilation, cib, cob, stand_in,
        )  # fmt: skip
        if len(_MASK_SCHED) > 65536:
            _MASK_SCHED.clear()
        _MASK_SCHED[key] = sched
    return sched


@lru_cache(maxsize=4096)
def _struct_counts(cout, cin, groups, kh, kw, R, C):
    """The structural mask, its flat ``(COB * CIB,)`` block counts (over KH x KW), their total,
    whether every block is structural and the distinct counts."""
    from .layer import _structural

    s = _structural(cout, cin, groups, kh, kw, R, C)
    per = s.sum(axis=(2, 3)).astype(float).ravel()
    per.flags.writeable = False
    return s, per, float(s.sum()), bool(s.all()), tuple(float(v) for v in np.unique(per))


def _cfg_row(cfg: HardwareConfig) -> tuple:
    em = _energy_model(cfg)
    t = em.table
    return (
        cfg.array_rows, cfg.array_cols, cfg.num_arrays, cfg.dram_bytes_per_cycle,
        cfg.dram_latency_cycles, cfg.act_bytes, cfg.weight_bytes, cfg.wgt_depth,
        cfg.clock_mhz, em.mac_pj, t["add32"], t["mult32"],
        em.sram_pj_per_byte(cfg.inp_buffer_bytes), em.sram_pj_per_byte(cfg.wgt_buffer_bytes),
        em.sram_pj_per_byte(cfg.acc_buffer_bytes), em.dram_pj_per_byte, t["static_mw"],
        cfg.inp_depth, cfg.acc_depth, cfg.act_bits, cfg.weight_bits, cfg.macs_per_cycle,
    )  # fmt: skip


_CFG_COLS = ("R", "C", "A", "B", "L", "ab", "wb", "wgt_depth", "clock", "mac_pj", "add32",
             "mult32", "e_inp", "e_wgt", "e_acc", "e_dram", "static_mw", "inp_depth",
             "acc_depth", "act_bits", "weight_bits", "macs_per_cycle")  # fmt: skip


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


def _mask_position_rounds(m8: np.ndarray, cob: int, cib: int, kk: int, A: int, G: int):
    """GEMM rounds per (output-channel group, input block) ``(n_cg * cib,)`` of a non-zero
    block mask given as flat uint8 ``(COB, CIB, KH, KW)``: the sum over the kernel positions
    of ``ceil(n_p / A)`` (:func:`_position_rounds` before the sum over input chunks).

    The sum over a group's output blocks runs over the ``G`` row slices ``mm[j::G]`` (one
    contiguous-row operation each, the last group may be short)."""
    mm = m8.reshape(cob, cib * kk)
    if G == 1:
        acc = mm  # one block per position: a round per non-zero block
    elif G <= A:  # one round per position with any non-zero block
        if cob % G == 0 and cob * cib * kk <= 4096:
            acc = mm.reshape(cob // G, G, cib * kk).max(axis=1)
        else:
            acc = mm[0::G].copy()
            for j in range(1, min(G, cob)):
                r = mm[j::G]
                np.bitwise_or(acc[: len(r)], r, out=acc[: len(r)])
    else:
        acc = mm[0::G].astype(np.int32)
        for j in range(1, min(G, cob)):
            r = mm[j::G]
            np.add(acc[: len(r)], r, out=acc[: len(r)])
        acc = (acc + (A - 1)) // A
    if kk == 1:
        return acc.reshape(-1)
    if acc.dtype == np.uint8 and kk > 255:
        acc = acc.astype(np.int32)
    return np.einsum("ij->i", acc.reshape(-1, kk))  # (uint8: at most kk per position)


def _batch_rounds(total, st_off, nst, n_cg, n_kc, cib, K, parts, items, mparts, mitems):
    """GEMM rounds of every step of every query (flat, steps of query ``q`` at ``st_off[q]``),
    :func:`_position_rounds` over the batch: ``parts`` are the per-step rounds of the queries
    ``items`` (fraction queries), ``mparts`` the per (group, input block) rounds of the mask
    queries ``mitems`` (:func:`_mask_position_rounds`), summed here over each input chunk."""
    rounds = np.zeros(total)
    if parts:
        fq = np.asarray(items, np.int64)
        seg, loc = _ragged_arange(nst[fq])
        rounds[st_off[fq][seg] + loc] = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if mitems:
        mq = np.asarray(mitems, np.int64)
        flat = np.concatenate(mparts, dtype=np.float64) if len(mparts) > 1 else mparts[0]
        off = _excl_cumsum(n_cg[mq] * cib[mq])
        seg, loc = _ragged_arange(nst[mq])  # every step (group, chunk) of the mask queries
        q = mq[seg]
        g, kc = loc // n_kc[q], loc % n_kc[q]
        rounds[st_off[q] + loc] = np.add.reduceat(flat, off[seg] + g * cib[q] + kc * K[q])
    return rounds


def _bsum(seg, weights, n):
    return np.bincount(seg, weights=weights, minlength=n)


def analyze_batch(queries) -> BatchAnalysis:
    """Mid-level analysis of many ``(layer, config, schedule, sparsity)`` queries at once.

    The same model as :func:`analyze_reference` (``schedule=None``: ``plan_conv``'s;
    ``sparsity``: a :class:`BlockSparsity`, a fraction or a block mask), evaluated with numpy
    over the whole batch: the per-query Python work is reading the query.
    """
    queries = list(queries)
    n = len(queries)
    if n == 0:
        raise ValueError("analyze_batch needs at least one query")
    cfg_keys: dict = {}  # id(config) -> (row index, cache key)
    cfg_rows: list = []
    # (id(layer), id(config)) -> index of the pair (the objects live through the call)
    pair_ids: dict = {}
    pair_rows: list = []  # (config row, *layer numbers, structural blocks, kh * kw)
    pair_data: list = []  # (layer info, structure key, default schedule's row index)
    pair_of = []  # pair of every query
    sched_ids: dict = {}  # id(schedule) -> index into sched_rows
    sched_rows: list = []
    sched_of = []  # schedule row of every query
    schedules = []
    fracs = np.zeros(n)
    is_mask = np.zeros(n, bool)
    exact = np.ones(n, bool)
    frac_parts, frac_items = [], []  # per-(cob, cib) counts of fraction queries
    by_kk: dict = {}  # kh*kw -> ([flat uint8 mask], [query]) of mask queries
    round_parts, round_items = [], []  # GEMM rounds of every step of the fraction queries
    mask_rounds, mask_items = [], []  # rounds per (group, input block) of mask queries
    for i, (layer, cfg, schedule, sparsity) in enumerate(queries):
        pk = (id(layer), id(cfg))
        pair = pair_ids.get(pk)
        if pair is None:
            ck = cfg_keys.get(id(cfg))
            if ck is None:
                ck = cfg_keys[id(cfg)] = (len(cfg_rows), _cfg_key(cfg))
                cfg_rows.append(_cfg_row(cfg))
            lk = (layer, ck[1])
            info = _LAYER_INFO.get(lk)
            if info is None:
                info = _layer_info(layer, cfg, lk)
            lrow, struct, per, tot, full, uniq, kk, dsched, drow = info
            pair = pair_ids[pk] = len(pair_rows)
            pair_rows.append((ck[0], *lrow, tot, kk))
            skey = (layer.cout, layer.cin, layer.groups, layer.kh, layer.kw, cfg.array_rows,
                    cfg.array_cols)  # fmt: skip
            pair_data.append((info, skey, len(sched_rows)))
            sched_rows.append(drow)  # the compiler's schedule of this pair
        info, skey, dsidx = pair_data[pair]
        lrow, struct, per, tot, full, uniq, kk, dsched, drow = info
        pair_of.append(pair)
        mask = None
        if isinstance(sparsity, np.ndarray):
            mask = sparsity
        elif isinstance(sparsity, BlockSparsity) and sparsity.mask is not None:
            mask = sparsity.mask
        if mask is not None:
            m = np.asarray(mask, bool)
            if m.shape != struct.shape:
                raise ValueError(f"block mask of shape {m.shape}, expected {struct.shape}")
            if not full:
                m = m & struct
        if schedule is None and mask is not None and int(np.count_nonzero(m)) != tot:
            # the compiler plans for the non-zero blocks it is given (only their number counts)
            schedule = _mask_schedule(layer, cfg, pair_data[pair][0], int(np.count_nonzero(m)))
        if schedule is None:
            schedules.append(dsched)
            sched_of.append(dsidx)
            sch = dsched
        else:
            schedules.append(schedule)
            sch = schedule
            sidx = sched_ids.get(id(schedule))
            if sidx is None:
                srow = _SCHED_ROWS.get(schedule)
                if srow is None:
                    if len(_SCHED_ROWS) > 65536:
                        _SCHED_ROWS.clear()
                    srow = _SCHED_ROWS[schedule] = tuple(
                        getattr(schedule, f) for f in _sched_field_names(schedule)
                    )
                sidx = sched_ids[id(schedule)] = len(sched_rows)
                sched_rows.append(srow)
            sched_of.append(sidx)
        if isinstance(sparsity, BlockSparsity):
            if mask is None:
                fracs[i] = float(sparsity.fraction)
        elif mask is None:
            fracs[i] = float(sparsity or 0.0)
        if mask is not None:
            is_mask[i] = True
            g = by_kk.get(kk)
            if g is None:
                g = by_kk[kk] = ([], [])
            m8 = np.ascontiguousarray(m).reshape(-1).view(np.uint8)
            g[0].append(m8)
            g[1].append(i)
            cob_i, cib_i = struct.shape[:2]
            mask_rounds.append(
                _mask_position_rounds(m8, cob_i, cib_i, kk, cfg.num_arrays, max(1, sch.cob_group))
            )
            mask_items.append(i)
        else:
            f = fracs[i]
            if f != 0.0:
                per = per * (1.0 - f)
                exact[i] = not (f > 0 and any(abs(v * (1.0 - f) - round(v * (1.0 - f))) >= 1e-9
                                              for v in uniq))  # fmt: skip
            frac_parts.append(per)
            frac_items.append(i)
            gq, kq = max(1, sch.cob_group), max(1, sch.cib_chunk)
            round_parts.append(_struct_rounds(skey, f, cfg.num_arrays, gq, kq))
            round_items.append(i)

    pairs = np.array(pair_rows, dtype=np.int64).reshape(len(pair_rows), -1)[pair_of]
    (cidx, nb, cin, h, w, cout, kh, kw, sh, sw, dh, dw, pt, pl, groups, oh, ow, cob,
     cib, struct_tot, _) = pairs.T  # fmt: skip
    struct_tot = struct_tot.astype(np.float64)
    cfa = np.array(cfg_rows, dtype=np.float64)[cidx]
    cf = {name: cfa[:, j] for j, name in enumerate(_CFG_COLS)}
    R, C, A = cf["R"], cf["C"], cf["A"]
    B, L = cf["B"], cf["L"]
    ab, wb = cf["ab"], cf["wb"]
    inp_b, wgt_b, acc_b = R * ab, R * C * wb, C * 4
    sfields = _sched_field_names(schedules[0])
    sched_arr = np.array(sched_rows, dtype=np.float64).reshape(len(sched_rows), -1)[sched_of]
    scol = {name: sched_arr[:, j] for j, name in enumerate(sfields)}
    TH = scol["tile_h"].astype(np.int64)
    TW = scol["tile_w"].astype(np.int64)
    G = np.maximum(1, scol["cob_group"].astype(np.int64))
    K = np.maximum(1, scol["cib_chunk"].astype(np.int64))
    dbuf = scol["double_buffer"] != 0 if "double_buffer" in scol else np.zeros(n, bool)

    # ---- non-zero blocks per (cob, cib) of every query, flat: the fraction queries, then the
    # mask queries by kernel size ("memory order" perm); each query's blocks cob-major
    parts, order = frac_parts, list(frac_items)
    for kk, (masks, idx) in by_kk.items():
        flat = np.concatenate(masks).reshape(-1, kk) if len(masks) > 1 else masks[0].reshape(-1, kk)
        parts = [*parts, np.einsum("ij->i", flat) if kk < 256 else flat.sum(axis=1)]
        order += idx
    pcc = np.concatenate(parts).astype(np.float64, copy=False) if len(parts) > 1 else parts[0]
    perm = np.asarray(order, np.int64)
    n_cg, n_kc = -(-cob // G), -(-cib // K)
    cc_off = np.empty(n, np.int64)
    cc_off[perm] = _excl_cumsum((cob * cib)[perm])
    # sums over each input-channel chunk of each output block row: (query, cob, kc), in memory
    # order so that np.add.reduceat's segments end where the next begins
    seg_r, loc_r = _ragged_arange((cob * n_kc)[perm])
    seg_r = perm[seg_r]
    nkr = n_kc[seg_r]
    co_r, kc_r = loc_r // nkr, loc_r % nkr
    row = np.add.reduceat(pcc, cc_off[seg_r] + co_r * cib[seg_r] + kc_r * K[seg_r])
    first = kc_r == 0
    co_sum = np.add.reduceat(row, np.flatnonzero(first))  # per (query, cob)
    seg_co = seg_r[first]
    nnz = _bsum(seg_co, co_sum, n)
    frac = np.where(is_mask, 1.0 - nnz / np.maximum(struct_tot, 1), fracs)
    empty_cob = np.where(exact, _bsum(seg_co, (co_sum == 0).astype(float), n), 0.0)

    # ---- steps
    nst = n_cg * n_kc
    st_off = _excl_cumsum(nst)
    steps = _bsum(st_off[seg_r] + (co_r // G[seg_r]) * nkr + kc_r, row, int(nst.sum()))
    seg_s, loc_s = _ragged_arange(nst)
    g_s = loc_s // n_kc[seg_s]
    k_s = loc_s % n_kc[seg_s]
    gsz = np.minimum(G[seg_s], cob[seg_s] - g_s * G[seg_s]).astype(float)
    ksz = np.minimum(K[seg_s], cib[seg_s] - k_s * K[seg_s]).astype(float)
    A_s = A[seg_s]
    rounds = _batch_rounds(
        int(nst.sum()), st_off, nst, n_cg, n_kc, cib, K, round_parts, round_items, mask_rounds,
        mask_items,
    )  # fmt: skip
    # pruned blocks: the midpoint of the position rounds and the chain / throughput bound (see
    # analyze_reference)
    chain = np.zeros(len(steps))
    np.maximum.at(chain, st_off[seg_r] + (co_r // G[seg_r]) * nkr + kc_r, row)
    lower = np.minimum(rounds, np.maximum(chain, np.ceil(steps / A_s - 1e-9)))
    rounds = np.where(frac[seg_s] > 0, 0.5 * (rounds + lower), rounds)
    skew = np.where(steps > 0, np.minimum(steps, A_s) - 1, 0.0)
    resident = nnz <= cf["wgt_depth"]
    one_step = nst == 1
    # the code generator's fit_double_buffer: both halves must fit
    th_in = (TH - 1) * sh + (kh - 1) * dh + 1
    tw_in = (TW - 1) * sw + (kw - 1) * dw + 1
    fits = (
        (2 * K * th_in * tw_in <= cf["inp_depth"])
        & (2 * G * TH * TW + 2 * G <= cf["acc_depth"])
        & (np.where(resident, 1, 2) * G * K * kh * kw <= cf["wgt_depth"])
    )
    dbuf = dbuf & fits

    def wload(nblocks, Bq, Lq, wq):
        first = np.minimum(nblocks, _MAX_X)
        rest = nblocks - first
        beats = np.ceil(nblocks * wq / Bq - 1e-7)  # robust to summation order
        return beats + Lq * ((nblocks > 0).astype(float) + (rest > 0))

    w_all = wload(steps, B[seg_s], L[seg_s], wgt_b[seg_s])
    w_once = np.where(resident, wload(nnz, B, L, wgt_b), 0.0)
    w_first = w_all[st_off]  # the (only) step of one-step queries
    w_once = np.where(~resident & one_step, w_first, w_once)
    w_step = np.where(resident[seg_s] | one_step[seg_s], 0.0, w_all)

    # ---- tile classes
    hseg, th, thi, rows, hc, nh, th_last = _dim_classes(oh, TH, sh, kh, dh, pt, h)
    wseg, tw, twi, cols, wc, nw, tw_last = _dim_classes(ow, TW, sw, kw, dw, pl, w)
    seg_c, ia, ib = _ragged_outer(nh, nw)
    t = (th[ia] * tw[ib]).astype(float)
    data = (rows[ia] * cols[ib]).astype(float)
    padded = (thi[ia] * twi[ib]).astype(float)
    cnt = (hc[ia] * wc[ib] * nb[seg_c]).astype(float)
    n_tiles = _bsum(seg_c, cnt, n)
    pix = _bsum(seg_c, cnt * t, n)
    Lc, Bc, Cc, abc = L[seg_c], B[seg_c], C[seg_c], ab[seg_c]
    ld_in = Lc + np.ceil(data * inp_b[seg_c] / Bc) + (padded - data)
    st = Lc + np.ceil(t * Cc * abc / Bc)
    st_last = L + np.ceil((th_last * tw_last).astype(float) * C * ab / B)
    clip_ops = 1  # ReLU: MAX only (the dataset's convention)
    n_alu = 2 + clip_ops
    alu_one = ALU_LATENCY + t
    g0 = 2 * R + C - 2
    epi = n_alu * cob[seg_c] * alu_one + (empty_cob / np.maximum(n_cg, 1))[seg_c] * alu_one

    # ---- (tile class, step) pairs
    seg_e, ec, es = _ragged_outer(nh * nw, nst)
    first_k = k_s == 0
    loaded = np.where(n_kc[seg_s] > 1, 1.0, (g_s == 0).astype(float))
    in_dma = ld_in[ec] * (loaded * ksz)[es]
    load_seq = in_dma + w_step[es]
    bias = (L[seg_s] + np.ceil(2 * gsz * C[seg_s] * 4 / B[seg_s])) * first_k
    gemm = rounds[es] * (g0[seg_e] + t[ec]) + skew[es]
    has_gemm = steps[es] > 0
    fk = first_k[es]
    # the previous region's epilogue (group g - 1, cyclically; see analyze_reference)
    g_prev = (g_s - 1) % n_cg[seg_s]
    gsz_prev = gsz[st_off[seg_s] + g_prev * n_kc[seg_s] + k_s]
    m_alu = gsz_prev * n_alu + (empty_cob / np.maximum(n_cg, 1))[seg_s]
    w_alu = alu_one[ec]
    epi_prev = m_alu[es] * w_alu * fk
    waits = epi_prev + np.maximum(bias[es], fk * st[ec])
    pre = np.maximum(np.where(has_gemm, load_seq, 0.0), waits)
    # double buffered: see analyze_reference
    share = 1.0 - 1.0 / (n_tiles * n_cg)
    stb = (share[seg_s] * gsz_prev)[es] * np.ceil(t[ec] * C[seg_e] * ab[seg_e] / B[seg_e])
    beats_in = np.ceil(data * inp_b[seg_c] / Bc) + (padded - data)
    w_beats = np.where(
        resident[seg_s] | one_step[seg_s], 0.0, np.ceil(steps * wgt_b[seg_s] / B[seg_s] - 1e-7)
    )
    port = beats_in[ec] * (loaded * ksz)[es] + w_beats[es]
    port = port + fk * (stb + np.ceil(2 * gsz * C[seg_s] * 4 / B[seg_s])[es])
    # the next weight chunk's load (see analyze_reference): cyclically, then the next tile's
    order = np.flatnonzero(w_step > 0)
    nxt = np.zeros(len(es))
    if len(order):
        j = np.searchsorted(order, np.arange(len(seg_s)), side="right")
        j_ok = np.minimum(j, len(order) - 1)
        wrap = (j >= len(order)) | (order[j_ok] >= (st_off + nst)[seg_s])
        first_q = order[np.minimum(np.searchsorted(order, st_off[seg_s]), len(order) - 1)]
        nxt_w = w_step[np.where(wrap, first_q, order[j_ok])] * (first_q >= st_off[seg_s])
        nxt_w = nxt_w * (first_q < (st_off + nst)[seg_s])
        nxt = (nxt_w * np.where(wrap, 1.0 - 1.0 / n_tiles[seg_s], 1.0))[es]
    step_db = _interleaved_steps(
        gemm, load_seq, nxt, steps[es], fk, bias[es], (m_alu * share[seg_s])[es], w_alu,
        A[seg_e], port, (gsz < A_s)[es],
    )  # fmt: skip
    step = np.where(dbuf[seg_e], step_db, pre + gemm)
    ce = cnt[ec]
    g_last = (cob - (n_cg - 1) * G).astype(float)
    tail = (g_last * n_alu + empty_cob / np.maximum(n_cg, 1)) * (
        ALU_LATENCY + (th_last * tw_last).astype(float)
    )
    tail = np.where(dbuf, tail, 0.0)
    cycles = _bsum(seg_e, ce * step, n) + w_once + tail + st_last + 1.0
    load_total = _bsum(seg_e, ce * load_seq, n) + w_once
    cycles = np.maximum(cycles, load_total + st_last + 1.0)
    gemm_total = _bsum(seg_e, ce * gemm, n)
    pre_total = _bsum(seg_e, ce * pre, n)
    epi_total = _bsum(seg_c, cnt * epi, n)

    # ---- event counts (exact for an exact mask)
    cobf, cibf = cob.astype(float), cib.astype(float)
    macs = nnz * R * C * pix
    gemms = nnz * n_tiles
    multi = np.where(n_kc > 1, n_cg, 1).astype(float)
    inp_loads = _bsum(seg_c, cnt * padded, n) * cibf * multi
    inp_dram = _bsum(seg_c, cnt * data, n) * inp_b * (cibf * multi)
    w_blocks_loaded = np.where(resident | one_step, nnz, nnz * n_tiles)
    bias_bytes = 2 * cobf * C * 4 * n_tiles
    out_bytes = cobf * C * ab * pix
    dram_read = inp_dram + w_blocks_loaded * wgt_b + bias_bytes
    started = cobf - empty_cob
    acc_reads = (nnz - started) * pix * acc_b
    acc_reads = acc_reads + cobf * pix * acc_b * (n_alu + 2)
    acc_reads = acc_reads + cobf * pix * acc_b
    acc_writes = nnz * pix * acc_b + cobf * pix * acc_b * n_alu + bias_bytes
    acc_reads = acc_reads + empty_cob * pix * acc_b
    acc_writes = acc_writes + empty_cob * pix * acc_b
    add_lanes = cobf * pix * C * (1 + clip_ops)
    mul_lanes = cobf * pix * C + empty_cob * pix * C
    latency_ms = cycles / cf["clock"] / 1e3
    uj = 1e-6
    energy = (
        np.trunc(macs * _ROUND_UP) * cf["mac_pj"] * uj
        + (
            np.trunc(add_lanes * _ROUND_UP) * cf["add32"]
            + np.trunc(mul_lanes * _ROUND_UP) * cf["mult32"]
        )
        * uj
        + (pix * nnz * inp_b + inp_loads * inp_b) * cf["e_inp"] * uj
        + (gemms * wgt_b + w_blocks_loaded * wgt_b) * cf["e_wgt"] * uj
        + (acc_reads + acc_writes) * cf["e_acc"] * uj
        + (np.trunc(dram_read * _ROUND_UP) + np.trunc(out_bytes * _ROUND_UP)) * cf["e_dram"] * uj
        + cf["static_mw"] * latency_ms
    )

    partial = _bsum(seg_c, cnt * (t < (TH * TW)[seg_c]), n)
    pad_tiles = _bsum(seg_c, cnt * (padded - data), n)
    rsum = _bsum(seg_s, rounds, n)
    ssum = _bsum(seg_s, steps, n)
    smean = ssum / nst
    sstd = np.sqrt(_bsum(seg_s, (steps - smean[seg_s]) ** 2, n) / nst)
    counts = {
        "macs_dense": (nb * oh * ow * cout * (cin // groups) * kh * kw).astype(float),
        "macs": macs,
        "struct_blocks": struct_tot,
        "nnz_blocks": nnz,
        "sparsity": frac,
        "n_tiles": n_tiles,
        "tile_classes": (nh * nw).astype(float),
        "n_cg": n_cg.astype(float),
        "n_kc": n_kc.astype(float),
        "steps": nst.astype(float),
        "resident": resident.astype(float),
        "gemms": gemms,
        "gemm_rounds": rsum * n_tiles,
        "round_efficiency": ssum / np.maximum(A * rsum, 1e-9),
        "empty_steps": _bsum(seg_s, (steps == 0).astype(float), n) / nst,
        "step_nnz_cv": sstd / np.maximum(smean, 1e-9),
        "empty_cob": empty_cob,
        "mean_tile": pix / np.maximum(n_tiles, 1),
        "partial_tile_frac": partial / np.maximum(n_tiles, 1),
        "pad_frac": pad_tiles / np.maximum(_bsum(seg_c, cnt * padded, n), 1),
        "dram_read": dram_read,
        "dram_write": out_bytes,
        "gemm_cycles": gemm_total,
        "load_cycles": load_total,
        "epi_cycles": epi_total,
        "pre_cycles": pre_total,
        "compute_bound": macs / cf["macs_per_cycle"],
        "memory_bound": (dram_read + out_bytes) / B,
        "instructions": n_tiles * (cibf * multi + cobf * (n_alu + 1) + n_cg) + gemms,
        "mid_cycles": cycles,
        "mid_energy_uj": energy,
    }
    columns = {
        "n": nb, "cin": cin, "h": h, "w": w, "cout": cout, "kh": kh, "kw": kw, "stride": sh,
        "groups": groups, "oh": oh, "ow": ow, "cob": cob, "cib": cib,
        "arrays": A, "rows": R, "cols": C, "inp_depth": cf["inp_depth"],
        "wgt_depth": cf["wgt_depth"], "acc_depth": cf["acc_depth"], "bytes_per_cycle": B,
        "dram_latency": L, "act_bits": cf["act_bits"], "weight_bits": cf["weight_bits"],
        "macs_per_cycle": cf["macs_per_cycle"],
    }  # fmt: skip
    columns.update({f"sched_{k}": v for k, v in scol.items()})
    return BatchAnalysis(cycles, energy, counts, columns, schedules)


@lru_cache(maxsize=16)
def _sched_fields_of(cls) -> tuple:
    return tuple(f.name for f in dataclasses.fields(cls))


def _sched_field_names(schedule) -> tuple:
    return _sched_fields_of(type(schedule))
