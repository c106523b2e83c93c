"""The bookkeeping of ``benchmarks/hwflow.py`` that decides published figures: which run is the
headline (chosen on validation only), how runs split over processes are merged, and where an
objective's results and figures go."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_script):
    """``benchmarks/hwflow.py`` as a module."""
    return benchmark_script("hwflow")


def run(lat, energy, val_drop, test_drop):
    return {"latency_reduction": lat, "energy_reduction": energy, "val_int8_drop": val_drop,
            "accuracy_drop": test_drop, "ci_accuracy_drop": [test_drop - 0.3, test_drop + 0.3],
            "search_seconds": 1.0, "ratios": {"conv": 0.5}}  # fmt: skip


def test_headline_is_the_best_objective_feasible_on_validation(bench):
    runs = {
        "rl_coarse": run(2.5, 2.1, 1.2, 0.1),  # fastest, but over the budget on validation
        "rl_fine": run(2.2, 1.8, 0.9, 5.0),  # feasible on validation; its test drop is not seen
        "uniform_fine": run(2.0, 1.9, 0.4, 0.2),
    }
    out = {"runs": runs}
    bench.select(out, Namespace(objective="latency", max_drop=1.0))
    assert out["winner"] == "rl_fine"
    assert out["feasible_on_validation"] == ["rl_fine", "uniform_fine"]
    assert (out["latency_reduction"], out["accuracy_drop"]) == (2.2, 5.0)
    assert list(out["by_level"]) == ["coarse", "fine"]
    bench.select(out, Namespace(objective="energy", max_drop=1.0))
    assert out["winner"] == "uniform_fine"
    bench.select(out, Namespace(objective="latency", max_drop=0.3))
    assert out["winner"] is None and out["feasible_on_validation"] == []


def record(settings, machine_date, runs=(), points=()):
    return {"meta": {"settings": settings, "machine": {"date": machine_date}, "seconds": 5.0},
            "resnet56": {"runs": {k: run(2.0, 1.8, 0.5, 0.5) for k in runs},
                         "budget_calibration": {"points": [
                             {"ratio": r, "estimated_drop": 2 * r, "recovered_val_int8_drop": r}
                             for r in points]}}}  # fmt: skip


def test_merge_keeps_every_process_runs_points_and_invocations(bench, tmp_path):
    base = {"objective": "latency", "max_drop": 1.0, "levels": [], "baselines": []}
    a, b, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "other.json"
    a.write_text(json.dumps(record({**base, "levels": ["fine"]}, "d1", ["rl_fine"], [0.7])))
    b.write_text(json.dumps(record({**base, "baselines": ["uniform"]}, "d2", ["uniform_fine"],
                                   [0.5])))  # fmt: skip
    settings = {**base, "levels": ["coarse"]}
    kept, earlier = bench.resumed([a, b], settings, tmp_path / "out.json")
    assert sorted(kept["resnet56"]["runs"]) == ["rl_fine", "uniform_fine"]
    points = kept["resnet56"]["budget_calibration"]["points"]
    assert [p["ratio"] for p in points] == [0.5, 0.7]
    assert settings["levels"] == ["coarse", "fine"] and settings["baselines"] == ["uniform"]
    assert [(i["file"], i["machine"]["date"], i["levels"]) for i in earlier] == [
        ("a.json", "d1", ["fine"]), ("b.json", "d2", [])]  # fmt: skip
    # a file of another run (here: another objective) is refused when merged ...
    other.write_text(json.dumps(record({**base, "objective": "energy"}, "d3", ["rl_mid"])))
    with pytest.raises(SystemExit, match="other settings"):
        bench.resumed([other], dict(settings), tmp_path / "out.json")
    # ... and not resumed when it is the output: the new run starts afresh
    kept, earlier = bench.resumed([other], dict(settings), other)
    assert kept == {} and earlier == []


def test_each_objective_and_dataset_has_its_own_results_and_figures(bench):
    assert bench.default_out("fashion-mnist", "latency").name == "hwflow.json"
    assert bench.default_out("fashion-mnist", "energy").name == "hwflow_energy.json"
    assert bench.default_out("digits", "energy").name == "hwflow_digits_energy.json"
    out = Path("results/x.json")
    energy = bench.figure_path(out, "resnet56", "fashion-mnist", "energy")
    assert energy == Path("results/hwflow_resnet56_energy.png")
    search = bench.figure_path(out, "resnet20", "digits", "latency", "_search")
    assert search == Path("results/hwflow_resnet20_digits_search.png")
