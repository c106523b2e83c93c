"""Instruction streams with GEMM blocks: a run of GEMMs kept as an integer table.

A convolution's stream is mostly GEMMs (ResNet-18: 262,784 of 277,330 instructions), and
the walker computes them a loop at a time with NumPy.  Making each one an
:class:`~tvm_hapm.target.isa.Instruction` and reading its fields back in every later pass cost
most of the compile (``docs/compile_time.md``).  So the code generators may put a
:class:`GemmBlock` in a stream where consecutive GEMMs would be: one row per GEMM, one column
per GEMM field.  A *stream* is a list whose items are instructions or GEMM blocks; it stands for
the instruction list :func:`expand` gives, and every pass that takes one
(:func:`~tvm_hapm.target.schedule.fuse_epilogues`,
:func:`~tvm_hapm.target.schedule.interleave_epilogues`,
:func:`~tvm_hapm.target.banks.place_accumulators`,
:func:`~tvm_hapm.target.dependency.insert_dependency_tokens`, :func:`encode_stream`) gives the
same result, once expanded, for a block as for the instructions it stands for.  Instructions
are made only when somebody asks for them (:attr:`~tvm_hapm.target.program.Program.instructions`).

A block has the attribute ``opcode`` (always GEMM), so code that looks only at opcodes, and
passes over a stream's ALU, LOAD and STORE instructions, need not tell the two apart.
"""

from __future__ import annotations

import bisect
import itertools
from operator import attrgetter

import numpy as np

from .gc_pause import paused_gc
from .isa import (
    LAYOUTS,
    REQUANT_SHIFT_MASK,
    AluOp,
    Instruction,
    Opcode,
    encode,
    instruction_block,
    pack_rows,
)
from .isa import encode_stream as encode_instructions

__all__ = [
    "GEMM_COLUMNS",
    "GemmBlock",
    "GemmRun",
    "as_blocks",
    "encode_stream",
    "expand",
    "gemm_entry_ranges",
    "gemm_table",
    "stream_length",
    "with_requant_shift",
]

#: The columns of a :class:`GemmBlock`: a GEMM's fields in encoding order (opcode aside).
GEMM_COLUMNS = tuple(name for name, _ in LAYOUTS[Opcode.GEMM][1:])
_COLUMN = {name: k for k, name in enumerate(GEMM_COLUMNS)}
_READ_GEMM = attrgetter(*GEMM_COLUMNS)


class GemmBlock:
    """Consecutive GEMM instructions as one table: ``table[k]`` holds the fields of the k-th,
    in :data:`GEMM_COLUMNS` order.

    A block is a value: the passes make new blocks (or slices) rather than change one, except
    the token inserter, which sets the token flags of the blocks it has just made.

    Parameters
    ----------
    table : numpy.ndarray
        ``(n, len(GEMM_COLUMNS))`` int64.
    """

    opcode = Opcode.GEMM
    __slots__ = ("table",)

    def __init__(self, table: np.ndarray):
        self.table = table

    @classmethod
    def from_columns(cls, count: int, columns: dict, fixed: dict | None = None) -> GemmBlock:
        """A block of ``count`` GEMMs: ``columns`` maps fields to arrays (or lists) of ``count``
        values, ``fixed`` fields to the value every GEMM shares; the other fields are 0.  The
        names are checked as :class:`~tvm_hapm.target.isa.Instruction` checks them."""
        fixed = fixed or {}
        Instruction(Opcode.GEMM, **dict.fromkeys([*fixed, *columns], 1))  # refuses a wrong name
        table = np.zeros((count, len(GEMM_COLUMNS)), np.int64)
        for name, value in fixed.items():
            table[:, _COLUMN[name]] = value
        for name, values in columns.items():
            table[:, _COLUMN[name]] = values
        return cls(table)

    @classmethod
    def from_instructions(cls, insns) -> GemmBlock:
        """The block of a list of GEMM instructions."""
        insns = list(insns)
        if any(i.opcode != Opcode.GEMM for i in insns):
            raise ValueError("a GEMM block holds GEMMs only")
        return cls(gemm_table(insns))

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: slice) -> GemmBlock:
        if not isinstance(key, slice):
            raise TypeError("a GEMM block is sliced, not indexed (expand it for one GEMM)")
        return GemmBlock(self.table[key])

    def __repr__(self) -> str:
        return f"GemmBlock({len(self)} GEMMs)"

    def column(self, name: str) -> np.ndarray:
        """The values of field ``name`` (a view: do not write)."""
        return self.table[:, _COLUMN[name]]

    def with_columns(self, **values) -> GemmBlock:
        """A copy with the given fields replaced (an array per field, or one value)."""
        table = self.table.copy()
        for name, value in values.items():
            table[:, _COLUMN[name]] = value
        return GemmBlock(table)

    def instructions(self) -> list[Instruction]:
        """The GEMM instructions the block stands for."""
        table = self.table
        if not len(table):
            return []
        # the columns that vary are set per instruction, the others once
        varies = (table != table[0]).any(axis=0)
        first = table[0].tolist()
        fixed = {n: v for n, v, var in zip(GEMM_COLUMNS, first, varies, strict=True) if not var}
        names = [n for n, var in zip(GEMM_COLUMNS, varies, strict=True) if var]
        return instruction_block(Opcode.GEMM, names, table[:, varies].tolist(), fixed)


