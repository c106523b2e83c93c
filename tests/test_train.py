"""Recovery fine-tuning inside TVM (tvm_hapm.compress.relax_training) and the bundled ResNet-20."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tvm_hapm.compress import relax_training as train
from tvm_hapm.data import (
    RESNET20_MODEL,
    load_bundled_resnet20,
    load_digits,
    resnet20_info,
)
from tvm_hapm.models.zoo import tiny_cnn


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def digits16():
    return load_digits(size=16, channels=1)


@pytest.fixture(scope="module")
def tiny():
    return tiny_cnn(in_ch=1, input_hw=(16, 16), width=4, seed=0)


@pytest.fixture(scope="module")
def tiny_masks(tiny):
    w = _weights(tiny)
    rng = np.random.default_rng(1)
    # one mask keyed by layer order (1 = second prunable weight, conv1), one by name
    return {
        1: rng.random(w["conv1.weight"].shape) > 0.5,
        "fc0.weight": rng.random(w["fc0.weight"].shape) > 0.7,
    }


@pytest.fixture(scope="module")
def tuned(tiny, tiny_masks, digits16):
    x, y, xt, yt = digits16
    return train.finetune(
        tiny,
        (x[:256], y[:256]),
        tiny_masks,
        epochs=3,
        batch_size=32,
        lr=1e-2,
        seed=0,
        eval_data=(xt[:200], yt[:200]),
    )


def test_prunable_and_trainable_names(tiny):
    assert train.prunable_weights(tiny) == [
        "conv0.weight",
        "conv1.weight",
        "conv2.weight",
        "fc0.weight",
    ]
    names = train.trainable_parameters(tiny)
    assert "conv0.bias" in names and "fc0.bias" in names and len(names) == 8


def test_trainable_parameters_freeze_bn_statistics():
    from tvm_hapm.models.zoo import resnet_cifar

    names = train.trainable_parameters(resnet_cifar(8, width=4))
    assert "bn0.scale" in names and "bn0.bias" in names
    assert not any(n.endswith((".mean", ".var")) for n in names)


def test_mask_key_validation(tiny, digits16):
    x, y, _, _ = digits16
    with pytest.raises(KeyError):
        train.finetune(tiny, (x[:64], y[:64]), {"nope": np.ones(3, bool)})
    with pytest.raises(KeyError):
        train.finetune(tiny, (x[:64], y[:64]), {9: np.ones(3, bool)})
    with pytest.raises(ValueError, match="shape"):
        train.finetune(tiny, (x[:64], y[:64]), {0: np.ones(3, bool)})


def test_finetune_decreases_loss(tuned):
    _, hist = tuned
    losses = [e["loss"] for e in hist["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert hist["steps"] == 3 * (256 // 32)
    assert hist["images_per_s"] > 0 and hist["compile_seconds"] > 0
    assert hist["masked"] == ["conv1.weight", "fc0.weight"]


def test_masked_weights_stay_zero(tiny, tiny_masks, tuned):
    out, _ = tuned
    before, after = _weights(tiny), _weights(out)
    for name, mask in (("conv1.weight", tiny_masks[1]), ("fc0.weight", tiny_masks["fc0.weight"])):
        assert np.all(after[name][~mask] == 0)
        assert np.all(after[name][mask] != 0)
        assert not np.allclose(after[name][mask], before[name][mask])  # kept weights trained
    # extract_masks recovers exactly the masks that were held fixed
    got = train.extract_masks(out)
    assert set(got) == {"conv1.weight", "fc0.weight"}
    np.testing.assert_array_equal(got["conv1.weight"], tiny_masks[1])
    # unmasked weights do not become sparse
    assert np.all(after["conv0.weight"] != 0)


def test_result_round_trips_through_onnx_and_tvm(tiny, tuned, digits16, tmp_path):
    out, hist = tuned
    _, _, xt, yt = digits16
    path = tmp_path / "tuned.onnx"
    onnx.save(out, str(path))
    back = onnx.load(str(path))
    onnx.checker.check_model(back)
    assert [n.op_type for n in back.graph.node] == [n.op_type for n in tiny.graph.node]
    acc_before = train.evaluate(tiny, xt[:200], yt[:200])
    acc_after = train.evaluate(path, xt[:200], yt[:200], batch_size=64)
    # the exported model predicts exactly like the trainer's own forward function
    assert acc_after == hist["epochs"][-1]["eval_accuracy"]
    assert acc_after > acc_before + 0.2


def test_bundled_resnet20_reaches_recorded_accuracy():
    info = resnet20_info()
    assert RESNET20_MODEL.stat().st_size < 2_000_000
    model = load_bundled_resnet20()
    ops = {n.op_type for n in model.graph.node}
    assert ops == {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Flatten"} | {
        "Gemm"
    }
    _, _, xt, yt = load_digits(size=32, channels=3)
    assert len(yt) == info["test_samples"] == 450
    acc = train.evaluate(model, xt, yt)
    assert abs(acc - info["test_accuracy"]) <= 0.005
    assert info["test_accuracy"] >= 0.9


@pytest.mark.slow
def test_finetune_pruned_resnet20_recovers():
    """Magnitude-prune the bundled ResNet-20 to 60 % and recover it with a few steps in TVM."""
    model = load_bundled_resnet20()
    x, y, xt, yt = load_digits(size=32, channels=3)
    w = _weights(model)
    masks = {}
    for name in train.prunable_weights(model)[1:]:  # keep the stem dense
        a = np.abs(w[name])
        masks[name] = a > np.quantile(a, 0.6)
    pruned = train.with_initializers(model, {n: w[n] * masks[n] for n in masks})
    acc_pruned = train.evaluate(pruned, xt, yt)
    tuned, hist = train.finetune(
        pruned, (x, y), train.extract_masks(pruned), epochs=1, batch_size=32, lr=1e-3,
        max_steps=12,
    )  # fmt: skip
    after = _weights(tuned)
    for name, m in masks.items():
        assert np.all(after[name][~m] == 0)
    acc = train.evaluate(tuned, xt, yt)
    print(f"pruned {acc_pruned:.4f} -> fine-tuned {acc:.4f}, {hist['images_per_s']} images/s")
    assert acc >= acc_pruned
