"""End-to-end: integer networks compiled for hapm_fpga equal TVM's llvm build bit for bit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tvm
from tvm import relax

import tvm_hapm
from tvm_hapm.passes import hapm_pipeline, last_compile_report
from tvm_hapm.runtime import last_run_stats
from tvm_hapm.target.config import HardwareConfig, get_config
from tvm_hapm.testing import build_int_network, llvm_reference, run_vm


def _inputs(cfg, shape, seed=1):
    lo, hi = cfg.act_range
    return np.random.default_rng(seed).integers(lo, hi + 1, shape).astype(cfg.act_dtype)


@pytest.mark.parametrize(
    "target, batch, hw",
    [
        ("hapm_fpga", 1, (11, 9)),
        ("hapm_fpga-zybo-z7-10", 2, (8, 13)),
        ("hapm_fpga-zcu104", 3, (12, 12)),
    ],
)
def test_bit_exact_against_llvm(target, batch, hw):
    cfg = get_config(target)
    mod = build_int_network(cfg, batch=batch, h=hw[0], w=hw[1])
    x = _inputs(cfg, (batch, 5, *hw))
    ref = llvm_reference(mod, x)
    out = run_vm(tvm.compile(mod, target=target), x)
    report = last_compile_report()
    assert sorted(set(report["accelerator"].values())) == [
        "add",
        "conv2d",
        "dense",
        "global_avg_pool",
        "max_pool2d",
    ]
    assert report["host"] == {"relax.reshape": 1}
    for r, o in zip(ref, out):
        assert r.dtype == o.dtype and r.shape == o.shape
        np.testing.assert_array_equal(o, r)
        assert np.unique(r).size >= min(5, r.size)  # not a comparison of constant tensors
    stats = last_run_stats()
    assert len(stats.layers) == len(report["accelerator"])
    assert stats.macs > 0 and stats.dram_bytes > 0
    assert stats.by_opcode["GEMM"] > 0 and stats.by_opcode["FINISH"] == len(stats.layers)
    cfg_clock = get_config(target).clock_mhz
    assert stats.cycles == sum(layer.cycles for layer in stats.layers) > 0
    assert abs(stats.latency_ms - stats.cycles / cfg_clock / 1e3) < 1e-9
    assert stats.energy_uj > 0


def test_int16_config_is_bit_exact():
    cfg = HardwareConfig(name="wide16", act_bits=16, weight_bits=16, num_arrays=2)
    target = tvm_hapm.target.hapm_target(cfg)
    mod = build_int_network(cfg, batch=1)
    x = _inputs(cfg, (1, 5, 11, 9))
    ref = llvm_reference(mod, x)
    out = run_vm(tvm.compile(mod, target=target), x)
    for r, o in zip(ref, out):
        np.testing.assert_array_equal(o, r)
        assert o.dtype == np.int16


def test_tiny_buffers_force_tiling():
    """Buffers far smaller than the layer: the schedule tiles rows, columns and channels."""
    cfg = HardwareConfig(
        name="tiny-buffers",
        num_arrays=2,
        array_rows=4,
        array_cols=4,
        inp_buffer_bytes=64 * 4,
        wgt_buffer_bytes=16 * 16 * 4,
        acc_buffer_bytes=40 * 16,
    )
    target = tvm_hapm.target.hapm_target(cfg)
    mod = build_int_network(cfg, batch=1, h=17, w=15, cmid=11)
    x = _inputs(cfg, (1, 5, 17, 15))
    ref = llvm_reference(mod, x)
    programs = []
    out = run_vm(tvm.compile(mod, target=target, relax_pipeline=hapm_pipeline(cfg, programs)), x)
    for r, o in zip(ref, out):
        np.testing.assert_array_equal(o, r)
    conv = programs[0].info["schedule"]
    assert conv["tile_h"] < 17  # the tile really was cut


def test_same_model_compiles_to_identical_streams():
    cfg = get_config("hapm_fpga")
    streams = []
    for _ in range(2):
        programs = []
        tvm.compile(
            build_int_network(cfg), "hapm_fpga", relax_pipeline=hapm_pipeline(cfg, programs)
        )
        streams.append(b"".join(p.to_bytes() for p in programs))
    assert len(streams[0]) > 1000
    assert streams[0] == streams[1]


def test_other_targets_are_unaffected():
    cfg = get_config("hapm_fpga")
    mod = build_int_network(cfg)
    lowered = relax.get_pipeline("default")
    with tvm.target.Target("llvm"):
        text = lowered(mod).script()
    assert "hapm_fpga.run" not in text
    with tvm.target.Target("hapm_fpga"):
        text = lowered(mod).script()
    assert "hapm_fpga.run" in text


def test_float_model_is_refused_with_advice():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(np.ones((4, 3, 3, 3), "float32"))
            y = bb.emit_output(bb.emit(relax.op.nn.conv2d(x, w)))
        bb.emit_func_output(y)
    with pytest.raises(Exception, match=r"tvm_hapm\.quantize"):
        tvm.compile(bb.get(), target="hapm_fpga")


def test_export_and_load_in_new_process(tmp_path):
    cfg = get_config("hapm_fpga")
    mod = build_int_network(cfg, batch=2)
    x = _inputs(cfg, (2, 5, 11, 9))
    out = run_vm(tvm.compile(mod, target="hapm_fpga"), x)
    lib = tmp_path / "model.so"
    tvm.compile(mod, target="hapm_fpga").export_library(str(lib))
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import numpy as np, tvm
        from tvm import relax
        import tvm_hapm
        vm = relax.VirtualMachine(tvm.runtime.load_module({str(lib)!r}), tvm.cpu())
        outs = vm["main"](tvm.runtime.tensor(np.load({str(tmp_path / "x.npy")!r})))
        np.savez({str(tmp_path / "y.npz")!r}, *[o.numpy() for o in outs])
        print(tvm_hapm.runtime.last_run_stats().instructions)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip().splitlines()[-1]) > 0
    loaded = np.load(tmp_path / "y.npz")
    for k, o in enumerate(out):
        np.testing.assert_array_equal(loaded[f"arr_{k}"], o)


def test_large_tiles_split_alu_loops():
    """A tile of more pixels than the ALU's inner loop field holds (zcu104, 40x40, 1x1 conv)."""
    from tvm_hapm.passes import qops

    cfg = get_config("zcu104")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 40, 40), "int8"))
    rng = np.random.default_rng(3)
    with bb.function("main", [x]):
        with bb.dataflow():
            w = rng.integers(-127, 128, (16, 16, 1, 1)).astype("int8")
            m, s = qops.choose_multiplier(rng.uniform(0.002, 0.01, 16))
            y = qops.emit_conv2d(
                bb, x, w, None, (1, 1), (0, 0, 0, 0), (1, 1), 1, m, s, -128, 127, "int8"
            )
            y = bb.emit_output(y)
        bb.emit_func_output(y)
    mod = bb.get()
    xi = _inputs(cfg, (1, 16, 40, 40))
    np.testing.assert_array_equal(
        run_vm(tvm.compile(mod, "hapm_fpga-zcu104"), xi)[0], llvm_reference(mod, xi)[0]
    )


