"""Residual adds fused into the producing convolution: quantizer, partition and code generator.

The quantizer's fused form (``qops.emit_conv2d_residual``) is checked against the same model
spelled out by hand; the code generator's program against a NumPy oracle of that arithmetic,
on the simulator, bit for bit; the whole flow against TVM's llvm build.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from tvm_hapm import quantize
from tvm_hapm.passes import hapm_pipeline, last_compile_report, qops
from tvm_hapm.passes.quantize import emit as quantize_module
from tvm_hapm.runtime import last_run_stats
from tvm_hapm.runtime.driver import run_program
from tvm_hapm.runtime.simulator import Simulator
from tvm_hapm.target import isa
from tvm_hapm.target import tir as htir
from tvm_hapm.target.config import get_config
from tvm_hapm.testing import (
    ONNX_INPUT_SHAPE,
    RESIDUAL_CASES,
    OnnxGraph,
    calls,
    fused_conv_oracle,
    llvm_reference,
    prune_random_blocks,
    random_samples,
    rel_err,
    residual_add_model,
    run_llvm,
    run_vm,
    tiny_buffers_config,
)

CFG = get_config("zedboard")


# ------------------------------------------------------------------------------ quantizer
def _block():
    """x -> relu(conv A) = a -> conv B (+bias, no activation) -> relu(B + a)."""
    g = OnnxGraph(21)
    a = g.node("Relu", [g.conv("x", 3, 4)])
    return g, a


def test_expected_module_residual_fused():
    """The fused residual spelled out: K = floor(s_a / (s_a * s_w)), widened weight scales."""
    g, a = _block()
    y = g.node("Relu", [g.node("Add", [g.conv(a, 4, 4), a])])
    onnx_model = g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 4, 8, 8])
    g2, a2 = _block()  # the same weights, with `a` as the output: its calibration scale
    mod_a = from_onnx(g2.model({"x": ONNX_INPUT_SHAPE}, a2, [1, 4, 8, 8]))
    mod = from_onnx(onnx_model)
    cal = random_samples(4, 0)
    report = []
    q = quantize(mod, cal, report=report)
    assert sum("residual add fused" in line for line in report) == 1, report

    init = {
        t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx_model.graph.initializer
    }
    wa, ba, wb, bb_ = (init[f"c{k}"] for k in range(4))
    s_in = float(max(np.abs(x).max() for x in cal)) / 127
    s_a = float(max(r.max() for r in run_llvm(mod_a, cal))) / 127
    s_out = float(max(r.max() for r in run_llvm(mod, cal))) / 127
    # conv A: the ordinary scheme
    s_wa = np.abs(wa).reshape(4, -1).max(axis=1) / 127
    wqa = np.clip(np.round(wa / s_wa[:, None, None, None]), -127, 127).astype("int8")
    bqa = np.round(ba / (s_in * s_wa)).astype(np.int32)
    ma, sa = qops.choose_multiplier(s_in * s_wa / s_a)
    # conv B with the shortcut a: its input scale is s_a too, so K = floor(1 / s_w)
    s_wb = np.abs(wb).reshape(4, -1).max(axis=1) / 127
    k = np.floor(s_a / (s_a * s_wb))
    assert k.min() >= quantize_module.RESIDUAL_MIN_K
    s_wb = s_a / (s_a * k)
    wqb = np.clip(np.round(wb / s_wb[:, None, None, None]), -127, 127).astype("int8")
    bqb = np.round(bb_ / (s_a * s_wb)).astype(np.int32)
    mb, sb = qops.choose_multiplier(s_a * s_wb / s_out)

    x = relax.Var("x", relax.TensorType(ONNX_INPUT_SHAPE, "float32"))
    attrs = {key: v for key, v in mod["main"].attrs.items() if key != "global_symbol"}
    bb = relax.BlockBuilder()
    with bb.function("main", [x], attrs=attrs):
        with bb.dataflow():
            xq = qops.emit_quantize(bb, x, s_in, "int8")
            aq = qops.emit_conv2d(
                bb, xq, wqa, bqa, [1, 1], [1, 1, 1, 1], [1, 1], 1, ma, sa, 0, 127, "int8"
            )
            yq = qops.emit_conv2d_residual(
                bb, aq, wqb, bqb, [1, 1], [1, 1, 1, 1], [1, 1], 1, aq, k.astype(np.int32),
                mb, sb, 0, 127, "int8",
            )  # fmt: skip
            gv = bb.emit_output(qops.emit_dequantize(bb, yq, s_out))
        bb.emit_func_output(gv)
    tvm.ir.assert_structural_equal(q["main"], bb.get()["main"])


def test_fusion_keeps_accuracy_and_can_be_turned_off():
    mod = from_onnx(residual_add_model())
    cal = random_samples(8, 0)
    fused = quantize(mod, cal)
    plain = quantize(mod, cal, fuse_residual=False)
    # fused: the shortcut is an astype -> multiply(K) term of a conv accumulator; plain: an
    # element-wise add of two requantized tensors (one more requantization)
    assert len(calls(plain, "relax.right_shift")) == len(calls(fused, "relax.right_shift")) + 1
    err_fused, err_plain = rel_err(mod, fused, cal[:4]), rel_err(mod, plain, cal[:4])
    assert err_fused < 0.05 and err_plain < 0.05
    assert err_fused < 1.5 * err_plain  # one rounding fewer: not worse than the separate add


def test_shortcut_weights_below_the_minimum_keep_the_add_separate(monkeypatch):
    mod = from_onnx(residual_add_model())
    cal = random_samples(8, 0)
    plain = quantize(mod, cal, fuse_residual=False)
    monkeypatch.setattr(quantize_module, "RESIDUAL_MIN_K", 2**40)
    report = []
    refused = quantize(mod, cal, report=report)
    assert not any("fused" in line for line in report)
    assert any("(residual add, int8)" in line for line in report)
    for a, b in zip(run_llvm(plain, cal[:2]), run_llvm(refused, cal[:2]), strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- code generator
@pytest.mark.parametrize("cfg", [CFG, tiny_buffers_config()], ids=["zedboard", "tiny"])
@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=str)
def test_fused_conv_matches_numpy_oracle(cfg, case):
    n, cin, hw, cout, kk, stride, pad, prune = case
    rng = np.random.default_rng(7)
    w = rng.integers(-127, 128, (cout, cin, kk, kk)).astype(np.int8)
    if prune:
        w = prune_random_blocks(cfg, w, 1, prune, rng)
    x = rng.integers(-128, 128, (n, cin, hw, hw)).astype(np.int8)
    oh = (hw + 2 * pad - kk) // stride + 1
    shortcut = rng.integers(-128, 128, (n, cout, oh, oh)).astype(np.int8)
    bias = rng.integers(-500, 500, cout)
    mult = rng.integers(1, 300, cout)
    k = rng.integers(16, 3000, cout)
    clip = (0, 120)
    prog, consts = htir.conv2d_program(
        cfg, "fused", (n, cin, hw, hw), w, bias, mult, 12, clip, (stride, stride), (pad,) * 4,
        residual=k,
    )  # fmt: skip
    assert [s.name for s in prog.slots] == ["data", "residual", "weight_blocks", "bias_mult", "out"]
    out = np.zeros(prog.slots[-1].shape, np.int8)
    y, stats = run_program(prog, Simulator(cfg), [x, shortcut, *consts, out])
    ref = fused_conv_oracle(x, w, bias, shortcut, k, mult, 12, clip, stride, pad)
    np.testing.assert_array_equal(y, ref)
    assert np.unique(ref).size > 5
    gemms = sum(1 for i in prog.instructions if i.opcode == isa.Opcode.GEMM)
    assert (gemms == 0) == (prog.info["nonzero_blocks"] == 0)
    assert stats.cycles > 0


def test_fused_conv_costs_far_less_than_conv_plus_add():
    """Several regions: the shortcut's load, multiply and bias add cost the conv less than half
    of what the separate add program costs (its order is checked by hand in
    ``test_lowering.py::test_hoist_prologues_and_partial_flush_by_hand``)."""
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (16, 16, 3, 3)).astype(np.int8)
    bias, mult = rng.integers(-500, 500, 16), rng.integers(1, 300, 16)
    shape = (1, 16, 32, 32)
    fused, _ = htir.conv2d_program(
        CFG, "f", shape, w, bias, mult, 12, (0, 120), padding=(1,) * 4, residual=np.full(16, 40)
    )
    plain, _ = htir.conv2d_program(CFG, "p", shape, w, bias, mult, 12, (0, 120), padding=(1,) * 4)
    add, _ = htir.add_program(CFG, "a", (1, 16, 32, 32), 300, 200, 9, (0, 127))
    cycles = {}
    for name, prog in (("fused", fused), ("plain", plain), ("add", add)):
        dram = [np.zeros(s.dram_elems, s.dtype) for s in prog.slots]
        cycles[name] = Simulator(CFG).run(prog.instructions, dram, timing=True).cycles
    assert cycles["fused"] < cycles["plain"] + 0.5 * cycles["add"], cycles
    assert fused.info["residual"] and fused.info["schedule"]["double_buffer"]


# ----------------------------------------------------------------------------- whole flow
def test_onnx_residual_network_runs_fused_and_bit_exact():
    mod = from_onnx(residual_add_model())
    cal = random_samples(8, 0)
    q = quantize(mod, cal)
    programs = []
    ex = tvm.compile(q, target="hapm_fpga", relax_pipeline=hapm_pipeline(CFG, programs))
    x = cal[5]
    np.testing.assert_array_equal(run_vm(ex, x)[0], llvm_reference(q, x)[0])
    kinds = sorted(last_compile_report()["accelerator"].values())
    assert "conv2d_residual" in kinds and "add" not in kinds
    fused = [p for p in programs if p.info.get("residual")]
    assert len(fused) == 1 and fused[0].info["source"] == "tir"
    assert len(last_run_stats().layers) == len(programs)
