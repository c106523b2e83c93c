"""The scalar reference of the mid-level cost model: :func:`analyze_reference` prices one
convolution tile class by tile class and step by step, as the module docstring of
:mod:`tvm_hapm.cost.analytic` describes.  It is the oracle the batched model
(:func:`~tvm_hapm.cost.analytic.analyze_batch`, the one production path) is tested against
(``tests/test_cost.py``), and the readable statement of the model; nothing in production calls it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..cost.analytic import (
    ROUND_UP,
    Analysis,
    default_schedule,
    energy_model_of,
    fluid_rounds,
    schedule_dict,
    store_bound,
)
from ..cost.layer import BlockSparsity, ConvLayer, structural_mask
from ..runtime.timing import TimingResult
from ..target.config import ALU_LATENCY, HardwareConfig, gemm_fixed_cycles
from ..target.isa import MAX_TRANSFER
from ..target.schedule import ConvSchedule, fit_double_buffer

__all__ = ["analyze_reference", "position_rounds"]


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
    # L: the fixed cycles of one transfer (a LOAD's; a STORE's is one more, neglected)
    B, L = cfg.dram_bytes_per_cycle, cfg.load_fixed_cycles
    ab, wb = cfg.act_bytes, cfg.weight_bytes
    inp_b, wgt_b = R * ab, R * C * wb
    struct = structural_mask(layer, cfg)
    cob, cib = struct.shape[:2]
    pmask, pfrac, per_cc, frac = _nonzero_blocks(struct, sparsity)
    exact = not (frac > 0 and per_cc is not None and not _is_int(per_cc))
    if schedule is None:  # the compiler's: planned for the non-zero blocks it is given
        schedule = default_schedule(layer, cfg, pmask)
    knobs = schedule_dict(schedule)
    TH, TW = schedule.tile_h, schedule.tile_w
    G, K = max(1, schedule.cob_group), max(1, schedule.cib_chunk)
    dbuf = bool(knobs.get("double_buffer", False))
    # ---- steps: (cg, kc) chunk sums
    n_cg, n_kc = -(-cob // G), -(-cib // K)
    steps, rounds, skew, gsz, ksz, nnz = _steps(per_cc, pmask, pfrac, frac, A, G, K)
    # output blocks whose every weight is zero (an extra MUL by 0 each tile)
    empty_cob = float((per_cc.sum(axis=1) == 0).sum()) if exact else 0.0
    resident = nnz <= cfg.wgt_depth
    one_step = n_cg * n_kc == 1
    if dbuf:  # the code generator's fit_double_buffer: both halves must fit
        dbuf = fit_double_buffer(
            cfg, schedule, layer.kh, layer.kw, layer.strides, layer.dilation, nnz
        ).double_buffer

    # weight DMA cycles of each step (non-resident) and of the resident load
    w_step = _weight_load(steps, wgt_b, B, L) if not resident else np.zeros_like(steps)
    w_once = float(_weight_load(nnz, wgt_b, B, L)) if resident else 0.0
    if not resident and one_step:
        w_once, w_step = float(w_step[0, 0]), np.zeros_like(steps)

    # ---- tile classes
    t, data, padded, cnt = _tile_classes(layer, TH, TW)
    n_tiles = float(cnt.sum())

    ld_in = L + np.ceil(data * inp_b / B) + (padded - data)  # one input-block load
    st = L + np.ceil(t * C * ab / B)  # one output-block store
    # an output block's epilogue is one ADD_REQUANT (bias ADD, REQUANT and the ReLU's MAX #0
    # fused by schedule.fuse_epilogues); the dataset's clip is a ReLU, so no clip instruction
    # is left over (a ReLU6 would keep its MIN: a second pass)
    clip_left = 0
    n_alu = 1 + clip_left
    alu_one = ALU_LATENCY + t
    g0 = gemm_fixed_cycles(R, C)

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
    g_prev = np.roll(gsz, 1)[None, :, None]  # its output blocks
    m_alu = g_prev * n_alu + (empty_cob / max(n_cg, 1))
    epi_prev = m_alu * w_alu * first_k
    st_t = st[:, None, None]
    st_prev = st_t * first_k
    # its stores run one at a time on the store module, each after its block's ALU pass: with
    # one pass per block a store (L + its beats) outlasts the pass, so the stores, not the ALU,
    # end the epilogue
    store_chain = first_k * (n_alu * w_alu + g_prev * st_t)
    # single buffered: the region's GEMMs overwrite the previous region's accumulators, so they
    # wait for its epilogue, its last store and the bias LOAD behind the epilogue
    pre_c = np.maximum(epi_prev + np.maximum(bias, st_prev), store_chain)
    pre = np.maximum(np.where(has_gemm, load_seq, 0.0), pre_c)
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
        nxt = _next_weight_loads(w_step, n_tiles)
        step = _interleaved_steps(
            gemm, load_seq, nxt.reshape(1, n_cg, n_kc), steps[None], first_k, bias, m_alu,
            w_alu, A, port, epilogue_hidden(min(G, cob), A),
        )  # fmt: skip
        step = np.maximum(
            step, first_k * share * store_bound(g_prev, st_t, A, g0 + t[:, None, None])
        )
    else:
        # single buffered: the step's loads start with it (they overwrite what the previous
        # step's GEMMs read) and the GEMMs of an input block need only that block (and the
        # weight chunk, loaded first): the loads and GEMMs overlap block by block
        ld1 = inp_loaded[None] * ld_in[:, None, None]  # its first input block, if it loads any
        step = np.maximum(pre_c + gemm, wdma + ld1 + gemm)
        step = np.where(
            (ld1 > 0) & has_gemm,
            np.maximum(step, load_seq + gemm / ks[None]),
            np.maximum(step, load_seq),
        )
    epi = (gsz[None, :] * n_alu * alu_one[:, None]).sum(axis=1)  # ALU over groups
    epi = epi + (empty_cob / max(n_cg, 1)) * alu_one  # MUL of empty output blocks (rough)
    tile_cycles = step.sum(axis=(1, 2))
    st_l = float(st[-1])
    end = st_l
    if dbuf:
        end = _double_buffered_tail(
            layer, cfg, (TH, TW), cob - (n_cg - 1) * G, st_l, n_alu, empty_cob / max(n_cg, 1),
            float(w_step[0, 0]), g0, float(rounds[0, 0]), float(skew[0, 0]),
        )  # fmt: skip
    cycles = float((cnt * tile_cycles).sum()) + w_once + end + 1.0
    # the load module alone (its loads are serial) bounds the run from below
    load_module = float((cnt[:, None, None] * load_seq).sum()) + w_once
    cycles = max(cycles, load_module + st_l + 1.0)

    # ---- event counts (exact for an exact mask) and the energy
    tr, macs, dram_read, out_bytes = _events(
        cfg, cycles, nnz, (t, cnt, data, padded), (cob, cib, n_cg, n_kc, ksz), empty_cob,
        resident or one_step, n_alu, clip_left,
    )  # fmt: skip
    energy = energy_model_of(cfg).estimate(tr).total_uj
    gemms = nnz * n_tiles

    counts = _counts(
        layer, cfg, (t, cnt, data, padded), (TH, TW), (steps, rounds, n_cg, n_kc, cib, cob),
        dict(nnz=nnz, frac=frac, struct=float(struct.sum()), resident=resident,
             empty_cob=empty_cob, n_alu=n_alu, macs=macs, gemms=gemms, dram_read=dram_read,
             out_bytes=out_bytes, cycles=cycles, energy=energy),
        dict(gemm=float((cnt[:, None, None] * gemm).sum()),
             load=float((cnt[:, None, None] * load_seq).sum()) + w_once,
             epi=float((cnt * epi).sum()), pre=float((cnt[:, None, None] * pre).sum())),
    )  # fmt: skip
    return Analysis(cycles=cycles, energy_uj=energy, counts=counts, schedule=schedule)


def _double_buffered_tail(layer, cfg, tile, g_l, st_l, n_alu, empty_per_group, w_first,
                          g0, rounds_first, skew_first) -> float:  # fmt: skip
    """Cycles after the last step of a double-buffered layer, and its fill: the last region's
    ALU passes and stores (each store after its pass, one store at a time; ``g_l`` output blocks
    in the last group, ``st_l`` cycles a store), and the pipeline's fill: the first step's GEMMs
    wait for its first input block (and weight chunk, ``w_first``); the steps' max(loads,
    GEMMs) hide every later load.  (Single buffered, the last epilogue is the cyclic stand-in
    of the first region's, already in the steps.)"""
    TH, TW = tile
    th_l = layer.oh - (-(-layer.oh // TH) - 1) * TH
    tw_l = layer.ow - (-(-layer.ow // TW) - 1) * TW
    alu_l = ALU_LATENCY + th_l * tw_l
    end = max((g_l * n_alu + empty_per_group) * alu_l + st_l, n_alu * alu_l + g_l * st_l)
    first = _first_tile(layer, TH, TW)
    R, B, L = cfg.array_rows, cfg.dram_bytes_per_cycle, cfg.load_fixed_cycles
    ld_first = L + math.ceil(first[1] * R * cfg.act_bytes / B) + (first[2] - first[1])
    return end + min(ld_first + w_first, rounds_first * (g0 + first[0]) + skew_first)


def _counts(layer, cfg, tiles, tile, step_arrays, v: dict, totals: dict) -> dict:
    """The analysis's counts (the fine model's features among them): ``tiles`` is ``(t, cnt,
    data, padded)`` per tile class, ``tile`` the planned ``(TH, TW)``, ``step_arrays`` ``(steps,
    rounds, n_cg, n_kc, cib, cob)``, ``v`` the layer's scalars and ``totals`` the cycles spent
    in GEMMs, loads, epilogues and region preambles over the layer."""
    t, cnt, data, padded = tiles
    steps, rounds, n_cg, n_kc, cib, cob = step_arrays
    n_tiles, pix = float(cnt.sum()), float((cnt * t).sum())
    A = cfg.num_arrays
    return {
        "macs_dense": float(layer.macs),
        "macs": v["macs"],
        "struct_blocks": v["struct"],
        "nnz_blocks": v["nnz"],
        "sparsity": float(v["frac"]),
        "n_tiles": n_tiles,
        "tile_classes": float(len(t)),
        "n_cg": float(n_cg),
        "n_kc": float(n_kc),
        "steps": float(n_cg * n_kc),
        "resident": float(v["resident"]),
        "gemms": v["gemms"],
        "gemm_rounds": float(rounds.sum()) * n_tiles,
        "round_efficiency": float(steps.sum() / max(A * rounds.sum(), 1e-9)),
        "empty_steps": float((steps == 0).sum()) / (n_cg * n_kc),
        "step_nnz_cv": float(steps.std() / max(steps.mean(), 1e-9)),
        "empty_cob": v["empty_cob"],
        "mean_tile": pix / max(n_tiles, 1),
        "partial_tile_frac": float((cnt * (t < tile[0] * tile[1])).sum()) / max(n_tiles, 1),
        "pad_frac": float((cnt * (padded - data)).sum() / max((cnt * padded).sum(), 1)),
        "dram_read": v["dram_read"],
        "dram_write": v["out_bytes"],
        "gemm_cycles": totals["gemm"],
        "load_cycles": totals["load"],
        "epi_cycles": totals["epi"],
        "pre_cycles": totals["pre"],
        "compute_bound": float(v["macs"] / cfg.macs_per_cycle),
        "memory_bound": float((v["dram_read"] + v["out_bytes"]) / cfg.dram_bytes_per_cycle),
        "instructions": float(
            n_tiles * (cib * (n_cg if n_kc > 1 else 1) + cob * (v["n_alu"] + 1) + n_cg) + v["gemms"]
        ),
        "mid_cycles": v["cycles"],
        "mid_energy_uj": v["energy"],
    }


def _events(cfg, cycles, nnz, tiles, blocks, empty_cob, weights_once, n_alu, clip_left):
    """The layer's events as a :class:`TimingResult` (what the energy model prices): MACs, DRAM
    bytes, buffer traffic and ALU lanes.  ``tiles`` is ``(t, cnt, data, padded)`` per tile
    class, ``blocks`` ``(cob, cib, n_cg, n_kc, ksz)``, ``weights_once`` whether every weight
    block is loaded once (resident, or a single step)."""
    R, C, ab = cfg.array_rows, cfg.array_cols, cfg.act_bytes
    inp_b, wgt_b, acc_b = R * ab, R * C * cfg.weight_bytes, C * 4
    t, cnt, data, padded = tiles
    cob, cib, n_cg, n_kc, ksz = blocks
    n_tiles, pix = float(cnt.sum()), float((cnt * t).sum())
    macs = nnz * R * C * pix
    gemms = nnz * n_tiles
    inp_loads = float((cnt * padded).sum()) * (ksz.sum() if n_kc > 1 else cib)
    inp_loads *= n_cg if n_kc > 1 else 1
    inp_dram = float((cnt * data).sum()) * inp_b * (cib * (n_cg if n_kc > 1 else 1))
    w_blocks_loaded = nnz if weights_once else nnz * n_tiles
    bias_bytes = 2 * cob * C * 4 * n_tiles
    out_bytes = cob * C * ab * pix
    dram_read = inp_dram + w_blocks_loaded * wgt_b + bias_bytes
    started = cob - empty_cob
    acc_reads = (nnz - started) * pix * acc_b  # GEMMs that accumulate
    acc_reads += cob * pix * acc_b * (n_alu + 2)  # ALU dst reads + bias and multiplier
    acc_reads += cob * pix * acc_b  # STORE
    acc_writes = nnz * pix * acc_b + cob * pix * acc_b * n_alu + bias_bytes
    acc_reads += empty_cob * pix * acc_b
    acc_writes += empty_cob * pix * acc_b
    add_lanes = cob * pix * C * (1 + clip_left)  # ADD_REQUANT: an add and a multiply a lane
    mul_lanes = cob * pix * C + empty_cob * pix * C
    return TimingResult(
        cycles=int(cycles), latency_ms=cycles / cfg.clock_mhz / 1e3, macs=_int(macs),
        dram_bytes_read=_int(dram_read), dram_bytes_written=_int(out_bytes),
        buffer_reads={"inp": pix * nnz * inp_b, "wgt": gemms * wgt_b, "acc": acc_reads},
        buffer_writes={"inp": inp_loads * inp_b, "wgt": w_blocks_loaded * wgt_b, "acc": acc_writes},
        alu_add_lanes=_int(add_lanes), alu_mul_lanes=_int(mul_lanes),
    ), macs, dram_read, out_bytes  # fmt: skip


def _steps(per_cc, pmask, pfrac: float, frac: float, A: int, G: int, K: int):
    """Per (output-channel group, input-channel chunk) step: its non-zero blocks, GEMM rounds and
    array skew; per group its output blocks, per chunk its input blocks; and the layer's non-zero
    blocks: ``(steps, rounds, skew, gsz, ksz, nnz)``."""
    cob, cib = per_cc.shape
    n_cg, n_kc = -(-cob // G), -(-cib // K)
    blk = np.pad(per_cc, ((0, n_cg * G - cob), (0, n_kc * K - cib)))
    steps = blk.reshape(n_cg, G, n_kc, K).sum(axis=(1, 3))  # non-zero blocks per step
    gsz = np.minimum(G, cob - np.arange(n_cg) * G)  # output blocks per group
    ksz = np.minimum(K, cib - np.arange(n_kc) * K)  # input blocks per chunk
    rounds = position_rounds(pmask, pfrac, A, G, K)
    # with pruned blocks dropped the GEMMs no longer line up by position and a region may move
    # to a free array: the arrays run the step in no fewer rounds than its longest chain (GEMMs
    # into one output block) or its GEMMs over the arrays, and the position rounds are the
    # upper bound: take the midpoint (structural zeros alone keep the position order)
    if frac > 0:
        chain = blk.reshape(n_cg, G, n_kc, K).sum(axis=3).max(axis=1)
        lower = np.minimum(rounds, np.maximum(chain, np.ceil(steps / A - 1e-9)))
        rounds = 0.5 * (rounds + lower)
    skew = np.where(steps > 0, np.minimum(steps, A) - 1, 0)
    return steps, rounds, skew, gsz, ksz, float(blk.sum())


def _weight_load(nblocks, wgt_b: int, B: float, L: float):
    """Cycles of the DMA of ``nblocks`` weight blocks (a second DMA past the transfer field)."""
    nblocks = np.asarray(nblocks, float)
    rest = nblocks - np.minimum(nblocks, MAX_TRANSFER)
    beats = np.ceil(nblocks * wgt_b / B - 1e-7)  # robust to summation order
    return beats + L * ((nblocks > 0).astype(float) + (rest > 0))


def _next_weight_loads(w_step: np.ndarray, n_tiles: float) -> np.ndarray:
    """Each step's next weight chunk load (after a tile's last step: the next tile's first, if
    any, so scaled by the share of tiles that have a next one), flat over the steps."""
    ns = w_step.size
    order = np.flatnonzero(w_step.ravel() > 0)
    if not len(order):
        return np.zeros(ns)
    j = np.searchsorted(order, np.arange(ns), side="right")
    wrap = j >= len(order)
    nxt_j = order[np.where(wrap, 0, np.minimum(j, len(order) - 1))]
    return w_step.ravel()[nxt_j] * np.where(wrap, 1.0 - 1.0 / n_tiles, 1.0)


def _nonzero_blocks(struct: np.ndarray, sparsity):
    """``(pmask, pfrac, per_cc, frac)``: the blocks of the dispatch rounds and their zero
    fraction, the non-zero blocks per ``(cob, cib)`` (exact from a mask, else expected from a
    fraction) and the layer's zero fraction."""
    if isinstance(sparsity, BlockSparsity) and sparsity.mask is not None:
        sparsity = sparsity.mask
    if isinstance(sparsity, np.ndarray):
        pmask = np.asarray(sparsity, bool) & struct
        per_cc = pmask.sum(axis=(2, 3)).astype(float)
        return pmask, 0.0, per_cc, 1.0 - per_cc.sum() / max(struct.sum(), 1)
    frac = float(sparsity.fraction) if isinstance(sparsity, BlockSparsity) else float(sparsity or 0)
    return struct, frac, struct.sum(axis=(2, 3)).astype(float) * (1.0 - frac), frac


def _tile_classes(layer: ConvLayer, TH: int, TW: int):
    """Per tile class of the layer: output pixels ``t``, in-bounds input pixels ``data``, padded
    input pixels ``padded`` and the number of tiles ``cnt`` (over the batch)."""
    pt, pl, _, _ = layer.padding
    hcl = _positions_cached(
        layer.oh, TH, layer.strides[0], layer.kh, layer.dilation[0], pt, layer.h
    )
    wcl = _positions_cached(
        layer.ow, TW, layer.strides[1], layer.kw, layer.dilation[1], pl, layer.w
    )
    th, thi, rows = (np.array(k, float) for k in zip(*(k for k, _ in hcl)))
    hc = np.array([c for _, c in hcl], float)
    tw, twi, cols = (np.array(k, float) for k in zip(*(k for k, _ in wcl)))
    wc = np.array([c for _, c in wcl], float)
    t = np.outer(th, tw).ravel()
    data = np.outer(rows, cols).ravel()
    padded = np.outer(thi, twi).ravel()
    cnt = np.outer(hc, wc).ravel() * layer.n
    return t, data, padded, cnt


def _int(x: float) -> int:
    return int(x * ROUND_UP)


def _is_int(a: np.ndarray) -> bool:
    return bool(np.all(np.abs(a - np.round(a)) < 1e-9))


def position_rounds(m: np.ndarray, frac: float, A: int, G: int, K: int) -> np.ndarray:
    """GEMM rounds of every step ``(n_cg, n_kc)``: the code generator dispatches a step's GEMMs
    by position ``(cib, kh, kw)`` outer and output block inner, and a GEMM waits for the
    previous GEMM into its accumulator region (the same output block at an earlier position),
    so a position of ``n_p <= A`` non-zero blocks costs a round.  A position of more blocks is
    charged ``n_p / A`` rounds (``max(n_p, A) / A`` for a non-empty position), the figure of
    the arrays' former free choice; since each output block's region is in one bank, on one
    array (:mod:`tvm_hapm.target.banks`), the busiest array runs ``ceil(n_p / A)`` of them
    (``docs/cost_model.md``: an under-count for these rare groups).  ``m``: the non-zero
    blocks ``(COB, CIB, KH, KW)`` (a mask, or the structural blocks of which a fraction
    ``frac`` is expected zero: then ``max(n_p (1 - frac), A) / A * (1 - frac ** n_p)``, exact
    for ``n_p <= A``)."""
    cob, cib = m.shape[:2]
    kk = m.shape[2] * m.shape[3]
    n_cg, n_kc = -(-cob // G), -(-cib // K)
    cnt = np.zeros((n_cg * G, n_kc * K, kk))
    cnt[:cob, :cib] = m.reshape(cob, cib, kk)
    n_p = cnt.reshape(n_cg, G, n_kc * K, kk).sum(axis=1)
    return fluid_rounds(n_p, frac, A).reshape(n_cg, n_kc, K * kk).sum(axis=2)


def epilogue_hidden(group: int, arrays: int) -> float:
    """1.0 when a region's epilogue can run beside the next region's GEMMs, else 0.0.

    ``place_accumulators`` puts the ``group`` output blocks of a region on consecutive banks,
    round robin, the other accumulator half's region after them: the two halves' regions
    share no bank when ``2 * group <= arrays``.  Otherwise the epilogue's ALU instruction
    waits for the array of its bank and runs while the compute module issues nothing (a bank's
    write port is its array's while it runs: ``docs/timing.md``)."""
    return 1.0 if 2 * group <= arrays else 0.0


def _interleaved_steps(
    gemm, load_seq, nxt, nsteps, first_k, bias, m_alu, w_alu, A, port, hidden=1.0
):
    """Cycles of double-buffered steps whose first chunk carries the previous region's epilogue
    (``schedule.interleave_epilogues``), element-wise over broadcastable arrays.

    The loads of a step overlap the previous step's GEMMs (``max(load_seq, run)``).  The
    ``m_alu`` ALU instructions of the previous region's epilogue (``w_alu`` cycles each) and
    the region's bias LOAD (``bias`` cycles) are issued ``ps = ceil(m / D)`` per dispatch among
    the first chunk's ``D = ceil(gemms / A)`` dispatches (``m = m_alu + 1``).  The accumulator
    scoreboard lets them run beside the GEMMs of other banks, so a dispatch costs
    ``max(P, A + its share)``, ``P = gemm / D`` the arrays' period and ``A`` the issue
    cycles: only the excess over ``P`` is exposed, when the two regions' banks differ
    (``hidden`` = 1, :func:`epilogue_hidden`); when they share banks, ``P + A + its share``.
    The bias LOAD queues on the DRAM port behind the next weight chunk's load (``nxt``: the
    compute token that frees its half is pushed by the first moved instruction, so it starts
    with the step), less the time before the bias LOAD issues.  A step also takes no less than
    its DRAM port beats ``port`` (its loads, and on a first chunk the bias and the previous
    region's stores).

    (Before the epilogue was fused into one ALU pass per output block, a group smaller than the
    arrays was charged its slots' whole work, on the grounds that the second GEMM of an output
    block in a dispatch waits a round for the first; with a third of the ALU work the slots fit
    beside that wait and the rule over-counted: on the 12000 training samples' double-buffered
    schedules, 6.0% error without it, 7.6% with it.)
    """
    m = m_alu + 1.0
    d = np.maximum(1.0, np.ceil(nsteps / A))
    period = gemm / d
    ps = np.ceil(m / d)
    n_sl = np.ceil(m / ps)
    rest = m - (n_sl - 1.0) * ps  # moved instructions of the last slot (the bias LOAD last)
    full = A + ps * w_alu
    hide = hidden * period  # the arrays' time an epilogue slot may hide in
    exposed = (n_sl - 1.0) * np.maximum(0.0, full - hide)
    # the load module's next loads start with the step (their half is free) and take the DRAM
    # port ahead of the bias LOAD, less the time before the LOAD issues
    before = (n_sl - 1.0) * (period + full - np.minimum(hide, full)) + A + (rest - 1.0) * w_alu
    wait = np.maximum(0.0, nxt - before)
    exposed = exposed + np.maximum(0.0, A + (rest - 1.0) * w_alu + bias + wait - hide)
    run = np.maximum(gemm + np.where(first_k, exposed, 0.0), port)
    return np.where(nsteps > 0, np.maximum(load_seq, run), run)


def _first_tile(layer: ConvLayer, TH: int, TW: int) -> tuple:
    """Pixels, in-bounds input entries and input entries with padding of the layer's first
    (top-left) output tile (as :func:`_positions` counts them)."""
    (sh, sw), (dh, dw), (pt, pl, _, _) = layer.strides, layer.dilation, layer.padding
    out = []
    for o, tile, s, k, d, pad, size in (
        (layer.oh, TH, sh, layer.kh, dh, pt, layer.h),
        (layer.ow, TW, sw, layer.kw, dw, pl, layer.w),
    ):
        t = min(tile, o)
        t_in = (t - 1) * s + (k - 1) * d + 1
        out.append((t, t_in, t_in - max(0, pad) - max(0, t_in - pad - size)))
    (th, thi, rows), (tw, twi, cols) = out
    return float(th * tw), float(rows * cols), float(thi * twi)
