"""Cycles, energy and event counts of a batch of queries from their plans and step counts."""

from __future__ import annotations

import numpy as np

from .plans import CFG_COLS, POOL, QI

_COUNT_KEYS = ("macs_dense", "macs", "struct_blocks", "nnz_blocks", "sparsity", "n_tiles",
               "tile_classes", "n_cg", "n_kc", "steps", "resident", "gemms", "gemm_rounds",
               "round_efficiency", "empty_steps", "step_nnz_cv", "empty_cob", "mean_tile",
               "partial_tile_frac", "pad_frac", "dram_read", "dram_write", "gemm_cycles",
               "load_cycles", "epi_cycles", "pre_cycles", "compute_bound", "memory_bound",
               "instructions", "mid_cycles", "mid_energy_uj")  # fmt: skip


_KERNEL_ROWS: dict = {}  # the kernel's input rows in Q and in the config rows (index arrays)


def batch_timing(kern, Q, q, plans, steps, chain, rounds, empty, exact, nnz, frac, tot, cfa):
    """Cycles, energy and event counts of the queries, by the compiled kernel
    (:func:`tvm_hapm.cost._jit.timing`, the mid model's one batched implementation: its
    scalar specification is :func:`tvm_hapm.testing.mid_reference.analyze_reference`); ``Q``: the
    query rows as one array, ``q`` by name."""
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
