"""Layer-wise least-squares reconstruction of pruned weights (tvm_hapm.compress.reconstruct)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from tvm_hapm.compress.reconstruct import ReconstructError, reconstruct
from tvm_hapm.data import load_bundled_model, load_digits
from tvm_hapm.flow import prune_onnx


def _conv_model(w, b=None, bn=None):
    """x -> Conv(w[, b]) [-> BatchNormalization(bn)] -> y, float32, "same" padding."""
    o, i, k = w.shape[:3]
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    conv_in = ["x", "w"]
    if b is not None:
        inits.append(numpy_helper.from_array(b.astype(np.float32), "b"))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], pads=[k // 2] * 4, name="conv")]
    out = "c"
    if bn is not None:
        for name, value in zip(("scale", "bias", "mean", "var"), bn):
            inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        nodes.append(
            helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"])
        )
        out = "y"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, i, 6, 6])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, o, 6, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _with_weight(model, w):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == "w":
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), "w"))
    return out


def _run(model, x):
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("tail", ["bias", "batchnorm"])
@pytest.mark.parametrize("relation", ["scaled", "offset"])
def test_reconstruction_moves_the_pruned_weights_onto_duplicate_inputs(tail, relation):
    """Input channel 1 is a function of channel 0 (2x it with a 3x3 kernel, or it plus a
    constant with a 1x1 kernel, where padding cannot break the relation), so the dense output
    is reachable from channel 0 alone: reconstruction must find the weights and intercept."""
    rng = np.random.default_rng(0)
    k = 3 if relation == "scaled" else 1
    w = rng.normal(size=(4, 3, k, k))
    b = rng.normal(size=4)
    bn = (rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4))
    dense = _conv_model(w, b=b) if tail == "bias" else _conv_model(w, bn=bn)
    x = rng.normal(size=(16, 3, 6, 6)).astype(np.float32)
    x[:, 1] = 2 * x[:, 0] if relation == "scaled" else x[:, 0] + 0.5
    w_pruned = w.copy()
    w_pruned[:, 1] = 0
    pruned = _with_weight(dense, w_pruned)
    err_pruned = np.abs(_run(pruned, x) - _run(dense, x)).max()
    fixed, report = reconstruct(pruned, dense, x, ridge=0.0)
    err_fixed = np.abs(_run(fixed, x) - _run(dense, x)).max()
    assert err_pruned > 0.5
    assert err_fixed < 1e-3 * err_pruned
    new_w = numpy_helper.to_array(next(i for i in fixed.graph.initializer if i.name == "w"))
    assert np.all(new_w[:, 1] == 0)  # the mask is held
    assert report[0]["rel_error_after"] < 1e-3 < report[0]["rel_error_before"]


def test_reconstruction_recovers_a_pruned_cnn_and_keeps_its_zeros():
    dense = load_bundled_model(batch=1)
    x_train, y_train, x_test, y_test = load_digits(size=16)
    pruned, _ = prune_onnx(dense, "unstructured", 0.8, keep_first_last=False)
    before = pruned.SerializeToString()
    fixed, report = reconstruct(pruned, dense, x_train[:128], seed=1)
    assert pruned.SerializeToString() == before  # the input is not changed
    onnx.checker.check_model(fixed)
    assert [r["weight"] for r in report] == ["conv0.w", "conv3.w", "dense7.w"]
    old = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    new = {i.name: numpy_helper.to_array(i) for i in fixed.graph.initializer}
    for r in report:
        np.testing.assert_array_equal(new[r["weight"]] == 0, old[r["weight"]] == 0)
        assert r["rel_error_after"] < r["rel_error_before"]

    def accuracy(model):
        logits = ReferenceEvaluator(model).run(None, {"input": x_test})[0]
        return float((logits.argmax(1) == y_test).mean())

    assert accuracy(fixed) > accuracy(pruned) + 0.05
    again, _ = reconstruct(pruned, dense, x_train[:128], seed=1)
    assert again.SerializeToString() == fixed.SerializeToString()  # deterministic


def test_reconstruction_refuses_mismatched_models_and_empty_data():
    dense = load_bundled_model(batch=1)
    other = _conv_model(np.ones((2, 1, 3, 3)))
    x = np.zeros((4, 1, 16, 16), np.float32)
    with pytest.raises(ReconstructError, match="same graph"):
        reconstruct(dense, other, x)
    with pytest.raises(ReconstructError, match="non-empty"):
        reconstruct(dense, dense, np.zeros((0, 1, 16, 16), np.float32))


def test_an_unpruned_model_comes_back_unchanged():
    dense = load_bundled_model(batch=1)
    same, report = reconstruct(dense, dense, np.zeros((2, 1, 16, 16), np.float32))
    assert report == []
    assert same.SerializeToString() == dense.SerializeToString()
