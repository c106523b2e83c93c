"""Tests of post-training quantization (:mod:`tvm_hapm.passes.quantize`).

Every model is a small ONNX graph built with ``onnx.helper``, imported with ``from_onnx``,
quantized with random calibration inputs and compiled for llvm next to its float original.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import tvm
from onnx import numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from tvm_hapm.passes import qops
from tvm_hapm.passes.quantize import (
    DEFAULT_PERCENTILE,
    Quantize,
    QuantizeError,
    has_float_compute,
    is_quantized,
    quantize,
)
from tvm_hapm.target.config import HardwareConfig
from tvm_hapm.testing import (
    ONNX_INPUT_SHAPE,
    OnnxGraph,
    calls,
    random_samples,
    rel_err,
    residual_add_model,
    run_llvm,
    run_vm,
)

INT16 = HardwareConfig(act_bits=16, weight_bits=16)


# ------------------------------------------------------------------------------------------
# ONNX model building (OnnxGraph and residual_add_model: tvm_hapm.testing)
# ------------------------------------------------------------------------------------------
def conv_bn_relu():
    g = OnnxGraph(1)
    y = g.node("Relu", [g.bn(g.conv("x", 3, 8, bias=False), 8)])
    return g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 8, 8, 8])


def strided_odd_channels():
    g = OnnxGraph(2)
    y = g.node("Relu", [g.conv("x", 3, 5, k=3, stride=2, pad=1)])
    y = g.conv(y, 5, 7, k=1, stride=2, pad=0)
    return g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 7, 2, 2])


def depthwise_conv():
    g = OnnxGraph(3)
    y = g.node("Relu", [g.bn(g.conv("x", 3, 6, k=1, pad=0, bias=False), 6)])
    y = g.node("Relu", [g.bn(g.conv(y, 6, 6, k=3, group=6, bias=False), 6)])
    y = g.conv(y, 6, 4, k=1, pad=0)
    return g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 4, 8, 8])


def maxpool_global_avg_pool():
    g = OnnxGraph(6)
    y = g.conv("x", 3, 8)  # no ReLU: padding of the pool must use the int minimum
    y = g.node("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    y = g.node("Relu", [g.conv(y, 8, 8)])
    y = g.node("Flatten", [g.node("GlobalAveragePool", [y])])
    y = g.gemm(y, 8, 10)
    return g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 10])


def avgpool():
    g = OnnxGraph(7)
    y = g.node("Relu", [g.conv("x", 3, 8)])
    y = g.node("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = g.node(
        "AveragePool", [y], kernel_shape=[3, 3], strides=[1, 1], pads=[1] * 4, count_include_pad=1
    )
    y = g.conv(y, 8, 4)
    return g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 4, 4, 4])


def gemm():
    g = OnnxGraph(9)
    y = g.node("Flatten", [g.node("Relu", [g.conv("x", 3, 4, stride=2)])])
    y = g.node("Relu", [g.gemm(y, 64, 16)])
    y = g.gemm(y, 16, 10, bias=False)
    return g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 10])


def clip6():
    g = OnnxGraph(10)
    y = g.clip(g.bn(g.conv("x", 3, 8, bias=False), 8), 0.0, 6.0)
    y = g.clip(g.conv(y, 8, 8, k=3, group=8), 0.0, 6.0)
    y = g.conv(y, 8, 4, k=1, pad=0)
    return g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 4, 8, 8])


def bn_after_relu():
    g = OnnxGraph(15)
    y = g.bn(g.node("Relu", [g.conv("x", 3, 8)]), 8)  # no conv to fold this batch norm into
    y = g.conv(y, 8, 4)
    return g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 4, 8, 8])


def sigmoid():
    g = OnnxGraph(11)
    y = g.node("Sigmoid", [g.conv("x", 3, 8)])
    y = g.conv(y, 8, 4)
    return g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 4, 8, 8])


def check_clip6(q, report):
    # conv+BN+Clip(0,6) and depthwise+Clip(0,6) requantize with lo = 0; the last conv: full range
    int64_clips = [c for c in calls(q, "relax.clip") if str(c.args[0].ty.dtype) == "int64"]
    assert [int(c.args[1].value) for c in int64_clips] == [0, 0, -128]
    assert all(int(c.args[2].value) == 127 for c in int64_clips)


def check_maxpool(q, report):
    assert dtypes(q, "relax.nn.max_pool2d") == ["int8"]
    assert any("global avg pool" in line for line in report)


def check_sigmoid(q, report):
    assert dtypes(q, "relax.sigmoid") == ["float32"]
    assert any(line.startswith("sigmoid") and "host float" in line for line in report)


def check_bn_after_relu(q, report):
    # the batch norm runs as a depthwise 1x1 int conv, not as float ops on the host
    groups = [int(c.attrs.groups) for c in calls(q, "relax.nn.conv2d")]
    assert groups == [1, 8, 1]
    assert any("depthwise 1x1" in line for line in report)


def int_residual_adds(q):
    """The ``a * Ma + b * Mb`` adds of emit_add (int32, two tensor operands)."""
    return [
        c
        for c in calls(q, "relax.add")
        if str(c.ty.dtype) == "int32" and all(isinstance(a, relax.Var) for a in c.args)
    ]


def check_residual(q, report):
    assert len(int_residual_adds(q)) == 1


# name -> (builder, #int conv2d, #int matmul, #host ops in the report, extra check)
MODELS = {
    "conv_bn_relu": (conv_bn_relu, 1, 0, 0, None),
    "strided_odd_channels": (strided_odd_channels, 2, 0, 0, None),
    "depthwise_conv": (depthwise_conv, 3, 0, 0, None),
    "residual_add": (residual_add_model, 3, 0, 0, check_residual),
    "maxpool_global_avg_pool": (maxpool_global_avg_pool, 2, 1, 0, check_maxpool),
    "avgpool": (avgpool, 4, 0, 0, None),  # the two pools become depthwise all-ones convs
    "gemm": (gemm, 1, 2, 0, None),
    "clip6": (clip6, 3, 0, 0, check_clip6),
    "bn_after_relu": (bn_after_relu, 3, 0, 0, check_bn_after_relu),
    "sigmoid": (sigmoid, 2, 0, 1, check_sigmoid),
}


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def pct(arrays, q=DEFAULT_PERCENTILE):
    """The calibration statistic: the percentile of |x| over all elements (numpy's linear)."""
    flat = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64)
    return float(np.percentile(np.abs(flat), q))


