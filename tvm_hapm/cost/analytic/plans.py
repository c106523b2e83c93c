"""The batched mid model's per (layer, config) constants and per schedule plans: tile classes,
steps, the columns of the query matrix, and their caches (see ``analytic.clear_caches``)."""

from __future__ import annotations

import weakref
from functools import lru_cache

import numpy as np

from ...target.config import ALU_LATENCY, HardwareConfig, gemm_fixed_cycles
from ...target.schedule import plan_conv
from ..layer import ConvLayer
from .common import (
    energy_model_of,
    fluid_rounds,
    sched_field_names,
    store_bound,
    struct_position_counts,
)

#: (layer, timing key of the config) -> LayerPair (the plans of its schedules hang off it)
_PAIRS: dict = {}


_PAIRS_BY_ID: dict = {}  # id(layer) -> (weak reference to the layer, {timing key: pair})


PAIR_OF_OBJECTS: dict = {}  # (id(layer), id(config)) -> (weak refs to both, pair)


MAX_PAIRS = 4096


_MAX_PLANS = 8192  # per pair (schedules, and the compiler's schedule per non-zero count)


def clear_plan_caches() -> None:
    """Forget the pairs (and the plans they hold)."""
    _PAIRS.clear()
    _PAIRS_BY_ID.clear()
    PAIR_OF_OBJECTS.clear()


def timing_key(cfg: HardwareConfig) -> tuple:
    """What a pair's plans depend on: the array shape, the buffer depths, what ``plan_conv``'s
    estimate reads (bandwidth, widths) and the fixed cycles of a transfer."""
    return (cfg.array_rows, cfg.array_cols, cfg.num_arrays, cfg.inp_depth, cfg.wgt_depth,
            cfg.acc_depth, cfg.dram_bytes_per_cycle, cfg.act_bytes, cfg.weight_bytes,
            cfg.acc_bytes, cfg.load_fixed_cycles)  # fmt: skip


class LayerPair:
    """Constants of one (layer, config timing key): the structural blocks, the compiler's
    schedule (``dplan``) and the plans of the schedules seen."""

    __slots__ = ("cib", "cob", "dplan", "full", "itot", "kk", "layer", "lrow", "nnz_plans",
                 "per", "plans", "shape", "struct", "tot", "trow", "uniq")  # fmt: skip

    def __init__(self, layer: ConvLayer, cfg: HardwareConfig, pending: list):
        R, C = cfg.array_rows, cfg.array_cols
        struct, per, tot, full, uniq = struct_counts(
            layer.cout, layer.cin, layer.groups, layer.kh, layer.kw, R, C
        )
        cob, cib = struct.shape[:2]
        (sh, sw), (dh, dw), (pt, pl, _, _) = layer.strides, layer.dilation, layer.padding
        self.layer = layer
        self.lrow = (layer.n, layer.cin, layer.h, layer.w, layer.cout, layer.kh, layer.kw, sh,
                     sw, dh, dw, pt, pl, layer.groups, layer.oh, layer.ow, cob, cib)  # fmt: skip
        # L: the fixed cycles of one transfer (a LOAD's; a STORE's is one more, neglected)
        self.trow = (R, C, cfg.num_arrays, cfg.dram_bytes_per_cycle, cfg.load_fixed_cycles,
                     cfg.act_bytes, cfg.weight_bytes, cfg.inp_depth, cfg.wgt_depth,
                     cfg.acc_depth)  # fmt: skip
        self.struct, self.per, self.tot, self.full, self.uniq = struct, per, tot, full, uniq
        self.itot = int(tot)
        self.shape = struct.shape
        self.cob, self.cib, self.kk = cob, cib, layer.kh * layer.kw
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


def get_pair(layer: ConvLayer, cfg: HardwareConfig, tkey: tuple, pending: list) -> LayerPair:
    # by the layer object first (a weak reference tells a reused id), else by value
    seen = _PAIRS_BY_ID.get(id(layer))
    if seen is not None and seen[0]() is layer:
        pair = seen[1].get(tkey)
        if pair is not None:
            return pair
    key = (layer, tkey)
    pair = _PAIRS.get(key)
    if pair is None:
        if len(_PAIRS) > MAX_PAIRS:
            _PAIRS.clear()
            _PAIRS_BY_ID.clear()
            PAIR_OF_OBJECTS.clear()
        pair = _PAIRS[key] = LayerPair(layer, cfg, pending)
    if seen is None or seen[0]() is not layer:
        seen = _PAIRS_BY_ID[id(layer)] = (weakref.ref(layer), {})
    seen[1][tkey] = pair
    return pair


