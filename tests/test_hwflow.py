"""HW-Flow search (tvm_hapm.hwflow) on the bundled digits CNN: fast checks."""

from __future__ import annotations

import numpy as np
import pytest

from tvm_hapm import hwflow
from tvm_hapm.cost import SchemaVersionError
from tvm_hapm.data import load_bundled_model, load_digits

#: the tests' environment: mid level, a 2-point budget, 300 validation images
OPTIONS = hwflow.EnvOptions(max_accuracy_drop=2.0, level="mid", val_size=300)


@pytest.fixture(scope="module")
def setup():
    x, y, xt, yt = load_digits(16, 1)
    model = load_bundled_model(1)
    env = hwflow.HWFlowEnv(model, (x, y), "zedboard", OPTIONS)
    return model, (x, y, xt, yt), env


def test_numpy_forward_matches_tvm(setup):
    from tvm_hapm.compress.relax_training import evaluate

    model, (_, _, xt, yt), _ = setup
    net = hwflow.NumpyNet(model)
    assert net.accuracy(xt, yt) == pytest.approx(evaluate(model, xt, yt))


@pytest.mark.parametrize("level", ["coarse", "mid", "fine", "sim"])
def test_costs_decrease_with_ratio(setup, level):
    _, _, env = setup
    try:
        env.table(level)
    except SchemaVersionError as err:  # the bundled fine model lags a feature change
        pytest.skip(str(err))
    lat = [env.cost([g] * env.n, level)[0] for g in range(len(env.grid))]
    en = [env.cost([g] * env.n, level)[1] for g in range(len(env.grid))]
    assert lat[-1] < lat[0] and en[-1] < en[0]
    assert all(b <= a * 1.02 for a, b in zip(lat, lat[1:]))  # (fine: small model noise)


def test_masks_equal_per_layer_pass(setup):
    model, _, env = setup
    idx = [3, 5, 1]
    ratios = {nm: float(env.grid[i]) for nm, i in zip(env.names, idx)}
    _, _, masks = hwflow.prune_onnx_per_layer(model, ratios, env.config)
    for li, w in enumerate(env.weight_names):
        np.testing.assert_array_equal(masks[w], env.masks[li][idx[li]])


@pytest.mark.parametrize("method", hwflow.METHODS)
def test_search_budget_bounds_and_beats_dense(setup, method, tmp_path):
    model, data, env = setup
    res = hwflow.optimize(model, data[:2], method=method, episodes=16, seed=0, env=env)
    assert all(0.0 <= r <= env.grid[-1] for r in res.ratios.values())
    assert res.val_drop <= 2.0 + 1e-9
    assert all(c["feasible"] == (c["drop"] <= 2.0 + 1e-9) for c in res.history)
    pred = res.predicted["mid"]
    if method in ("evolution", "uniform", "per_mac"):
        assert pred["latency_ms"] <= pred["dense_latency_ms"]
    else:  # the agent and the greedy baseline must beat dense
        assert pred["latency_ms"] < pred["dense_latency_ms"]
    out = hwflow.pareto_plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000 and out.endswith("p.png")


def test_deterministic(setup):
    model, data, _ = setup
    runs = []
    for _ in range(2):
        env = hwflow.HWFlowEnv(model, data[:2], "zedboard", OPTIONS, objective="energy")
        r = hwflow.optimize(model, data[:2], method="rl", episodes=8, seed=3, env=env)
        runs.append((r.ratios, [c["reward"] for c in r.history]))
    assert runs[0] == runs[1]


def test_bad_arguments(setup):
    model, data, _ = setup
    with pytest.raises(ValueError):
        hwflow.optimize(model, data[:2], level="rtl")
    with pytest.raises(ValueError):
        hwflow.optimize(model, data[:2], method="sa")


def test_reconstruction_recovers_candidates_and_keeps_their_masks(setup):
    from onnx import numpy_helper

    model, (x, y, _, _), bn_env = setup
    env = hwflow.HWFlowEnv(model, (x, y), "zedboard", OPTIONS, reconstruct=True)
    idx = (0, 7, 5)  # 70% of conv3's hardware groups, 50% of the dense layer's
    assert env.dense_accuracy == bn_env.dense_accuracy  # the dense model is not touched
    recovered, bn_only = env.evaluate(idx).accuracy, bn_env.evaluate(idx).accuracy
    assert recovered > bn_only
    weights = {t.name: numpy_helper.to_array(t) for t in env.recovered_model(idx).graph.initializer}
    for li, name in enumerate(env.weight_names):
        np.testing.assert_array_equal(weights[name] != 0, env.masks[li][idx[li]])


@pytest.mark.parametrize("allocation", hwflow.ALLOCATIONS)
@pytest.mark.parametrize("budget", [2.0, 10.0, 20.0])
def test_bisection_finds_the_largest_feasible_ratio(setup, budget, allocation):
    model, data, _ = setup
    env = hwflow.HWFlowEnv(model, data[:2], "zedboard", OPTIONS, max_accuracy_drop=budget)
    gi, best, used = hwflow.allocation_bisection(env, allocation, 10, allocation=allocation)
    assert used <= int(np.ceil(np.log2(len(env.grid))))
    # the full scan of the grid (the drop grows with the network-wide ratio on this model)
    idx = [env.allocation(allocation, g) for g in range(len(env.grid))]
    feasible = [i is not None and env.evaluate(i).feasible for i in idx]
    assert gi == max(g for g, ok in enumerate(feasible) if ok)
    assert gi == 0 or best.idx == tuple(idx[gi])


