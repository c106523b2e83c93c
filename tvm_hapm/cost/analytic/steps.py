"""Per-step counts of a batch of queries: non-zero blocks, longest chains and GEMM rounds (of
weight masks with the compiled kernels of :mod:`tvm_hapm.cost._jit`, of fractions in NumPy)."""

from __future__ import annotations

import numpy as np

from .common import fluid_rounds
from .plans import excl_cumsum, frac_arrays


def mask_steps(masks: list, plans: list, q: dict, S: np.ndarray, empty: np.ndarray):
    """Per step of the mask queries: non-zero blocks, longest chain and GEMM rounds, by the
    compiled kernel (:func:`tvm_hapm.cost._jit.mask_steps`: one
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


def jit_kernels():
    """The compiled kernels (:mod:`tvm_hapm.cost._jit`), imported on first use: numba's import
    and the kernels' load from numba's disk cache (~0.6 s; their compilation when the cache is
    empty, ~4-5 s) are paid by the first batch of a process, not by importing ``tvm_hapm``.

    They are the mid model's one batched implementation: a NumPy path computed the same
    numbers bit for bit and was removed, being 2.3x slower (216 dataset layers: 2.3 ms
    against 1.0 ms), which would have put the fine model's prediction under its 1,000x target
    over the timing replay (``benchmarks/cost_model.py``)."""
    from .. import _jit

    return _jit
