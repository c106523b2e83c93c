"""Tests of the functional simulator against independent per-element oracles.

The oracles below are deliberately naive: Python integers and explicit loops over every entry and
lane, written from the ISA reference (``docs/isa.md``) and sharing no code with the simulator.
"""

from __future__ import annotations

import numpy as np
import pytest

from tvm_hapm.runtime.simulator import ExecutionStats, Simulator, SimulatorError
from tvm_hapm.target.config import HardwareConfig
from tvm_hapm.target.isa import REQUANT_RELU, AluOp, Buffer, Instruction, Opcode

# A small, deliberately non-square machine: a transposed weight block cannot go unnoticed.
R, C = 4, 3
INP_DEPTH, WGT_DEPTH, ACC_DEPTH = 64, 16, 64
CFG = HardwareConfig(
    name="sim-test",
    num_arrays=2,
    array_rows=R,
    array_cols=C,
    inp_buffer_bytes=INP_DEPTH * R,
    wgt_buffer_bytes=WGT_DEPTH * R * C,
    acc_buffer_bytes=ACC_DEPTH * C * 4,
)
ELEM_CODE = {8: 0, 16: 1, 32: 2}
DTYPE = {8: np.int8, 16: np.int16, 32: np.int32}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# ------------------------------------------------------------------------------ helpers
def wrap32(v: int) -> int:
    return (v + 2**31) % 2**32 - 2**31


def load(buf, slot, sram, dram_addr, y, x, stride, bits=8, pads=(0, 0, 0, 0), pad_min=0, **kw):
    top, bottom, left, right = pads
    return Instruction(
        Opcode.LOAD,
        buffer=buf,
        dram_slot=slot,
        elem_bits_code=ELEM_CODE[bits],
        sram_addr=sram,
        dram_addr=dram_addr,
        y_size=y,
        x_size=x,
        x_stride=stride,
        y_pad_top=top,
        y_pad_bottom=bottom,
        x_pad_left=left,
        x_pad_right=right,
        pad_min=pad_min,
        **kw,
    )


def store(slot, sram, dram_addr, y, x, stride, bits=8, **kw):
    return Instruction(
        Opcode.STORE,
        buffer=Buffer.ACC,
        dram_slot=slot,
        elem_bits_code=ELEM_CODE[bits],
        sram_addr=sram,
        dram_addr=dram_addr,
        y_size=y,
        x_size=x,
        x_stride=stride,
        **kw,
    )


def gemm(wgt_addr, inp_addr, acc_addr, outer, inner, inp_so=0, inp_si=0, acc_so=0, acc_si=0, **kw):
    return Instruction(
        Opcode.GEMM,
        wgt_addr=wgt_addr,
        inp_addr=inp_addr,
        acc_addr=acc_addr,
        outer=outer,
        inner=inner,
        inp_so=inp_so,
        inp_si=inp_si,
        acc_so=acc_so,
        acc_si=acc_si,
        **kw,
    )


def alu(op, dst, src, outer, inner, dst_so=0, dst_si=0, src_so=0, src_si=0, **kw):
    return Instruction(
        Opcode.ALU,
        alu_op=op,
        dst_addr=dst,
        src_addr=src,
        outer=outer,
        inner=inner,
        dst_so=dst_so,
        dst_si=dst_si,
        src_so=src_so,
        src_si=src_si,
        **kw,
    )


FINISH = Instruction(Opcode.FINISH)


def program(loads=(), computes=(), stores=()):
    """Chain the three modules with tokens: loads -> computes -> stores -> FINISH.

    ACC loads belong in ``computes`` (they execute on the compute module).
    """
    loads, computes, stores = list(loads), list(computes), list(stores)
    finish = FINISH
    if loads:
        loads[-1] = loads[-1].replace(push_next=1)
        first = computes[0] if computes else finish
        first = first.replace(pop_prev=1)
        if computes:
            computes[0] = first
        else:
            finish = first
    if stores:
        computes[-1] = computes[-1].replace(push_next=1)
        stores[0] = stores[0].replace(pop_prev=1)
        stores[-1] = stores[-1].replace(push_prev=1)
        finish = finish.replace(pop_next=1)
    return loads + computes + stores + [finish]


def prefill(rng, acc_range=(INT32_MIN, INT32_MAX)):
    """DRAM slots and loads that fill the whole inp, wgt and acc buffers with random data.

    Returns the DRAM list, the load-module loads, the (compute-module) acc load and the expected
    initial buffer contents as Python-int nested lists.
    """
    inp = rng.integers(-128, 128, INP_DEPTH * R, dtype=np.int8)
    wgt = rng.integers(-128, 128, WGT_DEPTH * R * C, dtype=np.int8)
    acc = rng.integers(acc_range[0], acc_range[1], ACC_DEPTH * C, dtype=np.int64, endpoint=True)
    acc = acc.astype(np.int32)
    dram = [inp, wgt, acc]
    loads = [
        load(Buffer.INP, 0, 0, 0, 1, INP_DEPTH, INP_DEPTH),
        load(Buffer.WGT, 1, 0, 0, 1, WGT_DEPTH, WGT_DEPTH),
    ]
    acc_load = load(Buffer.ACC, 2, 0, 0, 1, ACC_DEPTH, ACC_DEPTH, bits=32)
    state = {
        "inp": [[int(inp[e * R + r]) for r in range(R)] for e in range(INP_DEPTH)],
        "wgt": [
            [[int(wgt[e * R * C + r * C + c]) for c in range(C)] for r in range(R)]
            for e in range(WGT_DEPTH)
        ],
        "acc": [[int(acc[e * C + c]) for c in range(C)] for e in range(ACC_DEPTH)],
    }
    return dram, loads, acc_load, state


