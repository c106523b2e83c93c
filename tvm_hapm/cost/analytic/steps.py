"""Per-step counts of a batch of weight masks: non-zero blocks, longest chains and GEMM rounds, in
NumPy or with the compiled kernels of :mod:`tvm_hapm.cost._jit`."""

from __future__ import annotations

import numpy as np

from .common import fluid_rounds
from .plans import excl_cumsum, frac_arrays


def mask_steps(masks: list, plans: list, q: dict):
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
    c_off = excl_cumsum(np.array([p.csize for p in plans], np.int64))  # each query's counts
    r_off = excl_cumsum(q["rsize"][:nm].astype(np.int64))  # and rounds
    RS = np.concatenate([p.RS for p in plans], axis=1) if nm > 1 else plans[0].RS
    RR = np.concatenate([p.RR for p in plans], axis=1) if nm > 1 else plans[0].RR
    off = np.repeat(c_off, nrow).astype(np.int32)
    d = np.zeros(RS.shape[1] + 1, np.int32)  # (and a last row: reduceat's segments end before it)
    np.subtract(cp[RS[1] + off], cp[RS[0] + off], out=d[:-1])  # non-zero blocks of each row
    base = excl_cumsum(nrow)
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


def mask_steps_jit(masks: list, plans: list, q: dict, S: np.ndarray, empty: np.ndarray):
    """:func:`mask_steps` by the compiled kernel (:func:`tvm_hapm.cost._jit.mask_steps`: one
    sweep over each mask, any query order; the masks are concatenated without padding), into
    the rows of ``S`` (non-zero blocks, longest chain, rounds of every step) and ``empty``."""
    nm = len(plans)
    F = np.concatenate(masks, axis=None).view(np.uint8)
    cob, cib, kh, kw, G, K, A, nst = np.array(
        [q[k][:nm] for k in ("cob", "cib", "kh", "kw", "G", "K", "A", "nst")], np.int64
    )
    kk = kh * kw
    jit_kernels().mask_steps(F, excl_cumsum(cob * cib * kk), cob, cib, kk, G, K, A,
                          excl_cumsum(nst), S[0], S[1], S[2], empty)  # fmt: skip


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


def frac_steps(fq: list):
    """:func:`mask_steps` of the fraction queries (``(plan, fraction)``): the structural
    blocks scaled by ``1 - f``, rounds ``max(n_p (1 - f), A) / A * (1 - f ** n_p)``, as rows
    ``(3, steps)`` (non-zero blocks, longest chain, rounds); the empty output blocks; whether
    the scaled counts are integers (exact)."""
    mats, empty, exact = [], [], []
    for plan, f in fq:
        scr, n_p, rowsum, empty0 = plan.frac_arrays or frac_arrays(plan)
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


KERNELS: list = []  # [the compiled kernels' module, or None without numba]; [None] forces NumPy


def jit_kernels():
    """The compiled kernels (:mod:`tvm_hapm.cost._jit`), imported on first use: numba's import
    and the kernels' load from numba's disk cache (~0.6 s; their compilation when the cache is
    empty, ~4-5 s) are paid by the first batch of a process, not by importing ``tvm_hapm``.
    ``None`` if numba cannot be imported: the numpy path (:func:`mask_steps`, :func:`batch_timing`)
    computes the same numbers, bit for bit, about twice as slowly."""
    if not KERNELS:
        try:
            from .. import _jit
        except ImportError:  # pragma: no cover - numba is a dependency
            _jit = None
        KERNELS.append(_jit)
    return KERNELS[0]
