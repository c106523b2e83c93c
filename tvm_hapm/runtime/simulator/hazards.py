"""The hazard checker: every conflicting pair of accesses by two modules must be ordered by tokens.

The load, compute and store modules run concurrently; the only order between two of them is the
one their dependency tokens give (:mod:`~tvm_hapm.runtime.simulator.tokens`).  The simulator
executes the instructions in one order the protocol allows, so a program that forgets a token
still computes *some* result there, and the timing model may even report it faster: a
synchronisation bug of the code generator would look like a speed-up.  On hardware the same
program races.  This module refuses such programs before they run.

Happens-before is the transitive closure of program order within a module and of "the k-th push
on a queue precedes the k-th pop on it" (each queue has one producer and one consumer module, so
tokens match in order).  It is tracked with vector clocks: three integers per instruction, the
number of instructions of each module that happen before it (itself included).  Instruction ``i``
of module ``a`` at position ``p`` (1-based, in ``a``'s own order) happens before ``j`` when
``clock(j)[a] >= p``.

Accesses are tracked per buffer entry (and per element of a DRAM slot that is both loaded and
stored): the last write and each module's last read.  A read must happen after the last write of
another module to its entries (read-after-write); a write after the last write (write-after-write)
and after every other module's last read (write-after-read).  Checking only the last access is
enough because happens-before is transitive and the earlier accesses were checked in turn.

Between two pops a module's clock changes only in its own component, so each such run of
instructions (a *segment*) is checked as one batch.
"""

from __future__ import annotations

import numpy as np

from ...target import isa
from ...target.isa import Buffer, Module, Opcode
from .errors import SimulatorError

__all__ = ["check_hazards"]

_RESOURCE_NAMES = {
    Buffer.INP: "input buffer entry",
    Buffer.WGT: "weight buffer entry",
    Buffer.ACC: "accumulator buffer entry",
}
_KINDS = {
    (False, True): "read-after-write",
    (True, True): "write-after-write",
    (True, False): "write-after-read",
}


def _loop_entries(base, so, si, outer, inner) -> np.ndarray:
    o = np.arange(outer, dtype=np.int64)[:, None] * so
    i = np.arange(inner, dtype=np.int64)[None, :] * si
    return (base + o + i).reshape(-1)


def _accesses(insn, entry_elems, shared_slots):
    """``(resource, entries, is_write)`` of one instruction; resources are buffers or
    ``("dram", slot)`` for the slots in ``shared_slots``."""
    op = insn.opcode
    out = []
    if op == Opcode.GEMM:
        out.append((Buffer.WGT, np.array([insn.wgt_addr], dtype=np.int64), False))
        out.append(
            (
                Buffer.INP,
                _loop_entries(insn.inp_addr, insn.inp_so, insn.inp_si, insn.outer, insn.inner),
                False,
            )
        )
        acc = _loop_entries(insn.acc_addr, insn.acc_so, insn.acc_si, insn.outer, insn.inner)
        if not insn.reset:
            out.append((Buffer.ACC, acc, False))
        out.append((Buffer.ACC, acc, True))
    elif op == Opcode.ALU:
        rows = isa.alu_operand_rows(insn.alu_op, insn.use_imm)
        if rows:
            src = _loop_entries(insn.src_addr, insn.src_so, insn.src_si, insn.outer, insn.inner)
            out.append((Buffer.ACC, np.concatenate([src + r for r in range(rows)]), False))
        dst = _loop_entries(insn.dst_addr, insn.dst_so, insn.dst_si, insn.outer, insn.inner)
        out.append((Buffer.ACC, dst, False))
        out.append((Buffer.ACC, dst, True))
    elif op in (Opcode.LOAD, Opcode.STORE):
        rows_total = insn.y_pad_top + insn.y_size + insn.y_pad_bottom
        cols_total = insn.x_pad_left + insn.x_size + insn.x_pad_right
        sram = np.arange(insn.sram_addr, insn.sram_addr + rows_total * cols_total, dtype=np.int64)
        load = op == Opcode.LOAD
        out.append((insn.buffer, sram, load))
        if insn.dram_slot in shared_slots:
            elems = isa.dram_elements(insn, entry_elems[insn.buffer])
            out.append((("dram", insn.dram_slot), elems, not load))
    return out


def _resource_name(res) -> str:
    if isinstance(res, tuple):
        return f"element of DRAM slot {res[1]}"
    return _RESOURCE_NAMES[res]


