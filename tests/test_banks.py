"""The accumulator banks: array k accumulates into bank k, and the placement pass that moves a
program's accumulator data into the banks (tvm_hapm.target.banks)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_hapm.runtime.simulator import Simulator
from tvm_hapm.target.banks import (
    BankPlacementError,
    acc_bank,
    acc_bank_range,
    acc_fits,
    place_accumulators,
)
from tvm_hapm.target.config import HardwareConfig
from tvm_hapm.target.dependency import insert_dependency_tokens
from tvm_hapm.target.isa import AluOp, Buffer, Instruction, Opcode

# 4 arrays, 64 accumulator entries: banks 0..15, 16..31, 32..47, 48..63
CFG = HardwareConfig(
    name="bank-test", num_arrays=4, array_rows=4, array_cols=4, inp_buffer_bytes=64 * 4,
    wgt_buffer_bytes=16 * 16, acc_buffer_bytes=64 * 16,
)  # fmt: skip


def gemm(acc, n, **kw):
    kw = {"reset": 1, **kw}
    return Instruction(Opcode.GEMM, acc_addr=acc, outer=1, inner=n, inp_si=1, acc_si=1, **kw)


def epilogue(dst, n, rows):
    return Instruction(
        Opcode.ALU, alu_op=AluOp.ADD_REQUANT, dst_addr=dst, src_addr=rows, outer=1, inner=n,
        dst_si=1, imm=8,
    )  # fmt: skip


def store(sram, n):
    return Instruction(
        Opcode.STORE, buffer=Buffer.ACC, sram_addr=sram, y_size=1, x_size=n, x_stride=n
    )


def load_acc(sram, n):
    return Instruction(
        Opcode.LOAD, buffer=Buffer.ACC, sram_addr=sram, elem_bits_code=2, y_size=1, x_size=n,
        x_stride=n,
    )  # fmt: skip


def test_banks_of_the_presets_and_a_remainder():
    assert [acc_bank_range(CFG, k) for k in range(4)] == [(0, 15), (16, 31), (32, 47), (48, 63)]
    assert [acc_bank(CFG, a) for a in (0, 15, 16, 47, 48, 63)] == [0, 0, 1, 2, 3, 3]
    odd = CFG.replace(name="bank-odd", num_arrays=3)  # 64 = 3 x 21 + 1: the last bank is 22
    assert acc_bank_range(odd, 2) == (42, 63) and acc_bank(odd, 63) == 2


def test_placement_by_hand():
    # The code generator's flat layout: bias rows 0..7, then two output blocks of 6 entries
    # (8..13, 14..19), each computed by two GEMMs, its epilogue and its store.
    seq = [load_acc(0, 8)]
    for blk in (8, 14):
        seq += [gemm(blk, 6), gemm(blk, 6, wgt_addr=1)]
    seq += [epilogue(8, 6, 0), store(8, 6), epilogue(14, 6, 2), store(14, 6)]
    out = place_accumulators(seq, CFG)
    # block 8..13 -> bank 0 (0..5), block 14..19 -> bank 1 (16..21); the rows go to the bank
    # with the most room (banks 2 and 3 are empty: the lower one), strides unchanged
    assert [i.acc_addr for i in out if i.opcode == Opcode.GEMM] == [0, 0, 16, 16]
    assert [i.array for i in out if i.opcode == Opcode.GEMM] == [0, 0, 1, 1]
    assert out[0].sram_addr == 32
    alus = [i for i in out if i.opcode == Opcode.ALU]
    assert [(i.dst_addr, i.src_addr) for i in alus] == [(0, 32), (16, 34)]
    assert [i.sram_addr for i in out if i.opcode == Opcode.STORE] == [0, 16]
    for a, b in zip(seq, out, strict=True):  # only addresses (and arrays) change
        fields = ("acc_addr", "sram_addr", "dst_addr", "src_addr", "array")
        assert a.replace(**{f: getattr(b, f) for f in fields}) == b
    # One array: nothing moves.  No GEMM: nothing moves.
    one = CFG.replace(name="bank-one", num_arrays=1)
    assert place_accumulators(seq, one) is seq
    alu_only = [load_acc(0, 40), epilogue(0, 40, 50), store(0, 40)]
    assert place_accumulators(alu_only, CFG) is alu_only


def test_placement_keeps_results():
    """The placed program computes what the flat one does (the simulator on both), and only
    the placed one follows the bank rule."""
    seq = [
        Instruction(Opcode.LOAD, buffer=Buffer.INP, y_size=1, x_size=6, x_stride=6),
        Instruction(Opcode.LOAD, buffer=Buffer.WGT, dram_slot=1, y_size=1, x_size=2, x_stride=2),
        load_acc(0, 4),
    ]
    seq[2] = seq[2].replace(dram_slot=2)
    for k, blk in enumerate((4, 10, 16)):  # three blocks: banks 0, 1, 2
        seq += [gemm(blk, 6, array=k), gemm(blk, 6, wgt_addr=1, reset=0, array=k)]
    seq += [epilogue(4, 6, 0), epilogue(10, 6, 2), epilogue(16, 6, 0)]
    seq += [
        store(blk, 6).replace(dram_slot=3, elem_bits_code=2, dram_addr=6 * k)
        for k, blk in enumerate((4, 10, 16))
    ]
    seq += [Instruction(Opcode.FINISH)]

    def dram():
        r = np.random.default_rng(1)
        return [
            r.integers(-50, 50, 6 * 4).astype(np.int8),
            r.integers(-50, 50, 2 * 16).astype(np.int8),
            np.array([3, 5, -7, 9, 1000, 2000, 3000, 4000] * 2, np.int32),
            np.zeros(18 * 4, np.int32),
        ]

    flat = insert_dependency_tokens(seq)
    with pytest.raises(Exception, match="outside bank"):
        Simulator(CFG).run(flat, dram())
    # the flat stream on a one-bank machine is the reference
    ref = dram()
    Simulator(CFG.replace(name="bank-ref", num_arrays=1)).run(
        [i.replace(array=0) if i.opcode == Opcode.GEMM else i for i in flat], ref
    )
    placed = insert_dependency_tokens(place_accumulators(seq, CFG))
    got = dram()
    Simulator(CFG).run(placed, got)
    np.testing.assert_array_equal(got[3], ref[3])
    assert np.abs(ref[3]).sum() > 0


def test_regions_join_what_touches_them():
    # An epilogue over 10..15 spans both blocks (8..13 and 14..19): they become one region, one
    # bank, one array.
    seq = [gemm(8, 6), gemm(14, 6), epilogue(10, 6, 0)]
    out = place_accumulators(seq, CFG)
    assert [(i.acc_addr, i.array) for i in out[:2]] == [(0, 0), (6, 0)]
    assert out[2].dst_addr == 2  # moved with them
    # A block whose GEMMs cover only part of its region in some tile (an edge tile) keeps the
    # whole region, which its store covers, in one bank.
    seq = [gemm(4, 6), store(4, 12), gemm(16, 12), store(16, 12)]
    out = place_accumulators(seq, CFG)
    assert [(i.acc_addr, i.array) for i in out if i.opcode == Opcode.GEMM] == [(0, 0), (16, 1)]
    assert [i.sram_addr for i in out if i.opcode == Opcode.STORE] == [0, 16]


@settings(max_examples=200, deadline=None)
@given(
    arrays=st.sampled_from([2, 3, 4]),
    regions=st.integers(1, 12),
    size=st.integers(1, 20),
    rows=st.integers(2, 30),  # the epilogue reads a bias and multiplier pair
)
def test_acc_fits_is_exactly_when_placement_succeeds(arrays, regions, size, rows):
    """The planners' capacity test (acc_fits) says yes exactly when place_accumulators can
    place ``regions`` GEMM regions of ``size`` entries and ``rows`` constant rows."""
    cfg = CFG.replace(name=f"bank-fit{arrays}", num_arrays=arrays)
    if rows + regions * size > cfg.acc_depth:
        return  # the flat layout itself overflows: the generators refuse it first
    seq = [load_acc(0, rows)]
    seq += [gemm(rows + k * size, size) for k in range(regions)]
    seq += [epilogue(rows + k * size, size, 0) for k in range(regions)]
    try:
        placed = place_accumulators(seq, cfg)
    except BankPlacementError:
        placed = None
    assert (placed is not None) == bool(acc_fits(cfg, regions, size, rows))
    if placed is not None:
        for insn in placed:
            if insn.opcode == Opcode.GEMM:
                lo, hi = acc_bank_range(cfg, insn.array)
                assert lo <= insn.acc_addr and insn.acc_addr + size - 1 <= hi
