"""ONNX models through the whole flow: from_onnx -> quantize -> tvm.compile(hapm_fpga) -> simulator.

The accelerator must equal TVM's llvm build of the same quantized module bit for bit, and the int8
model must classify real data (scikit-learn's digits) like the float model.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.onnx import from_onnx

import tvm_hapm
from tvm_hapm.data import load_bundled_model, load_digits
from tvm_hapm.models import zoo
from tvm_hapm.passes import last_compile_report
from tvm_hapm.testing import llvm_reference, run_vm


def _input_shape(model):
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def _check_bit_exact(model, target="hapm_fpga", samples=2):
    shape = _input_shape(model)
    rng = np.random.default_rng(0)
    cal = [rng.uniform(0, 1, shape).astype("float32") for _ in range(samples)]
    qmod = tvm_hapm.quantize(from_onnx(model), calibration=cal)
    x = rng.uniform(0, 1, shape).astype("float32")
    ref = llvm_reference(qmod, x)
    out = run_vm(tvm.compile(qmod, target=target), x)
    np.testing.assert_array_equal(out[0], ref[0])
    assert np.unique(ref[0]).size > 1
    return last_compile_report()


def test_resnet_style_with_strided_shortcuts_non_square_batch2():
    model = zoo.resnet_cifar(depth=8, width=8, input_hw=(12, 20), batch=2)
    report = _check_bit_exact(model)
    kinds = sorted(report["accelerator"].values())
    # 7 convs + 2 strided 1x1 projection shortcuts; each residual add fused into a conv
    assert kinds.count("conv2d") + kinds.count("conv2d_residual") == 9
    assert kinds.count("conv2d_residual") == 3 and "add" not in kinds
    assert "global_avg_pool" in kinds and "dense" in kinds


def test_mobilenet_style_depthwise_odd_channels():
    model = zoo.mobilenet_style(input_hw=(14, 18), batch=1, odd_channels=True)
    report = _check_bit_exact(model, target="hapm_fpga-zybo-z7-10")
    assert list(report["accelerator"].values()).count("conv2d") >= 8
    # ReLU6 (ONNX Clip) is folded into the layers: no float kernel is left on the host
    assert "relax.call_tir" not in report["host"]


def test_tiny_cnn_on_zcu104():
    _check_bit_exact(zoo.tiny_cnn(batch=3), target="hapm_fpga-zcu104")


def test_int8_model_agrees_with_float_on_digits():
    x_train, _, x_test, y_test = load_digits(size=16, channels=1)
    batch = 150
    model = load_bundled_model(batch=batch)
    mod = from_onnx(model)
    qmod = tvm_hapm.quantize(mod, calibration=[x_train[:batch]])
    float_ex = tvm.compile(mod, target="llvm")
    int_ex = tvm.compile(qmod, target="hapm_fpga")
    agree = correct_f = correct_q = 0
    for k in range(0, len(x_test) - batch + 1, batch):
        xb = x_test[k : k + batch]
        pf = run_vm(float_ex, xb)[0].argmax(1)
        pq = run_vm(int_ex, xb)[0].argmax(1)
        agree += int((pf == pq).sum())
        correct_f += int((pf == y_test[k : k + batch]).sum())
        correct_q += int((pq == y_test[k : k + batch]).sum())
    n = (len(x_test) // batch) * batch
    assert agree / n >= 0.99
    assert correct_q / n >= correct_f / n - 0.01
    assert correct_f / n > 0.9


@pytest.mark.slow
def test_resnet50_224_compiles_and_resnet18_is_bit_exact():
    """Large layers always get a schedule that fits (ResNet-50 at 224x224)."""
    model = zoo.resnet50_imagenet()
    shape = _input_shape(model)
    cal = [np.random.default_rng(0).uniform(0, 1, shape).astype("float32")]
    qmod = tvm_hapm.quantize(from_onnx(model), calibration=cal)
    tvm.compile(qmod, target="hapm_fpga-zybo-z7-10")
    assert len(last_compile_report()["accelerator"]) >= 53
    _check_bit_exact(zoo.resnet18_imagenet(), samples=1)
