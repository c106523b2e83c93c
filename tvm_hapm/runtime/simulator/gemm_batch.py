"""Runs of consecutive GEMMs executed as a few large matrix products.

Most instructions of a convolution are GEMMs, one per ``R x C`` weight block, and most of them
follow each other without a LOAD, STORE or ALU in between.  Executing each on its own costs a
small matrix product and a Python call apiece; here the simulator plans, once per program
(:func:`plan_steps`), which GEMMs of such a run can be combined, and executes a run
(:func:`exec_gemm_run`) as one product per group of GEMMs that write the same accumulator
entries.  The result is bit for bit that of executing the GEMMs one by one
(:func:`~tvm_hapm.runtime.simulator.execute.exec_gemm`), which is what a GEMM that cannot be
combined falls back to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...target.isa import Opcode
from .execute import exec_gemm, loop_index, wrap32

__all__ = ["exec_gemm_run", "plan_steps"]

_LOOP_CACHE: dict = {}


def _loop_vectors(outer: int, inner: int) -> tuple[np.ndarray, np.ndarray]:
    """The outer and inner loop counters of every iteration of an ``outer x inner`` nest."""
    hit = _LOOP_CACHE.get((outer, inner))
    if hit is None:
        o = np.repeat(np.arange(outer, dtype=np.int64), inner)
        i = np.tile(np.arange(inner, dtype=np.int64), outer)
        hit = _LOOP_CACHE[(outer, inner)] = (o, i)
    return hit


class _Group:
    """GEMMs of one flush that write the same accumulator entries (see :func:`plan_steps`)."""

    __slots__ = ("acc", "base", "pattern", "reset", "si", "so", "wgt")

    @classmethod
    def build(cls, key, members) -> _Group:
        acc_addr, acc_so, acc_si, outer, inner = key
        start = 0
        for j, (_, g) in enumerate(members):
            if g.reset:
                start = j  # earlier products are overwritten by this reset
        used = [g for _, g in members[start:]]
        self = cls()
        self.reset = bool(used[0].reset)
        self.acc = loop_index(acc_addr, acc_so, acc_si, outer, inner)[0]
        self.wgt = np.fromiter((g.wgt_addr for g in used), np.int64, len(used))
        self.base = np.fromiter((g.inp_addr for g in used), np.int64, len(used))
        o, i = _loop_vectors(outer, inner)
        strides = {(g.inp_so, g.inp_si) for g in used}
        if len(strides) == 1:
            so, si = strides.pop()
            self.pattern = (o * so + i * si)[:, None]
            self.so = self.si = None
        else:
            self.pattern = None
            self.so = np.fromiter((g.inp_so for g in used), np.int64, len(used))
            self.si = np.fromiter((g.inp_si for g in used), np.int64, len(used))
            self.so = o[:, None] * self.so[None, :]
            self.si = i[:, None] * self.si[None, :]
        return self

    def inp_index(self) -> np.ndarray:
        """Input entries read, shape ``(T, k)``: vector ``t`` of GEMM ``j`` at ``[t, j]``."""
        if self.pattern is not None:
            return self.pattern + self.base[None, :]
        return self.base[None, :] + self.so + self.si


@dataclass(frozen=True)
class _Flush:
    groups: tuple


@dataclass(frozen=True)
class _GemmRun:
    flushes: tuple  # _Flush objects and (index, instruction) of GEMMs executed on their own
    gemms: tuple  # instruction indices of all GEMMs of the run
    wgt_addrs: np.ndarray  # their weight blocks


def plan_steps(instructions, order) -> list:
    """Split the execution order into single instructions and runs of consecutive GEMMs.

    Between two instructions that are not GEMMs, the GEMMs read the input and weight
    buffers, which nothing changes meanwhile, and update accumulator entries.  A run is cut
    into *flushes*; a flush groups its GEMMs by accumulator pattern (same first entry,
    strides and loop counts, entries distinct), and the patterns of one flush occupy
    disjoint accumulator ranges.  Within a group, the sequential result is the sum of the
    products of the GEMMs from the last ``reset`` on (onto the old value if none resets),
    which is one matrix product ``[x_1 ... x_k] @ [W_1; ...; W_k]``: the order in which the
    GEMMs of a flush are applied does not change the result.

    Parameters
    ----------
    instructions : list of isa.Instruction
        The validated program.
    order : list of int
        Its execution order (:func:`~tvm_hapm.runtime.simulator.tokens.schedule`).

    Returns
    -------
    list
        The steps of the execution: an instruction index (execute that instruction) or a run
        of GEMMs (execute it with :func:`exec_gemm_run`).
    """
    steps: list = []
    run: list = []
    GEMM = Opcode.GEMM
    for idx in order:
        insn = instructions[idx]
        if insn.opcode == GEMM:
            run.append(idx)
            continue
        if run:
            _add_gemm_run(steps, instructions, run)
            run = []
        steps.append(idx)
    if run:
        _add_gemm_run(steps, instructions, run)
    return steps


def _add_gemm_run(steps, instructions, run) -> None:
    if len(run) == 1:
        steps.append(run[0])
        return
    flushes = []
    groups: dict = {}
    ranges: list = []  # (lo, hi, key) of the groups of the current flush

    def close():
        if groups:
            flushes.append(_Flush(tuple(_Group.build(k, v) for k, v in groups.items())))
            groups.clear()
            ranges.clear()

    for idx in run:
        g = instructions[idx]
        outer, inner, so, si = g.outer, g.inner, g.acc_so, g.acc_si
        key = (g.acc_addr, so, si, outer, inner)
        members = groups.get(key)
        if members is None:
            distinct = (
                inner == 1
                or outer == 1
                or (si > 0 and so >= si * inner)
                or (so > 0 and si >= so * outer)
            )
            if not distinct or (outer > 1 and so == 0) or (inner > 1 and si == 0):
                # Entries repeat within the GEMM: execute it on its own, in order.
                close()
                flushes.append((idx, g))
                continue
            lo = g.acc_addr
            hi = lo + (outer - 1) * so + (inner - 1) * si
            if any(not (hi < a or b < lo) for a, b, _ in ranges):
                close()
            ranges.append((lo, hi, key))
            members = groups[key] = []
        members.append((idx, g))
    close()
    wgt_addrs = np.fromiter((instructions[i].wgt_addr for i in run), np.int64, len(run))
    steps.append(_GemmRun(tuple(flushes), tuple(run), wgt_addrs))


def exec_gemm_run(sim, run: _GemmRun, zero) -> None:
    """Execute a run of GEMMs planned by :func:`plan_steps`.

    Parameters
    ----------
    sim : Simulator
        The simulator whose accumulator is updated.
    run : _GemmRun
        A run of GEMMs, one of the steps :func:`plan_steps` returned.
    zero : bytearray or None
        When given (a run with timing), ``zero[i]`` is set for every GEMM ``i`` of the run to
        whether its weight block is all zero (what the Dynamic Sparsity Bypass sees).
    """
    inp, wgt, acc = sim.inp, sim.wgt, sim.acc
    if zero is not None:
        blocks = wgt[run.wgt_addrs]
    for item in run.flushes:
        if item.__class__ is tuple:  # a GEMM executed on its own: (index, instruction)
            exec_gemm(sim, item[0], item[1], None)
            continue
        for grp in item.groups:
            X = inp[grp.inp_index()]  # (T, k, R)
            T = X.shape[0]
            X = X.reshape(T, -1)
            W = wgt[grp.wgt].reshape(-1, sim.cols)
            dt = _flush_dtype(sim, X.shape[1])
            if dt is np.int64:
                prod = X.astype(np.int64) @ W.astype(np.int64)
            else:
                prod = (X.astype(dt) @ W.astype(dt)).astype(np.int64)
            if grp.reset:
                acc[grp.acc] = wrap32(prod)
            else:
                acc[grp.acc] = wrap32(acc[grp.acc] + prod)
    if zero is not None:
        flags = ~blocks.reshape(len(run.gemms), -1).any(axis=1)
        for idx, flag in zip(run.gemms, flags.tolist(), strict=True):
            zero[idx] = flag


def _flush_dtype(sim, K: int):
    """The exact dtype for a product with ``K`` terms per output: float32 while every
    partial sum stays below 2**24, float64 below 2**53, else int64."""
    cfg = sim.config
    bound = K * (1 << (cfg.act_bits - 1)) * (1 << (cfg.weight_bits - 1))
    if bound < (1 << 24):
        return np.float32
    if bound < (1 << 53):
        return np.float64
    return np.int64
