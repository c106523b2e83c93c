"""Re-simulate the latency and energy of recorded pruning results on the current hardware model,
without retraining.

Run: ``python benchmarks/reprice.py`` (a few minutes), or ``--check`` to compare instead of
writing.

A pruned model's cycles and energy on hapm_fpga depend on its layer shapes, on which weight
groups are zero (the Dynamic Sparsity Bypass skips all-zero blocks) and on which residual adds
the quantizer fuses (a choice made from the activation scales: :func:`tvm_hapm.flow.simulate`).
Recovery holds the pruning masks, so the recovered model of a record has the zeros of its
pruning, which is deterministic; its int8 rounding may zero a few more blocks, and its scales
may fuse another add.  So when the timing or energy model changes (the banked accumulator, the
RTL's costs, the FPGA energy tables), a record's latency and energy are re-simulated from its
pruning alone, calibrated on the same 8 training images as the record, while its accuracy (a
function of the recovered weights, which no hardware-model change touches) stays as measured.
Whether the pruning stands for the recovered model is checked, not assumed (``--check``).

For every row of ``results/hapm_vs_standard.json`` and every run of ``results/hwflow.json``,
this script redoes the pruning with the recorded settings (method, ranking, the recorded
validated cap, filter fraction, or HW-Flow's per-layer ratios), checks that it reaches the
recorded weight sparsity, simulates one image, and writes the new ``lat_*`` / ``energy_*`` /
``gemm_*`` (or ``sim_latency_ms`` / ``sim_energy_uj`` and the reductions), the speed-ups and
the targets, keeping the previous figures under ``previous_hardware`` with the commit they
came from.

``--check`` prints, for every record, the re-simulated figures against the recorded ones
without writing: run on the commit that produced a record, it must reproduce the record's
latency exactly, which is how the method itself is checked.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path

from common import RESULTS, ROOT, write_json
from hapm_vs_standard import METHODS, add_speedups, targets

from tvm_hapm.data import load_fashion_mnist, load_fashion_resnet
from tvm_hapm.flow import filter_deploy_pass, prune_onnx, simulate, sparsity_of
from tvm_hapm.hwflow import prune_onnx_per_layer
from tvm_hapm.target.config import get_config

#: figures of a hapm_vs_standard row that depend on the hardware model
ROW_FIGURES = ("lat", "energy", "gemm")
#: figures of a hwflow run (or headline) that depend on the hardware model
RUN_FIGURES = ("latency_reduction", "energy_reduction")


def commit() -> str:
    """The checked-out commit of the repository."""
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def config_of(data: dict, name: str):
    """The hardware config a model's records were measured on."""
    meta = data["meta"]
    settings = meta["settings"] if "settings" in meta else meta["runs"][name]["settings"]
    return get_config(settings["target"])


def pruned_model(base, label: str, s: float, row: dict, cfg):
    """The model ``label`` of a hapm_vs_standard row pruned as the benchmark pruned it, and the
    deployment transform (filter pruning removes the channels)."""
    method, ranking = METHODS[label]
    ratio, transform, cap = s, None, None
    if method == "filter":
        ratio = row["filter_channel_fraction"]
        transform = filter_deploy_pass(ratio, cfg)
    if label == "hapm_val":
        cap = row["hapm_val_cap"]
    pruned, _ = prune_onnx(base, method, ratio, config=cfg, ranking=ranking,
                           max_layer_sparsity=cap)  # fmt: skip
    return pruned, transform