def as_lists(a):
    return a.astype(np.int64).tolist()


# ------------------------------------------------------------------------------ oracles
def oracle_load(buffer, entry_elems, dram, insn, bits):
    """Apply a LOAD to ``buffer`` (a list of entries, each a flat list of elements)."""
    top, bottom = insn.y_pad_top, insn.y_pad_bottom
    left, right = insn.x_pad_left, insn.x_pad_right
    rows = top + insn.y_size + bottom
    cols = left + insn.x_size + right
    pad = -(2 ** (bits - 1)) if insn.pad_min else 0
    for yy in range(rows):
        for xx in range(cols):
            entry = insn.sram_addr + yy * cols + xx
            for e in range(entry_elems):
                inside = top <= yy < top + insn.y_size and left <= xx < left + insn.x_size
                if inside:
                    r, c = yy - top, xx - left
                    element = (insn.dram_addr + r * insn.x_stride) * entry_elems + c * entry_elems
                    buffer[entry][e] = int(dram[element + e])
                else:
                    buffer[entry][e] = pad


def oracle_store(acc, dram_out, insn, bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for r in range(insn.y_size):
        for c in range(insn.x_size):
            entry = insn.sram_addr + r * insn.x_size + c
            for lane in range(C):
                element = (insn.dram_addr + r * insn.x_stride) * C + c * C + lane
                dram_out[element] = min(max(acc[entry][lane], lo), hi)


def oracle_gemm(state, insn):
    inp, wgt, acc = state["inp"], state["wgt"], state["acc"]
    for o in range(insn.outer):
        for i in range(insn.inner):
            a = insn.acc_addr + o * insn.acc_so + i * insn.acc_si
            x = insn.inp_addr + o * insn.inp_so + i * insn.inp_si
            for c in range(C):
                total = 0 if insn.reset else acc[a][c]
                for r in range(R):
                    total += inp[x][r] * wgt[insn.wgt_addr][r][c]
                acc[a][c] = wrap32(total)


def oracle_alu(acc, insn, act_range=(-128, 127)):
    for o in range(insn.outer):
        for i in range(insn.inner):
            d = insn.dst_addr + o * insn.dst_so + i * insn.dst_si
            s = insn.src_addr + o * insn.src_so + i * insn.src_si
            new = []
            for lane in range(C):
                v = acc[d][lane]
                operand = insn.imm if insn.use_imm else acc[s][lane]
                op = insn.alu_op
                if op == AluOp.ADD:
                    v = wrap32(v + operand)
                elif op == AluOp.MUL:
                    v = wrap32(v * operand)
                elif op == AluOp.SHR:
                    assert 0 <= operand <= 31
                    if operand > 0:
                        v = (v + 2 ** (operand - 1)) // 2**operand
                elif op == AluOp.MIN:
                    v = min(v, operand)
                elif op == AluOp.MAX:
                    v = max(v, operand)
                elif op == AluOp.RELU:
                    v = max(v, 0)
                elif op == AluOp.REQUANT:
                    k = insn.imm
                    v = (v * acc[s][lane] + 2 ** (k - 1)) // 2**k
                    v = min(max(v, act_range[0]), act_range[1])
                elif op == AluOp.ADD_REQUANT:
                    k = insn.imm % 64
                    v = (wrap32(v + acc[s][lane]) * acc[s + 1][lane] + 2 ** (k - 1)) // 2**k
                    lo = 0 if insn.imm // 64 else act_range[0]
                    v = min(max(v, lo), act_range[1])
                new.append(v)
            acc[d] = new


# ------------------------------------------------------------------------------ LOAD
@pytest.mark.parametrize("pad_min", [0, 1])
@pytest.mark.parametrize(
    "shape",
    [
        # (y, x, stride, pads top/bottom/left/right, sram, dram_addr)
        (3, 4, 6, (1, 2, 1, 0), 5, 2),
        (2, 5, 5, (0, 0, 0, 0), 0, 0),
        (4, 1, 3, (0, 1, 2, 2), 7, 1),
        (3, 2, 0, (1, 1, 1, 1), 0, 4),  # stride 0 repeats one DRAM row
    ],
)
def test_load_input_buffer(shape, pad_min):
    rng = np.random.default_rng(1)
    y, x, stride, pads, sram, addr = shape
    dram = rng.integers(-128, 128, 40 * R, dtype=np.int8)
    insn = load(Buffer.INP, 0, sram, addr, y, x, stride, pads=pads, pad_min=pad_min)
    sim = Simulator(CFG)
    sim.run(program(loads=[insn]), [dram])
    expected = [[0] * R for _ in range(INP_DEPTH)]
    oracle_load(expected, R, dram, insn, 8)
    assert as_lists(sim.inp) == expected
    assert not sim.wgt.any() and not sim.acc.any()


def test_load_weight_buffer_keeps_row_major_blocks():
    rng = np.random.default_rng(2)
    dram = rng.integers(-128, 128, 20 * R * C, dtype=np.int8)
    insn = load(Buffer.WGT, 0, 3, 1, 2, 3, 5, pads=(0, 1, 1, 0), pad_min=1)
    sim = Simulator(CFG)
    sim.run(program(loads=[insn]), [dram])
    expected = [[0] * (R * C) for _ in range(WGT_DEPTH)]
    oracle_load(expected, R * C, dram, insn, 8)
    assert sim.wgt.reshape(WGT_DEPTH, R * C).astype(np.int64).tolist() == expected
    # Block [r][c]: element r * C + c of a DRAM entry is input channel r, output channel c.
    assert sim.wgt[4, 1, 2] == dram[(1 + 0 * 5) * R * C + 0 * R * C + 1 * C + 2]


@pytest.mark.parametrize("bits", [8, 16, 32])
@pytest.mark.parametrize("pad_min", [0, 1])
def test_load_accumulator_sign_extends(bits, pad_min):
    rng = np.random.default_rng(3)
    info = np.iinfo(DTYPE[bits])
    dram = rng.integers(info.min, info.max, 30 * C, dtype=DTYPE[bits], endpoint=True)
    dram[:C] = info.min  # make sure the extremes are there
    insn = load(Buffer.ACC, 0, 2, 0, 3, 2, 4, bits=bits, pads=(1, 0, 2, 1), pad_min=pad_min)
    sim = Simulator(CFG)
    sim.run(program(computes=[insn]), [dram])
    expected = [[0] * C for _ in range(ACC_DEPTH)]
    oracle_load(expected, C, dram, insn, bits)
    assert as_lists(sim.acc) == expected


# ------------------------------------------------------------------------------ STORE
@pytest.mark.parametrize("bits", [8, 16, 32])
def test_store_saturates(bits):
    rng = np.random.default_rng(4)
    dram, loads, acc_load, state = prefill(rng)
    # Mix huge values (that saturate) with small ones (that must pass unchanged).
    small = rng.integers(-100, 100, ACC_DEPTH * C).astype(np.int32)
    dram[2][::2] = small[::2]
    state["acc"] = [[int(dram[2][e * C + c]) for c in range(C)] for e in range(ACC_DEPTH)]
    out = np.full(60 * C, 77, dtype=DTYPE[bits])  # 77 marks untouched DRAM
    dram.append(out)
    insn = store(3, 5, 2, 3, 4, 6, bits=bits)
    sim = Simulator(CFG)
    sim.run(program(loads, [acc_load], [insn]), dram)
    expected = [77] * out.size
    oracle_store(state["acc"], expected, insn, bits)
    assert out.astype(np.int64).tolist() == expected


def test_store_overlapping_rows_later_rows_win():
    rng = np.random.default_rng(5)
    dram, loads, acc_load, state = prefill(rng, acc_range=(-50, 50))
    out = np.zeros(10 * C, dtype=np.int8)
    dram.append(out)
    insn = store(3, 0, 0, 3, 4, 1)  # rows of 4 entries, 1 entry apart
    Simulator(CFG).run(program(loads, [acc_load], [insn]), dram)
    expected = [0] * out.size
    oracle_store(state["acc"], expected, insn, 8)
    assert out.tolist() == expected


# ------------------------------------------------------------------------------ GEMM
@pytest.mark.parametrize("reset", [0, 1])
@pytest.mark.parametrize(
    "loops",
    [
        # (wgt, inp, acc, outer, inner, inp_so, inp_si, acc_so, acc_si)
        (3, 0, 0, 1, 10, 0, 1, 0, 1),  # contiguous
        (5, 2, 1, 3, 4, 9, 2, 5, 1),  # 2-D nest, strided input (a stride-2 convolution)
        (0, 7, 40, 4, 3, 1, 0, 0, 2),  # repeated input vectors
        (1, 0, 10, 3, 5, 5, 1, 1, 0),  # repeated accumulator entries (sum over inner)
        (2, 0, 20, 2, 3, 3, 1, 1, 1),  # overlapping rows: entries hit by several iterations
        (9, 4, 34, 7, 1, 3, 0, 2, 0),  # inner loop of one
    ],
)
def test_gemm(loops, reset):
    rng = np.random.default_rng(6)
    dram, loads, acc_load, state = prefill(rng)
    w, x, a, outer, inner, inp_so, inp_si, acc_so, acc_si = loops
    array = a // (ACC_DEPTH // 2)  # array k accumulates into bank k (two banks of 32)
    insn = gemm(w, x, a, outer, inner, inp_so, inp_si, acc_so, acc_si, reset=reset, array=array)
    sim = Simulator(CFG)
    sim.run(program(loads, [acc_load, insn]), dram)
    oracle_gemm(state, insn)
    assert as_lists(sim.acc) == state["acc"]


def test_gemm_accumulates_with_int32_wraparound():
    dram = [
        np.full(INP_DEPTH * R, -128, dtype=np.int8),
        np.full(WGT_DEPTH * R * C, -128, dtype=np.int8),
        np.full(ACC_DEPTH * C, INT32_MAX - 10, dtype=np.int32),
    ]
    loads = [
        load(Buffer.INP, 0, 0, 0, 1, INP_DEPTH, INP_DEPTH),
        load(Buffer.WGT, 1, 0, 0, 1, WGT_DEPTH, WGT_DEPTH),
    ]
    acc_load = load(Buffer.ACC, 2, 0, 0, 1, ACC_DEPTH, ACC_DEPTH, bits=32)
    insn = gemm(0, 0, 0, 1, 8, inp_si=1, acc_si=1)
    sim = Simulator(CFG)
    sim.run(program(loads, [acc_load, insn]), dram)
    assert sim.acc[0, 0] == wrap32(INT32_MAX - 10 + R * 128 * 128)
    assert sim.acc[8, 0] == INT32_MAX - 10


# ------------------------------------------------------------------------------ ALU
ALU_PATTERNS = {
    # (dst, src, outer, inner, dst_so, dst_si, src_so, src_si)
    "disjoint": (0, 32, 3, 4, 4, 1, 5, 1),
    "src_ahead": (10, 11, 2, 5, 5, 1, 5, 1),  # reads entries before they are overwritten
    "src_behind": (11, 10, 2, 5, 5, 1, 5, 1),  # reads entries written by earlier iterations
    "in_place": (3, 3, 4, 2, 3, 1, 3, 1),
    "reduce": (0, 32, 4, 6, 1, 0, 6, 1),  # repeated dst: pooling-style reduction
    "repeat_both": (5, 5, 2, 3, 0, 1, 0, 1),  # dst and src entries repeat across iterations
}


@pytest.mark.parametrize("pattern", sorted(ALU_PATTERNS))
@pytest.mark.parametrize(
    "op", [AluOp.ADD, AluOp.MUL, AluOp.MIN, AluOp.MAX, AluOp.RELU, AluOp.REQUANT]
)
def test_alu_register_operand(op, pattern):
    rng = np.random.default_rng(7 + int(op))
    # REQUANT: small multipliers in the source region, values that both saturate and not.
    dram, loads, acc_load, state = prefill(rng)
    imm = 0
    if op == AluOp.REQUANT:
        mult = rng.integers(1, 2**16, ACC_DEPTH * C).astype(np.int32)
        dram[2][ACC_DEPTH * C // 2 :] = mult[ACC_DEPTH * C // 2 :]
        state["acc"] = [[int(dram[2][e * C + c]) for c in range(C)] for e in range(ACC_DEPTH)]
        imm = 30
    insn = alu(op, *ALU_PATTERNS[pattern], imm=imm)
    sim = Simulator(CFG)
    sim.run(program(loads, [acc_load, insn]), dram)
    oracle_alu(state["acc"], insn)
    assert as_lists(sim.acc) == state["acc"]


@pytest.mark.parametrize("pattern", ["disjoint", "reduce", "in_place"])
@pytest.mark.parametrize(
    "op,imm",
    [
        (AluOp.ADD, -12345),
        (AluOp.ADD, 32767),
        (AluOp.MUL, -32768),
        (AluOp.MUL, 3),
        (AluOp.MIN, -5),
        (AluOp.MAX, 7),
        (AluOp.SHR, 0),
        (AluOp.SHR, 1),
        (AluOp.SHR, 13),
        (AluOp.SHR, 31),
    ],
)
def test_alu_immediate_operand(op, imm, pattern):
    rng = np.random.default_rng(8)
    dram, loads, acc_load, state = prefill(rng)
    insn = alu(op, *ALU_PATTERNS[pattern], use_imm=1, imm=imm)
    sim = Simulator(CFG)
    sim.run(program(loads, [acc_load, insn]), dram)
    oracle_alu(state["acc"], insn)
    assert as_lists(sim.acc) == state["acc"]


# ADD_REQUANT reads one (bias, multiplier) pair for the whole nest: src_so = src_si = 0
ADD_REQUANT_PATTERNS = {
    # (dst, src, outer, inner, dst_so, dst_si, src_so, src_si)
    "disjoint": (0, 32, 3, 4, 4, 1, 0, 0),
    "reduce": (0, 32, 4, 6, 1, 0, 0, 0),  # repeated dst
    "repeat_dst": (5, 32, 2, 3, 0, 1, 0, 0),
    "bias_in_dst": (8, 10, 1, 3, 0, 1, 0, 0),  # the bias entry is written by iteration 2
}


@pytest.mark.parametrize("relu", [0, 1])
@pytest.mark.parametrize("pattern", sorted(ADD_REQUANT_PATTERNS))
def test_alu_add_requant(pattern, relu):
    # bias at acc[s], multiplier at acc[s + 1]: values of 2**13 and a shift of 18 so that
    # results span the activation range, saturate at both ends and round
    rng = np.random.default_rng(10 + relu)
    dram, loads, acc_load, state = prefill(rng)
    dram[2][:] = rng.integers(-(2**13), 2**13, ACC_DEPTH * C)
    insn = alu(AluOp.ADD_REQUANT, *ADD_REQUANT_PATTERNS[pattern], imm=18 | relu * REQUANT_RELU)
    mult = insn.src_addr + 1
    dram[2][mult * C : (mult + 1) * C] = [2**14, 2**12, -(2**14)]  # both ends saturate
    state["acc"] = [[int(dram[2][e * C + c]) for c in range(C)] for e in range(ACC_DEPTH)]
    sim = Simulator(CFG)
    sim.run(program(loads, [acc_load, insn]), dram)
    oracle_alu(state["acc"], insn)
    assert as_lists(sim.acc) == state["acc"]
    if pattern == "disjoint":  # the cases the data covers
        out = np.asarray(state["acc"][:12])
        assert out.min() == (0 if relu else -128) and out.max() == 127
        assert ((out > out.min()) & (out < 127)).any()


def test_add_requant_is_add_then_requant_then_relu():
    # one pass equals the three instructions it replaces, wrap-around of the add included
    values = [INT32_MAX - 3, -5, 1000, -1000, 40, -40]
    rows = [7, 7, -100, 100, 0, 0, 1 << 9, 1 << 9, 1 << 9, 1 << 9, 1 << 9, 1 << 9]
    # acc[32] = bias, acc[33] = multiplier (lanes 0..3 of C = 4)
    bias_mult = rows[:4] + rows[6:10]
    for relu in (0, REQUANT_RELU):
        fused = alu(AluOp.ADD_REQUANT, 0, 32, 1, 2, dst_si=1, imm=10 | relu)
        one = _run_alu_on(values, bias_mult, fused)
        three = [
            alu(AluOp.ADD, 0, 32, 1, 2, dst_si=1),
            alu(AluOp.REQUANT, 0, 33, 1, 2, dst_si=1, imm=10),
        ] + ([alu(AluOp.MAX, 0, 0, 1, 2, dst_si=1, use_imm=1, imm=0)] if relu else [])
        acc = np.zeros(ACC_DEPTH * C, dtype=np.int32)
        acc[: len(values)] = values
        acc[32 * C : 32 * C + len(bias_mult)] = bias_mult
        sim = Simulator(CFG)
        sim.run(program(computes=[load(Buffer.ACC, 0, 0, 0, 1, 64, 64, bits=32), *three]), [acc])
        assert one[:2].tolist() == sim.acc[:2].tolist()
    # INT32_MAX - 3 + 7 wraps to a large negative value: it saturates low (or is cut by ReLU)
    assert one[0, 0] == 0 and _run_alu_on(values, bias_mult, fused.replace(imm=10))[0, 0] == -128


@pytest.mark.parametrize("pattern", ["disjoint", "src_ahead", "reduce"])
def test_alu_shr_by_register(pattern):
    rng = np.random.default_rng(9)
    dram, loads, acc_load, state = prefill(rng)
    if pattern == "src_ahead":
        # Source entries are also destinations: keep every value a valid shift amount.
        dram[2][:] = rng.integers(0, 32, ACC_DEPTH * C)
    else:
        dram[2][32 * C :] = rng.integers(0, 32, 32 * C)
    state["acc"] = [[int(dram[2][e * C + c]) for c in range(C)] for e in range(ACC_DEPTH)]
    insn = alu(AluOp.SHR, *ALU_PATTERNS[pattern])
    sim = Simulator(CFG)
    sim.run(program(loads, [acc_load, insn]), dram)
    oracle_alu(state["acc"], insn)
    assert as_lists(sim.acc) == state["acc"]


def _run_alu_on(values, operands, insn, cfg=CFG):
    """Load ``values`` to acc[0..], ``operands`` to acc[32..], run ``insn``; return acc."""
    acc = np.zeros(ACC_DEPTH * C, dtype=np.int32)
    acc[: len(values)] = values
    acc[32 * C : 32 * C + len(operands)] = operands
    sim = Simulator(cfg)
    sim.run(program(computes=[load(Buffer.ACC, 0, 0, 0, 1, 64, 64, bits=32), insn]), [acc])
    return sim.acc


def test_shr_rounds_half_up_on_negatives():
    values = [-5, -6, -7, 5, 6, 7, -1, -2, -3, 1, 2, 3]
    acc = _run_alu_on(values, [], alu(AluOp.SHR, 0, 0, 1, 4, dst_si=1, use_imm=1, imm=1))
    # (v + 1) >> 1 with an arithmetic (floor) shift.
    assert acc[:4].ravel().tolist() == [-2, -3, -3, 3, 3, 4, 0, -1, -1, 1, 1, 2]
    acc = _run_alu_on([-6, -10, -9], [2, 2, 3], alu(AluOp.SHR, 0, 32, 1, 1))
    assert acc[0].tolist() == [-1, -2, -1]  # (-6+2)>>2, (-10+2)>>2, (-9+4)>>3


def test_requant_saturates_and_rounds():
    values = [1000, -1000, 3, 5, -5, 100]
    mults = [1 << 20, 1 << 20, 1 << 9, 1 << 9, 1 << 9, 1 << 10]
    acc = _run_alu_on(values, mults, alu(AluOp.REQUANT, 0, 32, 1, 2, dst_si=1, src_si=1, imm=10))
    # 1000 * 2**10 saturates; 3/2 = 1.5 -> 2; 5/2 -> 3; -5/2 = -2.5 -> -2; 100 * 1 = 100.
    assert acc[:2].ravel().tolist() == [127, -128, 2, 3, -2, 100]
    cfg16 = CFG.replace(name="sim-test16", act_bits=16, inp_buffer_bytes=INP_DEPTH * R * 2)
    acc = _run_alu_on(
        values, mults, alu(AluOp.REQUANT, 0, 32, 1, 2, dst_si=1, src_si=1, imm=10), cfg16
    )
    assert acc[:2].ravel().tolist() == [32767, -32768, 2, 3, -2, 100]


def test_relu_and_mul_wrap():
    acc = _run_alu_on([-3, 0, 4], [], alu(AluOp.RELU, 0, 0, 1, 1))
    assert acc[0].tolist() == [0, 0, 4]
    acc = _run_alu_on([2**30, -(2**30), 65536], [4, 4, 65536], alu(AluOp.MUL, 0, 32, 1, 1))
    assert acc[0].tolist() == [0, 0, 0]  # 2**32, -2**32 and 2**32 wrap to 0


# ------------------------------------------------------------------------------ SYNC / FINISH
def test_finish_only_program():
    sim = Simulator(CFG)
    stats = sim.run([FINISH], [])
    assert stats.instructions == 1 and stats.by_opcode == {"FINISH": 1}
    assert stats.macs == stats.alu_ops == stats.dram_bytes == 0


def test_sync_carries_tokens_and_does_nothing_else():
    rng = np.random.default_rng(10)
    dram, loads, acc_load, state = prefill(rng, acc_range=(-1000, 1000))
    out = np.zeros(ACC_DEPTH * C, np.int8)
    dram.append(out)
    sync = {m: Instruction(Opcode.SYNC, module=m) for m in range(3)}
    insns = [
        *loads,
        sync[0].replace(push_next=1),
        sync[1].replace(pop_prev=1),
        acc_load,
        gemm(0, 0, 0, 1, 16, inp_si=1, acc_si=1),
        sync[1].replace(push_next=1),
        sync[2].replace(pop_prev=1),
        store(3, 0, 0, 1, 16, 16),
        sync[2].replace(push_prev=1),
        FINISH.replace(pop_next=1),
    ]
    stats = Simulator(CFG).run(insns, dram)
    oracle_gemm(state, insns[5])
    expected = [0] * out.size
    oracle_store(state["acc"], expected, insns[8], 8)
    assert out.tolist() == expected
    assert stats.by_opcode["SYNC"] == 5


# ------------------------------------------------------------------------------ a full program
def test_multi_module_program_with_double_use_of_a_buffer():
    """Two tiles reuse the same input/weight entries: only the tokens keep the second load from
    overwriting the first tile's data before the GEMM has read it."""
    rng = np.random.default_rng(11)
    K, N, M = 2 * R, 6, 2 * C  # a (N x K) @ (K x M) product per tile, two tiles
    acts = rng.integers(-128, 128, (2, N, K), dtype=np.int8)
    weights = rng.integers(-127, 128, (2, K, M), dtype=np.int8)
    # DRAM layouts: activations (tile, kb, n, R); weights (tile, kb, mb, R, C).
    act_dram = acts.reshape(2, N, 2, R).transpose(0, 2, 1, 3).ravel()
    wgt_dram = weights.reshape(2, 2, R, 2, C).transpose(0, 1, 3, 2, 4).ravel()
    out = np.zeros(2 * 2 * N * C, np.int8)  # (tile, mb, n, C)
    dram = [act_dram.copy(), wgt_dram.copy(), out]

    insns = []
    for t in range(2):
        # load module: wait until compute has finished with the buffers of the previous tile
        insns.append(load(Buffer.INP, 0, 0, t * 2 * N, 1, 2 * N, 2 * N, pop_next=int(t > 0)))
        insns.append(load(Buffer.WGT, 1, 0, t * 4, 1, 4, 4, push_next=1))
        for mb in range(2):
            for kb in range(2):
                insns.append(
                    gemm(
                        kb * 2 + mb,
                        kb * N,
                        mb * N,
                        1,
                        N,
                        inp_si=1,
                        acc_si=1,
                        reset=int(kb == 0),
                        pop_prev=int(mb == 0 and kb == 0),
                        # the tile's first output tile has to be stored before it is reused
                        pop_next=int(t > 0 and mb == 0 and kb == 0),
                    )
                )
        insns[-1] = insns[-1].replace(push_prev=int(t == 0))
        insns.append(alu(AluOp.SHR, 0, 0, 1, 2 * N, dst_si=1, use_imm=1, imm=6))
        insns.append(alu(AluOp.RELU, 0, 0, 1, 2 * N, dst_si=1, push_next=1))
        insns.append(store(2, 0, t * 2 * N, 2, N, N, pop_prev=1, push_prev=1))
    insns.append(FINISH.replace(pop_next=1))

    stats = Simulator(CFG).run(insns, dram)
    for t in range(2):
        ref = acts[t].astype(np.int64) @ weights[t].astype(np.int64)
        ref = np.maximum((ref + 32) >> 6, 0)
        ref = np.clip(ref, -128, 127).reshape(N, 2, C).transpose(1, 0, 2).ravel()
        assert out[t * 2 * N * C : (t + 1) * 2 * N * C].tolist() == ref.tolist()
    assert stats.by_opcode == {"LOAD": 4, "STORE": 2, "GEMM": 8, "ALU": 4, "FINISH": 1}


# ------------------------------------------------------------------------------ statistics
def test_stats_hand_computed():
    rng = np.random.default_rng(12)
    dram = [
        rng.integers(-128, 128, 40 * R, dtype=np.int8),
        rng.integers(-128, 128, 4 * R * C, dtype=np.int8),
        rng.integers(-9, 9, 8 * C).astype(np.int32),
        np.zeros(20 * C, np.int8),
        np.zeros(4 * C, np.int16),
    ]
    insns = program(
        loads=[
            load(Buffer.INP, 0, 0, 0, 2, 5, 7, pads=(1, 1, 1, 1)),  # 2*5 entries of 4 B: 40 B
            load(Buffer.WGT, 1, 0, 0, 1, 2, 2),  # 2 blocks of 12 B: 24 B
        ],
        computes=[
            load(Buffer.ACC, 2, 0, 0, 1, 4, 4, bits=32),  # 4 vectors of 3 int32: 48 B
            gemm(0, 0, 0, 2, 5, inp_so=7, inp_si=1, acc_so=5, acc_si=1),  # 10 vectors x 12 MACs
            alu(AluOp.ADD, 0, 0, 1, 4, dst_si=1, use_imm=1, imm=1),  # 4 vectors x 3 lanes
        ],
        stores=[
            store(3, 0, 0, 2, 3, 5),  # 6 vectors of 3 int8: 18 B
            store(4, 0, 1, 1, 1, 1, bits=16),  # 1 vector of 3 int16: 6 B
        ],
    )
    stats = Simulator(CFG).run(insns, dram, layer="conv0")
    assert stats.layer == "conv0"
    assert stats.instructions == 8
    assert stats.by_opcode == {"LOAD": 3, "STORE": 2, "GEMM": 1, "ALU": 1, "FINISH": 1}
    assert stats.macs == 10 * R * C == 120
    assert stats.alu_ops == 12
    assert stats.dram_bytes_read == 40 + 24 + 48
    assert stats.dram_bytes_written == 18 + 6
    assert stats.dram_bytes == 136
    d = stats.to_dict()
    assert d["dram_bytes"] == 136 and d["macs"] == 120 and d["by_opcode"]["LOAD"] == 3

    both = stats.merge(stats)
    assert both.macs == 240 and both.by_opcode["LOAD"] == 6 and both.layer == "conv0"
    total = ExecutionStats.total([stats, ExecutionStats(layer="x", macs=1)], layer="net")
    assert total.layer == "net" and total.macs == 121 and total.instructions == 8
    assert sum([stats, stats]).dram_bytes == 272
    # Validation alone reports the same numbers without running.
    assert Simulator(CFG).validate(insns, dram, layer="conv0") == stats


# ------------------------------------------------------------------------------ int16
def test_int16_config_is_exact():
    cfg = HardwareConfig(act_bits=16, weight_bits=16)
    rows, cols = cfg.array_rows, cfg.array_cols
    rng = np.random.default_rng(13)
    n = 24
    inp = rng.integers(-32768, 32768, n * rows, dtype=np.int16)
    inp[:rows] = -32768  # extremes: products of 2**30, sums beyond float32 exactness
    wgt = rng.integers(-32768, 32768, 2 * rows * cols, dtype=np.int16)
    wgt[: rows * cols] = -32768
    mult = rng.integers(1, 2**12, n * cols).astype(np.int32)
    mult[:cols] = 2**20  # the first output vector saturates
    out = np.zeros(n * cols, np.int16)
    insns = program(
        loads=[
            load(Buffer.INP, 0, 0, 0, 1, n, n, bits=16),
            load(Buffer.WGT, 1, 0, 0, 1, 2, 2, bits=16),
        ],
        computes=[
            load(Buffer.ACC, 2, 100, 0, 1, n, n, bits=32),
            gemm(0, 0, 0, 1, n, inp_si=1, acc_si=1, reset=1),
            gemm(1, 0, 0, 1, n, inp_si=1, acc_si=1),
            gemm(0, 0, 0, 1, n, inp_si=1, acc_si=1),  # accumulate past 2**31: wraps
            alu(AluOp.REQUANT, 0, 100, 1, n, dst_si=1, src_si=1, imm=30),
        ],
        stores=[store(3, 0, 0, 1, n, n, bits=16)],
    )
    sim = Simulator(cfg)
    sim.run(insns, [inp, wgt, mult, out])
    x = inp.reshape(n, rows).astype(object)
    w0 = wgt[: rows * cols].reshape(rows, cols).astype(object)
    w1 = wgt[rows * cols :].reshape(rows, cols).astype(object)
    total = (x @ w0 + x @ w1 + x @ w0).tolist()  # Python ints: exact
    ref = []
    for j in range(n):
        for c in range(cols):
            v = wrap32(total[j][c])
            v = (v * int(mult[j * cols + c]) + 2**29) // 2**30
            ref.append(min(max(v, -32768), 32767))
    assert out.tolist() == ref
    assert any(v in (-32768, 32767) for v in ref)  # saturation was exercised
    assert any(abs(v) < 32767 for v in ref)


# ------------------------------------------------------------------------------ refusals
def _refused(insns, dram, *fragments, cfg=CFG):
    with pytest.raises(SimulatorError) as info:
        Simulator(cfg).run(insns, dram)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_refuses_buffer_address_out_of_range():
    insn = gemm(0, 60, 0, 1, 5, inp_si=1, acc_si=1)
    msg = _refused(program(computes=[insn]), [], "instruction 0 (gemm", "input buffer address 64")
    assert "out of range [0, 64)" in msg
    _refused(
        program(computes=[alu(AluOp.ADD, 0, 60, 2, 3, src_so=3, src_si=1)]),
        [],
        "source address 65 out of range [0, 64)",
    )
    _refused(
        program(loads=[load(Buffer.INP, 0, 60, 0, 1, 3, 3, pads=(0, 0, 1, 1))]),
        [np.zeros(100, np.int8)],
        "input buffer address 64 out of range",
    )
    _refused(program(computes=[gemm(16, 0, 0, 1, 1)]), [], "weight buffer address 16 out of range")


def test_refuses_gemm_outside_its_bank():
    # two banks of 32 entries: array 1 accumulates into 32..63 only
    ok = gemm(0, 0, 32, 1, 4, inp_si=1, acc_si=1, array=1)
    Simulator(CFG).validate(program(computes=[ok]), [])
    for acc in (0, 30):  # starts in bank 0; starts in bank 0 and ends in bank 1
        bad = ok.replace(acc_addr=acc)
        _refused(program(computes=[bad]), [], "outside bank 1 [32, 63]")
    # the vectorised screen of many GEMMs catches it too
    many = [ok] * 40 + [ok.replace(acc_addr=30, array=0)]  # 30..33
    _refused(program(computes=many), [], "instruction 40 (gemm", "outside bank 0 [0, 31]")


def test_refuses_add_requant_with_moving_or_overwritten_multiplier():
    fused = alu(AluOp.ADD_REQUANT, 0, 32, 1, 4, 0, 1, imm=9)
    Simulator(CFG).validate(program(computes=[fused]), [])
    _refused(program(computes=[fused.replace(src_si=2)]), [], "src_so and src_si must be 0")
    _refused(program(computes=[fused.replace(src_so=2)]), [], "src_so and src_si must be 0")
    # the multiplier (entry 33) is read once, before the first iteration: no write to it
    _refused(program(computes=[fused.replace(dst_addr=30)]), [], "may not write its multiplier")


def test_refuses_dram_out_of_range_and_changes_no_dram():
    dram = [np.arange(8 * C, dtype=np.int32), np.zeros(4 * C, np.int8)]
    insns = program(
        computes=[load(Buffer.ACC, 0, 0, 0, 1, 8, 8, bits=32)],
        stores=[store(1, 0, 0, 1, 4, 4), store(1, 0, 2, 1, 4, 4)],  # the second runs off the end
    )
    _refused(insns, dram, "instruction 2 (store", "DRAM slot 1 element 17 out of range [0, 12)")
    assert not dram[1].any()
    _refused(
        program(loads=[load(Buffer.INP, 2, 0, 0, 1, 1, 1)]), dram, "DRAM slot 2 does not exist"
    )


def test_refuses_wrong_slot_dtype():
    _refused(
        program(loads=[load(Buffer.INP, 0, 0, 0, 1, 2, 2)]),
        [np.zeros(8, np.int16)],
        "DRAM slot 0 has dtype int16, but the instruction moves int8 elements",
    )
    _refused(
        program(loads=[load(Buffer.INP, 0, 0, 0, 1, 2, 2, bits=16)]),
        [np.zeros(8, np.int16)],
        "needs 8-bit DRAM elements, got 16-bit",
    )
    _refused(
        program(loads=[load(Buffer.INP, 0, 0, 0, 1, 2, 2)]),
        [np.zeros((2, 4), np.int8)],
        "flat (1-D)",
    )


def test_refuses_missing_or_misplaced_finish():
    _refused([], [], "empty program")
    _refused([alu(AluOp.RELU, 0, 0, 1, 1)], [], "instruction 0 (alu    relu", "end with FINISH")
    _refused([FINISH, FINISH], [], "instruction 0 (finish)", "last instruction")


def test_refuses_deadlock():
    insns = [gemm(0, 0, 0, 1, 1, pop_prev=1), FINISH]  # waits for a load that never comes
    msg = _refused(insns, [], "deadlock", "instruction 0 (gemm", "load->compute")
    assert "compute module" in msg
    # Two modules waiting for each other.
    insns = [
        load(Buffer.INP, 0, 0, 0, 1, 1, 1, pop_next=1, push_next=1),
        gemm(0, 0, 0, 1, 1, pop_prev=1, push_prev=1),
        FINISH,
    ]
    msg = _refused(insns, [np.zeros(R, np.int8)], "deadlock", "load module waits at instruction 0")
    assert "compute module waits at instruction 1" in msg


def test_refuses_illegal_flags_for_module():
    _refused(
        [load(Buffer.INP, 0, 0, 0, 1, 1, 1, pop_prev=1), FINISH],
        [np.zeros(R, np.int8)],
        "instruction 0 (load",
        "pop_prev is illegal",
    )
    _refused(
        [store(0, 0, 0, 1, 1, 1, push_next=1), FINISH],
        [np.zeros(C, np.int8)],
        "store module has no next module: push_next is illegal",
    )
    _refused([Instruction(Opcode.SYNC, module=0, push_prev=1), FINISH], [], "push_prev is illegal")


def test_refuses_unconsumed_tokens():
    insns = [gemm(0, 0, 0, 1, 1, push_next=1), FINISH]
    _refused(insns, [], "unconsumed dependency tokens", "compute->store", "instruction 0 (gemm")


def test_refuses_bad_fields():
    _refused(
        program(computes=[alu(AluOp.SHR, 0, 0, 1, 1, use_imm=1, imm=32)]),
        [],
        "SHR shift 32 out of range [0, 31]",
    )
    _refused(program(computes=[alu(AluOp.REQUANT, 0, 0, 1, 1, use_imm=1, imm=8)]), [], "use_imm=0")
    _refused(program(computes=[alu(AluOp.REQUANT, 0, 0, 1, 1, imm=0)]), [], "[1, 62]")
    add_requant = alu(AluOp.ADD_REQUANT, 0, 0, 1, 1, imm=8)
    _refused(program(computes=[add_requant.replace(use_imm=1)]), [], "use_imm=0")
    _refused(program(computes=[add_requant.replace(imm=64)]), [], "shift 0 out of range [1, 62]")
    _refused(program(computes=[add_requant.replace(imm=63)]), [], "shift 63 out of range")
    _refused(program(computes=[add_requant.replace(imm=128 + 8)]), [], "only the shift and ReLU")
    _refused(program(computes=[add_requant.replace(imm=-8)]), [], "only the shift and ReLU")
    # the multiplier is the entry after the bias: a bias in the last entry reads past the end
    last = add_requant.replace(src_addr=ACC_DEPTH - 1)
    _refused(program(computes=[last]), [], f"source address {ACC_DEPTH} out of range")
    _refused(program(computes=[alu(AluOp.ADD, 0, 0, 0, 1)]), [], "empty loop")
    _refused(program(computes=[gemm(0, 0, 0, 1, 1, array=2)]), [], "array 2 out of range [0, 2)")
    _refused(
        program(computes=[alu(AluOp.ADD, 0, 0, 1, 1, use_imm=1, imm=40000)]),
        [],
        "field 'imm' = 40000 does not fit its 16-bit signed encoding",
    )
    _refused(
        [store(0, 0, 0, 1, 1, 1, x_pad_left=1), FINISH],
        [np.zeros(C, np.int8)],
        "pad fields and pad_min must be 0",
    )
    _refused(
        [Instruction(Opcode.STORE, buffer=Buffer.INP, y_size=1, x_size=1), FINISH],
        [np.zeros(C, np.int8)],
        "accumulator buffer only",
    )
    _refused(
        [load(Buffer.ACC, 0, 0, 0, 1, 1, 1).replace(elem_bits_code=3), FINISH],
        [np.zeros(C, np.int8)],
        "invalid element width code 3",
    )
    _refused([Instruction(Opcode.SYNC, module=3), FINISH], [], "unknown module 3")


def test_refuses_shr_amount_from_acc_at_run_time():
    with pytest.raises(SimulatorError, match=r"instruction 1 \(alu    shr.*amount 40"):
        _run_alu_on([1, 2, 3], [0, 40, 1], alu(AluOp.SHR, 0, 32, 1, 1))
