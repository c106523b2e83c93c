"""Dependency-token insertion: make a sequential instruction list correct on the decoupled machine.

The code generator writes each program as if one module executed everything in order.  On the
real machine the load, compute and store modules run concurrently and only the dependency tokens
order them.  :func:`insert_dependency_tokens` analyses the on-chip buffer ranges every instruction
reads and writes and, wherever an instruction of one module touches a range that a neighbouring
module touched since they last synchronised (read-after-write, write-after-read or
write-after-write), it makes the earlier module push a token and the later one pop it.  Tokens are
only inserted where a hazard exists, so independent work (e.g. loading the next tile while the
current one is computed, when the schedule double-buffers) overlaps.

Each module's accesses since the tokens towards a neighbour are kept per buffer and direction
(read / written) as the last instruction that touched each entry.
The push of a token goes on the **last instruction of the
earlier module that touched a conflicting entry**, not on its last instruction overall: with a
double-buffered schedule in program order ``load k, compute k, load k+1, compute k+1``, the load
of tile ``k+2`` into the half that compute ``k`` read waits only for compute ``k``, so it overlaps
compute ``k+1``.  Tokens still flow forward in program order and the pushes of one queue stay in
program order (accesses at or before a queue's last push are forgotten when it is pushed), so the
k-th pop matches the k-th push and a generated program cannot deadlock.
"""

from __future__ import annotations

import bisect
import itertools
from operator import attrgetter

import numpy as np

from .isa import TOKEN_QUEUES, Buffer, Instruction, Module, Opcode, alu_operand_rows
from .stream import (
    GEMM_COLUMNS,
    GemmBlock,
    expand,
    gemm_entry_ranges,
    gemm_table,
    stream_length,
)

__all__ = ["insert_dependency_tokens", "buffer_accesses"]

# (from, to) -> (push flag of `from`, pop flag of `to`)
_FLAGS = {(q.producer, q.consumer): (q.push_flag, q.pop_flag) for q in TOKEN_QUEUES}
_NEIGHBOURS = {
    Module.LOAD: (Module.COMPUTE,),
    Module.COMPUTE: (Module.LOAD, Module.STORE),
    Module.STORE: (Module.COMPUTE,),
}


_BUFFERS = tuple(Buffer)  # by code: a tuple lookup instead of an enum call per instruction
assert all(b == i for i, b in enumerate(_BUFFERS))


def _span(base: int, outer: int, so: int, inner: int, si: int) -> tuple[int, int]:
    return base, base + (outer - 1) * so + (inner - 1) * si


def buffer_accesses(insn: Instruction) -> list[tuple[Buffer, int, int, bool]]:
    """``(buffer, first, last, is_write)`` entry ranges an instruction touches on chip."""
    op = insn.opcode
    if op == Opcode.LOAD:
        rows = insn.y_pad_top + insn.y_size + insn.y_pad_bottom
        cols = insn.x_pad_left + insn.x_size + insn.x_pad_right
        buf = _BUFFERS[insn.buffer]
        return [(buf, insn.sram_addr, insn.sram_addr + rows * cols - 1, True)]
    if op == Opcode.STORE:
        n = insn.y_size * insn.x_size
        return [(Buffer.ACC, insn.sram_addr, insn.sram_addr + n - 1, False)]
    if op == Opcode.GEMM:
        acc = _span(insn.acc_addr, insn.outer, insn.acc_so, insn.inner, insn.acc_si)
        inp = _span(insn.inp_addr, insn.outer, insn.inp_so, insn.inner, insn.inp_si)
        out = [
            (Buffer.INP, *inp, False),
            (Buffer.WGT, insn.wgt_addr, insn.wgt_addr, False),
            (Buffer.ACC, *acc, True),
        ]
        if not insn.reset:
            out.append((Buffer.ACC, *acc, False))
        return out
    if op == Opcode.ALU:
        dst = _span(insn.dst_addr, insn.outer, insn.dst_so, insn.inner, insn.dst_si)
        out = [(Buffer.ACC, *dst, True), (Buffer.ACC, *dst, False)]
        rows = alu_operand_rows(insn.alu_op, insn.use_imm)
        if rows:  # ADD_REQUANT reads the multiplier in the entry after the bias
            lo, hi = _span(insn.src_addr, insn.outer, insn.src_so, insn.inner, insn.src_si)
            out.append((Buffer.ACC, lo, hi + rows - 1, False))
        return out
    return []


