"""The bit-exact semantics of each instruction, executed on the simulator's numpy buffers.

The simulator runs the instructions of a validated program
(:func:`~tvm_hapm.runtime.simulator.validate.validate_program`) in the order the token protocol
gives.  Each opcode's handler (:data:`HANDLERS`) updates the buffers of the simulator ``sim`` and
the DRAM slots in place:

* ``LOAD`` copies ``y_size`` rows of ``x_size`` entries (rows ``x_stride`` entries apart) from
  DRAM into a buffer, padded with 0 or with the minimum of the DRAM element type (so that a
  following max-pool ignores the padding);
* ``STORE`` writes accumulator entries to DRAM, saturating to the element width;
* ``GEMM`` accumulates (or resets to) ``inp @ wgt`` products into accumulator entries, for every
  iteration of its two-level loop nest;
* ``ALU`` applies ADD, MUL, SHR, MIN, MAX, RELU, REQUANT or ADD_REQUANT to accumulator lanes;
* ``SYNC`` and ``FINISH`` only move tokens: they have no handler.

The handlers vectorise whole loop nests with numpy where the result is provably that of the
sequential loop, and fall back to one vector operation per iteration otherwise.  (Runs of
consecutive GEMMs are usually combined into larger products instead, by
:mod:`~tvm_hapm.runtime.simulator.gemm_batch`, which falls back to :func:`exec_gemm`.)

The only refusal left for this phase is data dependent: a ``SHR`` whose shift amounts come from
the accumulator and fall outside ``[0, 31]`` raises :class:`SimulatorError`.

They use these attributes of ``sim`` (see :class:`~tvm_hapm.runtime.simulator.Simulator`):
``inp``, ``wgt``, ``acc``, ``cols``, ``entry_elems``, ``entry_shape``, ``gemm_dtype``,
``act_lo`` and ``act_hi``.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ...target import isa
from ...target.isa import REQUANT_RELU, REQUANT_SHIFT_MASK, AluOp, Buffer, Opcode
from .errors import instruction_error

__all__ = ["HANDLERS", "exec_gemm", "loop_index", "wrap32"]

_MASK32 = 0xFFFFFFFF


def wrap32(x: np.ndarray) -> np.ndarray:
    """Two's-complement wrap of int64 values to int32.

    Done with a mask and a reinterpretation rather than ``astype(np.int32)``: the latter relies
    on C's implementation-defined narrowing of out-of-range signed integers.

    Parameters
    ----------
    x : numpy.ndarray
        int64 values.

    Returns
    -------
    numpy.ndarray
        ``x`` modulo ``2**32``, as int32.
    """
    return (x & _MASK32).astype(np.uint32).view(np.int32)


def loop_index(base: int, so: int, si: int, outer: int, inner: int):
    """Buffer entries addressed by a two-level loop, in iteration order (``o`` major).

    Iteration ``(o, i)`` addresses entry ``base + o * so + i * si``.

    Parameters
    ----------
    base : int
        First entry.
    so, si : int
        Outer and inner strides, in entries.
    outer, inner : int
        Loop counts (at least 1).

    Returns
    -------
    index : slice or numpy.ndarray
        A slice when the addresses form an increasing arithmetic progression (the common case:
        indexing with it is a view, no gather), else a flat int64 array.
    distinct : bool
        Whether no address repeats.
    """
    # The nest is one arithmetic progression when one of the loops is trivial or when the inner
    # loop exactly tiles the outer stride.
    if inner == 1:
        step, count = so, outer
    elif outer == 1:
        step, count = si, inner
    elif so == si * inner:
        step, count = si, outer * inner
    else:
        step = count = None
    if step is not None:
        if count == 1:
            return slice(base, base + 1), True
        if step > 0:
            return slice(base, base + (count - 1) * step + 1, step), True
        return np.full(count, base, dtype=np.int64), False
    index = (
        base
        + so * np.arange(outer, dtype=np.int64)[:, None]
        + si * np.arange(inner, dtype=np.int64)[None, :]
    ).ravel()
    # Rows of the nest that do not interleave cannot collide; otherwise count unique addresses.
    if (si > 0 and so >= si * inner) or (so > 0 and si >= so * outer):
        distinct = True
    else:
        distinct = len(np.unique(index)) == index.size
    return index, distinct


def _as_array(index) -> np.ndarray:
    if isinstance(index, slice):
        return np.arange(index.start, index.stop, index.step or 1, dtype=np.int64)
    return index


def _read_before_written(dst: np.ndarray, src: np.ndarray) -> bool:
    """Whether every iteration ``j`` reads ``src[j]`` before any iteration writes it.

    True when no ``dst[k]`` with ``k < j`` equals ``src[j]``; then gathering all operands first
    and computing the whole nest at once gives the sequential result.
    """
    order = np.argsort(dst, kind="stable")
    sorted_dst = dst[order]
    pos = np.minimum(np.searchsorted(sorted_dst, src), dst.size - 1)
    # With a stable sort and the leftmost insertion point, order[pos] is the *first* iteration
    # that writes the address src[j].
    hit = sorted_dst[pos] == src
    first_writer = order[pos]
    return not np.any(hit & (first_writer < np.arange(src.size)))


# ---------------------------------------------------------------------------------- LOAD / STORE
def _exec_load(sim, idx, insn, dram):
    """LOAD: DRAM entries into a buffer, padded."""
    buf = insn.buffer
    E = sim.entry_elems[buf]
    shape = sim.entry_shape[buf]
    target = sim.inp if buf == Buffer.INP else sim.wgt if buf == Buffer.WGT else sim.acc
    slot = dram[insn.dram_slot]
    y, x = insn.y_size, insn.x_size
    top, left = insn.y_pad_top, insn.x_pad_left
    rows_total = top + y + insn.y_pad_bottom
    cols_total = left + x + insn.x_pad_right
    # A strided view of the y rows of x entries: no copy of the DRAM slot.
    item = slot.strides[0]
    src = as_strided(
        slot[insn.dram_addr * E :],
        shape=(y, x * E),
        strides=(insn.x_stride * E * item, item),
        writeable=False,
    ).reshape((y, x) + shape)
    region = target[insn.sram_addr : insn.sram_addr + rows_total * cols_total].reshape(
        (rows_total, cols_total) + shape
    )
    if rows_total != y or cols_total != x:
        # Pad with 0, or with the minimum of the DRAM element type so that a following
        # max-pool ignores the padding (sign-extended when loading into the accumulator).
        pad = -(1 << (isa.ELEM_BITS[insn.elem_bits_code] - 1)) if insn.pad_min else 0
        region[:top] = pad
        region[top + y :] = pad
        region[top : top + y, :left] = pad
        region[top : top + y, left + x :] = pad
    # Assignment casts: int8/int16 -> int32 sign-extends for accumulator loads.
    region[top : top + y, left : left + x] = src


def _exec_store(sim, idx, insn, dram):
    """STORE: accumulator entries to DRAM, saturated to the element width."""
    C = sim.cols
    slot = dram[insn.dram_slot]
    y, x = insn.y_size, insn.x_size
    values = sim.acc[insn.sram_addr : insn.sram_addr + y * x]
    bits = isa.ELEM_BITS[insn.elem_bits_code]
    if bits < 32:
        # Narrowing saturates (a plain cast would wrap).
        values = np.clip(values, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    values = values.astype(slot.dtype).reshape(y, x * C)
    item = slot.strides[0]
    dst = as_strided(
        slot[insn.dram_addr * C :],
        shape=(y, x * C),
        strides=(insn.x_stride * C * item, item),
        writeable=True,
    )
    if y == 1 or insn.x_stride >= x:
        dst[...] = values  # rows do not overlap in DRAM
    else:
        # Overlapping rows: write in order so that later rows win, as in hardware.
        for r in range(y):
            dst[r] = values[r]


# ---------------------------------------------------------------------------------- GEMM
def exec_gemm(sim, idx, insn, dram):
    """GEMM: for every iteration of the loop nest, ``acc[a] = (0 if reset else acc[a]) +
    inp[i] @ wgt[w]``, wrapped to int32.

    Parameters
    ----------
    sim : Simulator
        The simulator whose buffers are updated.
    idx : int
        Index of the instruction in the program.
    insn : isa.Instruction
        The validated GEMM.
    dram : list of numpy.ndarray or None
        Unused (the handlers share one signature).
    """
    outer, inner = insn.outer, insn.inner
    inp_index, _ = loop_index(insn.inp_addr, insn.inp_so, insn.inp_si, outer, inner)
    acc_index, distinct = loop_index(insn.acc_addr, insn.acc_so, insn.acc_si, outer, inner)
    # One matrix product for the whole loop nest: (n, R) @ (R, C).  In float64 every partial
    # sum is an exactly representable integer (see Simulator.__init__), so the result is exact.
    gd = sim.gemm_dtype
    prod = (sim.inp[inp_index].astype(gd) @ sim.wgt[insn.wgt_addr].astype(gd)).astype(np.int64)
    acc = sim.acc
    if distinct:
        if insn.reset:
            acc[acc_index] = wrap32(prod)
        else:
            acc[acc_index] = wrap32(acc[acc_index] + prod)
        return
    # Some accumulator entries are hit by several iterations.
    if insn.reset:
        # Every iteration resets its entry, so the last iteration to hit an entry wins.
        rev_unique, rev_first = np.unique(acc_index[::-1], return_index=True)
        acc[rev_unique] = wrap32(prod[acc_index.size - 1 - rev_first])
    else:
        # Addition modulo 2**32 is associative: sum per entry in int64, wrap once.
        unique, inverse = np.unique(acc_index, return_inverse=True)
        sums = np.zeros((unique.size, sim.cols), dtype=np.int64)
        np.add.at(sums, inverse, prod)
        acc[unique] = wrap32(acc[unique] + sums)


# ---------------------------------------------------------------------------------- ALU
def _exec_alu(sim, idx, insn, dram):
    """ALU: choose the vectorised path that gives the sequential result, else loop."""
    op = insn.alu_op
    outer, inner = insn.outer, insn.inner
    acc = sim.acc
    dst, dst_distinct = loop_index(insn.dst_addr, insn.dst_so, insn.dst_si, outer, inner)

    if op == AluOp.ADD_REQUANT:
        _exec_add_requant(sim, idx, insn, dst, dst_distinct)
        return

    if op == AluOp.RELU or (insn.use_imm and op in (AluOp.MIN, AluOp.MAX)):
        # Idempotent operations: applying them once per distinct entry is the sequential
        # result even when entries repeat (duplicate writes then carry equal values).
        acc[dst] = _alu(sim, idx, insn, acc[dst].astype(np.int64), insn.imm)
        return

    if insn.use_imm and op != AluOp.REQUANT:
        if dst_distinct:
            acc[dst] = _alu(sim, idx, insn, acc[dst].astype(np.int64), insn.imm)
        elif op in (AluOp.ADD, AluOp.MUL):
            operand = np.full((outer * inner, sim.cols), insn.imm, dtype=np.int64)
            _alu_reduce(sim, op, dst, operand)
        else:
            _alu_loop(sim, idx, insn, _as_array(dst), None)
        return

    src, _ = loop_index(insn.src_addr, insn.src_so, insn.src_si, outer, inner)
    if _src_ready(insn, dst, src):
        if dst_distinct:
            # Gather both operands before writing anything.
            acc[dst] = _alu(sim, idx, insn, acc[dst].astype(np.int64), acc[src].astype(np.int64))
            return
        if op in (AluOp.ADD, AluOp.MUL, AluOp.MAX, AluOp.MIN):
            # A reduction into repeated entries (e.g. pooling): associative and commutative.
            _alu_reduce(sim, op, dst, acc[src].astype(np.int64))
            return
    _alu_loop(sim, idx, insn, _as_array(dst), _as_array(src))


def _exec_add_requant(sim, idx, insn, dst, dst_distinct):
    """ADD_REQUANT: every iteration reads its destination, the bias at ``acc[s]`` and the
    multiplier at ``acc[s + 1]``, then writes the destination."""
    acc = sim.acc
    src = _as_array(loop_index(insn.src_addr, insn.src_so, insn.src_si, insn.outer, insn.inner)[0])
    d = _as_array(dst)
    if dst_distinct and _read_before_written(d, src) and _read_before_written(d, src + 1):
        acc[dst] = _alu(
            sim, idx, insn, acc[dst].astype(np.int64),
            (acc[src].astype(np.int64), acc[src + 1].astype(np.int64)),
        )  # fmt: skip
        return
    for j in range(d.size):  # sequential fallback
        operand = (acc[src[j]].astype(np.int64), acc[src[j] + 1].astype(np.int64))
        acc[d[j]] = _alu(sim, idx, insn, acc[d[j]].astype(np.int64), operand)


def _src_ready(insn, dst, src) -> bool:
    """Whether no iteration reads a source entry that an earlier iteration wrote."""
    outer, inner = insn.outer, insn.inner
    d_lo = insn.dst_addr
    d_hi = d_lo + (outer - 1) * insn.dst_so + (inner - 1) * insn.dst_si
    s_lo = insn.src_addr
    s_hi = s_lo + (outer - 1) * insn.src_so + (inner - 1) * insn.src_si
    if d_hi < s_lo or s_hi < d_lo:
        return True  # disjoint address ranges
    if (insn.dst_addr, insn.dst_so, insn.dst_si) == (insn.src_addr, insn.src_so, insn.src_si):
        # Every iteration reads the entry it writes; fine unless entries repeat.
        return not isinstance(dst, np.ndarray) or len(np.unique(dst)) == dst.size
    return _read_before_written(_as_array(dst), _as_array(src))


def _alu_reduce(sim, op, dst, operand):
    """Fold ``operand`` rows into repeated destination entries, in int64, then wrap."""
    unique, inverse = np.unique(dst, return_inverse=True)
    current = sim.acc[unique].astype(np.int64)
    ufunc = {
        AluOp.ADD: np.add,
        AluOp.MUL: np.multiply,  # int64 products wrap mod 2**64, which preserves mod 2**32
        AluOp.MIN: np.minimum,
        AluOp.MAX: np.maximum,
    }[op]
    ufunc.at(current, inverse, operand)
    sim.acc[unique] = wrap32(current)


def _alu_loop(sim, idx, insn, dst, src):
    """Sequential fallback: one vector operation per iteration."""
    acc = sim.acc
    imm = insn.imm
    for j in range(dst.size):
        d = dst[j]
        operand = imm if src is None else acc[src[j]].astype(np.int64)
        acc[d] = _alu(sim, idx, insn, acc[d].astype(np.int64), operand)


def _alu(sim, idx, insn, value, operand):
    """One ALU operation on int64 lanes; returns int32 lanes.

    ``value`` holds the destination lanes, ``operand`` the source lanes or the immediate.
    """
    op = insn.alu_op
    if op == AluOp.ADD:
        return wrap32(value + operand)
    if op == AluOp.MUL:
        # |int32 * int32| < 2**62: the int64 product is exact before wrapping.
        return wrap32(value * operand)
    if op == AluOp.SHR:
        if isinstance(operand, np.ndarray) and np.any((operand < 0) | (operand > 31)):
            bad = int(operand[(operand < 0) | (operand > 31)].flat[0])
            raise instruction_error(
                idx, insn, f"SHR shift amount {bad} read from acc out of range [0, 31]"
            )
        # Round half up: add 2**(k-1) before the arithmetic shift; (1 << k) >> 1 is 0 for
        # k = 0, which leaves the value unchanged.  The sum fits easily in int64.
        return ((value + ((1 << operand) >> 1)) >> operand).astype(np.int32)
    if op == AluOp.MIN:
        return np.minimum(value, operand).astype(np.int32)
    if op == AluOp.MAX:
        return np.maximum(value, operand).astype(np.int32)
    if op == AluOp.RELU:
        return np.maximum(value, 0).astype(np.int32)
    lo = sim.act_lo
    if op == AluOp.ADD_REQUANT:
        bias, operand = operand
        value = wrap32(value + bias).astype(np.int64)
        shift = insn.imm & REQUANT_SHIFT_MASK
        if insn.imm & REQUANT_RELU:
            lo = max(lo, 0)
    else:
        shift = insn.imm
    # REQUANT: |dst * mult| <= 2**62 and the rounding term is at most 2**61, so the int64
    # sum cannot overflow; the result saturates to the activation range.
    scaled = (value * operand + (1 << (shift - 1))) >> shift
    return np.clip(scaled, lo, sim.act_hi).astype(np.int32)


# Opcode -> semantics, each called as ``handler(sim, idx, insn, dram)``.  SYNC and FINISH have
# none: they only move tokens, which the execution order already honours.
HANDLERS = {
    Opcode.LOAD: _exec_load,
    Opcode.STORE: _exec_store,
    Opcode.GEMM: exec_gemm,
    Opcode.ALU: _exec_alu,
}
