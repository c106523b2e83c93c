"""The Relax flow's TIR route for convolutions and dense layers against the direct generator.

:func:`tvm_hapm.target.tir.conv2d_program` (TIR definition, ``s_tir`` schedule with the tensor
intrinsic, TIR passes, the walker with the compile-time sparse schedule) must give the same
slots, constants and instruction stream as
:func:`tvm_hapm.testing.direct_codegen.conv2d_program`, and the same bits on the simulator.
"""

from dataclasses import replace

import numpy as np
import pytest

from tvm_hapm.passes.prune import hapm_groups
from tvm_hapm.runtime.driver import run_program
from tvm_hapm.runtime.simulator import Simulator
from tvm_hapm.runtime.timing import TimingModel
from tvm_hapm.target import isa
from tvm_hapm.target import tir as htir
from tvm_hapm.target.banks import acc_bank
from tvm_hapm.target.config import get_config
from tvm_hapm.target.schedule import (
    ConvSchedule,
    EltwiseSchedule,
    ScheduleError,
    dispatch_group,
    estimate_conv_cycles,
    estimate_eltwise_cycles,
    fit_double_buffer,
    fuse_epilogues,
    hoist_prologues,
    interleave_epilogues,
    plan_conv,
    plan_eltwise,
)
from tvm_hapm.testing import (
    build_int_network,
    direct_codegen,
    instruction_diff,
    llvm_reference,
    prune_random_blocks,
    run_vm,
    tiny_buffers_config,
)

CFG = get_config("zedboard")


# (n, cin, hw, cout, k, stride, pad, dilation, groups, prune)
SHAPES = [
    (1, 16, 8, 32, 3, 1, 1, 1, 1, 0.0),
    (2, 13, 9, 21, 3, 2, 1, 1, 1, 0.0),  # odd channels, two images
    (3, 8, 6, 8, 1, 1, 0, 1, 1, 0.0),  # batch 3, 1x1
    (1, 32, 8, 32, 3, 1, 1, 1, 32, 0.0),  # depthwise
    (1, 24, 10, 48, 3, 1, 2, 2, 3, 0.0),  # grouped, dilation 2
    (1, 40, 8, 40, 1, 1, 0, 1, 1, 0.5),  # pruned
    (3, 16, 7, 16, 5, 1, 2, 1, 1, 0.3),  # 5x5, pruned
    (1, 64, 14, 64, 3, 1, 1, 1, 1, 0.6),
    (1, 8, 12, 8, 7, 2, 3, 1, 1, 0.0),  # 7x7 stride 2
    (1, 16, 8, 16, 3, 2, 0, 1, 1, 1.0),  # every block pruned
    (1, 24, 9, 24, 3, 1, 1, 2, 24, 0.0),  # depthwise, dilation 2
]


