"""The bookkeeping of ``benchmarks/hapm_vs_standard.py``: rows of one run split over processes
(by methods or sparsities) are merged method by method, with the speed-ups and targets
recomputed over the merged rows and every invocation's record kept; a file of another run is
refused; a run with another fine-tuning budget does not overwrite the headline results."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_script):
    """``benchmarks/hapm_vs_standard.py`` as a module."""
    return benchmark_script("hapm_vs_standard")


SETTINGS = {"dataset": "fashion-mnist", "epochs": 6.0, "lr": 0.01, "seed": 0}


def method(label, acc, lat):
    return {f"acc_{label}": acc, f"lat_{label}": lat, f"energy_{label}": 10 * lat}


def record(path, sparsities, date, methods, rows, **extra):
    meta = {"settings": {**SETTINGS, "sparsities": sparsities}, "machine": {"date": date},
            "seconds": 1.0, "methods": methods, "models": ["resnet20"]}  # fmt: skip
    dense = {"acc_dense": 94.0, "lat_dense": 3.0}
    rows = {s: {**dense, **row} for s, row in rows.items()}
    path.write_text(json.dumps({"meta": meta, "resnet20": rows, "meta_resnet20": {"seconds": 2},
                                **extra}))  # fmt: skip


def test_merge_joins_rows_method_by_method(bench, tmp_path):
    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    record(
        a,
        [0.5],
        "d1",
        ["standard", "hapm_layer"],
        {"0.5": {**method("standard", 93.8, 3.0), **method("hapm_layer", 93.5, 2.0)}},
    )
    record(
        b,
        [0.5],
        "d2",
        ["filter", "hapm"],
        {"0.5": {**method("filter", 93.0, 2.5), **method("hapm", 92.0, 1.5)}},
    )
    # another process ran a method of a's again (a deterministic run: the first file's is kept)
    record(
        c,
        [0.7, 0.5],
        "d3",
        ["standard"],
        {"0.7": method("standard", 93.6, 3.0), "0.5": method("standard", 99.0, 3.0)},
    )
    settings = {**SETTINGS, "sparsities": [0.5]}
    kept, earlier = bench.resumed([a, b, c], settings, tmp_path / "out.json")
    row = kept["resnet20"]["0.5"]
    assert {k for k in row if k.startswith("acc_")} == {
        "acc_dense", "acc_standard", "acc_hapm_layer", "acc_filter", "acc_hapm"}  # fmt: skip
    assert row["acc_standard"] == 93.8
    # speed-ups across files: hapm (from b) against standard (from a)
    assert row["hapm_vs_standard_speedup"] == pytest.approx(2.0)
    assert row["hapm_vs_dense_speedup"] == pytest.approx(2.0)
    assert kept["targets_resnet20"]["0.5"]["hapm"]["within_1pt_of_standard"] is False
    assert kept["targets_resnet20"]["0.5"]["hapm_layer"]["within_1pt_of_standard"] is True
    assert sorted(kept["resnet20"]) == ["0.5", "0.7"]
    assert settings["sparsities"] == [0.5, 0.7]
    assert [(i["file"], i["machine"]["date"], i["methods"]) for i in earlier] == [
        ("a.json", "d1", ["standard", "hapm_layer"]), ("b.json", "d2", ["filter", "hapm"]),
        ("c.json", "d3", ["standard"])]  # fmt: skip
    # a file given twice (or kept in a resumed output's record) is one invocation
    assert len(bench.resumed([a, a], dict(settings), tmp_path / "out.json")[1]) == 1


def test_merge_refuses_another_run(bench, tmp_path):
    other = tmp_path / "other.json"
    record(other, [0.5], "d1", ["standard"], {"0.5": method("standard", 93.8, 3.0)})
    settings = {**SETTINGS, "epochs": 2.0, "sparsities": [0.5]}
    with pytest.raises(SystemExit, match="other settings"):
        bench.resumed([other], dict(settings), tmp_path / "out.json")
    # the output itself, written by another run, is started afresh
    assert bench.resumed([other], dict(settings), other) == ({}, [])


def test_another_budget_writes_its_own_results(bench):
    assert bench.default_out("fashion-mnist", 2.0).name == "hapm_vs_standard.json"
    assert bench.default_out("fashion-mnist", 6.0).name == "hapm_vs_standard_6ep.json"
    assert bench.default_out("digits", 0.5).name == "hapm_vs_standard_digits_0.5ep.json"
    assert bench.default_out("fashion-mnist", 6.0, 3).name == "hapm_vs_standard_6ep_3stages.json"
    assert bench.default_out("fashion-mnist", 6.0, 1, 0.9).name == "hapm_vs_standard_6ep_kd0.9.json"


def test_files_written_before_iterative_pruning_are_one_shot_runs(bench, tmp_path):
    old = tmp_path / "old.json"  # its settings have no "stages": it pruned in one round
    record(old, [0.5], "d1", ["standard"], {"0.5": method("standard", 93.8, 3.0)})
    one_shot = {**SETTINGS, "stages": 1, "schedule": "cubic", "sparsities": [0.5]}
    kept, _ = bench.resumed([old], dict(one_shot), tmp_path / "out.json")
    assert kept["resnet20"]["0.5"]["acc_standard"] == 93.8
    with pytest.raises(SystemExit, match="other settings"):
        bench.resumed([old], {**one_shot, "stages": 3}, tmp_path / "out.json")


def test_a_variant_with_the_same_pruned_model_is_not_recovered_twice(bench):
    from tvm_hapm.data import load_bundled_resnet20
    from tvm_hapm.target.config import get_config

    base, cfg = load_bundled_resnet20(1), get_config("hapm_fpga-zedboard")
    row = {"acc_hapm_layer": 93.0, "acc_hapm": 92.0}
    # per_mac with every layer capped at the target sparsity is the per-layer allocation
    assert bench.recovered_twin("hapm_val", 0.5, base, cfg, {**row, "hapm_val_cap": 0.5}) == (
        "hapm_layer"
    )
    assert bench.recovered_twin("hapm_val", 0.5, base, cfg, {**row, "hapm_val_cap": 0.625}) is None
    # hapm is per_mac at its default cap (0.875)
    assert bench.recovered_twin("hapm_cal", 0.5, base, cfg, {**row, "hapm_cal_cap": 0.875}) == (
        "hapm"
    )


def test_merge_compares_methods_of_different_files_image_by_image(bench, tmp_path):
    import numpy as np

    n = 4000
    standard, hapm = np.ones(n, bool), np.ones(n, bool)
    standard[:80] = False  # 98%
    hapm[:240] = False  # 94%: wrong wherever standard is, and on 160 images more
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    row_a = {**method("standard", 98.0, 3.0), "correct_standard": bench.pack_correct(standard)}
    row_b = {**method("hapm", 94.0, 1.5), "correct_hapm": bench.pack_correct(hapm)}
    record(a, [0.5], "d1", ["standard"], {"0.5": row_a}, test_images=n)
    record(b, [0.5], "d2", ["hapm"], {"0.5": row_b}, test_images=n)
    assert np.array_equal(bench.unpack_correct(row_b["correct_hapm"], n), hapm)
    settings = {**SETTINGS, "sparsities": [0.5]}
    kept, _ = bench.resumed([a, b], settings, tmp_path / "out.json")
    low, high = kept["resnet20"]["0.5"]["ci_gap_hapm"]
    # paired: +-0.61 point around the 4-point gap; unpaired accuracies would give +-0.85
    assert 3.25 < low < 4.0 < high < 4.75