def gemm_table(items) -> np.ndarray:
    """The :class:`GemmBlock` table of consecutive GEMMs given as instructions or blocks."""
    parts, insns = [], []
    for item in items:
        if item.__class__ is GemmBlock:
            if insns:
                parts.append(_table_of(insns))
                insns = []
            parts.append(item.table)
        else:
            insns.append(item)
    if insns:
        parts.append(_table_of(insns))
    if not parts:
        return np.zeros((0, len(GEMM_COLUMNS)), np.int64)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def gemm_entry_ranges(table: np.ndarray) -> dict:
    """The input, weight and accumulator entries each GEMM of a :class:`GemmBlock` table
    accesses, as :func:`~tvm_hapm.target.dependency.buffer_accesses` gives them for one GEMM:
    ``{"inp": (first, last), "wgt": (first, last), "acc": (first, last)}``, arrays of a value
    per GEMM."""

    def col(name):
        return table[:, _COLUMN[name]]

    o, k = col("outer") - 1, col("inner") - 1
    inp, wgt, acc = col("inp_addr"), col("wgt_addr"), col("acc_addr")
    return {
        "inp": (inp, inp + o * col("inp_so") + k * col("inp_si")),
        "wgt": (wgt, wgt),
        "acc": (acc, acc + o * col("acc_so") + k * col("acc_si")),
    }


def _table_of(insns: list[Instruction]) -> np.ndarray:
    flat = itertools.chain.from_iterable(map(_READ_GEMM, insns))
    width = len(GEMM_COLUMNS)
    return np.fromiter(flat, np.int64, count=width * len(insns)).reshape(-1, width)


@paused_gc()  # ~10^5 new objects that live on: see target.gc_pause
def expand(stream) -> list[Instruction]:
    """The instruction list a stream stands for (its blocks expanded)."""
    out: list[Instruction] = []
    for item in stream:
        if item.__class__ is GemmBlock:
            out += item.instructions()
        else:
            out.append(item)
    return out


def with_requant_shift(stream, old: int, new: int) -> list:
    """``stream`` with the requantization shift ``old`` of its ``REQUANT`` and ``ADD_REQUANT``
    instructions replaced by ``new`` (the shift bits of their immediate); every other
    instruction, and every block (blocks are values), as it is."""
    out = list(stream)
    if old == new:
        return out
    for k, insn in enumerate(out):
        if (
            insn.opcode == Opcode.ALU
            and insn.alu_op in (AluOp.REQUANT, AluOp.ADD_REQUANT)
            and insn.imm & REQUANT_SHIFT_MASK == old
        ):
            out[k] = insn.replace(imm=insn.imm & ~REQUANT_SHIFT_MASK | new)
    return out


