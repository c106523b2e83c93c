"""Pruning ONNX models through the Relax passes (tvm_hapm.flow)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tvm_hapm import flow
from tvm_hapm.data import load_bundled_model, load_bundled_resnet20, load_digits
from tvm_hapm.flow import PER_MAC_MAX_LAYER_SPARSITY, prune_onnx, sparsity_of


def _weights(model):
    return {
        i.name: numpy_helper.to_array(i)
        for i in model.graph.initializer
        if numpy_helper.to_array(i).ndim in (2, 4)
    }


@pytest.mark.parametrize("method", ["hapm", "unstructured"])
def test_prune_onnx_writes_zeros_into_the_middle_layers_only(method):
    model = load_bundled_model(batch=1)
    before = model.SerializeToString()
    pruned, report = prune_onnx(model, method, 0.5)
    assert model.SerializeToString() == before  # the input is not changed
    onnx.checker.check_model(pruned)
    orig, new = _weights(model), _weights(pruned)
    changed = [n for n in orig if not np.array_equal(orig[n], new[n])]
    assert len(changed) == 1  # three layers: the first and the last stay dense
    name = changed[0]
    zeros = new[name] == 0
    assert abs(zeros.mean() - 0.5) < 0.1
    # only zeros were written, and the kept weights are untouched
    np.testing.assert_array_equal(new[name][~zeros], orig[name][~zeros])
    assert 0 < sparsity_of(pruned) < 0.5
    assert any(e.get("sparsity", 0) > 0 for e in report)


def test_prune_onnx_refuses_unknown_methods():
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_onnx(load_bundled_model(batch=1), "random", 0.5)


def test_per_mac_ranking_moves_pruning_to_high_resolution_layers():
    model = load_bundled_resnet20(batch=1)
    _, uniform = prune_onnx(model, "hapm", 0.5)
    _, per_mac = prune_onnx(model, "hapm", 0.5, ranking="per_mac")

    def total(report):
        return sum(e["zeros"] for e in report) / sum(e["weights"] for e in report)

    # the same network-wide weight sparsity (within a group of the largest layer) ...
    assert abs(total(per_mac) - total(uniform)) < 0.01
    # ... moved to the 16-channel layers at 32x32 (64x the MACs per weight of the 8x8 ones),
    # up to the cap
    mid = [e for e in per_mac if e["target_sparsity"] > 0 and e["weights"] > 0]
    early = [e["sparsity"] for e in mid if e["weight_shape"][0] == 16]
    late = [e["sparsity"] for e in mid if e["weight_shape"][0] == 64]
    assert min(early) > 0.8 > max(late)
    assert max(e["sparsity"] for e in per_mac) <= PER_MAC_MAX_LAYER_SPARSITY
    assert {e["ranking"] for e in per_mac if e["sparsity"] > 0} == {"global_per_mac"}


def test_prune_onnx_refuses_unknown_or_unsupported_rankings():
    model = load_bundled_model(batch=1)
    with pytest.raises(ValueError, match="unknown ranking 'best'"):
        prune_onnx(model, "hapm", 0.5, ranking="best")
    with pytest.raises(ValueError, match="not available for method 'unstructured'"):
        prune_onnx(model, "unstructured", 0.5, ranking="per_mac")
    with pytest.raises(ValueError, match="not available for method 'filter'"):
        prune_onnx(model, "filter", 0.5, ranking="global")


def test_filter_pruning_zeroes_coupled_channels_and_deploys_shrunk():
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from tvm_hapm.flow import filter_deploy_pass
    from tvm_hapm.passes.prune import find_layers

    model = load_bundled_model(batch=2)
    pruned, report, masks = prune_onnx(model, "filter", 0.5, config="zedboard", return_masks=True)
    w = _weights(pruned)
    # conv0's 8 channels are one array width: nothing to round to, kept
    np.testing.assert_array_equal(w["conv0.w"], _weights(model)["conv0.w"])
    conv3, dense = w["conv3.w"], w["dense7.w"]  # (16, 8, 3, 3), (10, 16 channels x 4 x 4)
    dead = np.flatnonzero(np.abs(conv3).reshape(16, -1).sum(1) == 0)
    assert len(dead) == 8  # whole filters, half of them
    assert np.all(dense.reshape(10, 16, 16)[:, dead] == 0)  # ...and the features they fed
    live = np.setdiff1d(np.arange(16), dead)
    np.testing.assert_array_equal(conv3[live], _weights(model)["conv3.w"][live])
    assert set(masks) >= {"conv3.w", "dense7.w"}

    x = np.random.default_rng(0).uniform(0, 1, size=(2, 1, 16, 16)).astype(np.float32)

    def run(mod):
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        return vm["main"](tvm.runtime.tensor(x)).numpy()

    masked = from_onnx(pruned)
    shrunk = filter_deploy_pass(0.5, "zedboard")(masked)
    out_channels = [lay.weight.shape[0] for lay in find_layers(shrunk)]
    assert out_channels[1] == len(live)  # the tensors really shrank
    np.testing.assert_allclose(run(shrunk), run(masked), rtol=1e-5, atol=1e-5)


def test_iterative_pruning_raises_sparsity_on_a_cubic_schedule():
    from onnx.reference import ReferenceEvaluator

    from tvm_hapm.data import load_digits
    from tvm_hapm.flow import prune_iteratively

    model = load_bundled_model(batch=1)
    x, y, xt, yt = load_digits(size=16)
    calls = []
    final, rounds = prune_iteratively(
        model, "unstructured", 0.8, (x, y), stages=3, steps=0,
        progress=lambda k, n: calls.append((k, n)),
    )  # fmt: skip
    assert calls == [(1, 3), (2, 3), (3, 3)]
    targets = [r["target"] for r in rounds]
    np.testing.assert_allclose(targets, [0.8 * (1 - (1 - k / 3) ** 3) for k in (1, 2, 3)])
    achieved = [r["sparsity"] for r in rounds]
    assert achieved == sorted(achieved) and achieved[0] < achieved[-1]
    oneshot, _ = prune_onnx(model, "unstructured", 0.8)
    assert abs(sparsity_of(final) - sparsity_of(oneshot)) < 0.01  # same final sparsity

    def accuracy(m):
        return float((ReferenceEvaluator(m).run(None, {"input": xt})[0].argmax(1) == yt).mean())

    assert accuracy(final) > accuracy(oneshot)
    with pytest.raises(ValueError, match="schedule"):
        prune_iteratively(model, "hapm", 0.5, (x, y), schedule="exponential")


def test_iterative_pruning_reconstructs_towards_the_teacher():
    from tvm_hapm.flow import prune_iteratively, recover

    model = load_bundled_model(batch=1)
    x, y, _, _ = load_digits(size=16)
    final, rounds = prune_iteratively(
        model, "hapm", 0.6, (x, y), stages=2, steps=0, schedule="linear", teacher="previous"
    )
    assert [r["target"] for r in rounds] == pytest.approx([0.3, 0.6])
    # round by round by hand: the second round reconstructs towards the first round's model
    first, _ = recover(prune_onnx(model, "hapm", 0.3)[0], model, (x, y), steps=0)
    second, _ = recover(prune_onnx(first, "hapm", 0.6)[0], first, (x, y), steps=0)
    got, want = _weights(final), _weights(second)
    assert all(np.array_equal(got[n], want[n]) for n in want)
    towards_dense, _ = prune_iteratively(
        model, "hapm", 0.6, (x, y), stages=2, steps=0, schedule="linear"
    )
    assert not all(np.array_equal(_weights(towards_dense)[n], want[n]) for n in want)
    with pytest.raises(ValueError, match="teacher"):
        prune_iteratively(model, "hapm", 0.6, (x, y), teacher="student")


def test_recover_keeps_the_better_of_reconstruction_and_fine_tuning():
    from tvm_hapm.compress.numpynet import NumpyNet
    from tvm_hapm.data import load_digits
    from tvm_hapm.flow import recover

    model = load_bundled_model(batch=1)
    x, y, _, _ = load_digits(size=16)
    pruned, _ = prune_onnx(model, "hapm", 0.9, keep_first_last=False)
    best, info = recover(pruned, model, (x, y), steps=3, val_size=200)
    assert info["val_reconstructed"] > info["val_pruned"]
    assert info["kept"] in ("reconstructed", "finetuned")
    kept_val = info["val_finetuned"] if info["kept"] == "finetuned" else info["val_reconstructed"]
    assert kept_val == max(info["val_finetuned"], info["val_reconstructed"])
    # the validation split is the first 200 of the seeded permutation: recompute it
    order = np.random.default_rng(0).permutation(len(x))[:200]
    assert NumpyNet(best).accuracy(x[order], y[order]) == pytest.approx(kept_val)
    np.testing.assert_array_equal(  # the masks are held through both steps
        _weights(best)["conv3.w"] == 0, _weights(pruned)["conv3.w"] == 0
    )


def test_recover_without_reconstruction_fine_tunes_the_pruned_model():
    from tvm_hapm.data import load_digits
    from tvm_hapm.flow import recover

    model = load_bundled_model(batch=1)
    x, y, _, _ = load_digits(size=16)
    pruned, _ = prune_onnx(model, "hapm", 0.9, keep_first_last=False)
    best, info = recover(pruned, model, (x, y), steps=0, reconstruct=False)
    assert info["reconstruction"] is None and info["val_reconstructed"] is None
    assert info["kept"] == "pruned"
    np.testing.assert_array_equal(_weights(best)["conv3.w"], _weights(pruned)["conv3.w"])


def test_per_mac_cap_spreads_the_pruning():
    model = load_bundled_resnet20(batch=1)
    sparsities = {}
    for cap in (None, 0.5):
        _, report = prune_onnx(model, "hapm", 0.3, ranking="per_mac", max_layer_sparsity=cap)
        layers = [e for e in report if e["weights"] > 0 and e["target_sparsity"] > 0]
        sparsities[cap] = [e["sparsity"] for e in layers]
        total = sum(e["zeros"] for e in layers) / sum(e["weights"] for e in layers)
        assert abs(total - 0.3) < 0.02
    assert max(sparsities[None]) > 0.8 and max(sparsities[0.5]) <= 0.5 + 1e-9
    # what the cap keeps in the cheapest layers goes to others
    assert any(b > a + 0.1 for a, b in zip(sparsities[None], sparsities[0.5]))
    with pytest.raises(ValueError, match="caps"):
        prune_onnx(model, "unstructured", 0.3, max_layer_sparsity=0.5)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_time_programs_gives_the_simulated_run_s_cycles_and_energy(ratio):
    """HW-Flow's ``sim`` level times the offloaded programs without running them: every
    figure must be the full compile-and-run's (a ResNet with fused residuals, dense and
    pruned, so the weight-block bypass has blocks to skip)."""
    from tvm_hapm.models import resnet_cifar

    x, _, xt, _ = load_digits(size=16, channels=3)
    model = resnet_cifar(depth=8, input_hw=(16, 16), width=8)
    if ratio:
        model, _ = flow.prune_onnx(model, "hapm", ratio, config="zedboard")
    ran = flow.simulate(model, "zedboard", x, xt)
    timed = flow.time_programs(model, "zedboard", x)
    assert timed[3] == ran[3] and len(timed[3]) >= 8
    assert timed[:3] == ran[:3] and timed[4] == ran[4]


def test_evaluate_deployed_takes_an_accuracy_already_measured(monkeypatch):
    """``correct=`` (the demo's dense row, measured in its part one) skips the int8 run and
    keeps the simulation: the same result as measuring it."""
    from tvm_hapm.models import resnet_cifar

    x, y, xt, yt = load_digits(size=16, channels=3)
    model = resnet_cifar(depth=8, input_hw=(16, 16), width=8)
    measured = flow.evaluate_deployed(model, "hapm_fpga", x[:16], xt[:40], yt[:40], engine="tvm")

    def refuse(*args, **kwargs):
        raise AssertionError("int8_accuracy ran although the accuracy was given")

    monkeypatch.setattr(flow.int8_accuracy.__module__ + ".int8_accuracy", refuse)
    given = flow.evaluate_deployed(model, "hapm_fpga", x[:16], xt[:40], yt[:40], engine="tvm",
                                   correct=measured.correct)  # fmt: skip
    assert given.correct is measured.correct
    assert (given.accuracy, given.latency_ms, given.energy_uj, given.gemms, given.cycles) == (
        measured.accuracy, measured.latency_ms, measured.energy_uj, measured.gemms,
        measured.cycles,
    )  # fmt: skip
