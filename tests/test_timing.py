"""Tests of the cycle-level timing model and the energy model against hand-computed cases.

Every expected cycle count below is worked out by hand from the formulas of ``docs/timing.md``
on a small machine: 2 arrays of 4 x 4, int8, 4 DRAM bytes per cycle, 10 cycles of DRAM latency,
an ALU latency of 4 and a 1-cycle sparsity check.  So, for an instruction starting at ``t``:

* instruction ``i`` starts no earlier than ``i + 2`` (fetch);
* LOAD of ``k`` input vectors (4 bytes: one beat each), without padding: first beat at
  ``t + 1 + 10``, one entry written per cycle after its beat, done 2 cycles after the last
  write: ends at ``t + 13 + k``; a weight block (16 bytes, 4 beats) ends at ``t + 17``;
* STORE of ``k`` int8 accumulator vectors (4 bytes each): first beat at ``t + 3``, the write
  response 10 cycles after the last beat, done 2 cycles later: ends at ``t + 14 + k``;
* GEMM streaming ``T`` vectors: ``2*4 + 4 + 2 + T = 14 + T`` on its array from its issue cycle;
* ALU over ``T`` vectors: ``4 + T``; SYNC and FINISH: 1;
* a compute token that waits for GEMMs is popped from the cycle after the last one ends.

The accelerator's RTL runs the same programs (``test_the_rtl_agrees_instruction_by_instruction``):
its start and end cycles are these, instruction by instruction.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tvm_hapm.runtime.energy import EnergyModel, estimate_energy
from tvm_hapm.runtime.simulator import ExecutionStats, Simulator
from tvm_hapm.runtime.timing import STALL_CAUSES, TimingError, TimingModel
from tvm_hapm.target.config import HardwareConfig
from tvm_hapm.target.isa import AluOp, Buffer, Instruction, Opcode
from tvm_hapm.target.tir import conv2d_program

CFG = HardwareConfig(
    name="timing-test",
    num_arrays=2,
    array_rows=4,
    array_cols=4,
    dram_bytes_per_cycle=4,
    dram_latency_cycles=10,
    dsb_check_cycles=1,
    clock_mhz=100.0,
    inp_buffer_bytes=64 * 4,
    wgt_buffer_bytes=8 * 16,
    acc_buffer_bytes=64 * 16,
)
FINISH = Instruction(Opcode.FINISH)
# the accumulator of the element-wise test: 1024 entries
ELTWISE_CFG = CFG.replace(name="timing-eltwise", acc_buffer_bytes=1024 * 16)


def load(buf, sram, x, *, y=1, pads=(0, 0, 0, 0), bits_code=0, dram=0, **kw):
    top, bottom, left, right = pads
    return Instruction(
        Opcode.LOAD,
        buffer=buf,
        sram_addr=sram,
        dram_addr=dram,
        elem_bits_code=bits_code,
        y_size=y,
        x_size=x,
        x_stride=x,
        y_pad_top=top,
        y_pad_bottom=bottom,
        x_pad_left=left,
        x_pad_right=right,
        **kw,
    )


def store(sram, x, dram=0, **kw):
    return Instruction(
        Opcode.STORE, buffer=Buffer.ACC, sram_addr=sram, dram_addr=dram, y_size=1, x_size=x,
        x_stride=x, **kw,
    )  # fmt: skip


def gemm(inp, acc, *, array=0, outer=1, inner=16, wgt=0, reset=1, **kw):
    return Instruction(
        Opcode.GEMM, array=array, wgt_addr=wgt, inp_addr=inp, acc_addr=acc, outer=outer,
        inner=inner, inp_so=inner, inp_si=1, acc_so=inner, acc_si=1, reset=reset, **kw,
    )  # fmt: skip


def alu(dst, n, **kw):
    return Instruction(
        Opcode.ALU, alu_op=AluOp.RELU, dst_addr=dst, outer=1, inner=n, dst_si=1, **kw
    )


def run(program, cfg=CFG, zero=None):
    return TimingModel(cfg).run(program, zero)


# ------------------------------------------------------------------------- single instructions
def test_one_load():
    # 16 input vectors of 4 int8 = 64 bytes = 16 beats: fetched at 2, 2 + 13 + 16 = 31.  FINISH
    # (fetched at 3) does not wait.
    r = run([load(Buffer.INP, 0, 16), FINISH])
    assert r.start.tolist() == [2, 3] and r.end.tolist() == [31, 4]
    assert r.cycles == 31
    assert r.busy == {"load": 29, "compute": 1, "store": 0}
    assert r.dram_bytes_read == 64 and r.buffer_writes["inp"] == 64
    # With a token the FINISH starts when the load is done.
    r = run([load(Buffer.INP, 0, 16, push_next=1), Instruction(Opcode.FINISH, pop_prev=1)])
    assert r.cycles == 32 and r.stalls["compute_wait_load"] == 31 - 3


def test_padded_load_writes_the_leading_padding_while_the_data_comes():
    # 2 rows of 3 vectors (6 beats) padded by 1 on every side: 4 x 5 = 20 entries on chip, the
    # first 6 of them padding (written at 3..8, before the first beat at 2 + 11 = 13): the first
    # data entry is written at 14, the other 13 entries at one per cycle up to 27, done: 29.
    r = run([load(Buffer.INP, 0, 3, y=2, pads=(1, 1, 1, 1)), FINISH])
    assert r.end[0] == 29 and r.cycles == 29
    assert r.dram_bytes_read == 24 and r.buffer_writes["inp"] == 20 * 4
    # One vector: 2 + 13 + 1.
    assert run([load(Buffer.INP, 0, 1), FINISH]).cycles == 16


def test_one_gemm():
    # outer 3 x inner 5 = 15 vectors: 14 + 15 = 29 cycles from the issue at 2; FINISH: 31..32.
    r = run([gemm(0, 0, outer=3, inner=5), FINISH])
    assert r.start.tolist() == [2, 31] and r.end.tolist() == [31, 32]
    assert r.cycles == 32
    assert r.macs == 15 * 16
    assert r.array_busy.tolist() == [29, 0]
    assert r.stalls["gemm_drain"] == 28  # FINISH was ready at cycle 3 (after the issue cycle)
    assert r.utilisation == pytest.approx(15 * 16 / (32 * 32))
    assert TimingModel(CFG).gemm_cycles(15) == 29


def test_alu_and_sync():
    # ALU over 6 vectors: 2 + 4 + 6 = 12; SYNC 1; FINISH 1: strictly sequential on compute.
    r = run([alu(0, 6), Instruction(Opcode.SYNC, module=1), FINISH])
    assert r.end.tolist() == [12, 13, 14] and r.cycles == 14
    assert r.alu_add_lanes == 6 * 4
    assert TimingModel(CFG, alu_latency=0).run([alu(0, 6), FINISH]).cycles == 9


def test_alu_waits_for_gemms():
    # ALU on the GEMM's accumulators (GEMM 2..32) waits until the array is idle (cycle 32).
    r = run([gemm(0, 0), alu(0, 16), FINISH])
    assert r.start[1] == 32 and r.end[1] == 32 + 4 + 16
    assert r.stalls["gemm_drain"] == 32 - 3
    assert r.cycles == 53


# --------------------------------------------------------------------- load -> compute -> store
def _single_buffered():
    # Tile 2 reuses the input and accumulator regions of tile 1: its LOAD waits until the GEMM
    # of tile 1 has read the inputs, its GEMM until the STORE of tile 1 has read the results.
    return [
        load(Buffer.WGT, 0, 1),  # 0: 16 B: 2..19 (read channel until 17)
        load(Buffer.INP, 0, 16, push_next=1),  # 1: 64 B: 19..48 (first beat 30)
        gemm(0, 0, pop_prev=1, push_prev=1, push_next=1),  # 2: 48..78, tokens from 79
        load(Buffer.INP, 0, 16, pop_next=1, push_next=1),  # 3: 79..108
        store(0, 16, pop_prev=1, push_prev=1),  # 4: 79..109 (write channel)
        gemm(0, 0, pop_prev=1, pop_next=1, push_next=1),  # 5: 109..139, token from 140
        store(0, 16, pop_prev=1, push_prev=1),  # 6: 140..170
        Instruction(Opcode.FINISH, pop_next=1),  # 7: 170..171
    ]


def _double_buffered():
    # Tile 2 uses the other half of the input and accumulator buffers: its load overlaps the
    # GEMM of tile 1.
    return [
        load(Buffer.WGT, 0, 1),  # 0: 2..19
        load(Buffer.INP, 0, 16, push_next=1),  # 1: 19..48
        load(Buffer.INP, 16, 16, push_next=1),  # 2: 48..77 (during GEMM 3)
        gemm(0, 0, pop_prev=1, push_next=1),  # 3: 48..78, token from 79
        gemm(16, 16, pop_prev=1, push_next=1),  # 4: ready 77, array 0 busy until 78: 78..108
        store(0, 16, pop_prev=1),  # 5: 79..109
        store(16, 16, pop_prev=1, push_prev=1),  # 6: 109..139
        Instruction(Opcode.FINISH, pop_next=1),  # 7: 139..140
    ]


def test_chain_single_buffered():
    r = run(_single_buffered())
    assert r.start.tolist() == [2, 19, 48, 79, 79, 109, 140, 170]
    assert r.end.tolist() == [19, 48, 78, 108, 109, 139, 170, 171]
    assert r.cycles == 171
    assert r.stalls == {
        "compute_wait_load": 44 + 59,  # GEMM 2 waits 4..48, GEMM 5 49..108
        "compute_wait_store": 1 + 60,  # GEMM 5 108..109, FINISH 110..170
        "load_wait_compute": 31,  # LOAD 3 48..79
        "store_wait_compute": 73 + 31,  # STORE 4 6..79, STORE 6 109..140
        "array_busy": 0,
        "gemm_drain": 0,
        "dram_port": 0,  # the loads never meet on the read channel; STOREs write
    }
    assert r.busy == {"load": 17 + 29 + 29, "compute": 3, "store": 30 + 30}


def test_chain_double_buffered_is_faster():
    r = run(_double_buffered())
    assert r.start.tolist() == [2, 19, 48, 48, 78, 79, 109, 139]
    assert r.end.tolist() == [19, 48, 77, 78, 108, 109, 139, 140]
    assert r.cycles == 140 < run(_single_buffered()).cycles == 171
    assert r.stalls["array_busy"] == 1  # GEMM 4 ready at 77, array 0 free at 78
    assert r.stalls["load_wait_compute"] == 0
    # The load of tile 2 runs while tile 1 computes.
    assert r.start[2] < r.end[3] and r.start[3] < r.end[2]


def test_double_buffered_with_tokens_inserted():
    from tvm_hapm.target.dependency import insert_dependency_tokens

    # The same two tiles written sequentially, software-pipelined (tile 2 is loaded before tile 1
    # is stored); the token inserter finds the same synchronisation and the same 140 cycles.
    plain = [
        i.replace(pop_prev=0, pop_next=0, push_prev=0, push_next=0) for i in _double_buffered()
    ]
    ldw, ld1, ld2, g1, g2, st1, st2, _ = plain
    r = run(insert_dependency_tokens([ldw, ld1, g1, ld2, st1, g2, st2]))
    assert r.cycles == 140


def test_token_stall_is_counted():
    # GEMM (fetched at 3) pops the load's token: it cannot start before the load's end (31).
    r = run([load(Buffer.INP, 0, 16, push_next=1), gemm(0, 0, pop_prev=1), FINISH])
    assert r.start[1] == 31 and r.end[1] == 31 + 30
    assert r.stalls["compute_wait_load"] == 31 - 3
    assert r.cycles == 31 + 30 + 1
    assert r.stall_cycles == sum(r.stalls.values())
    assert set(r.stalls) == set(STALL_CAUSES)


def test_compute_token_waits_for_all_gemms():
    # GEMM on array 0 streams 30 vectors (44 cycles: 2..46); the GEMM on array 1 (5 vectors, 19
    # cycles: 3..22) pushes to the store, which must wait for both: from 47.
    prog = [
        gemm(0, 0, array=0, inner=30),
        gemm(0, 32, array=1, inner=5, push_next=1),
        store(32, 5, pop_prev=1),
        FINISH,
    ]
    r = run(prog)
    assert r.end[:2].tolist() == [46, 22]
    assert r.start[2] == 47 and r.stalls["store_wait_compute"] == 47 - 4


# ------------------------------------------------------------------------------ sparsity bypass
def _zero_weight_program(reset=0):
    return [load(Buffer.WGT, 0, 1, push_next=1), gemm(0, 0, pop_prev=1, reset=reset), FINISH]


def test_dsb_skips_an_all_zero_block():
    prog = _zero_weight_program()
    on = run(prog, zero=[False, True, False])
    # load 2..19; GEMM 19..21 (issue and 1-cycle check); FINISH 21..22.
    assert on.end.tolist() == [19, 21, 22] and on.cycles == 22
    assert on.macs == 0 and on.macs_skipped == 16 * 16 and on.gemms_skipped == 1
    # Per-GEMM flags give the same result as per-instruction flags.
    assert run(prog, zero=[True]).cycles == 22
    # A reset GEMM still zeroes its 16 accumulators: 19..37.
    assert run(_zero_weight_program(reset=1), zero=[True]).cycles == 19 + 2 + 16 + 1
    # Disabled: the full 14 + 16 = 30 cycles and the MACs are done.
    off = run(prog, cfg=CFG.replace(dsb_enabled=False), zero=[False, True, False])
    assert off.end.tolist() == [19, 49, 50] and off.cycles == 50
    assert off.macs == 256 and off.gemms_skipped == 0
    # A non-zero block is never skipped.
    assert run(prog, zero=[False, False, False]).cycles == 50
    assert run(prog, cfg=CFG.replace(dsb_check_cycles=5), zero=[True]).cycles == 19 + 6 + 1


def test_zero_flag_count_checked():
    with pytest.raises(TimingError, match="one per GEMM"):
        run(_zero_weight_program(), zero=[True, True])


# ------------------------------------------------------------------------------ parallel arrays
def test_gemms_on_different_arrays_overlap():
    # array 0: 2..32, array 1: issued at 3, 3..33; FINISH drains: 33..34.
    r = run([gemm(0, 0, array=0), gemm(16, 16, array=1), FINISH])
    assert r.start.tolist() == [2, 3, 33] and r.end.tolist() == [32, 33, 34]
    assert r.cycles == 34 and r.stalls["array_busy"] == 0
    assert r.array_busy.tolist() == [30, 30]


def test_each_array_accumulates_into_its_own_bank():
    # CFG's 64 accumulator entries are two banks, 0..31 (array 0) and 32..63 (array 1).  GEMMs
    # into 0..15 on array 0 (2..32) and into 32..47 on array 1 (3..33) overlap: FINISH 33..34.
    r = run([gemm(0, 0, array=0), gemm(16, 32, array=1), FINISH])
    assert r.start.tolist() == [2, 3, 33] and r.end.tolist() == [32, 33, 34] and r.cycles == 34
    # Two GEMMs on array 0 (into its bank) serialise: the second is ready at 3 (after the first
    # one's issue cycle), waits for the array until 32, runs 32..62; FINISH drains 62..63.
    r = run([gemm(0, 0, array=0), gemm(16, 16, array=0), FINISH])
    assert r.start.tolist() == [2, 32, 62] and r.end.tolist() == [32, 62, 63]
    assert r.cycles == 63 and r.stalls["array_busy"] == 29


def test_alu_waits_for_the_bank_it_writes_and_the_gemms_it_reads():
    # Array 0 writes 0..15 (2..32), array 1 writes 32..47 (3..33).  An ALU writes its
    # destination through its bank's port, which the bank's array holds while it runs: on
    # 16..31 (bank 0, no GEMM entry) it waits for array 0 only, 32..52 (4 + 16 cycles); on
    # 48..63 for array 1 only, 33..53; on 24..39 (both banks) for both, 33..53.
    two = [gemm(0, 0, array=0), gemm(16, 32, array=1)]
    for dst, start in ((16, 32), (48, 33), (24, 33)):
        r = run([*two, alu(dst, 16), FINISH])
        assert r.start[2] == start and r.end[2] == start + 20
        assert r.stalls["gemm_drain"] == start - 4
    # With array 1 idle, an ALU on bank 1 starts right after the GEMM's issue cycle: 3..23;
    # FINISH (fetched at 4) waits for array 0 from 23 to 32: 32..33.
    one = [gemm(0, 0, array=0)]
    r = run([*one, alu(32, 16), FINISH])
    assert r.start[1] == 3 and r.end[1] == 23 and r.stalls["gemm_drain"] == 9
    assert r.cycles == 33
    # An operand only read waits for the GEMM that writes it: ADD of 0..15 into 48..63 waits
    # for array 0 (32..52); ADD of 16..31 (bank 0, no GEMM entry) does not (3..23).
    add = Instruction(
        Opcode.ALU, alu_op=AluOp.ADD, dst_addr=48, src_addr=0, outer=1, inner=16, dst_si=1,
        src_si=1,
    )  # fmt: skip
    r = run([*one, add, FINISH])
    assert r.start[1] == 32 and r.end[1] == 52
    assert run([*one, add.replace(src_addr=16), FINISH]).start[1] == 3
    # The same ADD with an immediate reads no operand: 3..23.
    imm = add.replace(use_imm=1, imm=3)
    assert run([*one, imm, FINISH]).start[1] == 3
    # ADD_REQUANT with its bias in entry 15 waits for array 0 (32); with the bias in 16 it
    # reads 16..17 (the multiplier after the bias) and does not wait (3).
    fused = add.replace(alu_op=AluOp.ADD_REQUANT, src_addr=15, src_si=0, imm=8)
    assert run([*one, fused, FINISH]).start[1] == 32
    fused = fused.replace(src_addr=16)
    r = run([*one, fused, FINISH])
    assert r.start[1] == 3 and r.end[1] == 3 + 4 + 16
    # one pass: a 32-bit add and multiply per lane; destination read and written, bias and
    # multiplier read (16 vectors of 4 lanes of 4 bytes)
    r = run([fused, FINISH])
    assert r.alu_add_lanes == r.alu_mul_lanes == 16 * 4
    assert r.buffer_reads["acc"] == 3 * 16 * 16 and r.buffer_writes["acc"] == 16 * 16


def test_accumulator_load_waits_only_for_the_banks_of_busy_arrays():
    # A LOAD into acc entries 40..43 (bank 1; 4 int32 vectors of 16 bytes, 4 beats each) after
    # a GEMM on array 0 into 0..15 (2..32) starts at 3 (after the issue cycle): first beat at
    # 14, an entry written after its 4 beats (18, 22, 26, 30), done: 3..32.  Into 12..15 or
    # 20..23 (bank 0: array 0 holds its write port): after the GEMM, 32..61.
    far = load(Buffer.ACC, 40, 4, bits_code=2)
    r = run([gemm(0, 0, array=0), far, FINISH])
    assert r.start[1] == 3 and r.end[1] == 32 and r.cycles == 33
    for sram in (12, 20):
        near = load(Buffer.ACC, sram, 4, bits_code=2)
        r = run([gemm(0, 0, array=0), near, FINISH])
        assert r.start[1] == 32 and r.end[1] == 61 and r.stalls["gemm_drain"] == 29


def test_gemms_on_the_same_array_serialise():
    r = run([gemm(0, 0, array=0), gemm(16, 16, array=0), FINISH])
    assert r.start.tolist() == [2, 32, 62] and r.end.tolist() == [32, 62, 63]
    assert r.cycles == 63 and r.stalls["array_busy"] == 29
    assert r.busy["compute"] == 3  # two issue cycles and FINISH


# ------------------------------------------------------------------------------ properties
def test_deterministic():
    a, b = run(_single_buffered()), run(_single_buffered())
    assert a.cycles == b.cycles and a.to_dict() == b.to_dict()
    assert np.array_equal(a.start, b.start) and np.array_equal(a.end, b.end)


def test_latency_is_cycles_over_clock():
    r = run(_single_buffered())
    assert r.latency_ms == pytest.approx(171 / 100.0 / 1e3)
    r2 = run(_single_buffered(), cfg=CFG.replace(clock_mhz=250.0))
    assert r2.cycles == 171 and r2.latency_ms == pytest.approx(171 / 250.0 / 1e3)


def test_roofline():
    r = run(_single_buffered())
    # 2 GEMMs x 16 vectors x 16 MACs = 512 MACs / 32 per cycle = 16; DRAM 16 + 128 + 128 = 272
    # bytes / 4 = 68 cycles: memory bound, 68 / 171.
    assert r.macs == 512 and r.dram_bytes == 272
    assert r.roofline_cycles == 68
    assert r.roofline_fraction == pytest.approx(68 / 171)
    assert r.utilisation == pytest.approx(512 / (32 * 171))


def test_deadlock_and_illegal_flags_refused():
    with pytest.raises(TimingError, match="deadlock"):
        run([gemm(0, 0, pop_prev=1), FINISH])
    with pytest.raises(TimingError, match="no previous module"):
        run([load(Buffer.INP, 0, 1, pop_prev=1), FINISH])


def _conv_program(cfg):
    rng = np.random.default_rng(0)
    w = rng.integers(-3, 4, (16, 12, 3, 3)).astype(np.int8)
    w[:8, :8] = 0  # one output-channel block loses its first input-channel block
    prog, consts = conv2d_program(
        cfg, "conv", (1, 12, 10, 9), w, np.arange(16), np.full(16, 3), 6, (-128, 127),
        padding=(1, 1, 1, 1),
    )  # fmt: skip
    x = rng.integers(-128, 128, (1, 12, 10, 9)).astype(np.int8)
    return prog, consts, x


def test_codegen_program_is_consistent():
    cfg = HardwareConfig(name="tt", num_arrays=2, array_rows=8, array_cols=8)
    prog, _, _ = _conv_program(cfg)
    r = TimingModel(cfg).run(prog.instructions)
    assert 0 < r.roofline_fraction <= 1 and 0 < r.utilisation <= 1
    assert np.all(r.start <= r.end) and r.cycles == r.end.max()
    assert r.macs == sum(
        8 * 8 * i.outer * i.inner for i in prog.instructions if i.opcode == Opcode.GEMM
    )
    assert all(v >= 0 for v in r.stalls.values())
    for m, busy in r.busy.items():
        assert busy <= r.cycles, m
    assert max(r.array_busy) <= r.cycles


def test_double_buffered_add_by_hand():
    # 512 entries of 4 lanes, accumulator of 1024 entries: three double-buffered tiles of 171,
    # 171 and 170 entries (a at 0 / 171, b at 342 / 513).  A LOAD of t int8 entries (one beat
    # each): 13 + t; an ALU pass: 4 + t; a STORE: 14 + t.  The loads run on the compute module:
    #   La0 2..186, Lb0 ..370, MUL a ..545, MUL b ..720, ADD ..895,
    #   La1 ..1079, Lb1 ..1263 (moved up into tile 0), SHR ..1438, MAX ..1613, MIN ..1788,
    #   St0 1788..1973 while tile 1 computes: MUL a 1788..1963, MUL b ..2138, ADD ..2313,
    #   La2 ..2496, Lb2 ..2679, SHR ..2854, MAX ..3029, MIN ..3204, St1 3204..3389,
    #   tile 2 (170): MUL a 3204..3378, ..., MIN ..4248, St2 4248..4432, FINISH 4432..4433.
    # Single buffered (one tile of 512): 2 + 2 * 525 + 6 * 516 + 526 + 1 = 4675.
    from tvm_hapm.runtime.driver import run_program
    from tvm_hapm.target.schedule import estimate_eltwise_cycles
    from tvm_hapm.target.tir import add_program

    cfg = ELTWISE_CFG
    shape = (1, 4, 16, 32)
    prog, _ = add_program(cfg, "add", shape, 3, -5, 2, (-100, 100))
    assert prog.info["schedule"] == {"tile": 171, "double_buffer": True}
    r = run(prog.instructions, cfg)
    insns = prog.instructions
    ops = [(i.opcode, i.alu_op if i.opcode == Opcode.ALU else None) for i in insns]
    loads = [k for k, (op, _) in enumerate(ops) if op == Opcode.LOAD]
    alus = [k for k, (op, _) in enumerate(ops) if op == Opcode.ALU]
    stores = [k for k, (op, _) in enumerate(ops) if op == Opcode.STORE]
    assert [insns[k].sram_addr for k in loads] == [0, 342, 171, 513, 0, 342]
    assert r.start[loads].tolist() == [2, 186, 895, 1079, 2313, 2496]
    assert r.end[alus].tolist() == [
        545, 720, 895, 1438, 1613, 1788,  # tile 0
        1963, 2138, 2313, 2854, 3029, 3204,  # tile 1
        *(3204 + 174 * j for j in range(1, 7)),  # tile 2
    ]  # fmt: skip
    assert r.start[stores].tolist() == [1788, 3204, 4248]
    assert r.end[stores].tolist() == [1973, 3389, 4432]
    assert r.cycles == 4433 == estimate_eltwise_cycles(cfg, 512, 171, 2, 6, True) + 1
    assert estimate_eltwise_cycles(cfg, 512, 512, 2, 6, False) + 1 == 4675
    # the loads of tile 1 start before tile 0's ALU work ends; its store overlaps tile 1's ALU
    assert r.start[loads[2]] < r.end[alus[5]]
    assert r.start[stores[0]] < r.end[alus[6]] and r.start[alus[6]] < r.end[stores[0]]
    # the store module waits for each tile's MIN (from its fetch, then after each store);
    # compute waits for a store only at FINISH
    assert r.stalls["store_wait_compute"] == (1788 - (stores[0] + 2)) + (3204 - 1973) + (
        4248 - 3389
    )
    assert r.stalls["compute_wait_store"] == 4432 - 4248
    # and it computes the add (tokens valid on the functional simulator)
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, shape).astype(np.int8)
    b = rng.integers(-128, 128, shape).astype(np.int8)
    y, stats = run_program(prog, Simulator(cfg), [a, b, np.zeros(shape, np.int8)])
    ref = np.clip((a.astype(np.int64) * 3 - b.astype(np.int64) * 5 + 2) >> 2, -100, 100)
    np.testing.assert_array_equal(y, ref)
    assert stats.cycles == 4433


# ------------------------------------------------------------------------------ energy
def test_energy_of_one_load_by_hand():
    r = run([load(Buffer.INP, 0, 16), FINISH])
    e = EnergyModel(CFG).estimate(r)
    # 64 DRAM bytes at 2000 pJ / 8 B; 64 bytes written into a 256-byte input buffer (below 8 KB:
    # the 8 KB figure, 10 pJ / 8 B); static 50 + 0.25 * 32 = 58 mW for 31 cycles at 100 MHz.
    assert e.dram_uj == pytest.approx(64 * 250e-6)
    assert e.inp_uj == pytest.approx(64 * 10 / 8 * 1e-6)
    assert e.mac_uj == 0 and e.wgt_uj == 0 and e.acc_uj == 0
    assert e.static_uj == pytest.approx(58 * 31 / 100 / 1e3)
    assert e.total_uj == pytest.approx(e.dram_uj + e.inp_uj + e.static_uj)


def test_energy_increases_with_dram_bytes():
    small = run([load(Buffer.INP, 0, 16), FINISH])
    big = run([load(Buffer.INP, 0, 32), FINISH])
    es, eb = estimate_energy(CFG, small), estimate_energy(CFG, big)
    assert big.dram_bytes == 2 * small.dram_bytes
    assert eb.dram_uj == pytest.approx(2 * es.dram_uj)
    assert eb.total_uj > es.total_uj


def test_energy_of_macs_and_widths():
    r = run([gemm(0, 0), FINISH])
    assert EnergyModel(CFG).mac_pj == pytest.approx(0.3)  # 0.2 multiply + 0.1 add
    assert EnergyModel(CFG).estimate(r).mac_uj == pytest.approx(256 * 0.3e-6)
    wide = CFG.replace(
        act_bits=16, weight_bits=16, inp_buffer_bytes=64 * 8, wgt_buffer_bytes=8 * 32
    )
    assert EnergyModel(wide).mac_pj == pytest.approx(0.8 + 0.1)


def test_energy_overrides_and_sram_interpolation():
    m = EnergyModel(CFG)
    assert m.sram_pj_per_64bit(8 * 1024) == pytest.approx(10)
    assert m.sram_pj_per_64bit(32 * 1024) == pytest.approx(20)
    assert m.sram_pj_per_64bit(1024 * 1024) == pytest.approx(100)
    assert m.sram_pj_per_64bit(16 * 1024) == pytest.approx(15)  # halfway in log2 size
    assert m.sram_pj_per_64bit(128 * 1024) == pytest.approx(20 + 80 * 2 / 5)
    assert m.sram_pj_per_64bit(1024) == pytest.approx(10)  # clamped below 8 KB
    assert m.sram_pj_per_64bit(2 * 1024 * 1024) == pytest.approx(116)  # extrapolated
    cfg = CFG.replace(energy={"dram_64b": 1300.0, "static_mw": 0})
    r = run([load(Buffer.INP, 0, 16), FINISH], cfg=cfg)
    e = EnergyModel(cfg).estimate(r)
    assert e.dram_uj == pytest.approx(64 * 1300 / 8 * 1e-6) and e.static_uj == 0
    with pytest.raises(ValueError, match="unknown energy key"):
        CFG.replace(energy={"dram": 1.0})
    assert math.isclose(EnergyModel.default_static_mw(CFG), 58.0)


# ------------------------------------------------------------------------------ simulator hook
def test_simulator_timing_option():
    cfg = HardwareConfig(name="tt", num_arrays=2, array_rows=8, array_cols=8)
    prog, consts, x = _conv_program(cfg)
    from tvm_hapm.runtime.driver import run_program

    sim = Simulator(cfg)
    out_plain, plain = run_program(
        prog, sim, [x, *consts, np.zeros((1, 16, 10, 9), np.int8)], timing=False
    )
    assert plain.cycles == 0 and plain.energy_uj == 0 and sim.last_timing is None

    dram = [np.ascontiguousarray(a).reshape(-1) for a in consts]
    from tvm_hapm.target.program import pack_activation

    dram = [pack_activation(x, 8).reshape(-1), *dram, np.zeros(prog.slots[-1].dram_elems, np.int8)]
    stats = sim.run(prog.instructions, dram, layer="conv", timing=True)
    ref = TimingModel(cfg).run(prog.instructions)  # codegen drops zero blocks: nothing to skip
    assert stats.cycles == ref.cycles > 0
    assert stats.latency_ms == pytest.approx(ref.cycles / cfg.clock_mhz / 1e3)
    assert stats.stall_cycles == ref.stall_cycles and stats.stalls == ref.stalls
    assert stats.utilisation == pytest.approx(ref.utilisation)
    assert stats.roofline_fraction == pytest.approx(ref.roofline_fraction)
    assert stats.energy_uj == pytest.approx(EnergyModel(cfg).estimate(ref).total_uj)
    assert sim.last_timing.cycles == stats.cycles
    # The functional counts are unchanged by the option.
    assert (stats.macs, stats.dram_bytes, stats.by_opcode) == (
        plain.macs,
        plain.dram_bytes,
        plain.by_opcode,
    )
    # Sequential layers: cycles, latency and energy add up; ratios are cycle-weighted.
    total = ExecutionStats.total([stats, stats, ExecutionStats(layer="host")])
    assert total.cycles == 2 * stats.cycles
    assert total.latency_ms == pytest.approx(2 * stats.latency_ms)
    assert total.energy_uj == pytest.approx(2 * stats.energy_uj)
    assert total.stalls["dram_port"] == 2 * stats.stalls["dram_port"]
    assert total.utilisation == pytest.approx(stats.utilisation)
    assert total.roofline_fraction == pytest.approx(stats.roofline_fraction)
    d = total.to_dict()
    assert d["cycles"] == total.cycles and "energy_uj" in d


def test_simulator_records_zero_weight_blocks():
    # Weights and inputs come from one slot; the weight block is its first 16 elements.
    prog = [
        load(Buffer.WGT, 0, 1),
        load(Buffer.INP, 0, 16, push_next=1),
        gemm(0, 0, pop_prev=1),
        FINISH,
    ]
    sim = Simulator(CFG)
    stats = sim.run(prog, [np.zeros(64, np.int8)], timing=True)
    assert sim.last_timing.gemms_skipped == 1 and stats.cycles == sim.last_timing.cycles
    # loads 2..48; the reset GEMM: issue, 1-cycle check, 16 accumulators zeroed; FINISH
    assert stats.cycles == 48 + 2 + 16 + 1
    # Non-zero weights: the full GEMM.
    stats2 = sim.run(prog, [np.ones(64, np.int8)], timing=True)
    assert sim.last_timing.gemms_skipped == 0 and stats2.cycles == 48 + 30 + 1
    # Without the bypass the zero block costs the full GEMM too.
    sim_off = Simulator(CFG.replace(dsb_enabled=False))
    assert sim_off.run(prog, [np.zeros(64, np.int8)], timing=True).cycles == stats2.cycles


# ------------------------------------------------------------------------------ the RTL
def _rtl_cases():
    """name -> (program, config, DRAM byte value, zero-weight flags of the model run)."""
    two = [gemm(0, 0, array=0), gemm(16, 32, array=1)]  # one GEMM in each bank
    add = Instruction(
        Opcode.ALU, alu_op=AluOp.ADD, dst_addr=48, src_addr=0, outer=1, inner=16, dst_si=1,
        src_si=1,
    )  # fmt: skip
    fused = add.replace(alu_op=AluOp.ADD_REQUANT, src_addr=16, src_si=0, imm=8)
    from tvm_hapm.target.dependency import insert_dependency_tokens
    from tvm_hapm.target.tir import add_program

    eltwise, _ = add_program(ELTWISE_CFG, "add", (1, 4, 16, 32), 3, -5, 2, (-100, 100))
    cases = {
        "one_load": [load(Buffer.INP, 0, 16), FINISH],
        "load_token": [
            load(Buffer.INP, 0, 16, push_next=1), Instruction(Opcode.FINISH, pop_prev=1)
        ],
        "padded_load": [load(Buffer.INP, 0, 3, y=2, pads=(1, 1, 1, 1)), FINISH],
        "one_gemm": [gemm(0, 0, outer=3, inner=5), FINISH],
        "alu_sync": [alu(0, 6), Instruction(Opcode.SYNC, module=1), FINISH],
        "alu_after_gemm": [gemm(0, 0), alu(0, 16), FINISH],
        "single_buffered": _single_buffered(),
        "double_buffered": _double_buffered(),
        "token_stall": [load(Buffer.INP, 0, 16, push_next=1), gemm(0, 0, pop_prev=1), FINISH],
        "token_waits_for_gemms": [
            gemm(0, 0, array=0, inner=30), gemm(0, 32, array=1, inner=5, push_next=1),
            store(32, 5, pop_prev=1), FINISH,
        ],
        "arrays_overlap": [*two, FINISH],
        "same_array": [gemm(0, 0, array=0), gemm(16, 16, array=0), FINISH],
        "alu_busy_bank": [*two, alu(16, 16), FINISH],
        "alu_free_bank": [gemm(0, 0, array=0), alu(32, 16), FINISH],
        "alu_on_both": [*two, alu(24, 16), FINISH],
        "alu_operand": [gemm(0, 0, array=0), add, FINISH],
        "alu_operand_free": [gemm(0, 0, array=0), add.replace(src_addr=16), FINISH],
        "add_requant": [gemm(0, 0, array=0), fused, FINISH],
        "add_requant_waits": [gemm(0, 0, array=0), fused.replace(src_addr=15), FINISH],
        "acc_load_bank": [gemm(0, 0, array=0), load(Buffer.ACC, 20, 4, bits_code=2), FINISH],
        "acc_load_far": [gemm(0, 0, array=0), load(Buffer.ACC, 40, 4, bits_code=2), FINISH],
        "acc_load_near": [gemm(0, 0, array=0), load(Buffer.ACC, 12, 4, bits_code=2), FINISH],
        "eltwise_add": eltwise.instructions,
    }  # fmt: skip
    out = {}
    for name, prog in cases.items():
        cfg = ELTWISE_CFG if name == "eltwise_add" else CFG
        gemms = sum(i.opcode == Opcode.GEMM for i in prog)
        if gemms and not any(i.opcode == Opcode.LOAD and i.buffer == Buffer.WGT for i in prog):
            # no weight LOAD: the weight buffer is zero, the bypass skips every GEMM (resetting
            # their accumulators); with one, the GEMMs run in full
            out[name] = (prog, cfg, 1, [True] * gemms)
            weighted = insert_dependency_tokens([load(Buffer.WGT, 0, 1), *prog])
            out[name + "+weights"] = (weighted, cfg, 1, None)
        else:
            out[name] = (prog, cfg, 1, None)
    # an all-zero DRAM: the weight block is zero and the bypass skips (or still resets)
    out["bypass"] = (_zero_weight_program(), CFG, 0, [True])
    out["bypass_reset"] = (_zero_weight_program(reset=1), CFG, 0, [True])
    out["bypass_check_5"] = (_zero_weight_program(), CFG.replace(dsb_check_cycles=5), 0, [True])
    out["no_bypass"] = (_zero_weight_program(), CFG.replace(dsb_enabled=False), 0, [True])
    return out


@pytest.fixture(scope="module")
def rtl_of():
    """``rtl_of(config)``: one RTL simulator per config for the module."""
    from tvm_hapm.rtl import RtlSimulator

    sims = {}
    return lambda cfg: sims.setdefault(cfg.to_json(), RtlSimulator(cfg))


@pytest.mark.parametrize("name", sorted(_rtl_cases()))
def test_the_rtl_agrees_instruction_by_instruction(rtl_of, name):
    """The programs above on the accelerator's RTL (Verilator): the same cycle count, and every
    instruction starts and ends in the same cycle as in the model."""
    program, cfg, fill, zero = _rtl_cases()[name]
    rtl = rtl_of(cfg).run(program, [np.full(4096, fill, np.int8) for _ in range(3)])
    model = run(program, cfg, zero)
    assert rtl.cycles == model.cycles
    np.testing.assert_array_equal(rtl.start, model.start)
    np.testing.assert_array_equal(rtl.end, model.end)