def _layer(shape, seed):
    n, cin, hw, cout, k, s, p, d, g, prune = shape
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (cout, cin // g, k, k)).astype(np.int8)
    if prune:
        w = prune_random_blocks(CFG, w, g, prune, rng)
    x = rng.integers(-128, 128, (n, cin, hw, hw)).astype(np.int8)
    bias, mult = rng.integers(-500, 500, cout), rng.integers(1, 300, cout)
    args = ((n, cin, hw, hw), w, bias, mult, 9, (-100, 120))
    kwargs = {"strides": (s, s), "padding": (p,) * 4, "dilation": (d, d), "groups": g}
    return x, args, kwargs


def _run(cfg, prog, x, consts):
    out = np.zeros(prog.slots[-1].shape, np.int8)
    y, _ = run_program(prog, Simulator(cfg), [x, *consts, out])
    return y


def _check(cfg, shape, seed=0, schedule=None):
    x, args, kwargs = _layer(shape, seed)
    ours, c_ours = htir.conv2d_program(cfg, "tir", *args, **kwargs, schedule=schedule)
    plan = ConvSchedule(**ours.info["schedule"])
    ref, c_ref = direct_codegen.conv2d_program(cfg, "tir", *args, **kwargs, schedule=plan)
    assert ours.instructions == ref.instructions, instruction_diff(
        ours.instructions, ref.instructions
    )
    assert ours.slots == ref.slots
    for a, b in zip(c_ours, c_ref, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_run(cfg, ours, x, c_ours), _run(cfg, ref, x, c_ref))
    return ours


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tir_route_equals_codegen(shape):
    prog = _check(CFG, shape)
    assert prog.info["source"] == "tir"


@pytest.mark.parametrize("shape", SHAPES[:6], ids=str)
def test_tir_route_equals_codegen_tiny_buffers(shape):
    _check(tiny_buffers_config(), shape, seed=1)


def test_pruned_blocks_are_skipped():
    shape = (1, 32, 8, 32, 3, 1, 1, 1, 1, 0.5)
    prog = _check(CFG, shape, seed=2)
    gemms = sum(1 for i in prog.instructions if i.opcode == isa.Opcode.GEMM)
    assert prog.info["nonzero_blocks"] < prog.info["weight_blocks"]
    assert gemms == prog.info["nonzero_blocks"]  # one tile: one GEMM per non-zero block


def test_depthwise_loads_only_diagonal_blocks():
    prog = _check(CFG, (1, 64, 8, 64, 3, 1, 1, 1, 64, 0.0))
    assert prog.info["nonzero_blocks"] == 8 * 9  # 8 diagonal blocks x 9 taps of 64 blocks each


def test_dense_tir_route_equals_codegen():
    rng = np.random.default_rng(4)
    n, k, m = 3, 40, 19
    wt = rng.integers(-127, 128, (k, m)).astype(np.int8)
    wt[8:16] = 0  # an all-zero block row
    args = (CFG, "fc", (n, k), wt, rng.integers(-9, 9, m), np.ones(m), 8, (-128, 127))
    ours, c1 = htir.dense_program(*args)
    ref, c2 = direct_codegen.dense_program(*args)
    assert ours.instructions == ref.instructions, instruction_diff(
        ours.instructions, ref.instructions
    )
    assert ours.slots == ref.slots and ours.info["kind"] == "dense"


# ------------------------------------------------------------------ double buffering and arrays
def _mid():
    """Buffers that hold two tiles and two weight chunks but not all the weights."""
    return CFG.replace(
        name="mid-lowering", inp_buffer_bytes=8 * 200, wgt_buffer_bytes=64 * 40,
        acc_buffer_bytes=32 * 80,
    )  # fmt: skip


@pytest.mark.parametrize(
    "shape", [(1, 32, 8, 32, 3, 1, 1, 1, 1, 0.3), (2, 24, 9, 16, 3, 2, 1, 1, 1, 0.0)], ids=str
)
def test_double_buffered_streamed_weights_equal_single_buffered(shape):
    cfg = _mid()
    prog = _check(cfg, shape, seed=3)
    sched = ConvSchedule(**prog.info["schedule"])
    assert sched.double_buffer and prog.info["nonzero_blocks"] > cfg.wgt_depth
    # Both halves of every buffer are used.
    loads = [i for i in prog.instructions if i.opcode == isa.Opcode.LOAD]
    inp = {i.sram_addr for i in loads if i.buffer == isa.Buffer.INP}
    wgt = {i.sram_addr for i in loads if i.buffer == isa.Buffer.WGT}
    stores = {i.sram_addr for i in prog.instructions if i.opcode == isa.Opcode.STORE}
    assert len(inp) >= 2 and min(inp) == 0  # two halves
    assert max(wgt) >= sched.cob_group * sched.cib_chunk * 9 > min(wgt) == 0
    assert max(stores) >= 2 * sched.cob_group + sched.cob_group * sched.tile_h * sched.tile_w
    # Same bits as the single-buffered schedule.
    x, args, kwargs = _layer(shape, 3)
    single, c_single = direct_codegen.conv2d_program(
        cfg, "s", *args, **kwargs, schedule=replace(sched, double_buffer=False)
    )
    assert single.info["schedule"]["double_buffer"] is False
    ours, c_ours = htir.conv2d_program(cfg, "tir", *args, **kwargs)
    np.testing.assert_array_equal(_run(cfg, ours, x, c_ours), _run(cfg, single, x, c_single))


def test_double_buffering_overlaps_load_compute_and_store():
    cfg = _mid()
    x, args, kwargs = _layer((1, 32, 8, 32, 3, 1, 1, 1, 1, 0.0), 0)
    db, _ = htir.conv2d_program(cfg, "db", *args, **kwargs)
    sb, _ = htir.conv2d_program(
        cfg, "sb", *args, **kwargs,
        schedule=replace(ConvSchedule(**db.info["schedule"]), double_buffer=False),
    )  # fmt: skip
    t_db, t_sb = TimingModel(cfg).run(db.instructions), TimingModel(cfg).run(sb.instructions)
    assert t_db.cycles < 0.9 * t_sb.cycles


def test_plan_falls_back_to_single_buffering():
    # Buffers that hold the smallest 3x3 tile once but not twice (one array: one bank).
    cfg = CFG.replace(name="one-tile", num_arrays=1, inp_buffer_bytes=8 * 9,
                      wgt_buffer_bytes=64 * 9, acc_buffer_bytes=32 * 3)  # fmt: skip
    s = plan_conv(cfg, 4, 4, 4, 4, 3, 3, (1, 1), (1, 1), 1, 1)
    assert s == ConvSchedule(1, 1, 1, 1, double_buffer=False)
    s2 = plan_conv(CFG, 8, 8, 8, 8, 3, 3, (1, 1), (1, 1), 2, 4)
    assert s2.double_buffer
    assert fit_double_buffer(cfg, ConvSchedule(1, 1, 1, 1), 3, 3, (1, 1), (1, 1), 9) == s


def _gemm_arrays(prog):
    return [(i.acc_addr, i.array) for i in prog.instructions if i.opcode == isa.Opcode.GEMM]


def test_dense_dispatch_is_one_hapm_group_per_array_set():
    # (cib, kh, kw) outer, cob inner: consecutive GEMMs of one dispatch are the G blocks of one
    # HAPM group on min(G, P) distinct arrays, each accumulator region in one bank, on its
    # array; when P | G, block cob is on array (cob - cg0) % P.  (With G < P the other half's
    # regions are on the other arrays: the next group's GEMMs overlap the last ones.)
    for group in (1, 2, 4, 8):
        cfg = CFG.replace(name=f"arr{group}", num_arrays=4)
        x, args, kwargs = _layer((1, 16, 6, 64, 3, 1, 1, 1, 1, 0.0), 0)
        sched = ConvSchedule(6, 6, group, 2)
        prog, _ = htir.conv2d_program(cfg, "a", *args, **kwargs, schedule=sched)
        assert prog.info["schedule"] == sched.to_dict()  # emitted as asked
        gemms = [i for i in prog.instructions if i.opcode == isa.Opcode.GEMM]
        arrays_of = {}
        for g in gemms:
            assert g.array == acc_bank(cfg, g.acc_addr)
            arrays_of.setdefault(g.acc_addr, set()).add(g.array)
        assert all(len(a) == 1 for a in arrays_of.values())  # a region stays on one array
        used = set()
        for d in range(0, len(gemms), group):
            dispatch = gemms[d : d + group]
            assert len({g.acc_addr for g in dispatch}) == group  # G blocks, cob innermost
            arrays = [g.array for g in dispatch]
            used.update(arrays)
            assert len(set(arrays[:4])) == min(group, 4)  # on distinct arrays
            if group % 4 == 0:
                assert arrays == [k % 4 for k in range(group)]
        assert len(used) == min(2 * group, 4)  # both halves' regions
        # The dispatches are the groups of passes.prune.hapm_groups.
        gid = hapm_groups(args[1], 1, cfg, sched)
        assert len(np.unique(gid)) == len(gemms) // group  # one tile, dense


def _g(acc, inp=0):
    return isa.Instruction(
        isa.Opcode.GEMM, reset=1, inp_addr=inp, acc_addr=acc, outer=1, inner=16, inp_si=1,
        acc_si=1,
    )  # fmt: skip


def _a(dst, src=0):
    return isa.Instruction(
        isa.Opcode.ALU, alu_op=isa.AluOp.ADD, dst_addr=dst, src_addr=src, outer=1, inner=16,
        dst_si=1,
    )  # fmt: skip


def _ld(buf, sram, n):
    return isa.Instruction(
        isa.Opcode.LOAD, buffer=buf, sram_addr=sram, y_size=1, x_size=n, x_stride=n
    )


def _st(sram):
    return isa.Instruction(
        isa.Opcode.STORE, buffer=isa.Buffer.ACC, sram_addr=sram, y_size=1, x_size=16,
        x_stride=16,
    )  # fmt: skip


def test_interleave_epilogues_by_hand():
    cfg = CFG.replace(name="two-arrays", num_arrays=2)
    inp, acc = isa.Buffer.INP, isa.Buffer.ACC
    # Region 1 (acc 2..33) then region 2 (acc 34..65, bias rows 0..1 reloaded in between).
    e1, e2, s1 = _a(2), _a(18), _st(2)
    bias, next_inp = _ld(acc, 0, 2), _ld(inp, 64, 16)
    g2 = [_g(34 + 16 * (k % 2), 64) for k in range(6)]
    seq = [_ld(inp, 0, 16), _g(2), _g(18), e1, s1, e2, next_inp, bias, *g2, _a(34), _a(50)]
    out = interleave_epilogues(seq, cfg)
    # The load of the next region goes first; the 3 moved compute instructions (and the store
    # behind e1) follow the 3 dispatches of 2 GEMMs, one each.
    expect = [seq[0], seq[1], seq[2], next_inp, g2[0], g2[1], e1, s1, g2[2], g2[3], e2]
    assert out == [*expect, g2[4], g2[5], bias, seq[-2], seq[-1]]
    assert sorted(map(id, out)) == sorted(map(id, seq))
    # A GEMM into the region an epilogue instruction works on: nothing passes it.
    clash = [_g(2), _a(2), _g(2), _g(18)]
    assert interleave_epilogues(clash, cfg) == clash
    # Programs without GEMMs are unchanged.
    alu_only = [_ld(acc, 0, 4), _a(0), _st(0), _ld(inp, 0, 4)]
    assert interleave_epilogues(alu_only, cfg) == alu_only


def test_hoist_prologues_and_partial_flush_by_hand():
    cfg = CFG.replace(name="two-arrays", num_arrays=2)
    acc = isa.Buffer.ACC
    # Three regions alternating between accumulator halves A (2..17) and B (18..33), each a
    # prologue (shortcut load, ALU from constant row 0), two GEMMs, an epilogue (ALU from row 1)
    # and a store.
    parts, seq, regions = [], [], []
    for base in (2, 18, 2):
        pro, gemms, epi = (
            [_ld(acc, base, 16), _a(base, 0)],
            [_g(base), _g(base)],
            [_a(base, 1), _st(base)],
        )
        regions.append((len(seq), len(seq), len(seq) + 2))
        seq += pro + gemms + epi
        parts.append((pro, gemms, epi))
    (p0, g0, e0), (p1, g1, e1), (p2, g2, e2) = parts
    # Region k+1's prologue moves ahead of region k, after region k-1's epilogue (same half).
    hoisted = hoist_prologues(seq, regions)
    assert hoisted == [*p0, *p1, *g0, *e0, *p2, *g1, *e1, *g2, *e2]
    # A full flush runs P1 before the arrays start; the partial flush lets it (and P2 with E0)
    # run while the GEMMs of the other half do.
    assert interleave_epilogues(hoisted, cfg)[:6] == [*p0, *p1, *g0]
    out = interleave_epilogues(hoisted, cfg, partial_flush=True)
    assert out == [*p0, *g0, *p1, *g1, *e0, *p2, *g2, *e1, *e2]


def test_fuse_epilogues_by_hand():
    alu, op = isa.AluOp, isa.Opcode.ALU
    add = _a(2, src=0)  # bias row 0 into entries 2..17
    req = add.replace(alu_op=alu.REQUANT, src_addr=1, imm=9)  # multiplier row 1
    relu = add.replace(alu_op=alu.MAX, use_imm=1, imm=0, src_addr=0)
    clip = relu.replace(alu_op=alu.MIN, imm=100)
    fused = add.replace(alu_op=alu.ADD_REQUANT, imm=9)
    st = _st(2)
    assert fuse_epilogues([add, req, relu, st]) == [fused.replace(imm=9 | isa.REQUANT_RELU), st]
    assert fuse_epilogues([add, req, clip, st]) == [fused, clip, st]
    assert fuse_epilogues([add, req, relu.replace(imm=-3)])[1:] == [relu.replace(imm=-3)]
    # left alone: the multiplier not after the bias, other loop nests, dependency tokens,
    # repeated destinations (a reduction), destinations over the rows they read
    for pair in (
        [add, req.replace(src_addr=5)],
        [add, req.replace(inner=8)],
        [add, req.replace(src_si=1)],
        [add.replace(push_next=1), req],
        [add.replace(dst_si=0), req.replace(dst_si=0)],
        [add.replace(src_addr=10), req.replace(src_addr=11)],
    ):
        assert fuse_epilogues(pair) == pair
    assert all(i.opcode != op or i.alu_op != alu.ADD_REQUANT for i in fuse_epilogues([req, add]))


def test_conv_epilogue_is_one_pass_per_output_block():
    # ReLU conv: per output block and tile one ADD_REQUANT with the ReLU flag, no ADD, REQUANT
    # or MAX left; with a clip to [0, 6] a MIN stays after it
    rng = np.random.default_rng(4)
    w = rng.integers(-127, 128, (16, 8, 3, 3)).astype(np.int8)
    args = ((1, 8, 8, 8), w, np.arange(16), np.full(16, 300), 12)
    for clip, extra in (((0, 127), []), ((0, 6), [isa.AluOp.MIN])):
        prog, _ = htir.conv2d_program(CFG, "c", *args, clip, padding=(1,) * 4)
        alus = [i for i in prog.instructions if i.opcode == isa.Opcode.ALU]
        regions = sum(1 for i in prog.instructions if i.opcode == isa.Opcode.STORE)
        assert [i.alu_op for i in alus] == [isa.AluOp.ADD_REQUANT, *extra] * regions
        assert all(i.imm == 12 | isa.REQUANT_RELU for i in alus[:: 1 + len(extra)])


def test_plan_conv_trades_input_chunks_for_larger_tiles():
    # ResNet-18's 3x3/2 64->128 layer on zedboard: all 8 input-channel blocks per chunk force
    # 2-row tiles (56 pixels per GEMM); 4 blocks per chunk allow 7 rows (196 pixels), reloading
    # the input for each of the 4 output-channel groups: estimated (and simulated) faster.
    base = ConvSchedule(2, 28, 4, 8)
    s = plan_conv(CFG, 56, 56, 28, 28, 3, 3, (2, 2), (1, 1), 8, 16)
    assert s == ConvSchedule(7, 28, 4, 4)
    args = (28, 28, 3, 3, (2, 2), (1, 1), 8, 16)
    assert estimate_conv_cycles(CFG, s, *args) < 0.95 * estimate_conv_cycles(CFG, base, *args)
    # The array term by hand: 4 tiles x 4 groups x 72 GEMMs per array x (26 + 196) cycles
    # (2R + C + 2 = 26 fixed cycles per GEMM).
    assert estimate_conv_cycles(CFG, s, *args) == 4 * 4 * 72 * 222
    # Stride 1, input not the limit: the base plan stays.
    assert plan_conv(CFG, 56, 56, 56, 56, 3, 3, (1, 1), (1, 1), 8, 8) == ConvSchedule(4, 56, 4, 8)


def test_sparse_dispatch_spreads_blocks_over_the_arrays():
    # 8 output-channel blocks per group on 4 arrays, half the blocks pruned: the remaining
    # blocks are spread over the arrays (a region moves only once its previous GEMM is done).
    cfg = CFG.replace(name="arr-sparse", num_arrays=4)
    rng = np.random.default_rng(5)
    w = rng.integers(-127, 128, (64, 32, 3, 3)).astype(np.int8)
    w = prune_random_blocks(cfg, w, 1, 0.5, rng)
    args = ((1, 32, 8, 8), w, None, np.ones(64), 8, (-128, 127))
    sched = ConvSchedule(8, 8, 8, 4)
    prog, _ = htir.conv2d_program(cfg, "s", *args, padding=(1,) * 4, schedule=sched)
    assert prog.info["schedule"] == sched.to_dict()  # emitted as asked
    r = TimingModel(cfg).run(prog.instructions)
    # No accumulator region is written by two arrays at once.
    gemm_idx = [k for k, i in enumerate(prog.instructions) if i.opcode == isa.Opcode.GEMM]
    spans = {}
    for k in gemm_idx:
        spans.setdefault(prog.instructions[k].acc_addr, []).append((r.start[k], r.end[k]))
    for ivs in spans.values():
        ivs.sort()
        assert all(a[1] <= b[0] for a, b in zip(ivs, ivs[1:], strict=False))
    # Faster than keeping each region on the fixed array (cob - cg0) % P.
    fixed = [
        i.replace(array=((i.acc_addr - 16) // 64) % 4) if i.opcode == isa.Opcode.GEMM else i
        for i in prog.instructions
    ]
    assert r.cycles < 0.9 * TimingModel(cfg).run(fixed).cycles


# ------------------------------------------------------------------ ALU-only layers through TIR
# (shape, mult_a, mult_b, shift, clip); zedboard: 8 lanes, ALU tiles of at most 1023 entries
ADD_SHAPES = [
    ((1, 64, 8, 8), 37, -21, 7, (-100, 120)),  # 512 entries: two double-buffered tiles of 256
    ((2, 13, 5, 5), 300, 5, 9, (-128, 127)),  # odd channels, two images: one tile of 100
    ((1, 16, 32, 32), 3, 4, 2, (0, 127)),  # 2048 entries: tiles 4 x 410 + 408 (partial)
    ((3, 10), 11, 12, 4, (-5, 5)),  # a 2-D (dense) tensor: one tile of 3
    ((1, 8, 30, 37), -9, 40, 6, (-20, 90)),  # 1110 entries: tiles 3 x 278 + 276 (partial)
    ((1, 24, 7, 9), 5, 6, 3, (-128, 127)),  # 189 entries: tiles 95 + 94
]


@pytest.mark.parametrize("case", ADD_SHAPES, ids=str)
def test_add_tir_route_equals_codegen(case):
    shape, ma, mb, shift, clip = case
    args = (CFG, "add", shape, ma, mb, shift, clip)
    ours, c1 = htir.add_program(*args)
    ref, c2 = direct_codegen.add_program(*args)
    assert ours.instructions == ref.instructions, instruction_diff(
        ours.instructions, ref.instructions
    )
    assert ours.slots == ref.slots and c1 == c2 == []
    assert ours.info["source"] == "tir"
    rng = np.random.default_rng(5)
    a = rng.integers(-128, 128, shape).astype(np.int8)
    b = rng.integers(-128, 128, shape).astype(np.int8)

    def run(prog):
        y, _ = run_program(prog, Simulator(CFG), [a, b, np.zeros(shape, np.int8)])
        return y

    np.testing.assert_array_equal(run(ours), run(ref))


@pytest.mark.parametrize("shape", [(1, 24, 7, 9), (1, 8, 25, 25)], ids=str)
def test_add_tir_route_tiny_accumulator(shape):
    # 256 accumulator entries: double-buffered tiles of at most 64 (189 entries: 3 x 63;
    # 625 entries: 9 x 63 + 58, partial)
    cfg = tiny_buffers_config()
    args = (cfg, "add", shape, 5, 6, 3, (-128, 127))
    ours, _ = htir.add_program(*args)
    ref, _ = direct_codegen.add_program(*args)
    assert ours.info["schedule"]["double_buffer"]
    assert ours.instructions == ref.instructions, instruction_diff(
        ours.instructions, ref.instructions
    )
    rng = np.random.default_rng(2)
    a = rng.integers(-128, 128, shape).astype(np.int8)
    b = rng.integers(-128, 128, shape).astype(np.int8)
    y, _ = run_program(ours, Simulator(cfg), [a, b, np.zeros(shape, np.int8)])
    s = (a.astype(np.int64) * 5 + b.astype(np.int64) * 6 + 4) >> 3
    np.testing.assert_array_equal(y, np.clip(s, -128, 127))


def _add_tiles(prog):
    """Per tile of a sequential add program: (lhs load, rhs load, ALU instructions, stores)."""
    loads = [i for i in prog.instructions if i.opcode == isa.Opcode.LOAD]
    alus = [i for i in prog.instructions if i.opcode == isa.Opcode.ALU]
    stores = [i for i in prog.instructions if i.opcode == isa.Opcode.STORE]
    assert len(loads) == 2 * len(stores) and len(alus) == 6 * len(stores)
    return [
        (loads[2 * k], loads[2 * k + 1], alus[6 * k : 6 * k + 6], stores[k])
        for k in range(len(stores))
    ]


@pytest.mark.parametrize("case", ADD_SHAPES, ids=str)
def test_add_tiles_are_balanced_and_double_buffered(case):
    shape, ma, mb, shift, clip = case
    prog, _ = direct_codegen.add_program(CFG, "add", shape, ma, mb, shift, clip)
    sched = EltwiseSchedule(**prog.info["schedule"])
    tiles = _add_tiles(prog)
    sizes = [st.x_size for *_, st in tiles]
    total = sum(sizes)
    assert len(sizes) == -(-total // sched.tile)
    assert sizes[:-1] == [sched.tile] * (len(sizes) - 1)
    assert sched.tile - len(sizes) < sizes[-1] <= sched.tile  # no full tiles and a sliver
    assert sched.double_buffer == (len(sizes) > 1)
    t = sched.tile
    copies = 2 if sched.double_buffer else 1
    assert 2 * copies * t <= CFG.acc_depth
    for k, (la, lb, alus, st) in enumerate(tiles):
        half = k % copies
        lhs, rhs = half * t, (copies + half) * t
        assert (la.sram_addr, lb.sram_addr, st.sram_addr) == (lhs, rhs, lhs)
        assert {a.dst_addr for a in alus} == {lhs, rhs}
    # the loads of tile k+1 come after the ADD of tile k, before its SHR (program order)
    order = {id(i): j for j, i in enumerate(prog.instructions)}
    for (_, _, alus, _), (la, lb, _, _) in zip(tiles, tiles[1:], strict=False):
        assert alus[2].alu_op == isa.AluOp.ADD
        assert order[id(alus[2])] < order[id(la)] < order[id(lb)] < order[id(alus[3])]


def test_plan_eltwise_rule():
    # 2048 entries of two operands on zedboard (2048 accumulator entries): halves of 512
    # entries allow 4 tiles at least; 5 balanced tiles are estimated fastest.
    sched = plan_eltwise(CFG, 2048, buffers=2, double_buffer=True, alu_passes=6)
    assert sched == EltwiseSchedule(410, True)
    # without double buffering: the fewest tiles that fit, balanced (683 + 683 + 682)
    assert plan_eltwise(CFG, 2048, buffers=2) == EltwiseSchedule(683)
    # one tile: nothing to overlap, single buffered
    assert plan_eltwise(CFG, 100, buffers=2, double_buffer=True, alu_passes=6) == EltwiseSchedule(
        100
    )
    # the halves do not fit (3 free entries for two operands): single buffered, tiles of 1
    sched = plan_eltwise(CFG, 10, buffers=2, reserved=CFG.acc_depth - 3, double_buffer=True)
    assert sched == EltwiseSchedule(1, False)
    with pytest.raises(ScheduleError):
        plan_eltwise(CFG, 10, buffers=2, reserved=CFG.acc_depth - 1)
    # the estimate is the timing model's cycle count (but the FINISH cycle)
    for case in ADD_SHAPES:
        shape, ma, mb, shift, clip = case
        prog, _ = direct_codegen.add_program(CFG, "add", shape, ma, mb, shift, clip)
        sched = EltwiseSchedule(**prog.info["schedule"])
        total = sum(i.x_size for i in prog.instructions if i.opcode == isa.Opcode.STORE)
        est = estimate_eltwise_cycles(CFG, total, sched.tile, 2, 6, sched.double_buffer)
        assert TimingModel(CFG).run(prog.instructions).cycles == est + 1


# (shape, mult, shift, clip)
GAP_SHAPES = [
    ((1, 64, 8, 8), 77, 9, (-100, 120)),  # one tile, MAX and MIN clip
    ((2, 13, 5, 5), 300, 11, (-128, 127)),  # odd channels, two images, no clip instruction
    ((3, 8, 7, 7), 21, 6, (0, 127)),  # batch 3, MAX only
    ((1, 16, 41, 41), 5, 13, (-128, 100)),  # 1681 pixels: balanced tiles 841, 840 (partial)
]


def _gap_check(cfg, case, seed=0):
    shape, mult, shift, clip = case
    args = (cfg, "gap", shape, mult, shift, clip)
    ours, c1 = htir.global_avg_pool_program(*args)
    ref, c2 = direct_codegen.global_avg_pool_program(*args)
    assert ours.instructions == ref.instructions, instruction_diff(
        ours.instructions, ref.instructions
    )
    assert ours.slots == ref.slots and ours.info["source"] == "tir"
    for a, b in zip(c1, c2, strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(seed).integers(-128, 128, shape).astype(np.int8)
    np.testing.assert_array_equal(_run(cfg, ours, x, c1), _run(cfg, ref, x, c2))


@pytest.mark.parametrize("case", GAP_SHAPES, ids=str)
def test_global_avg_pool_tir_route_equals_codegen(case):
    _gap_check(CFG, case)


def test_global_avg_pool_tir_route_tiny_accumulator():
    # 256 accumulator entries, 2 reserved: balanced pixel tiles of 221, 220 (partial)
    _gap_check(tiny_buffers_config(), ((2, 20, 21, 21), 9, 12, (-50, 50)), seed=3)


# (shape, pool, stride, padding (t, l, b, r), dilation)
MAXPOOL_SHAPES = [
    ((1, 16, 8, 8), 3, 2, (1, 1, 1, 1), 1),  # padded windows (pad_min), 2x2 tiles
    ((2, 13, 9, 9), 2, 2, (0, 0, 0, 0), 1),  # odd channels, two images
    ((3, 5, 10, 10), 3, 1, (2, 2, 2, 2), 2),  # batch 3, dilation 2
    ((1, 64, 56, 56), 3, 2, (1, 1, 1, 1), 1),  # ResNet stem pool
    ((1, 8, 9, 9), 1, 1, (0, 0, 0, 0), 1),  # 1x1 window
    ((1, 8, 11, 10), 3, 2, (0, 1, 1, 0), 1),  # asymmetric padding
]


def _maxpool_check(cfg, case, seed=0):
    shape, k, s, pad, d = case
    args = (cfg, "pool", shape, (k, k), (s, s), pad, (d, d))
    ours, c1 = htir.max_pool2d_program(*args)
    ref, c2 = direct_codegen.max_pool2d_program(*args)
    assert ours.instructions == ref.instructions, instruction_diff(
        ours.instructions, ref.instructions
    )
    assert ours.slots == ref.slots and c1 == c2 == [] and ours.info["source"] == "tir"
    x = np.random.default_rng(seed).integers(-128, 128, shape).astype(np.int8)
    x.reshape(-1)[::7] = -128  # the minimum, also what the padding holds
    np.testing.assert_array_equal(_run(cfg, ours, x, c1), _run(cfg, ref, x, c2))
    return ours


@pytest.mark.parametrize("case", MAXPOOL_SHAPES, ids=str)
def test_max_pool_tir_route_equals_codegen(case):
    _maxpool_check(CFG, case)


@pytest.mark.parametrize(
    "case",
    [((1, 64, 56, 56), 3, 2, (1, 1, 1, 1), 1), ((1, 16, 32, 32), 2, 2, (0, 0, 0, 0), 1)],
    ids=str,
)
def test_max_pool_tir_route_tiny_accumulator(case):
    prog = _maxpool_check(tiny_buffers_config(), case, seed=1)
    sched = prog.info["schedule"]
    assert sched["tile_h"] * sched["tile_w"] < 28 * 28  # tiled


def test_relax_flow_lowers_pools_through_tir():
    import tvm

    from tvm_hapm.passes import hapm_pipeline

    cfg = get_config("hapm_fpga")
    mod = build_int_network(cfg)
    programs = []
    ex = tvm.compile(mod, target="hapm_fpga", relax_pipeline=hapm_pipeline(cfg, programs))
    source = {p.info["kind"]: p.info["source"] for p in programs}
    assert source["max_pool2d"] == source["global_avg_pool"] == "tir", source
    shape = [int(v) for v in mod["main"].params[0].ty.shape]
    x = np.random.default_rng(2).integers(-128, 128, shape).astype(np.int8)
    for r, o in zip(llvm_reference(mod, x), run_vm(ex, x), strict=True):
        np.testing.assert_array_equal(o, r)


def test_dispatch_group_divides_the_blocks_and_keeps_the_arrays_busiest():
    for cob in range(1, 33):
        g = dispatch_group(cob, 4)
        assert cob % g == 0
        util = g / (4 * -(-g // 4))
        assert all(d / (4 * -(-d // 4)) <= util + 1e-12 for d in range(1, cob + 1) if cob % d == 0)
    assert [dispatch_group(c, 4) for c in (4, 6, 7, 8, 14)] == [4, 3, 7, 4, 7]


def test_seven_output_blocks_spread_over_the_arrays():
    """56 output channels on 4 arrays: a dispatch group of 1 (the largest divisor of 7 up to 4)
    chained every GEMM of an output block on one array and took 2.9x as many cycles."""
    shape = (1, 56, 8, 56, 3, 1, 1, 1, 1, 0.0)
    prog = _check(CFG, shape)
    assert prog.info["source"] == "tir" and prog.info["schedule"]["cob_group"] == 7
    arrays = {i.array for i in prog.instructions if i.opcode == isa.Opcode.GEMM}
    assert arrays == set(range(CFG.num_arrays))
    timing = TimingModel(CFG).run(prog.instructions)
    busy = np.asarray(timing.array_busy, float)
    # no array carries the layer alone: 7 regions pinned to 4 banks, 2 or 1 per array
    assert busy.min() >= 0.5 * busy.max()
