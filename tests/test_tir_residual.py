"""The TIR route of a convolution with a fused residual add against the direct generator.

:func:`tvm_hapm.target.tir.conv2d_program` with ``residual=K`` (the conv reduction starting
from ``int32(shortcut) * K + bias``, the shortcut's DMA injected into the accumulator region,
the prologue hoisted and the epilogues flushed partially as the direct generator does) must give
the same slots, constants and instruction stream as
``direct_codegen.conv2d_program(..., residual=K)``,
and the same bits on the simulator as the NumPy oracle,
:func:`tvm_hapm.testing.fused_conv_oracle`.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm.relax.frontend.onnx import from_onnx

import tvm_hapm
from tvm_hapm.models import zoo
from tvm_hapm.passes import hapm_pipeline, last_compile_report
from tvm_hapm.runtime.driver import run_program
from tvm_hapm.runtime.simulator import Simulator
from tvm_hapm.target import isa, layout
from tvm_hapm.target import tir as htir
from tvm_hapm.target.config import get_config
from tvm_hapm.target.program import pack_activation
from tvm_hapm.target.schedule import ConvSchedule
from tvm_hapm.testing import (
    RESIDUAL_CASES,
    direct_codegen,
    fused_conv_oracle,
    instruction_diff,
    llvm_reference,
    prune_random_blocks,
    run_vm,
    tiny_buffers_config,
)

CFG = get_config("zedboard")


def _layer(cfg, shape, seed):
    """A random fused layer: ``(x, shortcut, args, kwargs)``; ``shape`` is
    ``(n, cin, hw, cout, k, stride, pad, dilation, groups, prune)``."""
    n, cin, hw, cout, kk, stride, pad, dil, groups, prune = shape
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (cout, cin // groups, kk, kk)).astype(np.int8)
    if prune:
        w = prune_random_blocks(cfg, w, groups, prune, rng)
    x = rng.integers(-128, 128, (n, cin, hw, hw)).astype(np.int8)
    oh = (hw + 2 * pad - dil * (kk - 1) - 1) // stride + 1
    shortcut = rng.integers(-128, 128, (n, cout, oh, oh)).astype(np.int8)
    bias = rng.integers(-500, 500, cout)
    mult = rng.integers(1, 300, cout)
    k = rng.integers(16, 3000, cout)
    args = ((n, cin, hw, hw), w, bias, mult, 12, (0, 120))
    kwargs = {
        "strides": (stride, stride), "padding": (pad,) * 4, "dilation": (dil, dil),
        "groups": groups, "residual": k,
    }  # fmt: skip
    return x, shortcut, args, kwargs


def _run(cfg, prog, x, shortcut, consts):
    out = np.zeros(prog.slots[-1].shape, np.int8)
    y, _ = run_program(prog, Simulator(cfg), [x, shortcut, *consts, out])
    return y


def _check(cfg, shape, seed=0, schedule=None):
    x, shortcut, args, kwargs = _layer(cfg, shape, seed)
    ours, c_ours = htir.conv2d_program(cfg, "fused", *args, **kwargs, schedule=schedule)
    plan = ConvSchedule(**ours.info["schedule"])
    ref, c_ref = direct_codegen.conv2d_program(cfg, "fused", *args, **kwargs, schedule=plan)
    assert ours.instructions == ref.instructions, instruction_diff(
        ours.instructions, ref.instructions
    )
    assert ours.slots == ref.slots
    assert [s.name for s in ours.slots] == ["data", "residual", "weight_blocks", "bias_mult", "out"]
    for a, b in zip(c_ours, c_ref, strict=True):
        np.testing.assert_array_equal(a, b)
    y = _run(cfg, ours, x, shortcut, c_ours)
    np.testing.assert_array_equal(y, _run(cfg, ref, x, shortcut, c_ref))
    assert ours.info["source"] == "tir" and ours.info["kind"] == "conv2d_residual"
    return ours, y, (x, shortcut, args, kwargs)


@pytest.mark.parametrize("cfg", [CFG, tiny_buffers_config()], ids=["zedboard", "tiny"])
@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=str)
def test_tir_route_equals_codegen_residual(cfg, case):
    """tests/test_residual.py's ``RESIDUAL_CASES``; the result is also the NumPy oracle's."""
    n, cin, hw, cout, kk, stride, pad, prune = case
    prog, y, (x, shortcut, args, kwargs) = _check(
        cfg, (n, cin, hw, cout, kk, stride, pad, 1, 1, prune), seed=7
    )
    w, bias, mult = args[1:4]
    ref = fused_conv_oracle(
        x, w, bias, shortcut, kwargs["residual"], mult, 12, (0, 120), stride, pad
    )
    np.testing.assert_array_equal(y, ref)
    gemms = [i for i in prog.instructions if i.opcode == isa.Opcode.GEMM]
    assert len(gemms) > 0 or prog.info["nonzero_blocks"] == 0
    assert not any(g.reset for g in gemms)  # every GEMM accumulates onto the shortcut


S = ConvSchedule
# (n, cin, hw, cout, k, stride, pad, dilation, groups, prune), schedule on the zedboard
SCHEDULED = [
    # input channels in chunks, two groups, eight double-buffered regions
    ((1, 16, 8, 32, 3, 1, 1, 1, 1, 0.0), S(2, 8, 2, 1, True)),
    ((1, 16, 8, 32, 3, 1, 1, 1, 1, 0.0), S(1, 8, 2, 2, True)),  # one-row tiles
    ((2, 16, 8, 32, 3, 1, 1, 1, 1, 0.6), S(4, 4, 1, 1, True)),  # pruned, batch 2, 32 regions
    ((1, 16, 16, 16, 3, 2, 1, 1, 1, 0.9), S(2, 8, 1, 1, True)),  # regions without any GEMM
    ((1, 32, 8, 32, 3, 1, 1, 1, 32, 0.0), None),  # depthwise
    ((1, 24, 10, 48, 3, 1, 2, 2, 3, 0.0), None),  # grouped, dilation 2
    ((1, 128, 8, 128, 3, 1, 1, 1, 1, 0.5), None),  # weights not resident: chunks double buffered
]


@pytest.mark.parametrize(("shape", "schedule"), SCHEDULED, ids=str)
def test_tir_route_equals_codegen_residual_schedules(shape, schedule):
    _check(CFG, shape, seed=1, schedule=schedule)


def test_tir_route_equals_codegen_residual_tile_beyond_one_alu_loop():
    """A tile of more pixels than one ALU loop holds (1600 > 1023): its epilogue loops over rows
    and columns.  One array, so that the region fits a bank (of the whole accumulator)."""
    one = CFG.replace(name="one-bank-residual", num_arrays=1)
    _check(one, (1, 8, 40, 8, 1, 1, 0, 1, 1, 0.0), seed=1, schedule=S(40, 40, 1, 1, True))


def test_tir_route_equals_codegen_residual_small_buffers():
    """Buffers where the weights are not resident and the regions are double buffered."""
    mid = CFG.replace(
        name="mid-residual", wgt_buffer_bytes=64 * 64, acc_buffer_bytes=512 * 32,
        inp_buffer_bytes=1024 * 8,
    )  # fmt: skip
    for shape in [(1, 32, 16, 32, 3, 1, 1, 1, 1, 0.0), (2, 32, 16, 48, 3, 2, 1, 1, 1, 0.3)]:
        prog, _, _ = _check(mid, shape, seed=2)
        assert prog.info["schedule"]["double_buffer"]


def test_fused_tir_starts_the_reduction_from_the_shortcut():
    """The scheduled function: the init of the conv reduction reads the shortcut, and after
    the TIR passes the shortcut tile is a DMA into the GEMMs' accumulator region."""
    func = htir.conv2d_primfunc(
        CFG, 1, 16, 8, 8, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 9, (0, 120), residual=True
    )
    assert [str(p.name) for p in func.params] == [
        "data", "residual", "weight", "bias_mult", "out"
    ]  # fmt: skip
    sch = htir.schedule_conv2d(func, CFG)
    init = htir.blocks_named(sch.mod["main"].body, "conv_init")["conv_init"]
    assert {str(r.source.name) for r in init.reads} == {"residual", "bias_mult_global.hapm_acc"}
    lowered = htir.LowerToAccelerator(CFG)(sch.mod)["main"]
    loads = []

    def on_call(call):
        if htir.is_call(call, htir.DMA_LOAD):
            loads.append((str(call.args[1].args[0].name), str(call.args[3].args[0].name)))

    tvm_ffi.structural_walk(lowered.body, (tvm.ir.expr.Call, on_call))
    assert ("conv_global.hapm_acc", "residual") in loads