class _Plan:
    """The mask-independent part of one (layer, config timing key, schedule); its arrays are
    filled by :func:`build_plans`.

    ``q``: the query row (``QCOLS`` then the schedule's fields); ``P`` and ``P64``: the
    ``PCOLS32`` and ``PCOLS64`` columns of each (tile class, step) pair; ``qi`` and ``pe``: the
    query row's column and the first pair's column in the pools of ``POOL`` (generation
    ``gen``).
    """

    __slots__ = ("G", "K", "P", "P64", "dbs", "frac_arrays", "gen", "pair", "pe", "q", "qi",
                 "sched", "srow", "tile")  # fmt: skip

    def __init__(self, pair: LayerPair, schedule):
        self.pair, self.sched = pair, schedule
        self.srow = tuple(getattr(schedule, f) for f in sched_field_names(schedule))
        self.G, self.K = max(1, schedule.cob_group), max(1, schedule.cib_chunk)
        self.tile = (schedule.tile_h, schedule.tile_w)
        self.dbs = bool(getattr(schedule, "double_buffer", False))
        self.frac_arrays = None


QCOLS = ("nst", "npairs", "n_cg", "n_kc", "n_tiles", "pix", "fits_res", "fits_non", "dbs",
          "st_last", "g_last", "tail_alu", "sa", "cnt_pad", "cnt_data", "partial", "ncls",
          "tile", "G", "K", "tot", "share", "n", "cin", "h", "w", "cout", "kh",
          "kw", "stride", "groups", "oh", "ow", "cob", "cib", "R", "C", "A", "B", "L", "ab",
          "wb", "inp_depth", "wgt_depth", "acc_depth", "ld_first", "g0t_first")  # fmt: skip


QI = {k: i for i, k in enumerate(QCOLS)}


# (tile class, step) pair columns: small integers (exact in float32, half the bytes to copy
# per batch) and those that are not (a DMA time or a store chain can pass 2**24 cycles, port
# beats and the store bound are fractional)
PCOLS32 = ("es", "cnt", "g0t", "w_alu", "fk", "bias", "bst", "mab", "A", "kb", "hidden")


PCOLS64 = ("in_dma", "port", "sbound", "ld1", "schain")


#: ALU passes of an output block's epilogue: one ADD_REQUANT (bias ADD, REQUANT and the ReLU's
#: MAX #0 fused by ``schedule.fuse_epilogues``; the dataset's clip is a ReLU, nothing is left)
N_ALU = 1


BOOL = np.dtype(bool)


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
            clear_plan_caches()
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


POOL = _Pools()


def build_plans(plans: list) -> None:
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
    st_off = excl_cumsum(nst)
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
        "mab": gsz_prev[es] * N_ALU,
        "A": A[seg_e],
        "kb": ksz[es],
        # reference.epilogue_hidden: the two accumulator halves' regions share no bank
        "hidden": (2 * np.minimum(G, cob) <= A)[seg_e],
        "sbound": fk * share[seg_e] * store_bound(gp_e, st_e, A[seg_e], g0[seg_e] + t[ec]),
        "ld1": (Lc + beats_in)[ec] * loaded[es],
        "schain": fk * (N_ALU * alu_one[ec] + gp_e * st_e),
    }
    P32 = np.stack([np.asarray(pcols[k], np.float32) for k in PCOLS32])  # column-major
    P64 = np.stack([np.asarray(pcols[k], np.float64) for k in PCOLS64])

    qcols = {
        "nst": nst, "npairs": ncls * nst, "n_cg": n_cg, "n_kc": n_kc, "n_tiles": n_tiles,
        "pix": pix, "fits_res": fits_res, "fits_non": fits_non, "dbs": dbs,
        "st_last": L + np.ceil((th_last * tw_last) * C * ab / B), "g_last": cob - (n_cg - 1) * G,
        "tail_alu": ALU_LATENCY + th_last * tw_last, "sa": _bsum(seg_c, cnt * alu_one, m),
        "cnt_pad": _bsum(seg_c, cnt * padded, m), "cnt_data": _bsum(seg_c, cnt * data, m),
        "partial": _bsum(seg_c, cnt * (t < (TH * TW)[seg_c]), m), "ncls": ncls,
        "tile": TH * TW, "G": G, "K": K, "tot": [p.pair.tot for p in plans],
        "share": share,
        "n": nb, "cin": cin, "h": h, "w": w, "cout": cout, "kh": kh, "kw": kw, "stride": sh,
        "groups": groups, "oh": oh, "ow": ow, "cob": cob, "cib": cib, "R": R, "C": C, "A": A,
        "B": B, "L": L, "ab": ab, "wb": wb, "inp_depth": inp_depth, "wgt_depth": wgt_depth,
        "acc_depth": acc_depth, "ld_first": ld_first, "g0t_first": g0 + th0 * tw0,
    }  # fmt: skip
    Q = np.stack([np.asarray(qcols[k], np.float64) for k in QCOLS], axis=1)
    S = np.array([p.srow for p in plans], np.float64).reshape(m, -1)
    Q = np.concatenate([Q, S], axis=1)
    pe = np.cumsum(ncls * nst)
    qi, p0 = POOL.add(Q.T, P32, P64)
    for k, p in enumerate(plans):
        p.q = Q[k]
        p.P = P32[:, pe[k] - (ncls[k] * nst[k]) : pe[k]]
        p.P64 = P64[:, pe[k] - (ncls[k] * nst[k]) : pe[k]]
        p.qi, p.pe, p.gen = qi + k, p0 + int(pe[k] - ncls[k] * nst[k]), POOL.gen


