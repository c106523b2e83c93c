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
(read / written) as disjoint entry segments, each with the last instruction that touched it.
The push of a token goes on the **last instruction of the
earlier module that touched a conflicting segment**, not on its last instruction overall: with a
double-buffered schedule in program order ``load k, compute k, load k+1, compute k+1``, the load
of tile ``k+2`` into the half that compute ``k`` read waits only for compute ``k``, so it overlaps
compute ``k+1``.  Tokens still flow forward in program order and the pushes of one queue stay in
program order (segments at or before a queue's last push are dropped when it is pushed), so the
k-th pop matches the k-th push and a generated program cannot deadlock.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from .isa import TOKEN_QUEUES, Buffer, Instruction, Module, Opcode, alu_operand_rows, module_of

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


class _Segments:
    """Disjoint entry ranges ``[lo, hi]`` of one buffer, sorted, each with the index of the last
    instruction that accessed it (later accesses overwrite the part they cover)."""

    __slots__ = ("starts", "ends", "last")

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.last: list[int] = []

    def add(self, lo: int, hi: int, index: int) -> None:
        starts, ends, last = self.starts, self.ends, self.last
        j = bisect_left(ends, lo)
        i = bisect_right(starts, hi)
        if j == i:  # nothing overlaps
            starts.insert(j, lo)
            ends.insert(j, hi)
            last.insert(j, index)
            return
        ns, ne, nl = [lo], [hi], [index]
        if starts[j] < lo:  # the part of the first overlapped segment before lo
            ns.insert(0, starts[j])
            ne.insert(0, lo - 1)
            nl.insert(0, last[j])
        if ends[i - 1] > hi:  # the part of the last overlapped segment after hi
            ns.append(hi + 1)
            ne.append(ends[i - 1])
            nl.append(last[i - 1])
        starts[j:i], ends[j:i], last[j:i] = ns, ne, nl

    def latest(self, lo: int, hi: int) -> int:
        """The last instruction that accessed an entry of ``[lo, hi]``, or -1."""
        j = bisect_left(self.ends, lo)
        i = bisect_right(self.starts, hi)
        return max(self.last[j:i]) if j < i else -1

    def drop(self, upto: int) -> None:
        keep = [k for k, v in enumerate(self.last) if v > upto]
        self.starts = [self.starts[k] for k in keep]
        self.ends = [self.ends[k] for k in keep]
        self.last = [self.last[k] for k in keep]


# The buffers a module can touch: accesses to others never conflict with it.
_TOUCHES = {
    Module.LOAD: (Buffer.INP, Buffer.WGT),
    Module.COMPUTE: (Buffer.INP, Buffer.WGT, Buffer.ACC),
    Module.STORE: (Buffer.ACC,),
}


class _Tracker:
    """Reads and writes per (module, neighbour) since the tokens between them.

    ``spans[(module, neighbour)]`` maps ``2 * buffer + is_write`` to the :class:`_Segments` of
    the buffer entries ``module`` read / wrote, each with the last instruction that did.  Only
    buffers the neighbour can touch are recorded.
    """

    def __init__(self):
        self.spans = {pair: {} for pair in _FLAGS}

    def record(self, module, neighbour, accesses, index):
        spans = self.spans[(module, neighbour)]
        touches = _TOUCHES[neighbour]
        for buf, lo, hi, write in accesses:
            if buf not in touches:
                continue
            key = 2 * buf + write
            segs = spans.get(key)
            if segs is None:
                segs = spans[key] = _Segments()
            segs.add(lo, hi, index)

    def conflict(self, earlier, later, accesses) -> int:
        """The last instruction of ``earlier`` that ``accesses`` must wait for, or -1."""
        spans = self.spans[(earlier, later)]
        if not spans:
            return -1
        last = -1
        for buf, lo, hi, write in accesses:
            # an earlier write conflicts with any access; an earlier read with a write
            segs = spans.get(2 * buf + 1)
            if segs is not None:
                last = max(last, segs.latest(lo, hi))
            if write:
                segs = spans.get(2 * buf)
                if segs is not None:
                    last = max(last, segs.latest(lo, hi))
        return last

    def busy(self, module, neighbour) -> bool:
        return any(segs.starts for segs in self.spans[(module, neighbour)].values())

    def clear(self, module, neighbour, upto: int):
        """Forget the accesses of instructions up to ``upto`` (ordered by a token)."""
        spans = self.spans[(module, neighbour)]
        for key in list(spans):
            spans[key].drop(upto)
            if not spans[key].starts:
                del spans[key]


def insert_dependency_tokens(program: list[Instruction]) -> list[Instruction]:
    """Return ``program`` with dependency flags set and SYNC instructions added where needed.

    ``program`` is a sequential instruction list without flags, ending with FINISH or not
    (a FINISH is appended if missing).  The result is deterministic.
    """
    out: list[Instruction] = []
    last: dict[Module, int | None] = {m: None for m in Module}
    pending: dict[Module, list[str]] = {m: [] for m in Module}  # pop flags owed by a module
    tracker = _Tracker()

    def emit(insn: Instruction) -> None:
        mod = module_of(insn)
        if pending[mod]:
            insn = insn.replace(**{f: 1 for f in pending[mod]})
            pending[mod] = []
        out.append(insn)
        last[mod] = len(out) - 1

    def sync(src: Module, dst: Module, at: int | None = None) -> None:
        """A token from ``src`` to ``dst``: pushed by instruction ``at`` of ``src`` (default:
        its last instruction), popped by the next instruction of ``dst``."""
        push, pop = _FLAGS[(src, dst)]
        if pop in pending[dst]:  # dst still owes a pop for an earlier token: take it now
            emit(Instruction(Opcode.SYNC, module=dst))
        if at is None:
            if last[src] is None or getattr(out[last[src]], push):
                emit(Instruction(Opcode.SYNC, module=src))
            at = last[src]
        elif getattr(out[at], push):  # cannot happen: segments up to a push are dropped
            raise AssertionError("two pushes of one queue on one instruction")
        out[at] = out[at].replace(**{push: 1})
        pending[dst].append(pop)
        tracker.clear(src, dst, at)

    body = [i for i in program if i.opcode != Opcode.FINISH]
    for insn in body:
        if insn.opcode == Opcode.SYNC:
            continue  # tokens of the input are recomputed from the hazards
        if any((insn.pop_prev, insn.pop_next, insn.push_prev, insn.push_next)):
            insn = insn.replace(pop_prev=0, pop_next=0, push_prev=0, push_next=0)
        mod = module_of(insn)
        accesses = buffer_accesses(insn)
        for other in _NEIGHBOURS[mod]:
            at = tracker.conflict(other, mod, accesses)
            if at >= 0:
                sync(other, mod, at)
        emit(insn)
        for other in _NEIGHBOURS[mod]:
            tracker.record(mod, other, accesses, len(out) - 1)

    # FINISH (compute) completes the program: everything the other modules did must be done.
    for other in (Module.LOAD, Module.STORE):
        if tracker.busy(other, Module.COMPUTE):
            sync(other, Module.COMPUTE)
    emit(Instruction(Opcode.FINISH))
    return out
