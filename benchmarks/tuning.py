"""Schedule tuning on ResNet-18 layers: tuned vs default, model-guided vs random, gap to optimum.

Run: ``python benchmarks/tuning.py [--layers N] [--workers 2]``.  For each layer, the whole knob
space is enumerated and measured (the timing model over each candidate's instruction stream), so
the true optimum is known; then the model-guided search and random search each get the same
budget of 10% of the space (random search: mean over three seeds).  Writes the tuning keys of
``benchmarks/results/cost_model.json`` (merged with what is there).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import tvm_hapm  # noqa: F401
from tvm_hapm.cost.measure import LocalRunner
from tvm_hapm.cost.tune import (
    ConvTask,
    _measure,
    enumerate_space,
    model_guided_search,
    random_search,
)
from tvm_hapm.target.config import get_config

RESULTS = Path(__file__).resolve().parent / "results" / "cost_model.json"

# ResNet-18 (224x224) convolutions whose knob space can be measured exhaustively here (the
# 56x56 and 28x28 3x3 layers have ~1000-1300 candidates of ~5-20k instructions each: add them
# with --all on a machine with time to spare): (name, cin, cout, k, stride, input hw)
LAYERS = [
    ("conv5_x 3x3", 512, 512, 3, 1, 7),
    ("conv5_x 1x1/2", 256, 512, 1, 2, 14),
    ("conv4_x 3x3", 256, 256, 3, 1, 14),
    ("conv4_x 1x1/2", 128, 256, 1, 2, 28),
]
LARGE_LAYERS = [
    ("conv3_x 3x3", 128, 128, 3, 1, 28),
    ("conv2_x 3x3", 64, 64, 3, 1, 56),
]


def _task(cfg, name, cin, cout, k, stride, hw, seed=0):
    w = np.random.default_rng(seed).integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
    return ConvTask(name, cfg, (1, cin, hw, hw), w, (stride, stride), (k // 2,) * 4)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also the large 3x3 layers")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--target", default="hapm_fpga")
    args = parser.parse_args(argv)
    cfg = get_config(args.target)
    runner = LocalRunner(args.workers)
    console = Console()
    rows = []
    for spec in LAYERS + (LARGE_LAYERS if args.all else []):
        task = _task(cfg, *spec)
        space = enumerate_space(task)
        t0 = time.perf_counter()
        cycles = _measure(task, space, runner)
        enum_s = time.perf_counter() - t0
        optimum = min(cycles)
        budget = max(1, math.ceil(0.10 * len(space)))
        guided = model_guided_search(task, budget, runner=runner, seed=0)
        rand = [random_search(task, budget, runner=runner, seed=s).best_cycles for s in range(3)]
        rows.append(
            {
                "layer": spec[0],
                "space": len(space),
                "budget": budget,
                "default": guided.default_cycles,
                "optimum": optimum,
                "guided": guided.best_cycles,
                "random_mean": float(np.mean(rand)),
                "enumerate_seconds": enum_s,
            }
        )
        console.print(rows[-1])
    table = Table(title=f"Schedule tuning on ResNet-18 layers ({cfg.name})")
    for col in ("layer", "space", "trials", "default", "guided", "random (mean)", "optimum"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in rows:
        table.add_row(
            r["layer"],
            str(r["space"]),
            str(r["budget"]),
            f"{r['default']:,}",
            f"{r['guided']:,}",
            f"{r['random_mean']:,.0f}",
            f"{r['optimum']:,}",
        )
    console.print(table)
    total = {k: sum(r[k] for r in rows) for k in ("default", "guided", "random_mean", "optimum")}
    summary = {
        "tuned_vs_default_speedup": total["default"] / total["guided"],
        "guided_vs_random_speedup": total["random_mean"] / total["guided"],
        "gap_to_optimum": max(r["guided"] / r["optimum"] - 1 for r in rows),
        "fraction_of_space_tried": max(r["budget"] / r["space"] for r in rows),
    }
    console.print(summary)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.update(summary)
    data["tuning"] = {
        "config": cfg.name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "layers": rows,
        "method": "exhaustive enumeration gives the optimum; guided and random get 10% of it",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
