"""The hazard checker refuses programs whose modules race, and only those.

Each token push/pop pair of compiled programs is dropped in turn.  An independent oracle (plain
Python sets of the locations each instruction touches and the transitive closure of program
order plus token edges) says whether the drop leaves two conflicting accesses of different
modules unordered; the simulator must refuse exactly those programs.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

import tvm_hapm  # noqa: F401
from tvm_hapm.passes import hapm_pipeline
from tvm_hapm.runtime import Simulator, run_program
from tvm_hapm.runtime.simulator import SimulatorError
from tvm_hapm.target import isa
from tvm_hapm.target.isa import Buffer, Module, Opcode
from tvm_hapm.target.program import Program, ProgramError
from tvm_hapm.testing import build_int_network, tiny_buffers_config

# ---------------------------------------------------------------------------------- the oracle
# Token queues: (producer module, flag) and (consumer module, flag) of each.
_QUEUES = {
    "load->compute": ((Module.LOAD, "push_next"), (Module.COMPUTE, "pop_prev")),
    "compute->load": ((Module.COMPUTE, "push_prev"), (Module.LOAD, "pop_next")),
    "compute->store": ((Module.COMPUTE, "push_next"), (Module.STORE, "pop_prev")),
    "store->compute": ((Module.STORE, "push_prev"), (Module.COMPUTE, "pop_next")),
}


def _module(insn):
    if insn.opcode == Opcode.LOAD:
        return Module.COMPUTE if insn.buffer == Buffer.ACC else Module.LOAD
    if insn.opcode == Opcode.STORE:
        return Module.STORE
    return Module.COMPUTE


def _token_pairs(instructions):
    """``[(queue, push index, pop index)]``: the k-th push of a queue feeds its k-th pop."""
    pairs = []
    for queue, ((pm, pf), (cm, cf)) in _QUEUES.items():
        pushes = [i for i, s in enumerate(instructions) if _module(s) == pm and getattr(s, pf)]
        pops = [i for i, s in enumerate(instructions) if _module(s) == cm and getattr(s, cf)]
        assert len(pushes) == len(pops)
        pairs += [(queue, a, b) for a, b in zip(pushes, pops, strict=True)]
    return pairs


def _footprint(insn, cfg):
    """``(reads, writes)``: sets of ``(resource, index)`` the instruction touches."""
    R, C = cfg.array_rows, cfg.array_cols
    entry = {Buffer.INP: R, Buffer.WGT: R * C, Buffer.ACC: C}
    reads, writes = set(), set()
    op = insn.opcode
    if op == Opcode.GEMM:
        reads.add(("wgt", insn.wgt_addr))
        for o in range(insn.outer):
            for i in range(insn.inner):
                reads.add(("inp", insn.inp_addr + o * insn.inp_so + i * insn.inp_si))
                a = insn.acc_addr + o * insn.acc_so + i * insn.acc_si
                writes.add(("acc", a))
                if not insn.reset:
                    reads.add(("acc", a))
    elif op == Opcode.ALU:
        rows = isa.alu_operand_rows(insn.alu_op, insn.use_imm)
        for o in range(insn.outer):
            for i in range(insn.inner):
                d = insn.dst_addr + o * insn.dst_so + i * insn.dst_si
                reads.add(("acc", d))
                writes.add(("acc", d))
                s = insn.src_addr + o * insn.src_so + i * insn.src_si
                reads.update(("acc", s + r) for r in range(rows))
    elif op in (Opcode.LOAD, Opcode.STORE):
        name = {Buffer.INP: "inp", Buffer.WGT: "wgt", Buffer.ACC: "acc"}[insn.buffer]
        total = (insn.y_pad_top + insn.y_size + insn.y_pad_bottom) * (
            insn.x_pad_left + insn.x_size + insn.x_pad_right
        )
        sram = {(name, insn.sram_addr + k) for k in range(total)}
        E = entry[insn.buffer]
        dram = {
            (f"dram{insn.dram_slot}", (insn.dram_addr + y * insn.x_stride) * E + k)
            for y in range(insn.y_size)
            for k in range(insn.x_size * E)
        }
        if op == Opcode.LOAD:
            writes |= sram
            reads |= dram
        else:
            reads |= sram
            writes |= dram
    return reads, writes


def _races(instructions, cfg) -> bool:
    """Whether two instructions of different modules conflict with no happens-before path."""
    n = len(instructions)
    succ = [set() for _ in range(n)]
    last = {}
    for i, insn in enumerate(instructions):
        m = _module(insn)
        if m in last:
            succ[last[m]].add(i)
        last[m] = i
    for _, a, b in _token_pairs(instructions):
        succ[a].add(b)
    indeg = [0] * n
    for s in succ:
        for j in s:
            indeg[j] += 1
    ready = [i for i in range(n) if indeg[i] == 0]
    topo = []
    while ready:
        i = ready.pop()
        topo.append(i)
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    assert len(topo) == n, "token edges form a cycle"
    reach = [0] * n  # bit j set: i happens before j
    for i in reversed(topo):
        for j in succ[i]:
            reach[i] |= (1 << j) | reach[j]
    foot = [_footprint(s, cfg) for s in instructions]
    mods = [_module(s) for s in instructions]
    for a in range(n):
        ra, wa = foot[a]
        for b in range(a + 1, n):
            if mods[a] == mods[b]:
                continue
            rb, wb = foot[b]
            if not (wa & (rb | wb) or wb & ra):
                continue
            if not (reach[a] >> b & 1 or reach[b] >> a & 1):
                return True
    return False


# ---------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def compiled_programs():
    """The programs of a network covering every layer kind, tiled by tiny buffers."""
    cfg = tiny_buffers_config()
    programs = []
    tvm.compile(build_int_network(cfg), "hapm_fpga", relax_pipeline=hapm_pipeline(cfg, programs))
    return programs


def _refused(sim, instructions, dram) -> bool:
    try:
        sim.run(instructions, [d.copy() for d in dram], timing=False)
    except SimulatorError as err:
        assert "hazard" in str(err), err
        return True
    return False


def _dram(prog):
    rng = np.random.default_rng(0)
    return [
        rng.integers(-5, 5, s.dram_elems).astype(s.dtype)
        if s.role != "output"
        else np.zeros(s.dram_elems, s.dtype)
        for s in prog.slots
    ]


def test_dropping_token_pairs_is_refused_exactly_when_it_races(compiled_programs):
    cfg = compiled_programs[0].config
    sim = Simulator(cfg)
    tried = racy = 0
    for prog in compiled_programs:
        dram = _dram(prog)
        assert not _races(prog.instructions, cfg)
        assert not _refused(sim, prog.instructions, dram)
        for queue, a, b in _token_pairs(prog.instructions):
            (_, pf), (_, cf) = _QUEUES[queue]
            insns = list(prog.instructions)
            insns[a] = insns[a].replace(**{pf: 0})
            insns[b] = insns[b].replace(**{cf: 0})
            expected = _races(insns, cfg)
            got = _refused(sim, insns, dram)
            assert got == expected, (prog.layer, queue, a, b, expected)
            tried += 1
            racy += expected
    assert tried >= 30 and 0 < racy, (tried, racy)


def test_race_message_names_both_instructions(compiled_programs):
    prog = min(compiled_programs, key=lambda p: len(p.instructions))
    cfg = prog.config
    for queue, a, b in _token_pairs(prog.instructions):
        (_, pf), (_, cf) = _QUEUES[queue]
        insns = list(prog.instructions)
        insns[a] = insns[a].replace(**{pf: 0})
        insns[b] = insns[b].replace(**{cf: 0})
        if _races(insns, cfg):
            break
    else:
        pytest.fail("no token pair of the program guards a dependency")
    with pytest.raises(SimulatorError, match=r"hazard \(.*\).* instruction \d+ .* instruction \d+"):
        Simulator(cfg).run(insns, _dram(prog), timing=False)


def test_program_leaving_output_unwritten_is_refused(compiled_programs):
    prog = next(p for p in compiled_programs if p.info.get("kind") == "conv2d")
    prog.check_outputs_written()  # the compiled program writes all of it
    stores = [i for i, s in enumerate(prog.instructions) if s.opcode == Opcode.STORE]
    insns = list(prog.instructions)
    k = stores[-1]
    insns[k] = insns[k].replace(x_size=insns[k].x_size - 1)
    assert insns[k].x_size >= 1
    short = Program(prog.layer, prog.config, prog.slots, insns, prog.layer_index, prog.info)
    with pytest.raises(ProgramError, match=r"output slot .* DRAM elements that no STORE writes"):
        short.check_outputs_written()
    # The compiled-model entry point refuses it before running.
    args = [np.frombuffer(short.to_bytes(), np.uint8)] + [
        np.zeros(s.shape, s.dtype) for s in short.slots
    ]
    with pytest.raises(ProgramError, match="no STORE writes"):
        tvm.get_global_func("hapm_fpga.run")(*[tvm.runtime.tensor(a) for a in args])
    # The simulator alone still runs it (the check belongs to the program, not to the ISA).
    run_program(short, Simulator(prog.config), [a for a in args[1:]], timing=False)
