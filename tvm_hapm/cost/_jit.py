"""Compiled (numba) loops of the cost model's batch prediction.

Each replaces numpy or xgboost work whose cost is the number of calls and of sweeps over small
arrays rather than arithmetic (see ``docs/cost_model.md``, "Batched evaluation"):

* :func:`mask_steps` (:func:`tvm_hapm.cost.analytic.analyze_batch`): every step's non-zero
  blocks, longest chain and GEMM rounds and every query's empty output blocks, in one sweep over
  each mask's bytes;
* :func:`timing`: the per-step and per-(tile class, step) arithmetic of the timing model, its
  per-query sums, the event counts and the energy, query by query;
* :func:`forest`: the fine model's trees (:class:`tvm_hapm.cost.models.CompiledForest`), the
  outputs of xgboost's prediction without its per-call setup.

The first two are the mid model's one batched implementation; its readable specification is
the scalar :func:`tvm_hapm.testing.mid_reference.analyze_reference`, which ``tests/test_cost.py``
checks them against, and against stored figures bit for bit.  (A NumPy path computed the same
numbers and was removed: 2.3x slower, see :func:`tvm_hapm.cost.analytic.jit_kernels`.)  The
per-query sums follow numpy's ``np.add.reduceat`` (the first element plus numpy's pairwise sum
of the rest, :func:`_seg_sum`), the order the stored figures were computed in.  The signatures
are explicit (compiled when this module is first imported, cached on disk by numba), so a
caller passing other dtypes gets a ``TypeError`` instead of a new compilation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..target.isa import MAX_TRANSFER
from .analytic.common import ROUND_UP
from .analytic.plans import N_ALU

_F64 = "float64[::1]"
_I64 = "int64[::1]"


@njit("float64(float64[::1], int64, int64)", cache=True, nogil=True)
def _pairwise(a, lo, n):  # pragma: no cover - compiled
    """``sum(a[lo:lo + n])`` as numpy's pairwise summation adds it (blocks of 8 partial sums up
    to 128 elements, halves above): the inner loop of ``np.add.reduce`` / ``reduceat`` on
    contiguous float64 (numpy's ``pairwise_sum``)."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    if n <= 128:
        r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
        r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
        i = 8
        end = n - n % 8
        while i < end:
            j = lo + i
            r0 += a[j]
            r1 += a[j + 1]
            r2 += a[j + 2]
            r3 += a[j + 3]
            r4 += a[j + 4]
            r5 += a[j + 5]
            r6 += a[j + 6]
            r7 += a[j + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[lo + i]
            i += 1
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise(a, lo, n2) + _pairwise(a, lo + n2, n - n2)


@njit("float64(float64[::1], int64, int64)", cache=True, nogil=True)
def _seg_sum(a, lo, n):  # pragma: no cover - compiled
    """One segment of ``np.add.reduceat``: its first element plus the pairwise sum of the rest
    (``n >= 1``)."""
    return a[lo] + _pairwise(a, lo + 1, n - 1)


@njit(
    f"void(uint8[::1], {_I64}, {_I64}, {_I64}, {_I64}, {_I64}, {_I64}, {_I64}, {_I64}, "
    f"{_F64}, {_F64}, {_F64}, {_F64})",
    cache=True,
    nogil=True,
    error_model="numpy",
)
def mask_steps(
    F, off, cob, cib, kk, G, K, A, st_off, steps, chain, rounds, empty
):  # pragma: no cover
    """Per step of every mask query: non-zero blocks, longest chain (non-zero blocks of one
    output block over the step's input chunk) and GEMM rounds (per position of the step, one
    round if ``n_p <= A``, else ``n_p / A``, for the ``n_p`` non-zero blocks of the group
    there); per query: output blocks without a non-zero block.

    ``F``: the masks' bytes one after the other (query ``i`` at ``off[i]``, ``(cob, cib, kk)``
    C order, no padding); the steps of query ``i`` are ``st_off[i] + g * n_kc + k`` (group
    ``g``, input chunk ``k``), as the plans number them.  Each output block's row is read
    twice while in cache: its chunk sums, then added to the group's per-position counts.  The
    loops run over slices (indices known non-negative, so they vectorise).
    """
    wmax = 1
    for q in range(off.shape[0]):
        wmax = max(wmax, cib[q] * kk[q])
    npos = np.empty(wmax, np.int32)
    for q in range(off.shape[0]):
        W = cib[q] * kk[q]
        gq, aq = G[q], A[q]
        cw = K[q] * kk[q]  # bytes of a full input chunk in a row
        n_kc = (cib[q] + K[q] - 1) // K[q]
        n_cg = (cob[q] + gq - 1) // gq
        acc = npos[:W]
        ne = 0
        for g in range(n_cg):
            s = st_off[q] + g * n_kc
            acc[:] = 0
            for k in range(n_kc):
                steps[s + k] = 0.0
                chain[s + k] = 0.0
            for co in range(g * gq, min((g + 1) * gq, cob[q])):
                row = F[off[q] + co * W : off[q] + (co + 1) * W]
                tot = 0
                for k in range(n_kc):
                    chunk = row[k * cw : min((k + 1) * cw, W)]
                    x = np.uint32(0)
                    for w in range(chunk.shape[0]):
                        x += chunk[w]
                    xi = np.int64(x)
                    steps[s + k] += xi
                    chain[s + k] = max(chain[s + k], xi)
                    tot += xi
                if tot == 0:
                    ne += 1
                for w in range(W):
                    acc[w] += row[w]
            for k in range(n_kc):
                part = acc[k * cw : min((k + 1) * cw, W)]
                r = 0
                if gq <= aq:  # at most A blocks at a position: one round if any
                    for w in range(part.shape[0]):
                        r += 1 if part[w] > 0 else 0
                    rounds[s + k] = r
                else:  # max(n_p, A) A-ths of a round (analytic.position_rounds)
                    for w in range(part.shape[0]):
                        r += max(part[w], aq) if part[w] > 0 else 0
                    rounds[s + k] = r / aq
        empty[q] = ne


#: Rows of :func:`timing`'s ``qin``: the query columns it reads (``analytic._QCOLS`` names).
IN_ROWS = ("nst", "npairs", "R", "C", "A", "B", "L", "ab", "wb", "n_cg", "n_kc", "n_tiles", "pix",
           "cob", "cib", "wgt_depth", "dbs", "fits_res", "fits_non", "share", "g_last",
           "tail_alu", "st_last", "cnt_data", "cnt_pad", "sa", "partial", "n", "oh", "ow",
           "cout", "cin", "groups", "kh", "kw", "ld_first", "g0t_first")  # fmt: skip
#: Rows of :func:`timing`'s ``cfg``: the config's energy constants (``analytic._CFG_COLS``).
CFG_ROWS = ("clock", "mac_pj", "add32", "mult32", "e_inp", "e_wgt", "e_acc", "e_dram",
            "background_mw", "macs_per_cycle")  # fmt: skip
#: Rows of :func:`timing`'s ``out``: cycles, energy and the counts it computes.
OUT_ROWS = ("mid_cycles", "mid_energy_uj", "macs_dense", "macs", "resident", "gemms",
            "gemm_rounds", "round_efficiency", "empty_steps", "step_nnz_cv", "empty_cob",
            "mean_tile", "partial_tile_frac", "pad_frac", "dram_read", "dram_write",
            "gemm_cycles", "load_cycles", "epi_cycles", "pre_cycles", "compute_bound",
            "memory_bound", "instructions")  # fmt: skip
# the row numbers as module constants (numba compiles them in; a dict could not be read)
(_NST, _NPAIRS, _R, _C, _A, _B, _L, _AB, _WB, _NCG, _NKC, _NTILES, _PIX, _COB, _CIB, _WDEPTH,
 _DBS, _FRES, _FNON, _SHARE, _GLAST, _TAIL, _STLAST, _CDATA, _CPAD, _SA, _PART, _N, _OH, _OW,
 _COUT, _CIN, _GROUPS, _KH, _KW, _LDFIRST, _G0TFIRST) = range(len(IN_ROWS))  # fmt: skip
# rows of the pair columns (analytic._PCOLS32 and _PCOLS64)
_P_ES, _P_CNT, _P_G0T, _P_WALU, _P_FK, _P_BIAS, _P_BST, _P_MAB, _P_A, _P_KB, _P_HID = range(11)
_P_INDMA, _P_PORT, _P_SBOUND, _P_LD1, _P_SCHAIN = range(5)
_CLOCK, _MAC_PJ, _ADD32, _MULT32, _E_INP, _E_WGT, _E_ACC, _E_DRAM, _BACKGROUND, _MPC = range(
    len(CFG_ROWS)
)
(_O_CYC, _O_EN, _O_MDENSE, _O_MACS, _O_RES, _O_GEMMS, _O_GROUNDS, _O_REFF, _O_EST, _O_CV,
 _O_ECOB, _O_MTILE, _O_PART, _O_PAD, _O_DREAD, _O_DWRITE, _O_GCYC, _O_LCYC, _O_ECYC, _O_PCYC,
 _O_CB, _O_MB, _O_INSTR) = range(len(OUT_ROWS))  # fmt: skip
_N_ALU = N_ALU  # one ADD_REQUANT (bias, requantization and ReLU fused)
_ROUND_UP = ROUND_UP


@njit(
    f"void(float64[:, ::1], float64[:, ::1], {_I64}, {_F64}, {_F64}, {_F64}, boolean[::1], "
    f"{_F64}, {_F64}, {_F64}, float32[:, ::1], float64[:, ::1], float64[:, ::1])",
    cache=True,
    nogil=True,
)
def timing(  # pragma: no cover - compiled
    qin, cfg, pe_off, nnz, frac, empty, exact, steps, chain, rounds, P32, P64, out
):
    # One kernel on purpose (over 150 lines): it is the mid model's hot loop (the batch of 216
    # layers in 1.0 ms), with explicit signatures so that it compiles once; its sections follow
    # testing.mid_reference.analyze_reference, the readable statement of the same arithmetic.
    """Cycles, energy and the counts of ``analytic._timing``, one query at a time (the same
    floating-point operations in the same order).

    Per query ``i``: ``qin[:, i]`` its ``IN_ROWS``, ``cfg[:, i]`` its config's ``CFG_ROWS``, its
    non-zero blocks, zero fraction, empty output blocks and whether they are exact; its steps
    (``nst`` from the running total) with their non-zero blocks, longest chains and position
    rounds; its (tile class, step) pairs, the ``_PCOLS32`` rows ``P32`` and ``_PCOLS64`` rows
    ``P64`` from column ``pe_off[i]`` (the plans' pools, ``analytic._Pools``).  Writes ``out``
    ``(len(OUT_ROWS), n)``.
    """
    n = qin.shape[1]
    ns = steps.shape[0]
    radj = np.empty(ns)
    skew = np.empty(ns)
    w_step = np.empty(ns)
    w_beats = np.empty(ns)
    nxt = np.empty(ns)
    tmp = np.empty(ns)
    emax = 1
    for q in range(n):
        emax = max(emax, np.int64(qin[_NPAIRS, q]))
    buf = np.empty((4, emax))  # one query's weighted pairs
    s0 = 0
    for q in range(n):
        m = np.int64(qin[_NST, q])
        R, C, A, B, L = qin[_R, q], qin[_C, q], qin[_A, q], qin[_B, q], qin[_L, q]
        ab, wb = qin[_AB, q], qin[_WB, q]
        inp_b, wgt_b, acc_b = R * ab, R * C * wb, C * 4
        n_cg, n_kc, n_tiles, pix = qin[_NCG, q], qin[_NKC, q], qin[_NTILES, q], qin[_PIX, q]
        cob, cib = qin[_COB, q], qin[_CIB, q]
        nz, ez = nnz[q], empty[q]
        resident = nz <= qin[_WDEPTH, q]
        one_step = m == 1
        fits = qin[_FRES, q] if resident else qin[_FNON, q]
        dbuf = qin[_DBS, q] != 0 and fits != 0
        if resident:  # analytic._wload
            w_once = np.ceil(nz * wgt_b / B - 1e-7) + L * (
                (1.0 if nz > 0 else 0.0) + (1.0 if nz > MAX_TRANSFER else 0.0)
            )
        else:
            w_once = 0.0
        no_w = resident or one_step  # no weight load per step
        e_q = ez / max(n_cg, 1.0)  # MUL of empty output blocks per group (rough)
        wB = wgt_b / B
        pruned = frac[q] > 0
        zero_steps = 0.0
        for s in range(s0, s0 + m):
            st = steps[s]
            lower = min(rounds[s], max(chain[s], np.ceil(st / A - 1e-9)))
            radj[s] = 0.5 * (rounds[s] + lower) if pruned else rounds[s]
            has = st > 0
            skew[s] = min(st, A) - 1.0 if has else 0.0
            beats = np.ceil(st * wB - 1e-7)  # robust to summation order
            w_all = beats + L * ((1.0 if has else 0.0) + (1.0 if st > MAX_TRANSFER else 0.0))
            if s == s0 and not resident and one_step:
                w_once = w_all
            w_step[s] = 0.0 if no_w else w_all
            w_beats[s] = 0.0 if no_w else beats
            if st == 0:
                zero_steps += 1.0
        # the next weight load of each step: the next step's with one, after the last step
        # (cyclically) the first's, which is the next tile's (none after the layer's last tile)
        first = -1
        for s in range(s0, s0 + m):
            if w_step[s] > 0:
                first = s
                break
        after = -1
        for s in range(s0 + m - 1, s0 - 1, -1):
            if after >= 0:
                nxt[s] = w_step[after]
            elif first >= 0:
                nxt[s] = w_step[first] * (1.0 - 1.0 / n_tiles)
            else:
                nxt[s] = 0.0
            if w_step[s] > 0:
                after = s
        # (tile class, step) pairs
        e0, ne = pe_off[q], np.int64(qin[_NPAIRS, q])
        sh = qin[_SHARE, q]
        for e in range(e0, e0 + ne):
            es = np.int64(P32[_P_ES, e]) + s0
            w_alu, fk = np.float64(P32[_P_WALU, e]), np.float64(P32[_P_FK, e])
            A_e = np.float64(P32[_P_A, e])
            m_alu = np.float64(P32[_P_MAB, e]) + e_q
            load_seq = P64[_P_INDMA, e] + w_step[es]
            st = steps[es]
            has = st > 0
            gemm = radj[es] * np.float64(P32[_P_G0T, e]) + skew[es]
            pre_c = max(m_alu * w_alu * fk + np.float64(P32[_P_BST, e]), P64[_P_SCHAIN, e])
            pre = max(load_seq if has else 0.0, pre_c)
            if dbuf:  # the interleaved epilogue (analytic._interleaved_steps)
                mm = m_alu * sh + 1.0
                d = max(np.ceil(st / A_e), 1.0)
                period = gemm / d
                ps = np.ceil(mm / d)
                n_sl1 = np.ceil(mm / ps) - 1.0
                arw = A_e + (mm - n_sl1 * ps - 1.0) * w_alu
                full = A_e + ps * w_alu
                hide = np.float64(P32[_P_HID, e]) * period  # reference.epilogue_hidden
                exposed = n_sl1 * max(full - hide, 0.0)
                wait = max(nxt[es] - n_sl1 * (period + full - min(hide, full)) - arw, 0.0)
                wait = max(wait + (arw + np.float64(P32[_P_BIAS, e]) - hide), 0.0)
                exposed = (exposed + wait) * fk + gemm
                run = max(exposed, P64[_P_PORT, e] + w_beats[es])
                run = max(run, P64[_P_SBOUND, e])
                step = max(load_seq, run) if has else run
            else:  # loads and GEMMs overlap input block by input block
                ld1 = P64[_P_LD1, e]
                step = max(pre_c + gemm, w_step[es] + ld1 + gemm)
                if ld1 > 0 and has:
                    step = max(step, load_seq + gemm / np.float64(P32[_P_KB, e]))
                else:
                    step = max(step, load_seq)
            cnt = np.float64(P32[1, e])
            buf[0, e - e0] = step * cnt
            buf[1, e - e0] = load_seq * cnt
            buf[2, e - e0] = gemm * cnt
            buf[3, e - e0] = pre * cnt
        step_sum = _seg_sum(buf[0], 0, ne)
        load_sum = _seg_sum(buf[1], 0, ne)
        # the last region's ALU passes and stores, and the pipeline's fill
        st_last, g_last, alu_l = qin[_STLAST, q], qin[_GLAST, q], qin[_TAIL, q]
        if dbuf:
            end = max((g_last * _N_ALU + e_q) * alu_l + st_last, _N_ALU * alu_l + g_last * st_last)
            fill = min(qin[_LDFIRST, q] + w_step[s0], radj[s0] * qin[_G0TFIRST, q] + skew[s0])
            end = end + fill
        else:
            end = st_last
        cycles = step_sum + w_once + end + 1.0
        load_total = load_sum + w_once
        cycles = max(cycles, load_total + st_last + 1.0)
        rsum = _seg_sum(radj, s0, m)
        ssum = _seg_sum(steps, s0, m)
        smean = ssum / m
        for s in range(s0, s0 + m):
            dv = steps[s] - smean
            tmp[s] = dv * dv
        sstd = np.sqrt(_seg_sum(tmp, s0, m) / m)
        s0 += m

        # ---- event counts (exact for an exact mask)
        multi = n_cg if n_kc > 1 else 1.0
        macs = nz * R * C * pix
        gemms = nz * n_tiles
        w_blocks_loaded = nz if resident or one_step else gemms
        bias_bytes = 2 * cob * C * 4 * n_tiles
        out_bytes = cob * C * ab * pix
        dram_read = qin[_CDATA, q] * inp_b * (cib * multi) + w_blocks_loaded * wgt_b + bias_bytes
        cpa = cob * pix * acc_b
        epa = ez * pix * acc_b
        acc_reads = (nz - cob + ez) * pix * acc_b + cpa * (_N_ALU + 3) + epa
        acc_writes = nz * pix * acc_b + cpa * _N_ALU + bias_bytes + epa
        cpc = cob * pix * C
        latency_ms = cycles / cfg[_CLOCK, q] / 1e3
        energy = (
            np.trunc(macs * _ROUND_UP) * cfg[_MAC_PJ, q]
            + np.trunc(cpc * _ROUND_UP) * cfg[_ADD32, q]
            + np.trunc((cpc + ez * pix * C) * _ROUND_UP) * cfg[_MULT32, q]
            + (pix * nz + qin[_CPAD, q] * cib * multi) * inp_b * cfg[_E_INP, q]
            + (gemms + w_blocks_loaded) * wgt_b * cfg[_E_WGT, q]
            + (acc_reads + acc_writes) * cfg[_E_ACC, q]
            + (np.trunc(dram_read * _ROUND_UP) + np.trunc(out_bytes * _ROUND_UP)) * cfg[_E_DRAM, q]
        ) * 1e-6 + cfg[_BACKGROUND, q] * latency_ms
        out[_O_CYC, q] = cycles
        out[_O_EN, q] = energy
        out[_O_MDENSE, q] = (
            qin[_N, q] * qin[_OH, q] * qin[_OW, q] * qin[_COUT, q]
            * np.float64(np.int64(qin[_CIN, q]) // np.int64(qin[_GROUPS, q]))
            * qin[_KH, q] * qin[_KW, q]
        )  # fmt: skip
        out[_O_MACS, q] = macs
        out[_O_RES, q] = 1.0 if resident else 0.0
        out[_O_GEMMS, q] = gemms
        out[_O_GROUNDS, q] = rsum * n_tiles
        out[_O_REFF, q] = ssum / max(A * rsum, 1e-9)
        out[_O_EST, q] = zero_steps / m
        out[_O_CV, q] = sstd / max(smean, 1e-9)
        out[_O_ECOB, q] = ez if exact[q] else 0.0
        out[_O_MTILE, q] = pix / max(n_tiles, 1.0)
        out[_O_PART, q] = qin[_PART, q] / max(n_tiles, 1.0)
        out[_O_PAD, q] = (qin[_CPAD, q] - qin[_CDATA, q]) / max(qin[_CPAD, q], 1.0)
        out[_O_DREAD, q] = dram_read
        out[_O_DWRITE, q] = out_bytes
        out[_O_GCYC, q] = _seg_sum(buf[2], 0, ne)
        out[_O_LCYC, q] = load_total
        out[_O_ECYC, q] = (_N_ALU * cob + e_q) * qin[_SA, q]
        out[_O_PCYC, q] = _seg_sum(buf[3], 0, ne)
        out[_O_CB, q] = macs / cfg[_MPC, q]
        out[_O_MB, q] = (dram_read + out_bytes) / B
        out[_O_INSTR, q] = n_tiles * (cib * multi + cob * (_N_ALU + 1) + n_cg) + gemms


@njit(
    "void(float32[:, ::1], int32[::1], int32[::1], int32[::1], float32[::1], boolean[::1], "
    "int32[::1], int32[::1], float32[:, ::1], float32[::1], int64, float32[:, ::1])",
    cache=True,
    nogil=True,
)
def forest(
    X, left, right, feature, cond, default_left, leaf, roots, values, base, depth, out
):  # pragma: no cover
    """Outputs of a forest of regression trees with vector leaves (xgboost's multi-output
    trees) on the rows of ``X``, as xgboost's CPU predictor computes them: a row goes left at a
    node when its feature is below the split condition (a missing value, NaN, goes to the
    default side), and the leaf vectors are added to ``base`` in float32 tree by tree.

    The trees' nodes one tree after the other (tree ``t`` from ``roots[t]``; children as global
    node numbers; a leaf is its own children and has its row of ``values`` in ``leaf``).  The
    walk is level-synchronous, ``depth`` levels of every row per tree (no branch on the path
    length; independent rows keep the core busy while one row's node loads).
    """
    n, n_out = X.shape[0], values.shape[1]
    nid = np.empty(n, np.int32)
    for r in range(n):
        for k in range(n_out):
            out[r, k] = base[k]
    for t in range(roots.shape[0]):
        nid[:] = roots[t]
        for _ in range(depth):
            for r in range(n):
                i = nid[r]
                v = X[r, feature[i]]
                go_left = v < cond[i] or (np.isnan(v) and default_left[i])
                nid[r] = left[i] if go_left else right[i]
        if n_out == 2:  # the cost model's two outputs: no inner loop
            for r in range(n):
                row = leaf[nid[r]]
                out[r, 0] += values[row, 0]
                out[r, 1] += values[row, 1]
        else:
            for r in range(n):
                row = leaf[nid[r]]
                for k in range(n_out):
                    out[r, k] += values[row, k]
