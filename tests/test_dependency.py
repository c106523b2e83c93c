"""The dependency-token pass: tokens exactly where modules share buffer ranges."""

from __future__ import annotations

import numpy as np

from tvm_hapm.runtime import Simulator
from tvm_hapm.target.config import HardwareConfig
from tvm_hapm.target.dependency import insert_dependency_tokens
from tvm_hapm.target.isa import Buffer, Instruction, Opcode

CFG = HardwareConfig(name="dep-test", num_arrays=1, array_rows=2, array_cols=2)


def _load(buf, sram, dram, n=1, slot=0, bits=0):
    return Instruction(
        Opcode.LOAD, buffer=buf, dram_slot=slot, elem_bits_code=bits, sram_addr=sram,
        dram_addr=dram, y_size=1, x_size=n, x_stride=n,
    )  # fmt: skip


def _gemm(inp, wgt, acc, reset=1):
    return Instruction(
        Opcode.GEMM, reset=reset, wgt_addr=wgt, inp_addr=inp, acc_addr=acc, outer=1, inner=1
    )


def _store(acc, dram):
    return Instruction(
        Opcode.STORE, buffer=Buffer.ACC, dram_slot=2, elem_bits_code=2, sram_addr=acc,
        dram_addr=dram, y_size=1, x_size=1, x_stride=1,
    )  # fmt: skip


def _program():
    # two tiles; the second loads into other addresses (double buffered), then one reuse
    return [
        _load(Buffer.INP, 0, 0),
        _load(Buffer.WGT, 0, 0, slot=1),
        _gemm(0, 0, 0),
        _store(0, 0),
        _load(Buffer.INP, 1, 1),  # no conflict with the GEMM above: no token needed
        _gemm(1, 0, 1),
        _store(1, 1),
        _load(Buffer.INP, 0, 2),  # overwrites what the first GEMM read: compute -> load token
        _gemm(0, 0, 0),  # overwrites what the first STORE read: store -> compute token
        _store(0, 2),
    ]


def test_tokens_follow_hazards():
    out = insert_dependency_tokens(_program())
    assert out[-1].opcode == Opcode.FINISH
    loads = [i for i in out if i.opcode == Opcode.LOAD]
    # the third input load waits for compute (write after read), the second does not
    assert loads[3].pop_next == 1 and loads[2].pop_next == 0
    gemms = [i for i in out if i.opcode == Opcode.GEMM]
    assert gemms[0].pop_prev == 1  # read after the loads
    assert gemms[2].pop_next == 1  # write after the store read the same entry
    stores = [i for i in out if i.opcode == Opcode.STORE]
    assert all(s.pop_prev for s in stores)
    pushes = sum(i.push_next + i.push_prev for i in out)
    pops = sum(i.pop_next + i.pop_prev for i in out)
    assert pushes == pops


def test_tokenised_program_runs_and_matches_sequential_semantics():
    rng = np.random.default_rng(0)
    inp = rng.integers(-128, 128, 6).astype(np.int8)
    wgt = rng.integers(-127, 128, 4).astype(np.int8)
    out = np.zeros(6, np.int32)
    Simulator(CFG).run(insert_dependency_tokens(_program()), [inp, wgt, out])
    w = wgt.reshape(2, 2).astype(np.int64)
    expect = [inp[2 * k : 2 * k + 2].astype(np.int64) @ w for k in range(3)]
    np.testing.assert_array_equal(out, np.concatenate(expect))


def test_deterministic():
    assert insert_dependency_tokens(_program()) == insert_dependency_tokens(_program())


