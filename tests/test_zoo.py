"""Tests of the ONNX model zoo, the digits data and the bundled trained model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx.reference import ReferenceEvaluator
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from tvm_hapm.data import bundled_model_info, load_bundled_model, load_digits, set_batch
from tvm_hapm.models import (
    mobilenet_style,
    resnet18_imagenet,
    resnet50_imagenet,
    resnet_cifar,
    tiny_cnn,
)


def run_tvm(model, x):
    """Import ``model`` with the Relax ONNX frontend, build for llvm and run it on ``x``."""
    ex = tvm.compile(from_onnx(model), target="llvm")
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def input_shape(model):
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


# Small input sizes keep the whole module well under 30 s.
BUILDERS = {
    "tiny_cnn": lambda: tiny_cnn(num_classes=7, in_ch=3, input_hw=(12, 16), batch=2),
    "mobilenet_odd": lambda: mobilenet_style(num_classes=5, input_hw=(16, 20)),
    "resnet20": lambda: resnet_cifar(20, num_classes=10, width=4, input_hw=(8, 8)),
    "resnet18": lambda: resnet18_imagenet(num_classes=10, input_hw=(32, 32)),
    "resnet50": lambda: resnet50_imagenet(num_classes=10, input_hw=(32, 32)),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_runs_in_tvm(name):
    model = BUILDERS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    shape = input_shape(model)
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    y = run_tvm(model, x)
    out_shape = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert list(y.shape) == out_shape
    assert np.all(np.isfinite(y)) and 0.01 < y.std() < 100
    ref = ReferenceEvaluator(model).run(None, {"input": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("depth, convs", [(20, 19), (56, 55)])
def test_resnet_cifar_depth(depth, convs):
    model = resnet_cifar(depth, width=4, input_hw=(8, 8))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    # 6n + 1 main-path convs plus 2 projection shortcuts; BN after every conv; one Gemm.
    assert ops.count("Conv") == convs + 2 == ops.count("BatchNormalization")
    assert ops.count("Add") == (depth - 2) // 2 and ops.count("Gemm") == 1
    with pytest.raises(ValueError):
        resnet_cifar(21)


def test_resnet_imagenet_structure():
    ops18 = [n.op_type for n in resnet18_imagenet(input_hw=(32, 32)).graph.node]
    assert ops18.count("Conv") == 20 and ops18.count("MaxPool") == 1 and ops18.count("Add") == 8
    ops50 = [n.op_type for n in resnet50_imagenet(input_hw=(32, 32)).graph.node]
    assert ops50.count("Conv") == 53 and ops50.count("Add") == 16


def test_builders_are_deterministic():
    a = resnet_cifar(20, seed=3).SerializeToString()
    assert a == resnet_cifar(20, seed=3).SerializeToString()
    assert a != resnet_cifar(20, seed=4).SerializeToString()


def test_mobilenet_features():
    model = mobilenet_style(odd_channels=True)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    weights = {t.name: t.dims for t in model.graph.initializer}
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs]
    couts = [weights[n.input[1]][0] for n in convs]
    assert any(g > 1 and g == c for g, c in zip(groups, couts))  # depthwise
    assert {13, 27, 37} <= set(couts)
    ops = [n.op_type for n in model.graph.node]
    assert "Clip" in ops and "Add" in ops and "GlobalAveragePool" in ops
    even = mobilenet_style(odd_channels=False)
    even_w = {t.name: t.dims for t in even.graph.initializer}
    assert all(even_w[n.input[1]][0] % 2 == 0 for n in even.graph.node if n.op_type == "Conv")


FIRST_TEST_LABELS = [2, 0, 4, 9, 4, 1, 2, 4, 6, 7]


def test_load_digits_fixed_split():
    x_tr, y_tr, x_te, y_te = load_digits(size=16)
    assert x_tr.shape == (1347, 1, 16, 16) and x_te.shape == (450, 1, 16, 16)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    assert np.bincount(y_te).min() >= 43  # stratified (class 8 has 174 samples)
    again = load_digits(size=16)
    for a, b in zip((x_tr, y_tr, x_te, y_te), again):
        np.testing.assert_array_equal(a, b)
    # The split is pinned: these are the first test labels with random_state=0.
    assert y_te[:10].tolist() == FIRST_TEST_LABELS
    x8 = load_digits(size=8, channels=3)[2]
    x32 = load_digits(size=32, channels=3)[2]
    assert x8.shape == (450, 3, 8, 8) and x32.shape == (450, 3, 32, 32)
    np.testing.assert_array_equal(x32[:, 0], x32[:, 2])
    np.testing.assert_allclose(x8.mean(), x_te.mean(), atol=0.02)


def test_bundled_model_accuracy():
    info = bundled_model_info()
    _, _, x_te, y_te = load_digits(size=16, channels=1)
    model = load_bundled_model(batch=len(x_te))
    assert input_shape(model) == [len(x_te), 1, 16, 16]
    acc = float((run_tvm(model, x_te).argmax(1) == y_te).mean())
    assert info["test_accuracy"] >= 0.95
    assert abs(acc - info["test_accuracy"]) <= 0.005


def test_set_batch_symbolic():
    model = set_batch(load_bundled_model(), "N")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