def dtypes(mod, op_name):
    return sorted(str(c.ty.dtype) for c in calls(mod, op_name))


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_int8_models(name):
    build, n_conv, n_matmul, n_host, check = MODELS[name]
    mod = from_onnx(build())
    report = []
    cal = random_samples(8, 0)
    q = quantize(mod, cal, report=report)
    # (a) the expected qops chains, nothing float left in the layers
    assert dtypes(q, "relax.nn.conv2d") == ["int32"] * n_conv
    assert dtypes(q, "relax.matmul") == ["int32"] * n_matmul
    assert is_quantized(q) and not has_float_compute(q)
    assert relax.analysis.check_well_formed(q)
    assert has_float_compute(mod) and not is_quantized(mod)
    assert len(calls(q, "relax.right_shift")) >= n_conv + n_matmul
    assert sum("host float" in line for line in report) == n_host, report
    if check is not None:
        check(q, report)
    # the signature is unchanged
    assert q["main"].params[0].ty.dtype == "float32"
    tvm.ir.assert_structural_equal(q["main"].ret_ty, mod["main"].ret_ty)
    # (b) accuracy on calibration data: max calibration of 8 samples clips held-out data of
    # these tiny nets noticeably (up to 12 % on depthwise_conv), which is not what this checks
    err = rel_err(mod, q, cal[:4])
    assert err < 0.05, f"{name}: int8 relative L2 error {err:.4f}"


@pytest.mark.parametrize("name", ["residual_add", "avgpool", "gemm"])
def test_int16(name):
    mod = from_onnx(MODELS[name][0]())
    cal = random_samples(8, 0)
    q = quantize(mod, cal, INT16)
    casts = {str(c.attrs.dtype) for c in calls(q, "relax.astype")}
    assert "int16" in casts and "int8" not in casts
    for c in calls(q, "relax.nn.conv2d") + calls(q, "relax.matmul"):
        assert str(c.args[1].ty.dtype) == "int16"
    err = rel_err(mod, q, cal[:4])
    assert err < 0.005, f"{name}: int16 relative L2 error {err:.5f}"


def test_deterministic():
    mod = from_onnx(residual_add_model())
    cal = random_samples(4, 0)
    tvm.ir.assert_structural_equal(quantize(mod, cal), quantize(mod, cal))