def test_push_goes_on_the_last_conflicting_instruction():
    # load A, compute A, load B, compute B, load A: the third load waits for the GEMM that
    # read A (the first), not for the last compute instruction, so it overlaps compute B.
    prog = [
        _load(Buffer.INP, 0, 0),
        _load(Buffer.WGT, 0, 0, slot=1),
        _gemm(0, 0, 0),
        _store(0, 0),
        _load(Buffer.INP, 1, 1),
        _gemm(1, 0, 1),
        _store(1, 1),
        _load(Buffer.INP, 0, 2),
        _gemm(0, 0, 2),
        _store(2, 2),
    ]
    out = insert_dependency_tokens(prog)
    gemms = [k for k, i in enumerate(out) if i.opcode == Opcode.GEMM]
    assert out[gemms[0]].push_prev == 1 and out[gemms[1]].push_prev == 0
    loads = [i for i in out if i.opcode == Opcode.LOAD and i.buffer == Buffer.INP]
    assert [i.pop_next for i in loads] == [0, 0, 1]
    rng = np.random.default_rng(1)
    inp = rng.integers(-128, 128, 6).astype(np.int8)
    wgt = rng.integers(-127, 128, 4).astype(np.int8)
    res = np.zeros(6, np.int32)
    Simulator(CFG).run(out, [inp, wgt, res])
    w = wgt.reshape(2, 2).astype(np.int64)
    expect = [inp[2 * k : 2 * k + 2].astype(np.int64) @ w for k in range(3)]
    np.testing.assert_array_equal(res, np.concatenate(expect))


def test_add_requant_reads_the_multiplier_after_the_bias():
    from tvm_hapm.target.dependency import buffer_accesses
    from tvm_hapm.target.isa import AluOp

    fused = Instruction(
        Opcode.ALU, alu_op=AluOp.ADD_REQUANT, dst_addr=10, src_addr=4, outer=2, inner=3,
        dst_so=3, dst_si=1, imm=8,
    )  # fmt: skip
    assert buffer_accesses(fused) == [
        (Buffer.ACC, 10, 15, True),
        (Buffer.ACC, 10, 15, False),
        (Buffer.ACC, 4, 5, False),  # bias row 4, multiplier row 5
    ]
    add = fused.replace(alu_op=AluOp.ADD)
    assert buffer_accesses(add)[-1] == (Buffer.ACC, 4, 4, False)


def _random_program(rng, n=400):
    """Loads, GEMM runs (some with tokens of their own, some resetting), ALU, stores and
    syncs over small buffers, so that every kind of hazard occurs."""
    out = []
    while len(out) < n:
        kind = rng.integers(5)
        if kind == 0:
            out.append(
                _load(int(rng.integers(2)), int(rng.integers(12)), 0, int(rng.integers(1, 4)))
            )
        elif kind == 1:
            for _ in range(int(rng.integers(1, 40))):
                g = Instruction(
                    Opcode.GEMM, reset=int(rng.integers(2)), wgt_addr=int(rng.integers(8)),
                    inp_addr=int(rng.integers(10)), acc_addr=int(rng.integers(10)),
                    outer=int(rng.integers(1, 3)), inner=int(rng.integers(1, 3)),
                    inp_so=int(rng.integers(3)), inp_si=int(rng.integers(2)),
                    acc_so=int(rng.integers(3)), acc_si=int(rng.integers(2)),
                )  # fmt: skip
                out.append(g.replace(push_next=1) if rng.random() < 0.05 else g)
        elif kind == 2:
            out.append(
                Instruction(Opcode.ALU, alu_op=1, use_imm=1, imm=1, dst_addr=int(rng.integers(12)),
                            outer=1, inner=int(rng.integers(1, 3)), dst_si=1)
            )  # fmt: skip
        elif kind == 3:
            out.append(_store(int(rng.integers(12)), 0))
        else:
            out.append(Instruction(Opcode.SYNC, module=int(rng.integers(3))))
    return out


def test_gemm_runs_as_blocks_give_the_same_tokens(monkeypatch):
    """A long run of GEMMs is tracked as one block: the same output as one GEMM at a time."""
    from tvm_hapm.target import dependency

    rng = np.random.default_rng(7)
    programs = [_random_program(rng) for _ in range(30)]
    blocks = [insert_dependency_tokens(p) for p in programs]
    monkeypatch.setattr(dependency, "GEMM_BLOCK", 10**9)
    assert [insert_dependency_tokens(p) for p in programs] == blocks
    monkeypatch.setattr(dependency, "GEMM_BLOCK", 1)
    assert [insert_dependency_tokens(p) for p in programs] == blocks