def test_fused_primfunc_builds_for_llvm_and_hapm_fpga():
    """The TE definition (the restored init included) built for llvm, and its schedule built
    for hapm_fpga (the simulator), both equal the NumPy oracle."""
    rng = np.random.default_rng(0)
    n, cin, hw, cout, clip = 1, 16, 8, 16, (0, 120)
    w = rng.integers(-127, 128, (cout, cin, 3, 3)).astype(np.int8)
    x = rng.integers(-128, 128, (n, cin, hw, hw)).astype(np.int8)
    shortcut = rng.integers(-128, 128, (n, cout, hw, hw)).astype(np.int8)
    bias, mult = rng.integers(-500, 500, cout), rng.integers(1, 300, cout)
    k = rng.integers(16, 3000, cout)
    func = htir.conv2d_primfunc(
        CFG, n, cin, hw, hw, cout, 3, 3, (1, 1), (1,) * 4, (1, 1), 12, clip, residual=True
    )
    C = CFG.array_cols
    inputs = [
        pack_activation(x, CFG.array_rows),
        pack_activation(shortcut, C),
        np.ascontiguousarray(layout.expand_weight_blocks(CFG, w, 1)),
        layout.bias_mult_rows(CFG, "f", cout, bias, mult, k),
    ]
    ref = pack_activation(fused_conv_oracle(x, w, bias, shortcut, k, mult, 12, clip, 1, 1), C)
    for mod, target in (
        (tvm.IRModule({"main": func.without_attr(htir.LAYER_ATTR)}), "llvm"),
        (htir.schedule_conv2d(func, CFG).mod, "hapm_fpga"),
    ):
        lib = tvm.tirx.build(mod, target=target)
        out = tvm.runtime.tensor(np.zeros(ref.shape, np.int8))
        lib["main"](*[tvm.runtime.tensor(a) for a in inputs], out)
        np.testing.assert_array_equal(out.numpy(), ref, err_msg=target)


def test_onnx_resnet_runs_fused_convs_through_tir_bit_exact():
    """Strided projection shortcuts, batch 2, non-square: every fused conv goes through TIR and
    the network equals TVM's llvm build."""
    model = zoo.resnet_cifar(depth=8, width=8, input_hw=(12, 20), batch=2)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    cal = [rng.uniform(0, 1, shape).astype("float32") for _ in range(2)]
    q = tvm_hapm.quantize(from_onnx(model), calibration=cal)
    programs = []
    ex = tvm.compile(q, target="hapm_fpga", relax_pipeline=hapm_pipeline(CFG, programs))
    x = rng.uniform(0, 1, shape).astype("float32")
    np.testing.assert_array_equal(run_vm(ex, x)[0], llvm_reference(q, x)[0])
    fused = [p for p in programs if p.info.get("residual")]
    assert len(fused) == 3
    assert all(p.info["source"] == "tir" for p in fused)
    kinds = sorted(last_compile_report()["accelerator"].values())
    assert kinds.count("conv2d_residual") == 3