#: :class:`_LastAccess` keeps up to this many ranges in a list before painting them into its
#: array: most are forgotten by a token before that, and a short list is searched faster in
#: Python than a NumPy slice is painted or reduced.
_RECENT = 24


class _LastAccess:
    """The last instruction that accessed each entry of one buffer (one direction, one pair of
    modules), -1 where none did since the tokens between the modules.

    A dense array over the buffer's entries rather than a list of segments: an access paints its
    range and a token clears what it orders, and both also work on a whole run of GEMMs at once
    (:meth:`add_many`, :meth:`latest_many`).  ``lo`` / ``hi`` bound the entries that may be
    set, so clearing and testing look at that window only.  The latest single accesses wait in
    ``recent`` (``(first, last, index)``, later than everything in the array) until there are
    more than :data:`_RECENT` of them, or a run of GEMMs needs the array.
    """

    __slots__ = ("last", "lo", "hi", "top", "recent")

    def __init__(self):
        self.last = np.full(1024, -1, np.int64)
        self.lo, self.hi = 1 << 62, -1  # empty window
        self.top = -1  # the latest index recorded (indices only grow)
        self.recent: list[tuple[int, int, int]] = []

    def _fit(self, lo: int, hi: int) -> None:
        if hi >= len(self.last):
            grown = np.full(max(2 * len(self.last), hi + 1), -1, np.int64)
            grown[: len(self.last)] = self.last
            self.last = grown
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)

    def _flush(self) -> None:
        """Paint the ranges of ``recent`` into the array, in order (the later index wins)."""
        recent, self.recent = self.recent, []
        if recent:
            self._fit(min(r[0] for r in recent), max(r[1] for r in recent))
            last = self.last
            for lo, hi, index in recent:
                last[lo : hi + 1] = index

    def add(self, lo: int, hi: int, index: int) -> None:
        """Instruction ``index`` (later than every recorded one) accessed ``[lo, hi]``."""
        if hi >= lo:
            recent = self.recent
            recent.append((lo, hi, index))
            self.top = index
            if len(recent) > _RECENT:
                self._flush()

    def latest(self, lo: int, hi: int) -> int:
        """The last instruction that accessed an entry of ``[lo, hi]``, or -1."""
        if hi < lo:
            return -1
        for first, final, index in reversed(self.recent):  # the latest overlap is the answer
            if first <= hi and lo <= final:
                return index
        lo = max(lo, self.lo)
        hi = min(hi, self.hi)
        if hi > lo:
            return int(self.last[lo : hi + 1].max())
        return int(self.last[lo]) if hi == lo else -1

    def add_many(self, lo: np.ndarray, hi: np.ndarray, index: np.ndarray) -> None:
        """:meth:`add` of each range in turn (``index`` increasing)."""
        self.paint(_paint(lo, hi, index))

    def paint(self, paint: tuple | None) -> None:
        """:meth:`add_many` of the ranges :func:`_paint` prepared."""
        if paint is not None:
            self._flush()
            first, block = paint
            self._fit(first, first + len(block) - 1)
            # every index is later than what is there: the largest covering one is the last
            view = self.last[first : first + len(block)]
            np.maximum(view, block, out=view)
            self.top = max(self.top, int(block.max()))

    def latest_many(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """:meth:`latest` of each range (-1 where nothing accessed it)."""
        self._flush()
        out = np.full(len(lo), -1, np.int64)
        if self.hi < self.lo:
            return out
        if (lo == hi).all():  # single entries (the weights): looked up directly
            inside = (lo >= self.lo) & (lo <= self.hi)
            out[inside] = self.last[lo[inside]]
            return out
        lo, hi = np.maximum(lo, self.lo), np.minimum(hi, self.hi)
        some = hi >= lo
        if some.any():
            lo, hi = lo[some], hi[some]
            first = int(lo.min())
            out[some] = _range_max(self.last[first : int(hi.max()) + 1], lo - first, hi - first)
        return out

    def drop(self, upto: int) -> bool:
        """Forget the accesses of instructions up to ``upto``; whether any access is left."""
        empty = self.hi < self.lo
        if self.top <= upto:  # (the usual token: everything recorded so far)
            self.recent = []
            if not empty:
                self.last[self.lo : self.hi + 1] = -1
            self.lo, self.hi, self.top = 1 << 62, -1, -1
            return False
        # the access of index `top` is left (in `recent` or in the array)
        recent = self.recent
        k = 0
        while k < len(recent) and recent[k][2] <= upto:
            k += 1
        del recent[:k]
        if not empty:
            view = self.last[self.lo : self.hi + 1]
            view[view <= upto] = -1
        return True


def _paint(lo: np.ndarray, hi: np.ndarray, index: np.ndarray) -> tuple | None:
    """What :meth:`_LastAccess.add_many` of the ranges writes: ``(first entry, the largest
    index of each entry from there)`` (-1 for an entry no range covers), or None for no entry."""
    keep = hi >= lo
    if not keep.all():
        lo, hi, index = lo[keep], hi[keep], index[keep]
    if not len(lo):
        return None
    first = int(lo.min())
    size = int(hi.max()) - first + 1
    if (lo == hi).all():  # single entries (the weights): no range to cover
        block = np.full(size, -1, np.int64)
        np.maximum.at(block, lo - first, index)
        return first, block
    return first, _cover_max(size, lo - first, hi - first, index)


def _log2(n: np.ndarray) -> np.ndarray:
    """``floor(log2(n))`` of positive integers, exactly."""
    return np.frexp(n)[1] - 1


# A range of length n is the union of two (overlapping) ranges of length 2**floor(log2 n) at its
# ends.  So a range's maximum is two look-ups in the maxima over every range of that power-of-two
# length (_range_max), and the converse, the largest value over the ranges covering each entry, is
# two updates per range on those ranges, pushed down to single entries (_cover_max).  Both work
# on all of a GEMM run's ranges at once, in one array operation per power of two, however much
# the ranges overlap (the input windows of a convolution do, hundreds of entries each); the
# ranges of a run mostly have one length, so one power of two.


def _range_max(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``values[lo[k] : hi[k] + 1].max()`` for every ``k`` (``hi >= lo``)."""
    level = _log2(hi - lo + 1)
    low, top = int(level.min()), int(level.max())
    out = np.empty(len(lo), np.int64)
    span = values  # span[j]: the maximum of values[j : j + 2**k]
    for k in range(top + 1):
        if k >= low:
            at = slice(None) if low == top else level == k
            out[at] = np.maximum(span[lo[at]], span[hi[at] - ((1 << k) - 1)])
        if k < top:
            half = 1 << k
            span = np.maximum(span[:-half], span[half:])
    return out


def _cover_max(size: int, lo: np.ndarray, hi: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The largest ``index[k]`` of the ranges ``[lo[k], hi[k]]`` (``hi >= lo``) that cover each
    entry of ``range(size)``, -1 where none does."""
    level = _log2(hi - lo + 1)
    low, top = int(level.min()), int(level.max())
    cover = np.full(size, -1, np.int64)  # cover[j]: the largest index over entries j .. j + 2**k
    for k in range(top, -1, -1):
        if k >= low:
            at = slice(None) if low == top else level == k
            np.maximum.at(cover, lo[at], index[at])
            np.maximum.at(cover, hi[at] - ((1 << k) - 1), index[at])
        if k > 0:  # onto the two halves: from j .. j + 2**k - 1 to j and j + 2**(k-1)
            half = 1 << (k - 1)
            np.maximum(cover[half:], cover[:-half], out=cover[half:])
    return cover


# The records a module keeps for a neighbour hold only the accesses the neighbour can conflict
# with: a buffer it touches, and a direction that can meet one of its own.  LOAD writes INP / WGT
# (and a LOAD into ACC runs on compute); COMPUTE reads INP / WGT and reads and writes ACC; STORE
# reads ACC.  So (``2 * buffer + is_write``):
_INP_R, _INP_W, _WGT_R, _WGT_W, _ACC_R, _ACC_W = range(6)
# * LOAD for COMPUTE: _INP_W, _WGT_W (a GEMM's reads of them wait for the LOAD);
# * COMPUTE for LOAD: _INP_R, _WGT_R (a LOAD overwriting them waits for the GEMM);
# * COMPUTE for STORE: _ACC_W (a STORE waits for it; COMPUTE's reads of ACC are not recorded,
#   a STORE only reads);
# * STORE for COMPUTE: _ACC_R (a write to the accumulator waits for the STORE).
# :meth:`_Inserter.one` tests and records exactly these, one instruction kind at a time.


class _Tracker:
    """Reads and writes per (module, neighbour) since the tokens between them.

    ``spans[(module, neighbour)]`` maps ``2 * buffer + is_write`` to the :class:`_LastAccess`
    of the buffer entries ``module`` read / wrote, with the last instruction that did.  Only
    accesses the neighbour can conflict with are recorded (the table above).
    """

    def __init__(self):
        self.spans = {pair: {} for pair in _FLAGS}
        self.spare: list[_LastAccess] = []  # cleared records, reused (all -1 again)

    def _of(self, module, neighbour, key: int) -> _LastAccess:
        return self.of(self.spans[(module, neighbour)], key)

    def of(self, spans: dict, key: int) -> _LastAccess:
        """The record ``key`` of one pair's ``spans``, made (empty) if there is none: even an
        empty range makes the pair busy."""
        last = spans.get(key)
        if last is None:
            last = spans[key] = self.spare.pop() if self.spare else _LastAccess()
        return last

    def busy(self, module, neighbour) -> bool:
        return bool(self.spans[(module, neighbour)])

    def clear(self, module, neighbour, upto: int):
        """Forget the accesses of instructions up to ``upto`` (ordered by a token)."""
        spans = self.spans[(module, neighbour)]
        for key in list(spans):
            if not spans[key].drop(upto):
                self.spare.append(spans.pop(key))


def _latest(spans: dict, key: int, lo: int, hi: int) -> int:
    """:meth:`_LastAccess.latest` of record ``key`` of ``spans``, -1 if there is none."""
    seen = spans.get(key)
    return -1 if seen is None else seen.latest(lo, hi)


#: A run of at least this many GEMMs is tracked as one block (:func:`insert_dependency_tokens`);
#: shorter runs cost less one instruction at a time.
GEMM_BLOCK = 16


_OPCODE = attrgetter("opcode")
_FLAG_NAMES = ("pop_prev", "pop_next", "push_prev", "push_next")
_GEMM_COLUMN = {name: k for k, name in enumerate(GEMM_COLUMNS)}
#: The token flags' columns in a GEMM block's table.
_FLAG_COLUMNS = [_GEMM_COLUMN[f] for f in _FLAG_NAMES]


def _gemm_ranges(table: np.ndarray) -> dict:
    """The entry ranges of a run of GEMMs given as a :class:`~tvm_hapm.target.stream.GemmBlock`
    table, as arrays: ``inp``, ``wgt``, ``acc`` (:func:`~tvm_hapm.target.stream.
    gemm_entry_ranges`) and ``flagged`` (the GEMMs that carry tokens of their own, to be
    cleared)."""
    return gemm_entry_ranges(table) | {"flagged": table[:, _FLAG_COLUMNS].any(axis=1)}


def _gemm_conflicts(tracker: _Tracker, earlier: Module, r: dict) -> np.ndarray:
    """The last instruction of ``earlier`` that each GEMM of a run conflicts with (-1 for
    none), on the tracker as it is before the run, as :meth:`_Inserter.one` finds it for one
    GEMM (a GEMM reads its input and weight entries and writes, and without ``reset`` also
    reads, its accumulator entries)."""
    spans = tracker.spans[(earlier, Module.COMPUTE)]
    last = np.full(len(r["acc"][0]), -1, np.int64)
    checks = [
        (2 * Buffer.INP + 1, r["inp"]),  # earlier writes of what it reads
        (2 * Buffer.WGT + 1, r["wgt"]),
        (2 * Buffer.ACC + 1, r["acc"]),  # earlier writes of what it writes (or reads)
        (2 * Buffer.ACC, r["acc"]),  # earlier reads of what it writes
    ]
    for key, (lo, hi) in checks:
        seen = spans.get(key)
        if seen is not None:
            np.maximum(last, seen.latest_many(lo, hi), out=last)
    return last


def _record_gemms(tracker: _Tracker, r: dict, index: np.ndarray) -> None:
    """Record what every GEMM of a run accesses, as :meth:`_Inserter.one` does for one GEMM
    (``index``: their places in the output)."""
    compute = Module.COMPUTE
    tracker._of(compute, Module.LOAD, 2 * Buffer.INP).add_many(*r["inp"], index)
    tracker._of(compute, Module.LOAD, 2 * Buffer.WGT).add_many(*r["wgt"], index)
    tracker._of(compute, Module.STORE, 2 * Buffer.ACC + 1).add_many(*r["acc"], index)


def _gemm_runs(body: list) -> tuple[list, dict[int, int]]:
    """``body`` and ``{start: end}`` of every run of at least :data:`GEMM_BLOCK` consecutive
    GEMMs in it (instructions and blocks), the GEMM blocks of shorter runs expanded (one
    instruction at a time costs less for them)."""
    is_gemm = np.fromiter(map(_OPCODE, body), np.int64, count=len(body)) == Opcode.GEMM
    edges = np.flatnonzero(np.diff(np.concatenate(([0], is_gemm.view(np.int8), [0]))))
    pieces: list = []  # lists of items, and the tables of the short runs to expand
    tables = []
    runs = {}
    size = done = 0
    for start, end in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
        pieces.append(body[done:start])
        size += start - done
        run = body[start:end]
        n = stream_length(run)
        if end - start >= GEMM_BLOCK or n >= GEMM_BLOCK:
            runs[size] = size + len(run)
            pieces.append(run)
            size += len(run)
        elif not any(item.__class__ is GemmBlock for item in run):
            pieces.append(run)
            size += n
        else:
            pieces.append(gemm_table(run))
            tables.append(pieces[-1])
            size += n
        done = end
    pieces.append(body[done:])
    # the short runs with blocks expanded at once: one call instead of one a run
    gemms = iter(expand([GemmBlock(np.concatenate(tables))]) if tables else ())
    out: list = []
    for piece in pieces:
        out += piece if piece.__class__ is list else itertools.islice(gemms, len(piece))
    return out, runs


# The token flags as bits of one int (the inserter's bookkeeping), and back: the fields to set
# and the block columns of each combination.
_BIT = {name: 1 << k for k, name in enumerate(_FLAG_NAMES)}
_BITS_FIELDS = [{n: 1 for n in _FLAG_NAMES if bits & _BIT[n]} for bits in range(16)]
_BITS_COLUMNS = [[_GEMM_COLUMN[n] for n in fields] for fields in _BITS_FIELDS]
# (from, to) -> (push bit of `from`, pop bit of `to`)
_QUEUE_BITS = {pair: (_BIT[push], _BIT[pop]) for pair, (push, pop) in _FLAGS.items()}


class _Output:
    """The inserter's output stream (instructions and GEMM blocks), addressed by instruction
    position.

    Every item is emitted without flags; the token flags are kept aside (``flags``: position
    -> bits) and set once, by :meth:`flagged`, so that an instruction that pops and pushes is
    copied once rather than once per flag.
    """

    __slots__ = ("items", "starts", "size", "flags")

    def __init__(self):
        self.items: list = []
        self.starts: list[int] = []  # the position of each item's first instruction
        self.size = 0
        self.flags: dict[int, int] = {}

    def append(self, item) -> None:
        """Emit an instruction or a block."""
        self.items.append(item)
        self.starts.append(self.size)
        self.size += len(item) if item.__class__ is GemmBlock else 1

    def extend(self, insns: list[Instruction]) -> None:
        """Emit instructions."""
        self.items += insns
        self.starts += range(self.size, self.size + len(insns))
        self.size += len(insns)

    def flagged(self) -> list:
        """The items with their token flags (a block's rows in place: the inserter's own)."""
        items, starts = self.items, self.starts
        for pos, bits in self.flags.items():
            k = bisect.bisect_right(starts, pos) - 1
            item = items[k]
            if item.__class__ is GemmBlock:
                item.table[pos - starts[k], _BITS_COLUMNS[bits]] = 1
            else:
                items[k] = item.replace(**_BITS_FIELDS[bits])
        return items


#: A SYNC of each module, unflagged (it gets its flags as any instruction, by a copy).
_SYNCS = [Instruction(Opcode.SYNC, module=m) for m in Module]
_LOAD, _COMPUTE, _STORE = Module.LOAD, Module.COMPUTE, Module.STORE
_GEMM, _ALU, _ACC = Opcode.GEMM, Opcode.ALU, Buffer.ACC


class _Inserter:
    """The state of one :func:`insert_dependency_tokens`: the output, the last instruction of
    each module in it, the pops each module owes its next instruction, and the accesses since
    the tokens (:class:`_Tracker`)."""

    def __init__(self):
        self.out = _Output()
        self.last: list[int | None] = [None] * len(Module)
        self.pending = [0] * len(Module)  # pop bits owed by each module
        self.tracker = _Tracker()
        spans = self.tracker.spans  # (the dictionaries of the pairs, which stay the same)
        self.load_for_compute = spans[(_LOAD, _COMPUTE)]
        self.compute_for_load = spans[(_COMPUTE, _LOAD)]
        self.compute_for_store = spans[(_COMPUTE, _STORE)]
        self.store_for_compute = spans[(_STORE, _COMPUTE)]

    def emit(self, insn, mod: Module) -> int:
        """Emit an instruction, or a GEMM block of one row, with the pops ``mod`` owes; its
        position."""
        out = self.out
        pos = out.size
        if self.pending[mod]:
            out.flags[pos] = self.pending[mod]
            self.pending[mod] = 0
        out.append(insn)
        self.last[mod] = pos
        return pos

    def sync(self, src: Module, dst: Module, at: int | None = None) -> None:
        """A token from ``src`` to ``dst``: pushed by instruction ``at`` of ``src`` (default:
        its last instruction), popped by the next instruction of ``dst``."""
        push, pop = _QUEUE_BITS[(src, dst)]
        flags = self.out.flags
        if self.pending[dst] & pop:  # dst still owes a pop for an earlier token: take it now
            self.emit(_SYNCS[dst], dst)
        if at is None:
            at = self.last[src]
            if at is None or flags.get(at, 0) & push:
                at = self.emit(_SYNCS[src], src)
        elif flags.get(at, 0) & push:  # cannot happen: accesses up to a push are forgotten
            raise AssertionError("two pushes of one queue on one instruction")
        flags[at] = flags.get(at, 0) | push
        self.pending[dst] |= pop
        self.tracker.clear(src, dst, at)

    def wait(self, spans: dict, key: int, lo: int, hi: int, src: Module, dst: Module) -> None:
        """A token from ``src`` to ``dst`` if an access of ``src`` recorded in ``spans[key]``
        (one pair's records) touched ``[lo, hi]``: pushed by the last such instruction."""
        if spans:
            at = _latest(spans, key, lo, hi)
            if at >= 0:
                self.sync(src, dst, at)

    def one(self, insn: Instruction) -> None:
        """Take a LOAD, STORE, ALU or GEMM alone: wait for the neighbours' conflicting
        accesses, emit it, record its own (:func:`buffer_accesses`, as the table above the
        :class:`_Tracker` narrows them)."""
        if insn.pop_prev or insn.pop_next or insn.push_prev or insn.push_next:
            insn = insn.replace(pop_prev=0, pop_next=0, push_prev=0, push_next=0)
        op = insn.opcode
        record = self.tracker.of
        if op == _GEMM:
            o, k = insn.outer - 1, insn.inner - 1
            inp = insn.inp_addr
            inp_hi = inp + o * insn.inp_so + k * insn.inp_si
            acc = insn.acc_addr
            acc_hi = acc + o * insn.acc_so + k * insn.acc_si
            wgt = insn.wgt_addr
            loads, stores = self.load_for_compute, self.store_for_compute
            if loads:
                at = max(_latest(loads, _INP_W, inp, inp_hi), _latest(loads, _WGT_W, wgt, wgt))
                if at >= 0:
                    self.sync(_LOAD, _COMPUTE, at)
            self.wait(stores, _ACC_R, acc, acc_hi, _STORE, _COMPUTE)
            pos = self.emit(insn, _COMPUTE)
            record(self.compute_for_load, _INP_R).add(inp, inp_hi, pos)
            record(self.compute_for_load, _WGT_R).add(wgt, wgt, pos)
            record(self.compute_for_store, _ACC_W).add(acc, acc_hi, pos)
        elif op == _ALU:
            o, k = insn.outer - 1, insn.inner - 1
            dst = insn.dst_addr
            dst_hi = dst + o * insn.dst_so + k * insn.dst_si
            self.wait(self.store_for_compute, _ACC_R, dst, dst_hi, _STORE, _COMPUTE)
            pos = self.emit(insn, _COMPUTE)
            record(self.compute_for_store, _ACC_W).add(dst, dst_hi, pos)
        else:
            self.transfer(insn)

    def transfer(self, insn: Instruction) -> None:
        """:meth:`one` of a LOAD or a STORE."""
        if insn.opcode == Opcode.STORE:
            lo = insn.sram_addr
            hi = lo + insn.y_size * insn.x_size - 1
            self.wait(self.compute_for_store, _ACC_W, lo, hi, _COMPUTE, _STORE)
            pos = self.emit(insn, _STORE)
            self.tracker.of(self.store_for_compute, _ACC_R).add(lo, hi, pos)
            return
        rows = insn.y_pad_top + insn.y_size + insn.y_pad_bottom
        cols = insn.x_pad_left + insn.x_size + insn.x_pad_right
        lo = insn.sram_addr
        hi = lo + rows * cols - 1
        if insn.buffer == _ACC:  # on compute: it waits for the stores reading the entries
            self.wait(self.store_for_compute, _ACC_R, lo, hi, _STORE, _COMPUTE)
            pos = self.emit(insn, _COMPUTE)
            self.tracker.of(self.compute_for_store, _ACC_W).add(lo, hi, pos)
            return
        read = 2 * insn.buffer  # (_INP_R or _WGT_R)
        self.wait(self.compute_for_load, read, lo, hi, _COMPUTE, _LOAD)
        pos = self.emit(insn, _LOAD)
        self.tracker.of(self.load_for_compute, read + 1).add(lo, hi, pos)

    def gemm_run(self, run: list) -> None:
        """A run of GEMM items (:func:`insert_dependency_tokens`): instructions only, emitted
        as instructions, or with blocks, emitted as slices of one block of the whole run (its
        flags cleared, then set)."""
        out, tracker = self.out, self.tracker
        plain = not any(i.__class__ is GemmBlock for i in run)
        table = gemm_table(run)
        ranges = _gemm_ranges(table)
        if not plain:
            table = table.copy()
            table[:, _FLAG_COLUMNS] = 0
            run = GemmBlock(table)
        # A GEMM waits for a module when its conflict is later than every earlier one of the
        # run (the last token taken from that module pushed at the largest of those).
        waits: dict[int, list] = {}
        for other in _NEIGHBOURS[_COMPUTE]:
            if not tracker.busy(other, _COMPUTE):  # (nothing to wait for)
                continue
            at = _gemm_conflicts(tracker, other, ranges)
            before = np.maximum.accumulate(np.concatenate(([-1], at[:-1])))
            for k in np.flatnonzero(at > before).tolist():
                waits.setdefault(k, []).append((other, int(at[k])))
        special = sorted(set(waits).union(np.flatnonzero(ranges["flagged"]).tolist()))
        n = len(table)
        index = np.empty(n, np.int64)
        k = 0
        for stop in [*special, n]:
            if stop > k and not self.pending[_COMPUTE]:  # GEMMs that neither wait nor pop
                index[k:stop] = np.arange(out.size, out.size + stop - k)
                if plain:
                    out.extend(run[k:stop])
                else:
                    out.append(run[k:stop])
                self.last[_COMPUTE] = out.size - 1
                k = stop
            for j in range(k, min(stop + 1, n)):
                for other, at in waits.get(j, ()):
                    self.sync(other, _COMPUTE, at)
                insn = run[j] if plain else run[j : j + 1]
                if plain and (insn.pop_prev or insn.pop_next or insn.push_prev or insn.push_next):
                    insn = insn.replace(pop_prev=0, pop_next=0, push_prev=0, push_next=0)
                index[j] = self.emit(insn, _COMPUTE)
            k = stop + 1
        _record_gemms(tracker, ranges, index)


def insert_dependency_tokens(program: list) -> list:
    """Return ``program`` with dependency flags set and SYNC instructions added where needed.

    ``program`` is a sequential stream without flags (instructions, or instructions and GEMM
    blocks, :mod:`~tvm_hapm.target.stream`), ending with FINISH or not (a FINISH is appended if
    missing).  The result is deterministic, and the same for a block as for the instructions
    it stands for (expanded: the GEMMs of a run with a block stay in blocks).

    A run of GEMMs (the bulk of a convolution) is one block: only the compute module acts in
    it, so what the other modules did is fixed during the run except for the tokens it takes,
    which only forget accesses up to the instruction that pushes them.  The GEMMs' conflicts
    are found at once on the state before the run; one at a time, a GEMM then waits exactly
    when its conflict is later than the last token taken from that module.  What the GEMMs
    access is recorded after the run (no other module looks at it during the run).
    """
    state = _Inserter()
    body, runs = _gemm_runs([i for i in program if i.opcode != Opcode.FINISH])
    k, n = 0, len(body)
    while k < n:
        end = runs.get(k)
        if end is not None:
            state.gemm_run(body[k:end])
            k = end
        else:
            insn = body[k]
            k += 1
            if insn.opcode != Opcode.SYNC:  # tokens of the input are recomputed from the hazards
                state.one(insn)

    # FINISH (compute) completes the program: everything the other modules did must be done.
    for other in (_LOAD, _STORE):
        if state.tracker.busy(other, _COMPUTE):
            state.sync(other, _COMPUTE)
    state.emit(Instruction(Opcode.FINISH), _COMPUTE)
    return state.out.flagged()
