"""Dependency-token insertion: make a sequential instruction list correct on the decoupled machine.

The code generator writes each program as if one module executed everything in order.  On the
real machine the load, compute and store modules run concurrently and only the dependency tokens
order them.  :func:`insert_dependency_tokens` analyses the on-chip buffer ranges every instruction
reads and writes and, wherever an instruction of one module touches a range that a neighbouring
module touched since they last synchronised (read-after-write, write-after-read or
write-after-write), it makes the earlier module push a token and the later one pop it.  Tokens are
only inserted where a hazard exists, so independent work (e.g. loading the next tile while the
current one is computed, when the schedule double-buffers) overlaps.

Ranges are tracked as one bounding interval per buffer and module since the last token, which is
conservative (it may order two accesses that do not overlap) and never unsafe.
"""

from __future__ import annotations

from .isa import Buffer, Instruction, Module, Opcode, module_of

__all__ = ["insert_dependency_tokens", "buffer_accesses"]

# (from, to) -> (push flag of `from`, pop flag of `to`)
_FLAGS = {
    (Module.LOAD, Module.COMPUTE): ("push_next", "pop_prev"),
    (Module.COMPUTE, Module.LOAD): ("push_prev", "pop_next"),
    (Module.COMPUTE, Module.STORE): ("push_next", "pop_prev"),
    (Module.STORE, Module.COMPUTE): ("push_prev", "pop_next"),
}
_NEIGHBOURS = {
    Module.LOAD: (Module.COMPUTE,),
    Module.COMPUTE: (Module.LOAD, Module.STORE),
    Module.STORE: (Module.COMPUTE,),
}


def _span(base: int, outer: int, so: int, inner: int, si: int) -> tuple[int, int]:
    return base, base + (outer - 1) * so + (inner - 1) * si


def buffer_accesses(insn: Instruction) -> list[tuple[Buffer, int, int, bool]]:
    """``(buffer, first, last, is_write)`` entry ranges an instruction touches on chip."""
    op = insn.opcode
    if op == Opcode.LOAD:
        rows = insn.y_pad_top + insn.y_size + insn.y_pad_bottom
        cols = insn.x_pad_left + insn.x_size + insn.x_pad_right
        return [(Buffer(insn.buffer), insn.sram_addr, insn.sram_addr + rows * cols - 1, True)]
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
        if not insn.use_imm and insn.alu_op != 6:  # RELU has no operand
            src = _span(insn.src_addr, insn.outer, insn.src_so, insn.inner, insn.src_si)
            out.append((Buffer.ACC, *src, False))
        return out
    return []


class _Tracker:
    """Bounding intervals of reads and writes per (module, neighbour, buffer) since last token.

    ``spans[(module, neighbour)]`` maps ``2 * buffer + is_write`` to ``[lo, hi]``; clearing one
    direction after a token is a constant-time reset of its map (this runs per instruction).
    """

    def __init__(self):
        self.spans = {pair: {} for pair in _FLAGS}

    def record(self, module, neighbour, accesses):
        spans = self.spans[(module, neighbour)]
        for buf, lo, hi, write in accesses:
            key = 2 * buf + write
            old = spans.get(key)
            if old is None:
                spans[key] = [lo, hi]
            else:
                old[0] = min(old[0], lo)
                old[1] = max(old[1], hi)

    def conflicts(self, earlier, later, accesses) -> bool:
        spans = self.spans[(earlier, later)]
        if not spans:
            return False
        for buf, lo, hi, write in accesses:
            span = spans.get(2 * buf + 1)  # an earlier write conflicts with any access
            if span is not None and span[0] <= hi and lo <= span[1]:
                return True
            if write:  # an earlier read conflicts with a write
                span = spans.get(2 * buf)
                if span is not None and span[0] <= hi and lo <= span[1]:
                    return True
        return False

    def busy(self, module, neighbour) -> bool:
        return bool(self.spans[(module, neighbour)])

    def clear(self, module, neighbour):
        self.spans[(module, neighbour)] = {}


def insert_dependency_tokens(program: list[Instruction]) -> list[Instruction]:
    """Return ``program`` with dependency flags set and SYNC instructions added where needed.

    ``program`` is a sequential instruction list without flags, ending with FINISH or not
    (a FINISH is appended if missing).  The result is deterministic.
    """
    out: list[Instruction] = []
    last: dict[Module, int | None] = {m: None for m in Module}
    pending: dict[Module, list[str]] = {m: [] for m in Module}  # pop flags owed by a module
    pushed: dict[Module, set] = {m: set() for m in Module}  # push flags on the last instruction
    tracker = _Tracker()

    def emit(insn: Instruction) -> None:
        mod = module_of(insn)
        if pending[mod]:
            insn = insn.replace(**{f: 1 for f in pending[mod]})
            pending[mod] = []
        out.append(insn)
        last[mod] = len(out) - 1
        pushed[mod] = set()

    def sync(src: Module, dst: Module) -> None:
        push, pop = _FLAGS[(src, dst)]
        if pop in pending[dst]:  # dst still owes a pop for an earlier token: take it now
            emit(Instruction(Opcode.SYNC, module=dst))
        if last[src] is None or push in pushed[src]:
            emit(Instruction(Opcode.SYNC, module=src))
        out[last[src]] = out[last[src]].replace(**{push: 1})
        pushed[src].add(push)
        pending[dst].append(pop)
        tracker.clear(src, dst)

    body = [i for i in program if i.opcode != Opcode.FINISH]
    for insn in body:
        if insn.opcode == Opcode.SYNC:
            continue  # tokens of the input are recomputed from the hazards
        if any((insn.pop_prev, insn.pop_next, insn.push_prev, insn.push_next)):
            insn = insn.replace(pop_prev=0, pop_next=0, push_prev=0, push_next=0)
        mod = module_of(insn)
        accesses = buffer_accesses(insn)
        for other in _NEIGHBOURS[mod]:
            if tracker.conflicts(other, mod, accesses):
                sync(other, mod)
        emit(insn)
        for other in _NEIGHBOURS[mod]:
            tracker.record(mod, other, accesses)

    # FINISH (compute) completes the program: everything the other modules did must be done.
    for other in (Module.LOAD, Module.STORE):
        if tracker.busy(other, Module.COMPUTE):
            sync(other, Module.COMPUTE)
    emit(Instruction(Opcode.FINISH))
    return out