def stream_length(stream) -> int:
    """The number of instructions a stream stands for."""
    return sum(len(item) if item.__class__ is GemmBlock else 1 for item in stream)


def as_blocks(stream, min_length: int = 1) -> list:
    """The stream with every run of at least ``min_length`` consecutive GEMMs (instructions or
    blocks) as one block: the same instructions, as the walker could have emitted them."""
    out: list = []
    for is_gemm, group in itertools.groupby(stream, key=lambda i: i.opcode == Opcode.GEMM):
        group = list(group)
        if is_gemm and stream_length(group) >= min_length:
            out.append(GemmBlock(gemm_table(group)))
        else:
            out += group
    return out


class GemmRun:
    """A run of consecutive GEMMs given as stream items (instructions and blocks), read GEMM by
    GEMM or cut into items by position, for the passes that move other instructions into the
    run (:func:`~tvm_hapm.target.schedule.interleave_epilogues`).

    Parameters
    ----------
    items : list
        Consecutive GEMM instructions and blocks.
    """

    def __init__(self, items: list):
        self.items = items
        sizes = [len(i) if i.__class__ is GemmBlock else 1 for i in items]
        self.starts = [0, *itertools.accumulate(sizes)]  # GEMM position of each item
        self._acc: dict[int, tuple] = {}  # block item -> (first, last, reset) lists

    def __len__(self) -> int:
        return self.starts[-1]

    def acc_access(self, j: int) -> tuple[int, int, int]:
        """``(first, last, reset)`` of GEMM ``j``'s accumulator entries (as
        :func:`~tvm_hapm.target.dependency.buffer_accesses` gives its range)."""
        k = bisect.bisect_right(self.starts, j) - 1
        item = self.items[k]
        if item.__class__ is not GemmBlock:
            last = item.acc_addr + (item.outer - 1) * item.acc_so + (item.inner - 1) * item.acc_si
            return item.acc_addr, last, item.reset
        acc = self._acc.get(k)
        if acc is None:
            first, last = gemm_entry_ranges(item.table)["acc"]
            acc = self._acc[k] = (first.tolist(), last.tolist(), item.column("reset").tolist())
        r = j - self.starts[k]
        return acc[0][r], acc[1][r], acc[2][r]

    def items_between(self, a: int, b: int) -> list:
        """The items of GEMMs ``a`` to ``b - 1`` (blocks sliced where the range cuts them)."""
        if a >= b:
            return []
        starts, items = self.starts, self.items
        k = bisect.bisect_right(starts, a) - 1
        out = []
        while k < len(items) and starts[k] < b:
            item = items[k]
            if item.__class__ is GemmBlock:
                lo, hi = max(a, starts[k]) - starts[k], min(b, starts[k + 1]) - starts[k]
                out.append(item if (lo, hi) == (0, len(item)) else item[lo:hi])
            else:
                out.append(item)
            k += 1
        return out


def encode_stream(stream) -> bytes:
    """Encode a stream, byte for byte as :func:`~tvm_hapm.target.isa.encode_stream` encodes
    the instructions it stands for: the blocks' rows are packed from their tables, without
    making instructions.  A field out of range sends the stream through the instruction
    encoder, which names the offending instruction."""
    items = list(stream)
    blocks = [item for item in items if item.__class__ is GemmBlock]
    if not blocks:
        return encode_instructions(items)
    insns = [item for item in items if item.__class__ is not GemmBlock]
    flags = [item.__class__ is GemmBlock for item in items]
    counts = [len(item) if flag else 1 for item, flag in zip(items, flags, strict=True)]
    is_block = np.repeat(flags, counts)  # one entry per instruction
    words = np.empty((len(is_block), 2), "<u8")
    packed = pack_rows(Opcode.GEMM, np.concatenate([b.table for b in blocks]), GEMM_COLUMNS)
    if packed is None:
        return b"".join(encode(i) for i in expand(items))
    words[is_block] = packed
    if insns:
        words[~is_block] = np.frombuffer(encode_instructions(insns), "<u8").reshape(-1, 2)
    return words.tobytes()
