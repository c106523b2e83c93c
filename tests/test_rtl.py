"""The RTL against the Python simulator: every opcode and ALU op, padding, strides, tokens, the
bypass, and programs the compiler generates for random layers, bit for bit (Verilator).

The README's test command installs Verilator (Debian's ``verilator``); without it these tests
fail with the message saying so, they are not skipped.
"""

import numpy as np
import pytest

from tvm_hapm.rtl import RtlError, RtlSimulator, cosimulate
from tvm_hapm.rtl.params import RtlConfigError, check_config, config_header
from tvm_hapm.runtime.driver import pack_dram
from tvm_hapm.runtime.simulator import Simulator
from tvm_hapm.target import tir
from tvm_hapm.target.config import HardwareConfig, get_config
from tvm_hapm.target.dependency import insert_dependency_tokens
from tvm_hapm.target.isa import AluOp, Buffer, Instruction, Opcode
from tvm_hapm.testing import prune_random_blocks

ZED = get_config("zedboard")
# A 16-bit machine with two 4 x 4 arrays (the int16 configuration of the issue) and small buffers.
INT16 = HardwareConfig(
    name="rtl-int16", num_arrays=2, array_rows=4, array_cols=4, weight_bits=16, act_bits=16,
    inp_buffer_bytes=8 * 1024, wgt_buffer_bytes=8 * 1024, acc_buffer_bytes=8 * 1024,
    dram_bytes_per_cycle=4, dram_latency_cycles=7,
)  # fmt: skip


@pytest.fixture(scope="module")
def rtl():
    return {cfg.name: RtlSimulator(cfg) for cfg in (ZED, INT16)}


def run_both(rtl, cfg, body, dram, tokens=True):
    """Run ``body`` (+ tokens and FINISH) on both; assert bit-exact; return the result."""
    program = insert_dependency_tokens(body) if tokens else body
    Simulator(cfg).validate(program, dram)  # only valid programs are compared
    result = cosimulate(program, dram, config=cfg, rtl=rtl[cfg.name])
    assert result.bit_exact, result.mismatches
    return result


def load(buffer, slot, sram, dram_addr, y, x, stride, code=0, pads=(0, 0, 0, 0), pad_min=0):
    top, bottom, left, right = pads
    return Instruction(
        Opcode.LOAD, buffer=buffer, dram_slot=slot, elem_bits_code=code, sram_addr=sram,
        dram_addr=dram_addr, y_size=y, x_size=x, x_stride=stride, y_pad_top=top,
        y_pad_bottom=bottom, x_pad_left=left, x_pad_right=right, pad_min=pad_min,
    )  # fmt: skip


def store(slot, sram, dram_addr, y, x, stride, code=2):
    return Instruction(
        Opcode.STORE, buffer=Buffer.ACC, dram_slot=slot, elem_bits_code=code, sram_addr=sram,
        dram_addr=dram_addr, y_size=y, x_size=x, x_stride=stride,
    )  # fmt: skip


def alu(op, dst, src, outer, inner, dso, dsi, sso, ssi, imm=0, use_imm=0):
    return Instruction(
        Opcode.ALU, alu_op=op, use_imm=use_imm, imm=imm, dst_addr=dst, src_addr=src,
        outer=outer, inner=inner, dst_so=dso, dst_si=dsi, src_so=sso, src_si=ssi,
    )  # fmt: skip


def gemm(array, wgt, inp, acc, outer, inner, iso, isi, aso, asi, reset=1):
    return Instruction(
        Opcode.GEMM, reset=reset, array=array, wgt_addr=wgt, inp_addr=inp, acc_addr=acc,
        outer=outer, inner=inner, inp_so=iso, inp_si=isi, acc_so=aso, acc_si=asi,
    )  # fmt: skip