def frac_arrays(plan: _Plan) -> tuple:
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
        n_p = struct_position_counts(lay.cout, lay.cin, lay.groups, lay.kh, lay.kw, R, C, G, K)
        rounds = (fluid_rounds(n_p, 0.0, A).sum(axis=2) * pair.kk).ravel()
        scr = np.stack([b4.sum(axis=(1, 3)).ravel(), b4.sum(axis=3).max(axis=1).ravel(), rounds],
                       axis=1)  # fmt: skip
        rowsum = pair.per.reshape(cob, cib).sum(axis=1)
        plan.frac_arrays = (scr, n_p, rowsum, float((rowsum == 0).sum()))
    return plan.frac_arrays


@lru_cache(maxsize=4096)
def struct_counts(cout, cin, groups, kh, kw, R, C):
    """The structural mask, its flat ``(COB * CIB,)`` block counts (over KH x KW), their total,
    whether every block is structural and the distinct counts."""
    from ..layer import structural_blocks

    s = structural_blocks(cout, cin, groups, kh, kw, R, C)
    per = s.sum(axis=(2, 3)).astype(float).ravel()
    per.flags.writeable = False
    return s, per, float(s.sum()), bool(s.all()), tuple(float(v) for v in np.unique(per))


def cfg_row(cfg: HardwareConfig) -> tuple:
    em = energy_model_of(cfg)
    t = em.table
    return (
        cfg.clock_mhz, em.mac_pj, t["add32"], t["mult32"],
        em.sram_pj_per_byte(cfg.inp_buffer_bytes), em.sram_pj_per_byte(cfg.wgt_buffer_bytes),
        em.sram_pj_per_byte(cfg.acc_buffer_bytes), em.dram_pj_per_byte, em.background_mw,
        cfg.act_bits, cfg.weight_bits, cfg.macs_per_cycle,
    )  # fmt: skip


CFG_COLS = ("clock", "mac_pj", "add32", "mult32", "e_inp", "e_wgt", "e_acc", "e_dram",
             "background_mw", "act_bits", "weight_bits", "macs_per_cycle")  # fmt: skip


def excl_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros(len(a), dtype=np.int64)
    if len(a) > 1:
        np.cumsum(a[:-1], out=out[1:])
    return out


def _ragged_arange(sizes: np.ndarray):
    """``(segment, local index)`` of the concatenation of ``arange(s)`` for every size."""
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    seg = np.repeat(np.arange(len(sizes)), sizes)
    local = np.arange(total, dtype=np.int64) - np.repeat(excl_cumsum(sizes), sizes)
    return seg, local


def _ragged_outer(na: np.ndarray, nb: np.ndarray):
    """Every (a, b) pair of each segment: ``(segment, index into a, index into b)`` where the
    a's (b's) of the segments are stored one segment after the other."""
    seg, local = _ragged_arange(na * nb)
    nbs = nb[seg]
    ia = excl_cumsum(na)[seg] + local // nbs
    ib = excl_cumsum(nb)[seg] + local % nbs
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