def test_calibration_reuses_its_build_for_other_weight_values(monkeypatch):
    """The calibration's llvm build takes the weights as parameters: the same network with other
    weights (half of a conv's weights zeroed, as pruning does) reuses it and is quantized as a
    fresh build quantizes it; another network is built anew."""
    from tvm_hapm.passes.quantize import calibrate

    builds = []
    build = tvm.compile
    monkeypatch.setattr(
        tvm, "compile", lambda *a, **k: builds.append(k.get("target")) or build(*a, **k)
    )
    dense = conv_bn_relu()
    pruned = conv_bn_relu()
    weight = next(t for t in pruned.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    values = numpy_helper.to_array(weight).copy()
    values[: values.shape[0] // 2] = 0
    values *= 0.5  # every activation range after it changes
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    cal = random_samples(4, 0)
    calibrate.clear_calibration_builds()
    quantize(from_onnx(dense), cal)
    q_pruned = quantize(from_onnx(pruned), cal)
    assert builds == ["llvm"]  # one calibration build for both
    calibrate.clear_calibration_builds()
    tvm.ir.assert_structural_equal(q_pruned, quantize(from_onnx(pruned), cal))
    assert builds == ["llvm", "llvm"]
    quantize(from_onnx(strided_odd_channels()), cal)
    assert len(builds) == 3


def test_calibration_builds_with_constants_when_the_lifted_build_fails(monkeypatch):
    """An operator that needs a tensor argument constant makes the lifted build fail: the
    calibration then builds the function with its constants, as before, to the same scales."""
    from tvm_hapm.passes.quantize import calibrate

    mod, cal = from_onnx(conv_bn_relu()), random_samples(4, 0)
    expected = quantize(mod, cal)

    def refuse(_mod):
        raise tvm.error.OpError("a tensor argument must be constant")

    monkeypatch.setattr(calibrate, "_calibration_vm", refuse)
    tvm.ir.assert_structural_equal(quantize(mod, cal), expected)


@pytest.mark.parametrize("percentile", [None, DEFAULT_PERCENTILE, 50.0])
def test_expected_module_conv_relu(percentile):
    """The simplest case, spelled out with the qops emitters (scales from the maximum, or from
    a percentile of |x| over all calibration elements, as numpy computes it)."""
    g = OnnxGraph(12)
    y = g.node("Relu", [g.conv("x", 3, 4)])
    onnx_model = g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 4, 8, 8])
    mod = from_onnx(onnx_model)
    cal = random_samples(4, 0)
    q = quantize(mod, cal, percentile=percentile)

    w = numpy_helper.to_array(onnx_model.graph.initializer[0]).astype(np.float64)
    b = numpy_helper.to_array(onnx_model.graph.initializer[1]).astype(np.float64)
    s_in = pct(cal, percentile or 100.0) / 127
    s_out = pct(run_llvm(mod, cal), percentile or 100.0) / 127
    s_w = np.abs(w).reshape(4, -1).max(axis=1) / 127
    wq = np.clip(np.round(w / s_w[:, None, None, None]), -127, 127).astype("int8")
    bq = np.round(b / (s_in * s_w)).astype(np.int32)
    mult, shift = qops.choose_multiplier(s_in * s_w / s_out)

    x = relax.Var("x", relax.TensorType(ONNX_INPUT_SHAPE, "float32"))
    attrs = {k: v for k, v in mod["main"].attrs.items() if k != "global_symbol"}
    bb = relax.BlockBuilder()
    with bb.function("main", [x], attrs=attrs):
        with bb.dataflow():
            xq = qops.emit_quantize(bb, x, s_in, "int8")
            yq = qops.emit_conv2d(
                bb, xq, wq, bq, [1, 1], [1, 1, 1, 1], [1, 1], 1, mult, shift, 0, 127, "int8"
            )
            gv = bb.emit_output(qops.emit_dequantize(bb, yq, s_out))
        bb.emit_func_output(gv)
    tvm.ir.assert_structural_equal(q["main"], bb.get()["main"])


def test_multi_input_dict_calibration():
    g = OnnxGraph(13)
    a = g.node("Relu", [g.conv("a", 3, 4)])
    b = g.node("Relu", [g.conv("b", 3, 4)])
    y = g.conv(g.node("Add", [a, b]), 4, 4)
    mod = from_onnx(g.model({"a": ONNX_INPUT_SHAPE, "b": ONNX_INPUT_SHAPE}, y, [1, 4, 8, 8]))
    names = [p.name for p in mod["main"].params]
    rng = np.random.default_rng(0)
    cal = [
        {n: rng.normal(size=ONNX_INPUT_SHAPE).astype(np.float32) for n in names} for _ in range(4)
    ]
    q = quantize(mod, cal)
    assert dtypes(q, "relax.nn.conv2d") == ["int32"] * 3
    assert len(int_residual_adds(q)) == 1
    with pytest.raises(QuantizeError, match="do not match the model's inputs"):
        quantize(mod, [{names[0]: cal[0][names[0]]}])