def test_double_buffered_residual_add_overlaps_and_is_bit_exact():
    """A residual add of 2048 accumulator entries (ResNet-20's first stage on zedboard): balanced
    double-buffered tiles, whose operand loads start before the previous tile's ALU work ends
    and whose stores overlap the next tile's ALU work."""
    from tvm_hapm.passes import qops
    from tvm_hapm.runtime import profile
    from tvm_hapm.target.isa import Opcode

    cfg = get_config("zedboard")
    shape = (1, 16, 32, 32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "int8"))
    y = relax.Var("y", relax.TensorType(shape, "int8"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            ma, sa = qops.choose_multiplier([0.7, 0.45], qops.add_mult_bits(cfg.act_bits))
            z = qops.emit_add(bb, x, y, int(ma[0]), int(ma[1]), sa, 0, 127, "int8")
            z = bb.emit_output(z)
        bb.emit_func_output(z)
    mod = bb.get()
    xi, yi = _inputs(cfg, shape, seed=4), _inputs(cfg, shape, seed=5)
    with profile():
        out = run_vm(tvm.compile(mod, "hapm_fpga"), xi, yi)[0]
    np.testing.assert_array_equal(out, llvm_reference(mod, xi, yi)[0])
    assert last_compile_report()["accelerator"] and not last_compile_report()["host"]
    (trace,) = last_run_stats().traces
    assert trace.program.info["schedule"] == {"tile": 410, "double_buffer": True}
    insns, start, end = trace.program.instructions, trace.timing.start, trace.timing.end
    loads = [k for k, i in enumerate(insns) if i.opcode == Opcode.LOAD]
    alus = [k for k, i in enumerate(insns) if i.opcode == Opcode.ALU]
    stores = [k for k, i in enumerate(insns) if i.opcode == Opcode.STORE]
    assert len(stores) == 5 and len(loads) == 10 and len(alus) == 30
    for t in range(4):
        # tile t+1's loads start before tile t's last ALU pass ends
        assert start[loads[2 * t + 2]] < end[alus[6 * t + 5]]
        # tile t's store overlaps tile t+1's first ALU pass
        assert start[stores[t]] < end[alus[6 * t + 6]] and start[alus[6 * t + 6]] < end[stores[t]]
    assert trace.timing.cycles == 17301  # single buffered (tiles of 683): 18825


# ------------------------------------------------------------------------ no silent fallback
def _conv_model(batch):
    from tvm.relax.frontend.onnx import from_onnx

    from tvm_hapm.passes.quantize import quantize
    from tvm_hapm.testing import OnnxGraph, random_samples

    g = OnnxGraph(1)
    y = g.node("Relu", [g.bn(g.conv("x", 3, 8, bias=False), 8)])
    m = g.model({"x": [batch, 3, 8, 8]}, y, [batch, 8, 8, 8])
    return quantize(from_onnx(m), random_samples(2, 0))


def test_dynamic_batch_warns_that_layers_stay_on_the_host():
    import warnings

    with pytest.warns(UserWarning, match=r"1 integer conv2d/matmul .* host.*int8\[N, 3, 8, 8\].*"
                      r"bind the batch"):  # fmt: skip
        tvm.compile(_conv_model("N"), target="hapm_fpga")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a static batch runs on the accelerator, silently
        tvm.compile(_conv_model(1), target="hapm_fpga")


def test_model_quantized_for_another_precision_is_refused():
    from tvm_hapm.passes.lower import LoweringError

    int16 = HardwareConfig(name="int16", act_bits=16, weight_bits=16)
    with pytest.raises(LoweringError, match=r"quantized for int8 data.*'int16' computes int16"):
        tvm.compile(_conv_model(1), target="hapm_fpga", relax_pipeline=hapm_pipeline(int16))


def test_run_stats_start_afresh_at_every_run():
    """``last_run_stats()`` describes the last run even when it ran no accelerator layer (every
    entry function compiled for hapm_fpga calls ``hapm_fpga.begin_run`` first)."""
    import warnings

    from tvm_hapm.testing import random_samples

    cfg = get_config("zedboard")
    accelerated = tvm.compile(build_int_network(cfg), target="hapm_fpga")
    run_vm(accelerated, _inputs(cfg, (1, 5, 11, 9)))
    assert last_run_stats().macs > 0 and last_run_stats().layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its conv stays on the host (symbolic batch)
        host_only = tvm.compile(_conv_model("N"), target="hapm_fpga")
    relax.VirtualMachine(host_only, tvm.cpu())["main"](tvm.runtime.tensor(random_samples(1, 1)[0]))
    assert last_run_stats().layers == [] and last_run_stats().macs == 0
