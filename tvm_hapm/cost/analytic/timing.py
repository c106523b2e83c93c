"""Cycles, energy and event counts of a batch of queries from their plans and step counts."""

from __future__ import annotations

import numpy as np

from ...target.isa import MAX_TRANSFER
from .common import ROUND_UP
from .plans import CFG_COLS, N_ALU, PCOLS32, PCOLS64, POOL, QI, excl_cumsum


def batch_timing(q, plans, steps, chain, rounds, empty, exact, nnz, frac, tot, cfa):
    """Cycles, energy (uJ) and the counts of the queries (rows of ``q``, plans ``plans``),
    given each step's non-zero blocks, longest chain and position rounds and each query's
    empty output blocks, non-zero blocks and zero fraction (see
    :func:`tvm_hapm.cost.reference.analyze_reference`)."""
    n = len(plans)
    cf = dict(zip(CFG_COLS, cfa.T))
    nst = q["nst"].astype(np.int64)
    npairs = q["npairs"].astype(np.int64)
    R, C, A, B, L = q["R"], q["C"], q["A"], q["B"], q["L"]
    ab, wb = q["ab"], q["wb"]
    inp_b, wgt_b, acc_b = R * ab, R * C * wb, C * 4
    n_cg, n_tiles, pix = q["n_cg"], q["n_tiles"], q["pix"]
    cob, cib = q["cob"], q["cib"]
    st_off = excl_cumsum(nst)
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
    pc = dict(zip(PCOLS32, P32))
    pc.update(zip(PCOLS64, P64))
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
    sums = np.add.reduceat(weighted, excl_cumsum(npairs), axis=1)
    # the last region's ALU passes and stores, and the pipeline's fill (analyze_reference)
    st_last, g_last, alu_l = q["st_last"], q["g_last"], q["tail_alu"]
    end = np.maximum((g_last * N_ALU + e_q) * alu_l + st_last, N_ALU * alu_l + g_last * st_last)
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
    acc_reads = (nnz - cob + empty) * pix * acc_b + cpa * (N_ALU + 3) + epa
    acc_writes = nnz * pix * acc_b + cpa * N_ALU + bias_bytes + epa
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
        "epi_cycles": (N_ALU * cob + e_q) * q["sa"],
        "pre_cycles": sums[3],
        "compute_bound": macs / macs_per_cycle,
        "memory_bound": (dram_read + out_bytes) / B,
        "instructions": n_tiles * (cib * multi + cob * (N_ALU + 1) + n_cg) + gemms,
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


def batch_timing_jit(kern, Q, q, plans, steps, chain, rounds, empty, exact, nnz, frac, tot, cfa):
    """:func:`batch_timing` by the compiled kernel (:func:`tvm_hapm.cost._jit.timing`, bit for bit
    the same numbers; ``Q``: the query rows as one array, ``q`` by name)."""
    rows = _KERNEL_ROWS.get(kern)
    if rows is None:
        rows = _KERNEL_ROWS[kern] = (
            np.array([QI[k] for k in kern.IN_ROWS], np.int64),
            np.array([CFG_COLS.index(k) for k in kern.CFG_ROWS], np.int64),
        )
    c = np.ascontiguousarray
    out = np.empty((len(kern.OUT_ROWS), len(plans)))
    kern.timing(
        Q[rows[0]], c(cfa.T[rows[1]]), np.array([p.pe for p in plans], np.int64),
        c(nnz, np.float64), c(frac, np.float64), c(empty, np.float64), c(exact, bool),
        c(steps, np.float64), c(chain, np.float64), c(rounds, np.float64), POOL.P32, POOL.P64,
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