def test_pass_wrapper():
    mod = from_onnx(conv_bn_relu())
    report = []
    q = Quantize(random_samples(2, 0), report=report)(mod)
    assert is_quantized(q) and len(report) == 1


def test_already_quantized_raises():
    q = quantize(from_onnx(conv_bn_relu()), random_samples(2, 0))
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize(q, random_samples(2, 0))


def test_wrong_calibration_shape():
    mod = from_onnx(conv_bn_relu())
    with pytest.raises(QuantizeError, match=r"has shape \(1, 3, 4, 4\), expected \(1, 3, 8, 8\)"):
        quantize(mod, random_samples(2, 0, shape=(1, 3, 4, 4)))
    with pytest.raises(QuantizeError, match="non-empty list"):
        quantize(mod, [])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_is_refused(bad):
    samples = random_samples(3, 0)
    samples[1][0, 2, 3, 4] = bad
    with pytest.raises(QuantizeError, match="sample 1: input 'x' has 1 NaN or infinite"):
        quantize(from_onnx(conv_bn_relu()), samples)


def test_degenerate_calibration_warns_with_the_tensor():
    mod = from_onnx(conv_bn_relu())
    with pytest.warns(UserWarning, match="tensor 'x' is zero on every sample"):
        quantize(mod, [np.zeros(ONNX_INPUT_SHAPE, np.float32)] * 2)
    samples = random_samples(3, 0)
    samples[0][0, 0, 0, 0] = 1e30  # one outlier sets the input's int8 step
    with pytest.warns(UserWarning, match=r"tensor 'x' ranges up to \|x\| = 1e\+30, .* 100%"):
        quantize(mod, samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordinary data: no warning
        quantize(mod, random_samples(3, 0))


def test_non_finite_weights_are_refused():
    model = conv_bn_relu()
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init).copy()
        if w.ndim == 4:
            w[0, 0, 0, 0] = np.nan
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    with pytest.raises(QuantizeError, match=r"conv2d producing .* 1 NaN or infinite weight"):
        quantize(from_onnx(model), random_samples(2, 0))


def test_layer_left_float_warns_with_its_reason():
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).normal(0, 1, (4, 3, 3, 3)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, 8, 8])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.warns(UserWarning, match=r"1 layer\(s\) stay float: nn.conv2d .* not a float32"):
        quantize(from_onnx(model), [np.zeros((1, 3, 8, 8), np.float16)])


def test_nothing_to_quantize_warns():
    g = OnnxGraph(14)
    mod = from_onnx(
        g.model({"x": ONNX_INPUT_SHAPE}, g.node("Sigmoid", ["x"]), list(ONNX_INPUT_SHAPE))
    )
    report = []
    with pytest.warns(UserWarning, match="nothing to quantize"):
        out = quantize(mod, random_samples(1, 0), report=report)
    tvm.ir.assert_structural_equal(out, mod)
    assert report and report[0].startswith("warning")


@pytest.mark.parametrize("percentile", [0.0, -1.0, 100.5])
def test_percentile_out_of_range_is_refused(percentile):
    mod = from_onnx(conv_bn_relu())
    with pytest.raises(QuantizeError, match="percentile must be in"):
        quantize(mod, random_samples(2, 0), percentile=percentile)


def test_compiler_refuses_float_layers_but_not_activation_matmuls():
    from tvm_hapm.passes.quantize import FLOAT_MODEL_MESSAGE, float_layer_ops

    g = OnnxGraph(11)
    model = g.model({"x": ONNX_INPUT_SHAPE}, g.node("Relu", [g.conv("x", 3, 8)]), [1, 8, 8, 8])
    mod = from_onnx(model)
    assert float_layer_ops(mod) == ["relax.nn.conv2d"]
    with pytest.raises(Exception, match=re.escape(FLOAT_MODEL_MESSAGE)):
        tvm.compile(mod, target="hapm_fpga")
    # a product of two activations is no layer: it runs on the host, the model compiles
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.nn.relu(x))
            y = bb.emit_output(relax.op.matmul(h, relax.op.permute_dims(h)))
        bb.emit_func_output(y)
    act = bb.get()
    assert float_layer_ops(act) == []
    a = np.random.default_rng(0).random((4, 8), dtype=np.float32)
    out = run_vm(tvm.compile(act, target="hapm_fpga"), a)[0]
    np.testing.assert_allclose(out, a @ a.T, rtol=1e-5)  # a >= 0: relu(a) = a