def test_config_header_derives_every_constant():
    text = config_header(ZED)
    assert "`define HAPM_R 8" in text and "`define HAPM_A 4" in text
    assert "`define HAPM_ACC_DEPTH 2048" in text
    assert f"`define HAPM_ALU_ADD_REQUANT {int(AluOp.ADD_REQUANT)}" in text
    assert "`define HAPM_MEM_SRAM_ADDR_LO 16" in text  # docs/isa.md: bits 16-33
    assert config_header(ZED) == text  # deterministic


def test_unsupported_config_is_refused():
    cfg = HardwareConfig(name="odd", array_rows=4, array_cols=4, dram_bytes_per_cycle=8)
    with pytest.raises(RtlConfigError, match="whole DRAM beats"):
        check_config(cfg)


@pytest.mark.parametrize("code", [0, 1, 2])
def test_acc_load_padding_strides_and_store_narrowing(rtl, code):
    """LOAD into acc: every element width (sign-extended), every padding side, pad_min,
    strides larger, smaller than and equal to 0; STORE back with saturation to each width."""
    C = ZED.array_cols
    rng = np.random.default_rng(code)
    dtype = (np.int8, np.int16, np.int32)[code]
    info = np.iinfo(dtype)
    src = rng.integers(info.min, info.max, 40 * C, endpoint=True).astype(dtype)
    outs = [np.zeros(64 * C, d) for d in (np.int8, np.int16, np.int32)]
    body = [
        load(Buffer.ACC, 0, 0, 1, 3, 4, 6, code, pads=(1, 2, 3, 1), pad_min=1),  # 6 x 8
        load(Buffer.ACC, 0, 48, 2, 3, 5, 2, code, pads=(0, 1, 2, 0)),  # overlapping rows
        load(Buffer.ACC, 0, 80, 5, 2, 3, 0, code),  # stride 0: one row twice
        store(1, 0, 0, 6, 8, 8, 0),
        store(2, 48, 0, 4, 7, 7, 1),
        store(3, 80, 3, 2, 3, 2, 2),  # overlapping DRAM rows: the later wins
    ]
    run_both(rtl, ZED, body, [src, *outs])


def test_gemm_loops_resets_repeats_and_concurrent_arrays(rtl):
    """GEMMs on every array at once, strided loop nests, accumulate and reset, and a nest that
    hits one accumulator entry several times (the later iterations see the earlier ones)."""
    R, C, A = ZED.array_rows, ZED.array_cols, ZED.num_arrays
    rng = np.random.default_rng(1)
    inp = rng.integers(-128, 128, 64 * R).astype(np.int8)
    wgt = rng.integers(-128, 128, 8 * R * C).astype(np.int8)
    bank = ZED.acc_bank_depth  # array k accumulates into bank k
    out = np.zeros(A * 256 * C, np.int32)
    body = [load(Buffer.INP, 0, 0, 0, 1, 64, 64), load(Buffer.WGT, 1, 0, 0, 1, 8, 8)]
    for k in range(A):
        body.append(gemm(k, k, 2 * k, bank * k + 4 * k, 3, 5, 7, 2, 6, 1, reset=1))
        body.append(gemm(k, k + 4, 1, bank * k + 4 * k, 3, 5, 7, 2, 6, 1, reset=0))
    body.append(gemm(0, 2, 3, 200, 2, 6, 9, 1, 1, 0, reset=0))  # acc_si = 0: a reduction
    body.append(gemm(1, 3, 5, bank + 210, 4, 3, 2, 3, 0, 0, reset=1))  # one entry: last wins
    body += [store(2, bank * k, 256 * k, 1, 256, 256) for k in range(A)]
    result = run_both(rtl, ZED, body, [inp, wgt, out])
    assert result.rtl_bypassed == result.model_bypassed == 0


