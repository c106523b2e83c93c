"""Planned tiles that do not divide the output, through TIR.

A convolution (plain, strided, with a fused residual) or a max pooling whose planned tiles do not
divide its output is defined by output regions (:func:`~tvm_hapm.target.tir.compute.output_regions`:
the full tiles, the last column, the last row, the corner), so its edge tiles are exact blocks
that tensorize.  The stream must be the direct generator's, instruction by instruction (the
generator it replaced as the fallback of ``LowerToHapm``), and the simulated result the NumPy
oracle's, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import s_tir
from tvm.relax.frontend.onnx import from_onnx

import tvm_hapm
from tvm_hapm.models import zoo
from tvm_hapm.passes import hapm_pipeline
from tvm_hapm.runtime.driver import run_program
from tvm_hapm.runtime.simulator import Simulator
from tvm_hapm.target import tir as htir
from tvm_hapm.target.config import get_config
from tvm_hapm.target.schedule import ConvSchedule
from tvm_hapm.testing import (
    direct_codegen,
    fused_conv_oracle,
    instruction_diff,
    llvm_reference,
    prune_random_blocks,
    run_vm,
    tiny_buffers_config,
)

CFG = get_config("zedboard")
S = ConvSchedule

# (n, cin, hw, cout, k, stride, pad, prune, fused), schedule: every plan leaves edge tiles
CONV_CASES = [
    ((1, 32, 7, 32, 3, 1, 1, 0.0, False), S(3, 5, 1, 1, True)),  # edge row, column, corner
    ((1, 32, 7, 32, 3, 1, 1, 0.0, True), S(3, 5, 2, 2, True)),  # fused, two chunks
    ((1, 32, 14, 32, 1, 2, 0, 0.0, False), S(4, 7, 4, 4, True)),  # strided: rows only
    ((1, 32, 14, 32, 1, 2, 0, 0.0, True), S(4, 7, 4, 4, True)),  # ResNet's projections
    ((2, 16, 9, 16, 3, 2, 1, 0.0, True), S(2, 3, 2, 1, False)),  # batch 2, single buffered
    ((1, 16, 11, 32, 3, 1, 0, 0.0, False), S(4, 2, 2, 1, True)),  # many column tiles
    ((1, 32, 9, 32, 3, 1, 1, 0.5, False), S(4, 4, 2, 2, True)),  # pruned blocks
    ((1, 32, 9, 32, 3, 1, 1, 0.5, True), S(2, 4, 4, 1, True)),  # pruned, fused
    ((1, 16, 10, 16, 3, 1, 1, 0.0, False), S(1, 3, 1, 1, True)),  # one-row tiles
]
# Planned (schedule None): the plans leave edge rows.
PLANNED_CASES = [((1, 32, 17, 32, 3, 1, 1, 0.0, True), None)]  # 17 = 9 + 8 rows
# Planned on tiny buffers (weights streamed in chunks, small tiles).
TINY_CASES = [
    ((1, 32, 14, 64, 1, 2, 0, 0.0, True), None),  # double buffered, one input block a chunk
    ((1, 32, 15, 32, 3, 1, 1, 0.0, False), None),  # single buffered
    ((1, 16, 17, 32, 3, 2, 1, 0.3, True), None),  # strided, pruned
]


def _layer(cfg, case, seed):
    """A random layer: ``(x, shortcut or None, args, kwargs)``."""
    n, cin, hw, cout, kk, stride, pad, prune, fused = case
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (cout, cin, kk, kk)).astype(np.int8)
    if prune:
        w = prune_random_blocks(cfg, w, 1, prune, rng)
    x = rng.integers(-128, 128, (n, cin, hw, hw)).astype(np.int8)
    oh = (hw + 2 * pad - kk) // stride + 1
    shortcut = rng.integers(-128, 128, (n, cout, oh, oh)).astype(np.int8) if fused else None
    bias, mult = rng.integers(-500, 500, cout), rng.integers(1, 300, cout)
    args = ((n, cin, hw, hw), w, bias, mult, 12, (0, 120))
    kwargs = {"strides": (stride, stride), "padding": (pad,) * 4}
    if fused:
        kwargs["residual"] = rng.integers(16, 3000, cout)
    return x, shortcut, args, kwargs


def _run(cfg, prog, inputs, consts):
    out = np.zeros(prog.slots[-1].shape, np.int8)
    y, _ = run_program(prog, Simulator(cfg), [*inputs, *consts, out])
    return y


@pytest.mark.parametrize(
    ("cfg", "case", "schedule"),
    [(CFG, *c) for c in CONV_CASES + PLANNED_CASES]
    + [(tiny_buffers_config(), *c) for c in TINY_CASES],
    ids=[f"zedboard-{c}" for c in CONV_CASES + PLANNED_CASES] + [f"tiny-{c}" for c in TINY_CASES],
)
def test_edge_tiles_through_tir_equal_the_direct_generator(cfg, case, schedule):
    x, shortcut, args, kwargs = _layer(cfg, case, seed=3)
    ours, c_ours = htir.conv2d_program(cfg, "edge", *args, **kwargs, schedule=schedule)
    plan = ConvSchedule(**ours.info["schedule"])
    oh, ow = ours.slots[-1].shape[2:]
    assert oh % plan.tile_h or ow % plan.tile_w  # the tiles do not divide the output
    ref, c_ref = direct_codegen.conv2d_program(cfg, "edge", *args, **kwargs, schedule=plan)
    assert ours.instructions == ref.instructions, instruction_diff(
        ours.instructions, ref.instructions
    )
    assert ours.slots == ref.slots and ours.info["source"] == "tir"
    for a, b in zip(c_ours, c_ref, strict=True):
        np.testing.assert_array_equal(a, b)
    inputs = [x] if shortcut is None else [x, shortcut]
    y = _run(cfg, ours, inputs, c_ours)
    n, cin, hw, cout, kk, stride, pad, _, fused = case
    w, bias, mult = args[1:4]
    k = kwargs["residual"] if fused else np.zeros(cout, np.int64)
    sc = shortcut if fused else np.zeros((n, cout, oh, ow), np.int8)
    ref_y = fused_conv_oracle(x, w, bias, sc, k, mult, 12, (0, 120), stride, pad)
    np.testing.assert_array_equal(y, ref_y)


def test_edge_tiles_are_exact_blocks():
    """One output region per tile size, each tensorized without a predicate, one output."""
    func = htir.conv2d_primfunc(
        CFG, 1, 32, 7, 7, 32, 3, 3, padding=(1,) * 4, shift=12, residual=True, tile=(3, 5)
    )
    regions = htir.layer_of(func)["regions"]
    assert [(r["tile_h"], r["tile_w"]) for r in regions] == [(3, 5), (3, 2), (1, 5), (1, 2)]
    main = htir.schedule_conv2d(func, CFG, S(3, 5, 1, 1, True)).mod["main"]
    assert [str(p.name) for p in main.params] == [
        "data", "residual", "weight", "bias_mult", "out"
    ]  # fmt: skip
    gemm_blocks, predicated = [], []

    def on_realize(realize):
        if str(realize.block.name_hint).startswith("conv") and "_update" in str(
            realize.block.name_hint
        ):
            gemm_blocks.append(str(realize.block.name_hint))
        pred = realize.predicate
        if not (isinstance(pred, tvm.tirx.IntImm) and int(pred.value) == 1):
            predicated.append(str(realize.block.name_hint))

    tvm_ffi.structural_walk(main.body, (s_tir.SBlockRealize, on_realize))
    assert sorted(gemm_blocks) == sorted(
        ["conv_update_o", "conv@1_update_o", "conv@2_update_o", "conv@3_update_o"]
    )
    assert predicated == []


def test_a_function_defined_for_other_tiles_is_refused():
    func = htir.conv2d_primfunc(CFG, 1, 16, 7, 7, 16, 3, 3, padding=(1,) * 4, tile=(3, 5))
    with pytest.raises(htir.TirLoweringError, match="defined for 3x5 tiles"):
        htir.schedule_conv2d(func, CFG, S(2, 5, 1, 1, True))
    pool = htir.max_pool2d_primfunc(CFG, 2, 9, 9, (3, 3), (2, 2), (1,) * 4, (1, 1), tile=(2, 3))
    with pytest.raises(htir.TirLoweringError, match="defined for 2x3 tiles"):
        htir.schedule_max_pool2d(pool, 2, 5, {})


# ------------------------------------------------------------------ max pooling
def _np_max_pool(x, k, s, pad, d):
    """int8 NCHW max pooling, the padding the int8 minimum."""
    n, c, h, w = x.shape
    pt, pl, pb, pr = pad
    xp = np.full((n, c, h + pt + pb, w + pl + pr), -128, np.int64)
    xp[:, :, pt : pt + h, pl : pl + w] = x
    oh = (h + pt + pb - d * (k - 1) - 1) // s + 1
    ow = (w + pl + pr - d * (k - 1) - 1) // s + 1
    out = np.full((n, c, oh, ow), -128, np.int64)
    for y in range(k):
        for z in range(k):
            rows = slice(y * d, y * d + s * (oh - 1) + 1, s)
            cols = slice(z * d, z * d + s * (ow - 1) + 1, s)
            out = np.maximum(out, xp[:, :, rows, cols])
    return out.astype(np.int8)


# (shape, pool, stride, padding, dilation) on tiny buffers: every plan leaves edge tiles
POOL_CASES = [
    ((2, 24, 14, 14), 3, 2, (1, 1, 1, 1), 1),
    ((1, 16, 23, 25), 2, 2, (0, 0, 0, 0), 1),
    ((1, 8, 31, 33), 3, 1, (1, 1, 1, 1), 1),
    ((1, 8, 17, 19), 3, 1, (2, 2, 2, 2), 2),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_edge_tiles_through_tir_equal_the_direct_generator(case):
    cfg = tiny_buffers_config()
    shape, k, s, pad, d = case
    args = (cfg, "pool", shape, (k, k), (s, s), pad, (d, d))
    ours, _ = htir.max_pool2d_program(*args)
    plan = ours.info["schedule"]
    oh, ow = ours.slots[-1].shape[2:]
    assert oh % plan["tile_h"] or ow % plan["tile_w"]
    ref, _ = direct_codegen.max_pool2d_program(*args)
    assert ours.instructions == ref.instructions, instruction_diff(
        ours.instructions, ref.instructions
    )
    assert ours.slots == ref.slots and ours.info["source"] == "tir"
    x = np.random.default_rng(5).integers(-128, 128, shape).astype(np.int8)
    np.testing.assert_array_equal(_run(cfg, ours, [x], []), _np_max_pool(x, k, s, pad, d))


# ------------------------------------------------------------------ the Relax flow
def _has_edge_tiles(prog) -> bool:
    sched, shape = prog.info["schedule"], prog.slots[-1].shape
    if "tile_h" not in sched or len(shape) != 4:
        return False
    return bool(shape[2] % sched["tile_h"] or shape[3] % sched["tile_w"])


def test_relax_flow_lowers_edge_tiles_through_tir_bit_exact():
    """A network whose fused convolutions and max pooling leave edge tiles on tiny buffers:
    every program comes from TIR and the network equals TVM's llvm build."""
    cfg = tiny_buffers_config()
    model = zoo.resnet_cifar(depth=8, width=16, input_hw=(14, 22), batch=1)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    cal = [rng.uniform(0, 1, shape).astype("float32") for _ in range(2)]
    q = tvm_hapm.quantize(from_onnx(model), calibration=cal, config=cfg)
    programs = []
    ex = tvm.compile(q, target="hapm_fpga", relax_pipeline=hapm_pipeline(cfg, programs))
    assert {p.info["source"] for p in programs} == {"tir"}
    edges = [p for p in programs if _has_edge_tiles(p)]
    assert any(p.info.get("residual") for p in edges), [p.info for p in programs]
    x = rng.uniform(0, 1, shape).astype("float32")
    np.testing.assert_array_equal(run_vm(ex, x)[0], llvm_reference(q, x)[0])