def test_per_mac_allocation_is_the_pass_ranking_on_the_grid(setup):
    from tvm_hapm.flow import PER_MAC_MAX_LAYER_SPARSITY, prune_onnx

    model, _, env = setup
    for gi, ratio in enumerate(env.grid):
        idx = env.allocation("per_mac", gi)
        if ratio > PER_MAC_MAX_LAYER_SPARSITY:  # one prunable layer: the cap is the limit
            assert idx is None
            continue
        _, report = prune_onnx(model, "hapm", float(ratio), env.config, ranking="per_mac")
        achieved = {e["layer"]: e["sparsity"] for e in report}
        want = [int(np.argmin(np.abs(env.grid - achieved.get(nm, 0.0)))) for nm in env.names]
        assert idx == tuple(want), ratio
    assert env.allocation("uniform", 4) == tuple(min(4, m) for m in env.max_index)
    with pytest.raises(ValueError, match="allocation must be one of"):
        env.allocation("random", 3)


def test_int8_weight_grid_is_per_output_channel(setup):
    _, _, env = setup
    grid = env.weight_grid(env.net.inits)
    hi = env.config.weight_range[1]
    for li, name in enumerate(env.weight_names):
        w, q = env.net.inits[name], grid[name]
        assert q.shape == w.shape and q.dtype == np.float32
        rows_w = w.reshape(w.shape[0], -1) if w.shape[0] == env.conv_layers[li].cout else w.T
        rows_q = q.reshape(q.shape[0], -1) if q.shape[0] == env.conv_layers[li].cout else q.T
        s = np.abs(rows_w).max(axis=1, keepdims=True) / hi
        steps = rows_q / np.where(s == 0, 1, s)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # on the grid
        assert np.abs(rows_q - rows_w).max() <= s.max() / 2 + 1e-6  # rounded, not clipped
    assert env.dense_accuracy > 0.5  # the estimate with int8 weights still classifies


def test_env_options_are_checked_when_made_and_changed_by_keyword(setup):
    with pytest.raises(ValueError, match="objective"):
        hwflow.EnvOptions(objective="power")
    with pytest.raises(ValueError, match="level"):
        hwflow.EnvOptions(level="rtl")
    with pytest.raises(ValueError, match="grid"):
        hwflow.EnvOptions(grid=(0.1, 0.5))
    opt = hwflow.EnvOptions(grid=(0.5, 0.0, 0.5), skip=["conv1"])
    assert opt.grid == (0.0, 0.5) and opt.skip == ("conv1",)
    _, _, env = setup
    assert env.options.level == "mid" and env.options.max_accuracy_drop == 2.0
    assert env.with_level("coarse").options.level == "coarse"


def test_budget_from_points_interpolates_the_recovered_drop():
    """The search's budget is the estimated drop at which the recovered drop, interpolated
    through (0, 0) and the calibration points, reaches the budget on the recovered drop."""
    from tvm_hapm.hwflow import budget_from_points

    # the ResNet-20 / Fashion-MNIST calibration of benchmarks/results/hwflow.json
    est, rec = [1.0, 2.72, 13.52], [0.52, 0.78, 3.34]
    assert budget_from_points(est, rec, 1.0) == pytest.approx(2.72 + 10.8 * 0.22 / 2.56)
    assert budget_from_points(est, rec, 5.0) == 13.52  # never beyond the last point
    assert budget_from_points([2.0], [2.0], 1.0) == pytest.approx(1.0)  # from the origin
    # a larger estimate that recovered better does not lower the curve: made non-decreasing
    assert budget_from_points([3.0, 1.0, 2.0], [2.0, 0.9, 0.5], 1.0) == pytest.approx(
        2.0 + 0.1 / 1.1
    )
    assert budget_from_points([1.0], [0.0], 0.0) == 1.0  # nothing lost: as far as measured
    with pytest.raises(ValueError, match="estimated drops"):
        budget_from_points([1.0, 2.0], [0.5], 1.0)
    with pytest.raises(ValueError, match="finite"):
        budget_from_points([1.0], [float("nan")], 1.0)


def test_calibrate_budget_measures_both_drops_at_uniform_ratios(setup):
    """calibrate_budget evaluates each uniform ratio as the search would (the candidate lands in
    the environment's history and cache) and after the winners' recovery (here none: the
    reconstructed model, int8, on validation), and derives the budget from those points."""
    model, (x, y, _, _), _ = setup
    env = hwflow.HWFlowEnv(model, (x, y), "zedboard", OPTIONS, reconstruct=True)
    dense = hwflow.int8_accuracy(model, env.config, env.x_tune, env.x_val, env.y_val)
    cal = hwflow.calibrate_budget(env, [0.3, 0.7], 0, dense)
    points = cal["points"]
    assert [p["ratio"] for p in points] == [0.3, 0.7]
    assert [c.method for c in env.history] == ["calibration"] * 2
    assert [p["estimated_drop"] for p in points] == [c.drop for c in env.history]
    assert points[1]["recovered_val_int8_drop"] > points[0]["recovered_val_int8_drop"]
    assert cal["search_budget"] == hwflow.budget_from_points(
        [p["estimated_drop"] for p in points],
        [p["recovered_val_int8_drop"] for p in points],
        OPTIONS.max_accuracy_drop,
    )
    # resumed: a measured ratio is reused (not evaluated again), a new one is measured and
    # reported to the checkpoint callback
    seen = []
    again = hwflow.calibrate_budget(env, [0.3, 0.5], 0, dense, measured=points[:1],
                                    on_point=seen.append)  # fmt: skip
    assert again["points"][0] == points[0]
    assert [c.method for c in env.history] == ["calibration"] * 3
    assert len(seen) == 1 and seen[0] == again["points"] and again["points"][1]["ratio"] == 0.5