def reprice_hapm_vs_standard(data: dict, x, log, check: bool) -> list:
    """Re-simulate every row; returns ``(model, sparsity, label, recorded, now)`` mismatches of
    the weight sparsity (a record the pruning no longer reproduces is left as it was)."""
    bad = []
    for name in [k for k in data if k.startswith("resnet")]:
        base, cfg = load_fashion_resnet(int(name.removeprefix("resnet")), 1), config_of(data, name)
        dense = simulate(base, cfg, x, x)
        for s, row in data[name].items():
            now = {"dense": (dense[0], dense[1], dense[4])}
            for label in METHODS:
                if f"lat_{label}" not in row:
                    continue
                pruned, transform = pruned_model(base, label, float(s), row, cfg)
                sp = sparsity_of(pruned)
                if not math.isclose(sp, row[f"sparsity_{label}"], rel_tol=0, abs_tol=1e-9):
                    bad.append((name, s, label, row[f"sparsity_{label}"], sp))
                    continue
                lat, en, _, _, gemms = simulate(pruned, cfg, x, x, transform=transform)
                now[label] = (lat, en, gemms)
            for label, (lat, en, gemms) in now.items():
                log(f"{name} {s} {label}: {row[f'lat_{label}']:.4f} -> {lat:.4f} ms, "
                    f"{row[f'energy_{label}']:.1f} -> {en:.1f} uJ, "
                    f"{row[f'gemm_{label}']} -> {gemms} GEMMs")  # fmt: skip
                if not check:
                    old = {f"{f}_{label}": row[f"{f}_{label}"] for f in ROW_FIGURES}
                    row.setdefault("previous_hardware", {}).update(old)
                    row.update({f"lat_{label}": lat, f"energy_{label}": en,
                                f"gemm_{label}": gemms})  # fmt: skip
            if not check:
                add_speedups(row)
        if not check:
            data[f"targets_{name}"] = targets(data[name])
    return bad


def reprice_hwflow(data: dict, x, log, check: bool) -> list:
    """Re-simulate every run's winner from its per-layer ratios; the headline stays the run
    chosen on validation (the choice used accuracy, which does not change)."""
    bad = []
    for name in [k for k in data if k.startswith("resnet")]:
        base, cfg = load_fashion_resnet(int(name.removeprefix("resnet")), 1), config_of(data, name)
        d_lat, d_en = simulate(base, cfg, x, x)[:2]
        rec = data[name]
        log(f"{name} dense: {rec['dense']['sim_latency_ms']:.4f} -> {d_lat:.4f} ms, "
            f"{rec['dense']['sim_energy_uj']:.1f} -> {d_en:.1f} uJ")  # fmt: skip
        new_runs = {}
        for key, run in rec["runs"].items():
            pruned, _, _ = prune_onnx_per_layer(base, run["ratios"], cfg)
            lat, en = simulate(pruned, cfg, x, x)[:2]
            red = (d_lat / lat, d_en / en)
            log(f"{name} {key}: latency {run['latency_reduction']:.3f}x -> {red[0]:.3f}x, "
                f"energy {run['energy_reduction']:.3f}x -> {red[1]:.3f}x")  # fmt: skip
            new_runs[key] = (lat, en, red)
        if check:
            continue
        rec.setdefault("previous_hardware", {})["dense"] = dict(rec["dense"])
        rec["dense"].update({"sim_latency_ms": d_lat, "sim_energy_uj": d_en})
        for key, (lat, en, red) in new_runs.items():
            run = rec["runs"][key]
            run.setdefault("previous_hardware", {}).update(
                {f: run[f] for f in RUN_FIGURES} | {"final": dict(run["final"])}
            )
            run["final"].update({"sim_latency_ms": lat, "sim_energy_uj": en})
            run.update(dict(zip(RUN_FIGURES, red)))
        if rec.get("winner"):
            rec.setdefault("previous_hardware", {}).update({f: rec[f] for f in RUN_FIGURES})
            rec.update({f: rec["runs"][rec["winner"]][f] for f in RUN_FIGURES})
            for level, figures in rec.get("by_level", {}).items():
                figures.update({f: rec["runs"][f"rl_{level}"][f] for f in RUN_FIGURES})
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", nargs="+", default=["hapm_vs_standard", "hwflow"],
                    choices=["hapm_vs_standard", "hwflow"])  # fmt: skip
    ap.add_argument("--check", action="store_true", help="print, do not write")
    args = ap.parse_args(argv)
    x = load_fashion_mnist().x_train[:8]  # calibration images; cycles do not depend on them
    status = 0
    for stem in args.files:
        path = RESULTS / f"{stem}.json"
        data = json.loads(Path(path).read_text())
        fn = reprice_hapm_vs_standard if stem == "hapm_vs_standard" else reprice_hwflow
        bad = fn(data, x, print, args.check)
        for name, s, label, was, now in bad:
            print(f"NOT REPRICED {name} {s} {label}: the pruning now gives sparsity {now} "
                  f"(recorded {was})")  # fmt: skip
            status = 1
        if not args.check:
            data["meta"]["repriced"] = {
                "commit": commit(),
                "what": "latency, energy and GEMM counts re-simulated on this commit's hardware "
                "model from each record's pruning (benchmarks/reprice.py); accuracies as "
                "measured; the previous figures under previous_hardware",
            }
            write_json(path, data)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
