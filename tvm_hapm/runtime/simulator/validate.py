"""The static checks a program must pass before it runs.

Every instruction is checked (field widths, buffer and DRAM ranges of the whole loop nest, flags
legal for the executing module, ...) and the token protocol is played out on counters
(:func:`~tvm_hapm.runtime.simulator.tokens.schedule`) to find the execution order of the three
modules; then every pair of accesses by two modules to one location must be ordered by tokens
(:func:`~tvm_hapm.runtime.simulator.hazards.check_hazards`).  Any problem, including a deadlock
or a race, raises :class:`SimulatorError` before a single DRAM
byte is written: the execution (:mod:`~tvm_hapm.runtime.simulator.execute`) may assume a valid
program.

The checks read the simulator's configuration only (``sim.config`` and the attributes derived
from it: ``rows``, ``cols``, ``depth``, ``entry_elems``), never its buffers.
"""

from __future__ import annotations

from operator import attrgetter

import numpy as np

from ...target import isa
from ...target.banks import acc_bank_range
from ...target.isa import (
    REQUANT_RELU,
    REQUANT_SHIFT_MASK,
    AluOp,
    Buffer,
    Instruction,
    Module,
    Opcode,
)
from .errors import SimulatorError, instruction_error
from .hazards import check_hazards
from .stats import ExecutionStats
from .tokens import CMP2LD, CMP2ST, LD2CMP, ST2CMP, schedule, token_queues

__all__ = ["slots_ok", "validate_program"]

# Field ranges of every opcode, derived from the encoding: an instruction the encoder would reject
# is not a program the hardware could receive, so the simulator refuses it too.
_FIELD_RANGES = {
    op: tuple(
        (name, -(1 << (bits - 1)), (1 << (bits - 1)) - 1, bits, "signed")
        if name in isa.SIGNED_FIELDS
        else (name, 0, (1 << bits) - 1, bits, "unsigned")
        for name, bits in layout
        if name != "opcode"
    )
    for op, layout in isa.LAYOUTS.items()
}

_BUFFER_NAMES = {
    Buffer.INP: "input buffer",
    Buffer.WGT: "weight buffer",
    Buffer.ACC: "accumulator buffer",
}
_DRAM_DTYPES = {8: np.dtype(np.int8), 16: np.dtype(np.int16), 32: np.dtype(np.int32)}


# ---------------------------------------------------------------------------------- program
def validate_program(
    sim, instructions, dram, layer: str = ""
) -> tuple[ExecutionStats, list[int], dict]:
    """Static checks of the whole stream, then the token schedule.

    Parameters
    ----------
    sim : Simulator
        The simulator whose configuration the program must fit.
    instructions : list of isa.Instruction
        The program; it must end with its only ``FINISH``.
    dram : list of numpy.ndarray
        The DRAM slots the program will run on.
    layer : str
        Name recorded in the stats.

    Returns
    -------
    stats : ExecutionStats
        The event counts of the program (they do not depend on data; no timing).
    order : list of int
        The order in which the instructions execute (:func:`~.tokens.schedule`).
    slot_needs : dict
        ``slot -> (elements needed, ((elem_bits, writes), ...))``: what the program requires
        of the DRAM slots, for :func:`slots_ok`.

    Raises
    ------
    SimulatorError
        On the first invalid instruction in program order, a deadlock or leftover tokens.
    """
    if not isinstance(dram, (list, tuple)):
        raise SimulatorError(f"dram must be a list of numpy arrays, got {type(dram).__name__}")
    n = len(instructions)
    if n == 0:
        raise SimulatorError("empty program: a program must end with FINISH")
    err = instruction_error
    slot_checked = {}  # (slot, elem_bits, writes) -> True once the slot passed the checks

    counts = [0] * len(Opcode)
    macs = alu_ops = read = written = 0
    modules = [0] * n
    pops = [()] * n
    pushes = [()] * n

    gemms = []
    GEMM = Opcode.GEMM
    for idx, insn in enumerate(instructions):
        if insn.__class__ is not Instruction and not isinstance(insn, Instruction):
            raise SimulatorError(
                f"instruction {idx}: expected an isa.Instruction, got {type(insn).__name__}"
            )
        op = insn.opcode
        counts[op] += 1
        if op == GEMM:
            gemms.append(idx)
    # GEMMs (most of a program) are screened with numpy; only those that may be invalid,
    # and every other instruction, go through the checks below, in program order, so the
    # first invalid instruction is the one reported.
    flagged, macs = _screen_gemms(sim, instructions, gemms, modules, pops, pushes)
    if flagged is None:
        check = range(n)
    else:
        check = sorted(set(range(n)).difference(gemms).union(flagged))
    slot_needs: dict = {}

    for idx in check:
        insn = instructions[idx]
        op = insn.opcode

        # Field widths: everything below may assume non-negative, encodable values.
        for name, lo, hi, bits, kind in _FIELD_RANGES[op]:
            value = getattr(insn, name)
            if not lo <= value <= hi:
                raise err(
                    idx,
                    insn,
                    f"field '{name}' = {value} does not fit its {bits}-bit {kind} encoding "
                    f"[{lo}, {hi}]",
                )

        if op in (Opcode.LOAD, Opcode.STORE):
            nbytes = _check_transfer(sim, idx, insn, dram, slot_checked, slot_needs)
            if op == Opcode.LOAD:
                read += nbytes
            else:
                written += nbytes

        elif op == Opcode.GEMM:
            macs += _check_gemm(sim, idx, insn)

        elif op == Opcode.ALU:
            alu_ops += _check_alu(sim, idx, insn)

        elif op == Opcode.SYNC:
            if insn.module > Module.STORE:
                raise err(idx, insn, f"unknown module {insn.module}")

        elif op == Opcode.FINISH and idx != n - 1:
            raise err(idx, insn, "FINISH must be the last instruction (one FINISH per program)")

        # Dependency flags of the executing module.
        module = isa.module_of(insn)
        modules[idx] = module
        if insn.pop_prev or insn.pop_next or insn.push_prev or insn.push_next:
            pops[idx], pushes[idx] = token_queues(idx, insn, module)

    last_insn = instructions[-1]
    if last_insn.opcode != Opcode.FINISH:
        raise err(n - 1, last_insn, "the program must end with FINISH")

    order = schedule(instructions, modules, pops, pushes)
    check_hazards(sim, instructions, modules, pops, pushes, order, dram)
    stats = ExecutionStats(
        layer=layer,
        instructions=n,
        by_opcode={op.name: counts[op] for op in Opcode if counts[op]},
        macs=macs,
        alu_ops=alu_ops,
        dram_bytes_read=read,
        dram_bytes_written=written,
    )
    slot_needs = {k: (size, tuple(sorted(c))) for k, (size, c) in slot_needs.items()}
    return stats, order, slot_needs