# (cin, hw, cout, k): block counts with few divisors (43, 25 and 7 input or output blocks on
# zedboard's 8-wide arrays), where halving the chunk or lowering the group gives non-divisors
ODD_BLOCK_CASES = [(338, 6, 96, 3), (200, 5, 200, 3), (24, 9, 56, 1), (56, 7, 40, 3)]


@pytest.mark.parametrize("cfg", [CFG, tiny_buffers_config()], ids=["zedboard", "tiny"])
@pytest.mark.parametrize("case", ODD_BLOCK_CASES, ids=str)
def test_planned_groups_and_chunks_are_what_tir_emits(cfg, case):
    """The planner's output-channel group and input-channel chunk divide the block counts, so
    the TIR route (which has no partial group or chunk) emits the planned schedule, and the two
    generators give the same stream for the default plan."""
    cin, hw, cout, kk = case
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (cout, cin, kk, kk)).astype(np.int8)
    args = ((1, cin, hw, hw), w, rng.integers(-500, 500, cout), rng.integers(1, 300, cout), 12,
            (0, 120))  # fmt: skip
    kwargs = {"padding": (kk // 2,) * 4}
    ref, _ = direct_codegen.conv2d_program(cfg, "odd", *args, **kwargs)
    ours, _ = htir.conv2d_program(cfg, "odd", *args, **kwargs)
    plan = ConvSchedule(**ref.info["schedule"])
    cob, cib = -(-cout // cfg.array_cols), -(-cin // cfg.array_rows)
    assert cob % plan.cob_group == 0 and cib % plan.cib_chunk == 0, plan
    assert ours.info["schedule"] == ref.info["schedule"]
    assert ours.instructions == ref.instructions, instruction_diff(
        ours.instructions, ref.instructions
    )