@pytest.mark.parametrize("use_imm", [0, 1])
def test_every_alu_op(rtl, use_imm):
    """ADD, MUL, SHR, MIN, MAX, RELU with an immediate and with an accumulator operand, REQUANT
    and ADD_REQUANT (with and without ReLU), on values up to the int32 extremes, including a
    reduction into repeated destinations (the ALU's forwarding)."""
    C = ZED.array_cols
    rng = np.random.default_rng(2 + use_imm)
    vals = rng.integers(-(2**31), 2**31, 64 * C, dtype=np.int64)
    vals[:C] = [2**31 - 1, -(2**31), 0, -1, 1, 2**30, -(2**30) - 1, 5]
    data = vals.astype(np.int32)
    amounts = rng.integers(0, 32, 8 * C).astype(np.int32)  # SHR amounts read from acc
    mult = rng.integers(1, 2**20, 8 * C).astype(np.int32)
    out = np.zeros(256 * C, np.int32)
    body = [
        load(Buffer.ACC, 0, 0, 0, 1, 64, 64, 2),
        load(Buffer.ACC, 1, 100, 0, 1, 8, 8, 2),
        load(Buffer.ACC, 2, 120, 0, 1, 8, 8, 2),
    ]
    imm = {AluOp.ADD: -1234, AluOp.MUL: -3, AluOp.SHR: 7, AluOp.MIN: 99, AluOp.MAX: -77}
    for j, op in enumerate((AluOp.ADD, AluOp.MUL, AluOp.SHR, AluOp.MIN, AluOp.MAX, AluOp.RELU)):
        if use_imm or op == AluOp.RELU:
            body.append(alu(op, 8 * j, 0, 2, 4, 4, 1, 0, 0, imm=imm.get(op, 0), use_imm=1))
        elif op == AluOp.SHR:
            body.append(alu(op, 8 * j, 100, 2, 4, 4, 1, 4, 1))
        else:
            body.append(alu(op, 8 * j, 56 - 8 * j, 2, 4, 4, 1, 4, 1))
    if not use_imm:
        # REQUANT: dst * acc[src], shift 17; ADD_REQUANT: (dst + bias) * mult, shift 31 + ReLU,
        # one bias and multiplier pair per instruction (read before the first iteration)
        body.append(alu(AluOp.REQUANT, 48, 120, 1, 8, 0, 1, 0, 1, imm=17))
        body.append(alu(AluOp.ADD_REQUANT, 56, 120, 1, 4, 0, 1, 0, 0, imm=31 | 64))
        body.append(alu(AluOp.ADD_REQUANT, 60, 123, 1, 4, 0, 1, 0, 0, imm=9))
        body.append(alu(AluOp.MAX, 64, 0, 4, 8, 1, 0, 8, 1))  # 8 sources into each of 4 entries
        body.append(alu(AluOp.ADD, 70, 70, 1, 6, 0, 0, 0, 0))  # dst == src, repeated: doubles
        body.append(alu(AluOp.ADD, 72, 0, 4, 2, 0, 1, 2, 1))  # iteration j reads j - 2's write
    else:
        body.append(alu(AluOp.ADD, 64, 0, 1, 9, 0, 0, 0, 0, imm=3, use_imm=1))  # repeated dst
        body.append(alu(AluOp.MUL, 66, 0, 3, 2, 0, 1, 0, 0, imm=-5, use_imm=1))  # j - 2's write
    body.append(store(3, 0, 0, 1, 128, 128))
    run_both(rtl, ZED, body, [data, amounts, mult, out])


def test_bypass_skips_zero_blocks_and_still_resets(rtl):
    """An all-zero weight block: with reset = 0 the GEMM is skipped, with reset = 1 the
    accumulators are still zeroed; the RTL and the model count the same bypassed GEMMs."""
    R, C = ZED.array_rows, ZED.array_cols
    rng = np.random.default_rng(4)
    inp = rng.integers(-128, 128, 16 * R).astype(np.int8)
    wgt = np.zeros(2 * R * C, np.int8)
    wgt[R * C :] = rng.integers(-128, 128, R * C)
    init = rng.integers(-1000, 1000, 32 * C).astype(np.int32)
    out = np.zeros(32 * C, np.int32)
    body = [
        load(Buffer.INP, 0, 0, 0, 1, 16, 16),
        load(Buffer.WGT, 1, 0, 0, 1, 2, 2),
        load(Buffer.ACC, 2, 0, 0, 1, 32, 32, 2),
        gemm(0, 0, 0, 0, 1, 8, 0, 1, 0, 1, reset=0),  # skipped: acc keeps its values
        gemm(0, 0, 0, 8, 1, 8, 0, 1, 0, 1, reset=1),  # zeroes acc[8:16]
        gemm(0, 1, 0, 16, 1, 8, 0, 1, 0, 1, reset=0),  # dense
        store(3, 0, 0, 1, 32, 32),
    ]
    result = run_both(rtl, ZED, body, [inp, wgt, init, out])
    assert result.rtl_bypassed == result.model_bypassed == 2