# ---------------------------------------------------------------------------------- per opcode
def _check_transfer(sim, idx, insn, dram, slot_checked, slot_needs) -> int:
    """LOAD / STORE: buffer, element width, padding, buffer range, DRAM slot and range.

    Records the slot's requirements in ``slot_needs`` (and the slots that passed the dtype
    checks in ``slot_checked``); returns the DRAM bytes the instruction moves.
    """
    err = instruction_error
    cfg = sim.config
    depth = sim.depth
    op = insn.opcode
    buf = insn.buffer
    if buf > Buffer.ACC:
        raise err(idx, insn, f"unknown buffer {buf}")
    if op == Opcode.STORE and buf != Buffer.ACC:
        raise err(idx, insn, "STORE reads the accumulator buffer only")
    code = insn.elem_bits_code
    if code >= len(isa.ELEM_BITS):
        raise err(idx, insn, f"invalid element width code {code}")
    bits = isa.ELEM_BITS[code]
    if op == Opcode.LOAD:
        need = {Buffer.INP: cfg.act_bits, Buffer.WGT: cfg.weight_bits}.get(buf)
        if need is not None and bits != need:
            raise err(
                idx,
                insn,
                f"a LOAD into the {_BUFFER_NAMES[buf]} needs {need}-bit DRAM "
                f"elements, got {bits}-bit",
            )
    elif insn.y_pad_top or insn.y_pad_bottom or insn.x_pad_left or insn.x_pad_right or insn.pad_min:
        raise err(idx, insn, "STORE has no padding: pad fields and pad_min must be 0")
    y, x = insn.y_size, insn.x_size
    if y < 1 or x < 1:
        raise err(idx, insn, f"empty transfer: y_size={y}, x_size={x} (need >= 1)")
    rows_total = insn.y_pad_top + y + insn.y_pad_bottom
    cols_total = insn.x_pad_left + x + insn.x_pad_right
    last = insn.sram_addr + rows_total * cols_total - 1
    if last >= depth[buf]:
        raise err(
            idx,
            insn,
            f"{_BUFFER_NAMES[buf]} address {last} out of range [0, {depth[buf]})",
        )
    # DRAM slot and range.
    k = insn.dram_slot
    if k >= len(dram):
        raise err(idx, insn, f"DRAM slot {k} does not exist ({len(dram)} slots)")
    slot = dram[k]
    key = (k, bits, op == Opcode.STORE)
    if key not in slot_checked:
        problem = _slot_problem(slot, bits, op == Opcode.STORE)
        if problem:
            raise err(idx, insn, f"DRAM slot {k} {problem}")
        slot_checked[key] = True
    E = sim.entry_elems[buf]
    last = (insn.dram_addr + (y - 1) * insn.x_stride + x) * E - 1
    if last >= slot.size:
        raise err(idx, insn, f"DRAM slot {k} element {last} out of range [0, {slot.size})")
    need = slot_needs.get(k)
    if need is None:
        need = slot_needs[k] = [0, set()]
    need[0] = max(need[0], last + 1)
    need[1].add((bits, op == Opcode.STORE))
    return y * x * E * (bits // 8)


def _check_gemm(sim, idx, insn) -> int:
    """GEMM: array, loop counts, weight, input and accumulator ranges; returns its MACs."""
    err = instruction_error
    cfg = sim.config
    R, C = sim.rows, sim.cols
    depth = sim.depth
    if insn.array >= cfg.num_arrays:
        raise err(idx, insn, f"array {insn.array} out of range [0, {cfg.num_arrays})")
    outer, inner = insn.outer, insn.inner
    if outer < 1 or inner < 1:
        raise err(idx, insn, f"empty loop: outer={outer}, inner={inner} (need >= 1)")
    if insn.wgt_addr >= depth[Buffer.WGT]:
        raise err(
            idx,
            insn,
            f"weight buffer address {insn.wgt_addr} out of range [0, {depth[Buffer.WGT]})",
        )
    for buf, base, so, si in (
        (Buffer.INP, insn.inp_addr, insn.inp_so, insn.inp_si),
        (Buffer.ACC, insn.acc_addr, insn.acc_so, insn.acc_si),
    ):
        last = base + (outer - 1) * so + (inner - 1) * si
        if last >= depth[buf]:
            raise err(
                idx,
                insn,
                f"{_BUFFER_NAMES[buf]} address {last} out of range [0, {depth[buf]})",
            )
    lo, hi = acc_bank_range(cfg, insn.array)
    if insn.acc_addr < lo or last > hi:
        raise err(
            idx,
            insn,
            f"accumulator entries [{insn.acc_addr}, {last}] outside bank {insn.array} "
            f"[{lo}, {hi}]: array {insn.array} accumulates into its own bank only",
        )
    return R * C * outer * inner


def _check_alu(sim, idx, insn) -> int:
    """ALU: loop counts, destination and source ranges, immediates; returns its lane ops."""
    err = instruction_error
    C = sim.cols
    depth = sim.depth
    alu = insn.alu_op  # its 3-bit field has no unknown values
    outer, inner = insn.outer, insn.inner
    if outer < 1 or inner < 1:
        raise err(idx, insn, f"empty loop: outer={outer}, inner={inner} (need >= 1)")
    acc_depth = depth[Buffer.ACC]
    last = insn.dst_addr + (outer - 1) * insn.dst_so + (inner - 1) * insn.dst_si
    if last >= acc_depth:
        raise err(
            idx,
            insn,
            f"accumulator buffer destination address {last} out of range [0, {acc_depth})",
        )
    if alu == AluOp.REQUANT:
        if insn.use_imm:
            raise err(idx, insn, "REQUANT takes its multiplier from acc: use_imm=0")
        if not 1 <= insn.imm <= 62:
            raise err(idx, insn, f"REQUANT shift {insn.imm} out of range [1, 62]")
    elif alu == AluOp.ADD_REQUANT:
        if insn.use_imm:
            raise err(idx, insn, "ADD_REQUANT takes bias and multiplier from acc: use_imm=0")
        if not 0 <= insn.imm <= (REQUANT_RELU | REQUANT_SHIFT_MASK):
            raise err(
                idx,
                insn,
                f"ADD_REQUANT immediate {insn.imm}: only the shift and ReLU bits may be set",
            )
        if not 1 <= insn.imm & REQUANT_SHIFT_MASK <= 62:
            raise err(
                idx,
                insn,
                f"ADD_REQUANT shift {insn.imm & REQUANT_SHIFT_MASK} out of range [1, 62]",
            )
        if insn.src_so or insn.src_si:
            raise err(
                idx,
                insn,
                "ADD_REQUANT reads one bias and multiplier pair: src_so and src_si must be 0",
            )
        if insn.dst_addr <= insn.src_addr + 1 <= last:
            raise err(
                idx,
                insn,
                f"ADD_REQUANT may not write its multiplier (entry {insn.src_addr + 1}), "
                "which the ALU reads once, before its first iteration",
            )
    elif alu == AluOp.SHR and insn.use_imm and not 0 <= insn.imm <= 31:
        raise err(idx, insn, f"SHR shift {insn.imm} out of range [0, 31]")
    rows = isa.alu_operand_rows(alu, insn.use_imm)
    if rows:
        last = insn.src_addr + (outer - 1) * insn.src_so + (inner - 1) * insn.src_si
        last += rows - 1  # ADD_REQUANT: the multiplier after the bias
        if last >= acc_depth:
            raise err(
                idx,
                insn,
                f"accumulator buffer source address {last} out of range [0, {acc_depth})",
            )
    return C * outer * inner


def _screen_gemms(sim, instructions, gemms, modules, pops, pushes):
    """Vectorised checks of the GEMMs; fills their modules and token queues.

    Returns ``(flagged, macs)``: the indices of GEMMs that may break a rule (they are
    checked one by one afterwards) and the MACs of the others.  ``(None, 0)`` when the
    fields cannot be screened (e.g. integers beyond 64 bits): then every instruction is
    checked one by one.
    """
    if not gemms:
        return [], 0
    ranges = _FIELD_RANGES[Opcode.GEMM]
    getter = attrgetter(*(r[0] for r in ranges))
    try:
        V = np.array([getter(instructions[i]) for i in gemms], dtype=np.int64)
    except (OverflowError, TypeError, ValueError):
        return None, 0
    col = {r[0]: V[:, j] for j, r in enumerate(ranges)}
    lo = np.array([r[1] for r in ranges], dtype=np.int64)
    hi = np.array([r[2] for r in ranges], dtype=np.int64)
    bad = ((V < lo) | (V > hi)).any(axis=1)
    outer, inner = col["outer"], col["inner"]
    depth = sim.depth
    bad |= col["array"] >= sim.config.num_arrays
    bad |= (outer < 1) | (inner < 1)
    bad |= col["wgt_addr"] >= depth[Buffer.WGT]
    for buf, base, so, si in ((Buffer.INP, "inp_addr", "inp_so", "inp_si"),
                              (Buffer.ACC, "acc_addr", "acc_so", "acc_si")):  # fmt: skip
        last = col[base] + (outer - 1) * col[so] + (inner - 1) * col[si]
        bad |= last >= depth[buf]
    # the bank rule: array k accumulates into bank k only (an array out of range is flagged
    # above; any bank serves its lookup)
    A = sim.config.num_arrays
    banks = np.array([acc_bank_range(sim.config, k) for k in range(A)], dtype=np.int64)
    bank = banks[np.minimum(col["array"], A - 1)]
    bad |= (col["acc_addr"] < bank[:, 0]) | (last > bank[:, 1])
    ok = ~bad
    macs = sim.rows * sim.cols * int((outer * inner)[ok].sum())
    idx = np.asarray(gemms, dtype=np.int64)
    compute = Module.COMPUTE
    for i in idx[ok].tolist():
        modules[i] = compute
    # Token flags: every flag is legal on the compute module.
    flags = ok & ((col["pop_prev"] | col["pop_next"] | col["push_prev"] | col["push_next"]) > 0)
    for j in np.flatnonzero(flags).tolist():
        i = gemms[j]
        pops[i] = tuple(q for f, q in (("pop_prev", LD2CMP), ("pop_next", ST2CMP)) if col[f][j])
        pushes[i] = tuple(q for f, q in (("push_prev", CMP2LD), ("push_next", CMP2ST)) if col[f][j])
    return idx[bad].tolist(), macs


# ---------------------------------------------------------------------------------- DRAM slots
def _slot_problem(slot, bits: int, writes: bool) -> str:
    """Why ``slot`` cannot hold ``bits``-bit DRAM elements ("" when it can)."""
    if not isinstance(slot, np.ndarray):
        return f"is a {type(slot).__name__}, not a numpy array"
    if slot.ndim != 1:
        return f"must be a flat (1-D) array, got shape {slot.shape}"
    if slot.dtype != _DRAM_DTYPES[bits]:
        return f"has dtype {slot.dtype}, but the instruction moves int{bits} elements"
    if writes and not slot.flags.writeable:
        return "is read-only but the instruction stores into it"
    return ""


def slots_ok(slot_needs, dram) -> bool:
    """Whether ``dram`` satisfies the slot requirements a plan recorded.

    Parameters
    ----------
    slot_needs : dict
        What :func:`validate_program` returned for the program.
    dram : list of numpy.ndarray
        The DRAM slots of a new run.

    Returns
    -------
    bool
        True when the program would pass its DRAM checks on ``dram`` (then it need not be
        validated again); False when it must be, to report the precise error.
    """
    for k, (size, checks) in slot_needs.items():
        if k >= len(dram):
            return False
        slot = dram[k]
        for bits, writes in checks:
            if _slot_problem(slot, bits, writes):
                return False
        if slot.size < size:
            return False
    return True
