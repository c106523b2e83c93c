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
from operator import attrgetter

import numpy as np

from .isa import TOKEN_QUEUES, Buffer, Instruction, Module, Opcode, alu_operand_rows, module_of
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


class _LastAccess:
    """The last instruction that accessed each entry of one buffer (one direction, one pair of
    modules), -1 where none did since the tokens between the modules.

    A dense array over the buffer's entries rather than a list of segments: an access paints its
    range and a token clears what it orders, and both also work on a whole run of GEMMs at once
    (:meth:`add_many`, :meth:`latest_many`).  ``lo`` / ``hi`` bound the entries that may be
    set, so clearing and testing look at that window only.
    """

    __slots__ = ("last", "lo", "hi", "top")

    def __init__(self):
        self.last = np.full(1024, -1, np.int64)
        self.lo, self.hi = 1 << 62, -1  # empty window
        self.top = -1  # the latest index recorded (indices only grow)

    def _fit(self, lo: int, hi: int) -> None:
        if hi >= len(self.last):
            grown = np.full(max(2 * len(self.last), hi + 1), -1, np.int64)
            grown[: len(self.last)] = self.last
            self.last = grown
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)

    def add(self, lo: int, hi: int, index: int) -> None:
        """Instruction ``index`` (later than every recorded one) accessed ``[lo, hi]``."""
        if hi >= lo:  # (_fit inlined: called for every access of every instruction)
            if hi >= len(self.last):
                self._fit(lo, hi)
            self.lo = min(self.lo, lo)
            self.hi = max(self.hi, hi)
            self.last[lo : hi + 1] = index
            self.top = index

    def latest(self, lo: int, hi: int) -> int:
        """The last instruction that accessed an entry of ``[lo, hi]``, or -1."""
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
            entries, index, lo, hi = paint
            self._fit(lo, hi)
            # every index is later than what is there: the largest covering one is the last
            np.maximum.at(self.last, entries, index)
            self.top = max(self.top, int(index.max()))

    def latest_many(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """:meth:`latest` of each range (-1 where nothing accessed it)."""
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
            ulo, uhi, inverse = _distinct_ranges(lo[some], hi[some])
            entries, owner = _expand(ulo, uhi)
            starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
            out[some] = np.maximum.reduceat(self.last[entries], starts)[inverse]
        return out

    def drop(self, upto: int) -> bool:
        """Forget the accesses of instructions up to ``upto``; whether any access is left."""
        view = self.last[self.lo : self.hi + 1]
        if self.top > upto:
            view[view <= upto] = -1
            if (view >= 0).any():
                return True
        else:  # (the usual token: everything recorded so far)
            view[:] = -1
        self.lo, self.hi, self.top = 1 << 62, -1, -1
        return False


def _paint(lo: np.ndarray, hi: np.ndarray, index: np.ndarray) -> tuple | None:
    """What :meth:`_LastAccess.add_many` of the ranges writes: ``(entries, the largest index of
    each, first, last entry)``, or None for no entry."""
    if not len(lo):
        return None
    if (lo == hi).all():  # single entries (the weights): no range to expand
        return lo, index, int(lo.min()), int(lo.max())
    lo, hi, index = _distinct_ranges(lo, hi, index)
    if not len(lo):
        return None
    entries, owner = _expand(lo, hi)
    return entries, index[owner], int(lo.min()), int(hi.max())


def _distinct_ranges(lo: np.ndarray, hi: np.ndarray, index: np.ndarray | None = None):
    """The distinct ``[lo, hi]`` ranges (of ``hi >= lo``), sorted, with the largest ``index`` of
    each; without ``index``, the position of each input range among them instead."""
    keep = hi >= lo
    lo, hi = lo[keep], hi[keep]
    key = lo.astype(np.int64) << 32 | hi.astype(np.int64)
    if index is None:
        uniq, inverse = np.unique(key, return_inverse=True)
        return uniq >> 32, uniq & 0xFFFFFFFF, inverse
    uniq, inverse = np.unique(key, return_inverse=True)
    best = np.full(len(uniq), -1, np.int64)
    np.maximum.at(best, inverse, index[keep])
    return uniq >> 32, uniq & 0xFFFFFFFF, best


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every entry of the ranges ``[lo, hi]`` in order, and the range each belongs to."""
    sizes = hi - lo + 1
    owner = np.repeat(np.arange(len(lo)), sizes)
    first = np.cumsum(sizes) - sizes
    return np.arange(int(sizes.sum())) - first[owner] + lo[owner], owner


# The buffers a module can touch: accesses to others never conflict with it.
_TOUCHES = {
    Module.LOAD: (Buffer.INP, Buffer.WGT),
    Module.COMPUTE: (Buffer.INP, Buffer.WGT, Buffer.ACC),
    Module.STORE: (Buffer.ACC,),
}


class _Tracker:
    """Reads and writes per (module, neighbour) since the tokens between them.

    ``spans[(module, neighbour)]`` maps ``2 * buffer + is_write`` to the :class:`_LastAccess`
    of the buffer entries ``module`` read / wrote, with the last instruction that did.  Only
    buffers the neighbour can touch are recorded.
    """

    def __init__(self):
        self.spans = {pair: {} for pair in _FLAGS}
        self.spare: list[_LastAccess] = []  # cleared records, reused (all -1 again)

    def _of(self, module, neighbour, key: int) -> _LastAccess:
        spans = self.spans[(module, neighbour)]
        last = spans.get(key)
        if last is None:
            last = spans[key] = self.spare.pop() if self.spare else _LastAccess()
        return last

    def record(self, module, neighbour, accesses, index):
        touches = _TOUCHES[neighbour]
        spans = self.spans[(module, neighbour)]
        for buf, lo, hi, write in accesses:
            if buf in touches:
                key = 2 * buf + write
                last = spans.get(key)
                if last is None:  # (also for an empty range: the pair is then busy)
                    last = spans[key] = self.spare.pop() if self.spare else _LastAccess()
                last.add(lo, hi, index)

    def conflict(self, earlier, later, accesses) -> int:
        """The last instruction of ``earlier`` that ``accesses`` must wait for, or -1."""
        spans = self.spans[(earlier, later)]
        if not spans:
            return -1
        last = -1
        for buf, lo, hi, write in accesses:
            # an earlier write conflicts with any access; an earlier read with a write
            seen = spans.get(2 * buf + 1)
            if seen is not None:
                last = max(last, seen.latest(lo, hi))
            if write:
                seen = spans.get(2 * buf)
                if seen is not None:
                    last = max(last, seen.latest(lo, hi))
        return last

    def busy(self, module, neighbour) -> bool:
        return bool(self.spans[(module, neighbour)])

    def clear(self, module, neighbour, upto: int):
        """Forget the accesses of instructions up to ``upto`` (ordered by a token)."""
        spans = self.spans[(module, neighbour)]
        for key in list(spans):
            if not spans[key].drop(upto):
                self.spare.append(spans.pop(key))


#: A run of at least this many GEMMs is tracked as one block (:func:`insert_dependency_tokens`);
#: shorter runs cost less one instruction at a time.
GEMM_BLOCK = 16


_OPCODE = attrgetter("opcode")
_GEMM_COLUMN = {name: k for k, name in enumerate(GEMM_COLUMNS)}
#: The token flags' columns in a GEMM block's table.
_FLAG_COLUMNS = [_GEMM_COLUMN[f] for f in ("pop_prev", "pop_next", "push_prev", "push_next")]


def _gemm_ranges(table: np.ndarray) -> dict:
    """The entry ranges of a run of GEMMs given as a :class:`~tvm_hapm.target.stream.GemmBlock`
    table, as arrays: ``inp``, ``wgt``, ``acc`` (:func:`~tvm_hapm.target.stream.
    gemm_entry_ranges`), ``accumulates`` (the GEMMs that also read their accumulator entries:
    those without ``reset``) and ``flagged`` (those that carry tokens of their own, to be
    cleared)."""
    return gemm_entry_ranges(table) | {
        "accumulates": table[:, _GEMM_COLUMN["reset"]] == 0,
        "flagged": table[:, _FLAG_COLUMNS].any(axis=1),
    }


def _gemm_conflicts(tracker: _Tracker, earlier: Module, r: dict) -> np.ndarray:
    """:meth:`_Tracker.conflict` of ``earlier`` for every GEMM of a run, on the tracker as it
    is before the run (a GEMM reads its input and weight entries and writes, and without
    ``reset`` also reads, its accumulator entries)."""
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
    """:meth:`_Tracker.record` of every GEMM of a run (``index``: their places in the output)."""
    compute = Module.COMPUTE
    tracker._of(compute, Module.LOAD, 2 * Buffer.INP).add_many(*r["inp"], index)
    tracker._of(compute, Module.LOAD, 2 * Buffer.WGT).add_many(*r["wgt"], index)
    written = _paint(*r["acc"], index)
    tracker._of(compute, Module.STORE, 2 * Buffer.ACC + 1).paint(written)
    acc = r["accumulates"]
    if acc.all():  # (the usual run: the GEMMs that reset come first, in a run of their own)
        tracker._of(compute, Module.STORE, 2 * Buffer.ACC).paint(written)
    elif acc.any():
        lo, hi = r["acc"]
        tracker._of(compute, Module.STORE, 2 * Buffer.ACC).add_many(lo[acc], hi[acc], index[acc])


def _gemm_runs(body: list) -> tuple[list, dict[int, int]]:
    """``body`` and ``{start: end}`` of every run of at least :data:`GEMM_BLOCK` consecutive
    GEMMs in it (instructions and blocks), the GEMM blocks of shorter runs expanded (one
    instruction at a time costs less for them)."""
    is_gemm = np.fromiter(map(_OPCODE, body), np.int64, count=len(body)) == Opcode.GEMM
    edges = np.flatnonzero(np.diff(np.concatenate(([0], is_gemm.view(np.int8), [0]))))
    out: list = []
    runs = {}
    done = 0
    for start, end in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
        out += body[done:start]
        run = body[start:end]
        if end - start >= GEMM_BLOCK or stream_length(run) >= GEMM_BLOCK:
            runs[len(out)] = len(out) + len(run)
            out += run
        else:
            out += expand(run)
        done = end
    out += body[done:]
    return out, runs


class _Output:
    """The inserter's output stream (instructions and GEMM blocks), addressed by instruction
    position: the token flags of any instruction emitted so far can still be set."""

    __slots__ = ("items", "starts", "size")

    def __init__(self):
        self.items: list = []
        self.starts: list[int] = []  # the position of each item's first instruction
        self.size = 0

    def __len__(self) -> int:
        return self.size

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

    def _find(self, pos: int) -> tuple[int, int]:
        k = bisect.bisect_right(self.starts, pos) - 1
        return k, pos - self.starts[k]

    def flag(self, pos: int, name: str) -> int:
        """Token flag ``name`` of instruction ``pos``."""
        k, row = self._find(pos)
        item = self.items[k]
        if item.__class__ is GemmBlock:
            return int(item.table[row, _GEMM_COLUMN[name]])
        return getattr(item, name)

    def set_flags(self, pos: int, names) -> None:
        """Set token flags of instruction ``pos`` (a block's row in place: the inserter's own)."""
        k, row = self._find(pos)
        item = self.items[k]
        if item.__class__ is GemmBlock:
            item.table[row, [_GEMM_COLUMN[n] for n in names]] = 1
        else:
            self.items[k] = item.replace(**dict.fromkeys(names, 1))


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
    out = _Output()
    last: dict[Module, int | None] = {m: None for m in Module}
    pending: dict[Module, list[str]] = {m: [] for m in Module}  # pop flags owed by a module
    tracker = _Tracker()

    def emit(insn, mod: Module) -> None:
        """Emit an instruction, or a GEMM block of one row, with the pops ``mod`` owes."""
        if pending[mod]:
            if insn.__class__ is GemmBlock:
                insn.table[0, [_GEMM_COLUMN[f] for f in pending[mod]]] = 1
            else:
                insn = insn.replace(**dict.fromkeys(pending[mod], 1))
            pending[mod] = []
        out.append(insn)
        last[mod] = len(out) - 1

    def sync(src: Module, dst: Module, at: int | None = None) -> None:
        """A token from ``src`` to ``dst``: pushed by instruction ``at`` of ``src`` (default:
        its last instruction), popped by the next instruction of ``dst``."""
        push, pop = _FLAGS[(src, dst)]
        if pop in pending[dst]:  # dst still owes a pop for an earlier token: take it now
            emit(Instruction(Opcode.SYNC, module=dst), dst)
        if at is None:
            if last[src] is None or out.flag(last[src], push):
                emit(Instruction(Opcode.SYNC, module=src), src)
            at = last[src]
        elif out.flag(at, push):  # cannot happen: accesses up to a push are forgotten
            raise AssertionError("two pushes of one queue on one instruction")
        out.set_flags(at, (push,))
        pending[dst].append(pop)
        tracker.clear(src, dst, at)

    def clean(insn: Instruction) -> Instruction:
        if any((insn.pop_prev, insn.pop_next, insn.push_prev, insn.push_next)):
            return insn.replace(pop_prev=0, pop_next=0, push_prev=0, push_next=0)
        return insn

    def gemm_run(run: list) -> None:
        """A run of GEMM items: instructions only, emitted as instructions, or with blocks,
        emitted as slices of one block of the whole run (its flags cleared, then set)."""
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
        for other in _NEIGHBOURS[Module.COMPUTE]:
            at = _gemm_conflicts(tracker, other, ranges)
            before = np.maximum.accumulate(np.concatenate(([-1], at[:-1])))
            for k in np.flatnonzero(at > before).tolist():
                waits.setdefault(k, []).append((other, int(at[k])))
        special = sorted(set(waits).union(np.flatnonzero(ranges["flagged"]).tolist()))
        n = len(table)
        index = np.empty(n, np.int64)
        k = 0
        for stop in [*special, n]:
            if stop > k and not pending[Module.COMPUTE]:  # GEMMs that neither wait nor pop
                index[k:stop] = np.arange(len(out), len(out) + stop - k)
                if plain:
                    out.extend(run[k:stop])
                else:
                    out.append(run[k:stop])
                last[Module.COMPUTE] = len(out) - 1
                k = stop
            for j in range(k, min(stop + 1, n)):
                for other, at in waits.get(j, ()):
                    sync(other, Module.COMPUTE, at)
                emit(clean(run[j]) if plain else run[j : j + 1], Module.COMPUTE)
                index[j] = len(out) - 1
            k = stop + 1
        _record_gemms(tracker, ranges, index)

    body, runs = _gemm_runs([i for i in program if i.opcode != Opcode.FINISH])
    k, n = 0, len(body)
    while k < n:
        end = runs.get(k)
        if end is not None:
            gemm_run(body[k:end])
            k = end
            continue
        insn = body[k]
        k += 1
        if insn.opcode == Opcode.SYNC:
            continue  # tokens of the input are recomputed from the hazards
        insn = clean(insn)
        mod = module_of(insn)
        accesses = buffer_accesses(insn)
        for other in _NEIGHBOURS[mod]:
            at = tracker.conflict(other, mod, accesses)
            if at >= 0:
                sync(other, mod, at)
        emit(insn, mod)
        for other in _NEIGHBOURS[mod]:
            tracker.record(mod, other, accesses, len(out) - 1)

    # FINISH (compute) completes the program: everything the other modules did must be done.
    for other in (Module.LOAD, Module.STORE):
        if tracker.busy(other, Module.COMPUTE):
            sync(other, Module.COMPUTE)
    emit(Instruction(Opcode.FINISH), Module.COMPUTE)
    return out.items