def test_sync_tokens_on_every_module(rtl):
    """SYNC on each module carries tokens; a program whose order needs them runs correctly."""
    C = ZED.array_cols
    data = np.arange(4 * C, dtype=np.int32)
    out = np.zeros(4 * C, np.int32)
    program = [
        Instruction(Opcode.SYNC, module=0, push_next=1),
        load(Buffer.ACC, 0, 0, 0, 1, 4, 4, 2).replace(pop_prev=1),
        Instruction(Opcode.SYNC, module=1, push_next=1, push_prev=1),
        Instruction(Opcode.SYNC, module=0, pop_next=1),
        store(1, 0, 0, 1, 4, 4).replace(pop_prev=1, push_prev=1),
        Instruction(Opcode.SYNC, module=2),
        Instruction(Opcode.FINISH, pop_next=1),
    ]
    run_both(rtl, ZED, program, [data, out], tokens=False)


def test_a_deadlocked_program_is_reported(rtl):
    """A pop nobody pushes: the RTL reaches its cycle limit and says so."""
    C = ZED.array_cols
    program = [
        store(0, 0, 0, 1, 1, 1).replace(pop_prev=1),
        Instruction(Opcode.FINISH),
    ]
    with pytest.raises(RtlError, match="cycle limit"):
        rtl[ZED.name].run(program, [np.zeros(C, np.int32)], max_cycles=2000)