def check_hazards(sim, instructions, modules, pops, pushes, order, dram) -> None:
    """Refuse a program in which two modules access the same location without a token path.

    Parameters
    ----------
    sim : Simulator
        Gives the buffer depths and entry sizes.
    instructions : list of isa.Instruction
        The program, already validated instruction by instruction.
    modules : list of isa.Module
        The module of each instruction.
    pops, pushes : list of tuple of int
        The token queues each instruction pops and pushes.
    order : list of int
        An execution order the token protocol allows (:func:`~.tokens.schedule`).
    dram : list of numpy.ndarray
        The DRAM slots (their sizes bound the element tracking of shared slots).

    Raises
    ------
    SimulatorError
        Naming both instructions of the first unordered conflicting pair found.
    """
    n = len(instructions)
    pos = np.zeros(n, dtype=np.int64)  # 1-based position of each instruction in its module
    count = [0, 0, 0]
    for idx in range(n):
        m = modules[idx]
        count[m] += 1
        pos[idx] = count[m]

    # DRAM slots both loaded and stored are the only DRAM locations two modules can share.
    loaded, stored = set(), set()
    for insn in instructions:
        if insn.opcode == Opcode.LOAD:
            loaded.add(insn.dram_slot)
        elif insn.opcode == Opcode.STORE:
            stored.add(insn.dram_slot)
    shared_slots = loaded & stored

    module_arr = np.asarray(modules, dtype=np.int64)
    last_write = {}
    last_read = {}

    def tables(res):
        if res not in last_write:
            size = dram[res[1]].size if isinstance(res, tuple) else sim.depth[res]
            last_write[res] = np.full(size, -1, dtype=np.int64)
            last_read[res] = np.full((3, size), -1, dtype=np.int64)
        return last_write[res], last_read[res]

    clock = [[0, 0, 0] for _ in range(3)]  # current clock of each module
    push_clocks = [[] for _ in range(4)]  # clock of each push, per queue, in push order
    popped = [0, 0, 0, 0]
    segment: list[int] = []
    seg_module = None
    seg_clock = None

    def flush():
        if segment:
            _check_segment(instructions, segment, seg_module, seg_clock, pos, module_arr,
                           sim.entry_elems, shared_slots, tables)  # fmt: skip
            segment.clear()

    for idx in order:
        m = modules[idx]
        cur = clock[m]
        if pops[idx] or m != seg_module:
            flush()
            for q in pops[idx]:
                src = push_clocks[q][popped[q]]
                popped[q] += 1
                cur = [max(a, b) for a, b in zip(cur, src, strict=True)]
            seg_module, seg_clock = m, list(cur)
        cur = list(cur)
        cur[m] = int(pos[idx])
        clock[m] = cur
        for q in pushes[idx]:
            push_clocks[q].append(cur)
        segment.append(idx)
    flush()


def _check_segment(instructions, segment, m, seg_clock, pos, module_arr, entry_elems,
                   shared_slots, tables) -> None:  # fmt: skip
    """Check and record the accesses of a run of module ``m`` sharing ``seg_clock`` (the other
    modules' components are those of every instruction in the run)."""
    by_res: dict = {}
    for idx in segment:
        for res, entries, write in _accesses(instructions[idx], entry_elems, shared_slots):
            by_res.setdefault((res, write), ([], []))
            by_res[(res, write)][0].append(entries)
            by_res[(res, write)][1].append(np.full(entries.size, idx, dtype=np.int64))
    clock = np.asarray(seg_clock, dtype=np.int64)
    # Checks first (against the accesses before the segment), then the updates.
    merged = {}
    for (res, write), (ents, idxs) in by_res.items():
        entries, who = np.concatenate(ents), np.concatenate(idxs)
        merged[(res, write)] = (entries, who)
        last_w, last_r = tables(res)
        prior = [(last_w[entries], True)]
        if write:
            prior += [(last_r[a][entries], False) for a in range(3) if a != m]
        for other, other_writes in prior:
            seen = other >= 0
            if not seen.any():
                continue
            o = np.where(seen, other, 0)
            foreign = seen & (module_arr[o] != m)
            unordered = foreign & (pos[o] > clock[module_arr[o]])
            if unordered.any():
                k = int(np.flatnonzero(unordered)[0])
                _raise(instructions, int(who[k]), int(other[k]), res, int(entries[k]),
                       _KINDS[(write, other_writes)])  # fmt: skip
    for (res, write), (entries, who) in merged.items():
        last_w, last_r = tables(res)
        # The latest access of the segment to each entry: the last occurrence in program order.
        rev_entries, rev_who = entries[::-1], who[::-1]
        uniq, first = np.unique(rev_entries, return_index=True)
        target = last_w if write else last_r[m]
        target[uniq] = rev_who[first]


def _raise(instructions, later, earlier, res, entry, kind) -> None:
    a, b = instructions[earlier], instructions[later]
    ma, mb = isa.module_of(a), isa.module_of(b)
    raise SimulatorError(
        f"hazard ({kind}) on {_resource_name(res)} {entry}: instruction {later} "
        f"({isa.disassemble(b)}) on the {Module(mb).name.lower()} module and instruction "
        f"{earlier} ({isa.disassemble(a)}) on the {Module(ma).name.lower()} module access it "
        f"with no dependency token ordering them"
    )