# ------------------------------------------------------------------ compiled programs
def _conv_case(cfg, rng, cin, h, w, cout, k, stride, pad, groups=1, residual=False, prune=0.0):
    x = rng.integers(cfg.act_range[0], cfg.act_range[1] + 1, (1, cin, h, w)).astype(cfg.act_dtype)
    wt = rng.integers(-127, 128, (cout, cin // groups, k, k)).astype(cfg.weight_dtype)
    if prune:  # whole weight blocks zeroed: the sparse schedules, fewer GEMMs
        prune_random_blocks(cfg, wt, groups, prune, rng)
    bias = rng.integers(-2000, 2000, cout).astype(np.int32)
    mult = rng.integers(1, 3000, cout).astype(np.int32)
    res_k = rng.integers(1, 3000, cout).astype(np.int32) if residual else None
    prog, consts = tir.conv2d_program(
        cfg, "conv", x.shape, wt, bias, mult, 10, cfg.act_range, strides=(stride, stride),
        padding=(pad,) * 4, groups=groups, residual=res_k,
    )  # fmt: skip
    inputs = [x]
    if residual:
        shape = prog.slots[1].shape
        inputs.append(rng.integers(-128, 128, shape).astype(cfg.act_dtype))
    out = np.zeros(prog.slots[-1].shape, prog.slots[-1].dtype)
    return prog, pack_dram(prog, [*inputs, *consts, out])


# Random layer shapes (seeded): plain, strided, padded, depthwise, odd channel counts, residual.
_SHAPES = [
    (5, 11, 9, 13, 3, 1, 1, 1, False),
    (16, 14, 14, 24, 3, 2, 1, 1, False),
    (8, 7, 7, 8, 1, 1, 0, 1, True),
    (24, 9, 9, 24, 3, 1, 1, 24, False),
    (3, 16, 16, 10, 5, 2, 2, 1, False),
    (17, 6, 5, 9, 3, 1, 1, 1, True),
]


@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "x".join(map(str, s[:7])))
def test_compiled_conv_layers_are_bit_exact(rtl, shape):
    cin, h, w, cout, k, stride, pad, groups, residual = shape
    rng = np.random.default_rng(hash(shape) % 2**32)
    prog, dram = _conv_case(ZED, rng, cin, h, w, cout, k, stride, pad, groups, residual)
    result = cosimulate(prog, dram, rtl=rtl[ZED.name])
    assert result.bit_exact, result.mismatches
    # the timing model follows the RTL (docs/timing.md, section 11)
    assert abs(result.cycle_rel_diff) <= 1e-3, result.to_dict()


@pytest.mark.parametrize("seed", range(8))
def test_random_pruned_layers_are_bit_exact_and_cycle_exact(rtl, seed):
    """Random layer shapes (channels, size, kernel, stride, padding, depthwise or not, fused
    residual or not) with random weight blocks removed, compiled by the production code
    generator: the RTL and the simulator agree bit for bit, and the timing model's cycles are
    the RTL's (to 0.1%: the read channel's same-cycle ties)."""
    rng = np.random.default_rng(100 + seed)
    k = int(rng.choice([1, 3, 5]))
    cin = int(rng.integers(1, 40))
    depthwise = bool(rng.random() < 0.25)
    cout = cin if depthwise else int(rng.integers(1, 40))
    stride = int(rng.choice([1, 2]))
    h, w = (int(v) for v in rng.integers(k, 20, 2))
    pad = int(rng.integers(0, k // 2 + 1))
    residual = bool(rng.random() < 0.4) and not depthwise
    prog, dram = _conv_case(
        ZED, rng, cin, h, w, cout, k, stride, pad, cin if depthwise else 1, residual, prune=0.4
    )
    result = cosimulate(prog, dram, rtl=rtl[ZED.name])
    assert result.bit_exact, result.mismatches
    assert abs(result.cycle_rel_diff) <= 1e-3, result.to_dict()


def test_compiled_int16_conv_is_bit_exact(rtl):
    rng = np.random.default_rng(7)
    prog, dram = _conv_case(INT16, rng, 6, 8, 8, 5, 3, 1, 1, residual=True)
    result = cosimulate(prog, dram, rtl=rtl[INT16.name])
    assert result.bit_exact, result.mismatches
    assert abs(result.cycle_rel_diff) <= 1e-3, result.to_dict()


def test_compiled_pooling_add_and_dense_are_bit_exact(rtl):
    cfg = ZED
    rng = np.random.default_rng(8)
    x = rng.integers(-128, 128, (1, 12, 9, 9)).astype(np.int8)
    programs = []
    prog, consts = tir.max_pool2d_program(cfg, "pool", x.shape, (3, 3), (2, 2), (1, 1, 1, 1))
    programs.append((prog, [x, *consts]))
    prog, consts = tir.global_avg_pool_program(cfg, "gap", x.shape, 77, 12, cfg.act_range)
    programs.append((prog, [x, *consts]))
    y = rng.integers(-128, 128, x.shape).astype(np.int8)
    prog, consts = tir.add_program(cfg, "add", x.shape, 300, 500, 9, (0, 127))
    programs.append((prog, [x, y, *consts]))
    feat = rng.integers(-128, 128, (1, 40)).astype(np.int8)
    wkn = rng.integers(-127, 128, (40, 10)).astype(np.int8)
    bias = rng.integers(-500, 500, 10).astype(np.int32)
    mult = rng.integers(1, 3000, 10).astype(np.int32)
    prog, consts = tir.dense_program(cfg, "fc", feat.shape, wkn, bias, mult, 11, cfg.act_range)
    programs.append((prog, [feat, *consts]))
    for prog, arrays in programs:
        out = np.zeros(prog.slots[-1].shape, prog.slots[-1].dtype)
        result = cosimulate(prog, pack_dram(prog, [*arrays, out]), rtl=rtl[cfg.name])
        assert result.bit_exact, (prog.layer, result.mismatches)
        assert abs(result.cycle_rel_diff) <= 1e-3, result.to_dict()
