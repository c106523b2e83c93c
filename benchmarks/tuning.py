"""Schedule tuning on ResNet-18 layers: tuned vs default, model-guided vs random, gap to optimum.

Run from the repository root::

    python benchmarks/tuning.py                 # ~10 min on 2 cores the first time, then cached
    python benchmarks/tuning.py --workers 1 --seeds 3 --layers conv4_x_3x3 conv5_x_1x1s2

**Layers.**  Six convolutions of ResNet-18 at 224x224 on the default target (``hapm_fpga``,
zedboard): the 3x3 convolution of every stage (``conv2_x`` 56x56x64 ... ``conv5_x`` 7x7x512)
and the two strided 1x1 shortcut convolutions of ``conv4_x`` and ``conv5_x``; random dense int8
weights (dense: the zero-block pattern is the only property of the weights that matters).

**Space.**  The knob grid of :func:`tvm_hapm.cost.tune.enumerate_space` (tile rows and columns,
output-channel group, input-channel chunk, double buffering; only schedules that fit the
buffers), minus the degenerate candidates of :func:`tvm_hapm.cost.tune.prune_space`: those
whose instruction stream (closed-form count) is more than ``--max-instruction-ratio`` (1.5)
times as long as the compiler default's.  Those are the tiny-tile / tiny-chunk corners (up to
50x the default's length); measuring them is what made the unpruned grid take hours, since code
generation time is linear in the stream length.  The full grid size is reported next to the
pruned one; ``fraction_of_space_tried`` is relative to the pruned space, which is the space the
searches see.

**Measurement.**  Every candidate of the space is measured: its instruction stream from the
compiler's code generator (TIR's ``conv2d_program`` via ``ConvTask.program``), replayed on the
timing model (``tvm_hapm.cost.measure.measure_program``: no functional simulation; timing depends on
the instructions only).  That gives the true optimum of the space.  Measurements run in
``--workers`` processes and are cached in a JSONL file (``--cache``), keyed by a fingerprint of
the code generator / timing / energy sources, the task (config, shape, zero-block pattern) and
the schedule: a rerun reuses them, a change of the compiler or of the timing model does not.

**Searches**, each with the same budget: ``floor(--budget * |space|)`` distinct schedules
measured *including* the compiler default (the searches always measure it), over ``--seeds``
seeds, looking measurements up in the table:

* ``random``: uniform without replacement;
* ``xgb``: TVM-style model-guided search (an XGBoost model of the measurements so far, random
  start, 25% random picks per batch);
* ``fine``: the same search started from the fine cost model's prediction of the whole space (one
  batched call), the online model learning the prediction's error.

Reported per layer and method: best cycles found (mean and worst over seeds), gap to the
optimum; summary keys of ``benchmarks/results/cost_model.json`` (merged with the keys there):
``tuned_vs_default_speedup`` (sum over the layers of default cycles over the sum of the fine
search's best, mean over seeds), ``gap_to_optimum`` (the fine search's worst gap over layers and
seeds), ``fraction_of_space_tried`` (largest over layers), ``guided_vs_random_speedup``, and
the details under ``tuning``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from common import write_json
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table
from scipy.stats import spearmanr

from tvm_hapm.cost import load_bundled_fine_model
from tvm_hapm.cost.dataset import source_fingerprint
from tvm_hapm.cost.tune import (
    ConvTask,
    enumerate_space,
    fine_model_prior,
    instruction_counts,
    model_guided_search,
    prune_space,
    random_search,
)
from tvm_hapm.target.config import get_config
from tvm_hapm.target.schedule import ConvSchedule

RESULTS = Path(__file__).resolve().parent / "results" / "cost_model.json"
CACHE = Path.home() / ".cache" / "tvm_hapm" / "tuning_measurements.jsonl"

# ResNet-18 (224x224) convolutions: name -> (cin, cout, k, stride, input hw)
LAYERS = {
    "conv2_x_3x3": (64, 64, 3, 1, 56),
    "conv3_x_3x3": (128, 128, 3, 1, 28),
    "conv4_x_3x3": (256, 256, 3, 1, 14),
    "conv5_x_3x3": (512, 512, 3, 1, 7),
    "conv4_x_1x1s2": (128, 256, 1, 2, 28),
    "conv5_x_1x1s2": (256, 512, 1, 2, 14),
}
#: measured by default (conv2_x_3x3, the largest space, adds ~8M instructions: ~5 min more)
DEFAULT_LAYERS = ["conv3_x_3x3", "conv4_x_3x3", "conv5_x_3x3", "conv4_x_1x1s2", "conv5_x_1x1s2"]
METHODS = ("random", "xgb", "fine")


def make_task(cfg, name: str, seed: int = 0) -> ConvTask:
    cin, cout, k, stride, hw = LAYERS[name]
    w = np.random.default_rng(seed).integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
    w[w == 0] = 1  # dense: no all-zero block by chance
    return ConvTask(name, cfg, (1, cin, hw, hw), w, (stride, stride), (k // 2,) * 4)


def _sched_key(s: ConvSchedule) -> str:
    return json.dumps(s.to_dict(), sort_keys=True)


# ------------------------------------------------------------------------------- measuring
_WORKER_TASKS: dict = {}


def _measure_one(target: str, name: str, sched: dict) -> dict:
    """Code generation + timing model of one candidate (runs in a worker process)."""
    from tvm_hapm.cost.measure import measure_program

    key = (target, name)
    if key not in _WORKER_TASKS:
        _WORKER_TASKS[key] = make_task(get_config(target), name)
    task = _WORKER_TASKS[key]
    t0 = time.perf_counter()
    prog = task.program(ConvSchedule(**sched))
    t1 = time.perf_counter()
    r = measure_program(prog)
    t2 = time.perf_counter()
    return {
        "cycles": r.cycles,
        "energy_uj": r.energy_uj,
        "instructions": len(prog.instructions),
        "codegen_s": t1 - t0,
        "timing_s": t2 - t1,
    }


class MeasurementTable:
    """Measurements of (task, schedule) pairs, cached in a JSONL file."""

    def __init__(self, path: Path, fp: str):
        self.path, self.fp = Path(path), fp
        self.rows: dict = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted run
                if r.get("fp") == fp:
                    self.rows[(r["task"], r["schedule"])] = r["result"]

    def missing(self, task_key: str, space) -> list:
        return [s for s in space if (task_key, _sched_key(s)) not in self.rows]

    def add(self, task_key: str, s: ConvSchedule, result: dict) -> None:
        row = {"fp": self.fp, "task": task_key, "schedule": _sched_key(s), "result": result}
        self.rows[(task_key, row["schedule"])] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def get(self, task_key: str, s: ConvSchedule) -> dict:
        return self.rows[(task_key, _sched_key(s))]


def measure_all(jobs, table: MeasurementTable, target: str, workers: int, console) -> None:
    """Measure the missing ``(task, schedule, estimated instructions)`` jobs, longest first."""
    jobs = sorted(jobs, key=lambda j: -j[2])
    if not jobs:
        return
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as bar:
        tid = bar.add_task(f"measuring {len(jobs)} candidates", total=len(jobs))
        if workers <= 1:
            for task, s, _ in jobs:
                table.add(task.key(), s, _measure_one(target, task.name, s.to_dict()))
                bar.advance(tid)
            return
        with ProcessPoolExecutor(workers) as pool:
            futs = {
                pool.submit(_measure_one, target, task.name, s.to_dict()): (task, s)
                for task, s, _ in jobs
            }
            for fut in as_completed(futs):
                task, s = futs[fut]
                table.add(task.key(), s, fut.result())
                bar.advance(tid)


# ------------------------------------------------------------------------------- searching
def run_searches(task, space, cycles_of, budget, seeds, prior_scores):
    """Best cycles and trials of each method and seed (measurements from the table)."""
    calls = []

    def measure(schedules):
        calls.extend(schedules)
        return [cycles_of[_sched_key(s)] for s in schedules]

    def prior(_task, schedules):
        return [prior_scores[_sched_key(s)] for s in schedules]

    out = {m: [] for m in METHODS}
    trials = budget - 1  # the searches also measure the compiler default
    for seed in range(seeds):
        for method in METHODS:
            calls.clear()
            if method == "random":
                r = random_search(task, trials, seed=seed, space=space, measure=measure)
            else:
                r = model_guided_search(
                    task, trials, seed=seed, space=space, measure=measure,
                    prior=prior if method == "fine" else None,
                )  # fmt: skip
            tried = len({_sched_key(s) for s in calls})
            out[method].append({"seed": seed, "best": r.best_cycles, "tried": tried})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default="hapm_fpga")
    ap.add_argument("--layers", nargs="+", default=DEFAULT_LAYERS, choices=list(LAYERS))
    ap.add_argument("--max-instruction-ratio", type=float, default=1.5)
    ap.add_argument("--budget", type=float, default=0.10, help="fraction of the space measured")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args(argv)
    console = Console(width=150)
    cfg = get_config(args.target)
    t_start = time.time()
    fp = source_fingerprint()
    table = MeasurementTable(Path(args.cache), fp)
    prior_fn = fine_model_prior(load_bundled_fine_model())  # loaded before any timing

    tasks, spaces, grids, jobs, prior_s, priors = {}, {}, {}, [], {}, {}
    for name in args.layers:
        task = make_task(cfg, name)
        grid = enumerate_space(task)
        space = prune_space(task, grid, args.max_instruction_ratio)
        t0 = time.perf_counter()
        pred = prior_fn(task, space)  # the fine model on the whole space, one batch
        prior_s[name] = time.perf_counter() - t0
        est = dict(zip(map(_sched_key, space), instruction_counts(task, space)))
        tasks[name], spaces[name], grids[name] = task, space, len(grid)
        priors[name] = dict(zip(map(_sched_key, space), np.asarray(pred, float)))
        jobs += [(task, s, est[_sched_key(s)]) for s in table.missing(task.key(), space)]
        console.print(f"{name}: grid {len(grid)}, space {len(space)}, to measure "
                      f"{len(table.missing(task.key(), space))}")  # fmt: skip
    t0 = time.time()
    measure_all(jobs, table, args.target, args.workers, console)
    measure_wall = time.time() - t0

    rows = []
    for name in args.layers:
        task, space = tasks[name], spaces[name]
        res = {_sched_key(s): table.get(task.key(), s) for s in space}
        cycles_of = {k: r["cycles"] for k, r in res.items()}
        optimum = min(cycles_of.values())
        default = cycles_of[_sched_key(task.default_schedule())]
        budget = max(2, math.floor(args.budget * len(space)))
        found = run_searches(task, space, cycles_of, budget, args.seeds, priors[name])
        keys = list(cycles_of)
        meas = np.array([cycles_of[k] for k in keys], float)
        pred = np.array([priors[name][k] for k in keys], float)
        row = {
            "layer": name,
            "shape": dict(zip(("cin", "cout", "k", "stride", "hw"), LAYERS[name])),
            "grid": grids[name],
            "space": len(space),
            "budget": budget,
            "default": default,
            "optimum": optimum,
            "default_vs_optimum": default / optimum,
            "fine_spearman_in_space": float(spearmanr(pred, meas).statistic),
            "fine_mape_in_space": float(np.mean(np.abs(pred - meas) / meas)),
            "fine_top1_gap": float(meas[int(np.argmin(pred))] / optimum - 1),
            "fine_predict_space_seconds": prior_s[name],
            "measure_seconds": float(sum(r["codegen_s"] + r["timing_s"] for r in res.values())),
            "instructions": int(sum(r["instructions"] for r in res.values())),
        }
        for m in METHODS:
            best = np.array([f["best"] for f in found[m]], float)
            row[m] = {
                "best_mean": float(best.mean()),
                "best_worst": float(best.max()),
                "gap_mean": float(best.mean() / optimum - 1),
                "gap_worst": float(best.max() / optimum - 1),
                "within_3pct": int((best <= 1.03 * optimum).sum()),
                "tried_max": max(f["tried"] for f in found[m]),
            }
        rows.append(row)

    title = f"Schedule tuning, ResNet-18 layers on {cfg.name} ({args.seeds} seeds, budget "
    table_out = Table(title=title + f"{100 * args.budget:g}% of the space)")
    for col in ("layer", "grid", "space", "trials", "default", "optimum", "random",
                "xgb", "fine", "fine gap (worst)"):  # fmt: skip
        table_out.add_column(col, justify="left" if col == "layer" else "right")
    for r in rows:
        table_out.add_row(
            r["layer"], str(r["grid"]), str(r["space"]), str(r["budget"]), f"{r['default']:,}",
            f"{r['optimum']:,}", *(f"{r[m]['best_mean']:,.0f}" for m in METHODS),
            f"{100 * r['fine']['gap_worst']:.2f}%",
        )  # fmt: skip
    console.print(table_out)

    tot = lambda key: sum(r[key] for r in rows)  # noqa: E731
    totm = lambda m: sum(r[m]["best_mean"] for r in rows)  # noqa: E731
    summary = {
        "tuned_vs_default_speedup": tot("default") / totm("fine"),
        "optimum_vs_default_speedup": tot("default") / tot("optimum"),
        "guided_vs_random_speedup": totm("random") / totm("fine"),
        "xgb_guided_vs_random_speedup": totm("random") / totm("xgb"),
        "gap_to_optimum": max(r["fine"]["gap_worst"] for r in rows),
        "gap_to_optimum_mean": float(np.mean([r["fine"]["gap_mean"] for r in rows])),
        "random_gap_to_optimum": max(r["random"]["gap_worst"] for r in rows),
        "xgb_gap_to_optimum": max(r["xgb"]["gap_worst"] for r in rows),
        "fraction_of_space_tried": max(r["fine"]["tried_max"] / r["space"] for r in rows),
    }
    console.print(summary)
    path = Path(args.output)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(summary)
    data["tuning"] = {
        "config": cfg.name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "layers": rows,
        "seeds": args.seeds,
        "budget_fraction": args.budget,
        "max_instruction_ratio": args.max_instruction_ratio,
        "measurement": "the compiler's code generator, TIR (ConvTask.program) + timing model "
        "(measure_program), every candidate of the pruned space; cached by source fingerprint",
        "source_fingerprint": fp,
        "space": "enumerate_space grid minus candidates with > max_instruction_ratio x the "
        "default's instruction count (prune_space); fraction_of_space_tried is relative to it",
        "summary_definitions": {
            "tuned_vs_default_speedup": "sum of default cycles / sum of the fine-guided "
            "search's best (mean over seeds)",
            "gap_to_optimum": "fine-guided search: worst over layers and seeds of best/optimum-1",
            "fraction_of_space_tried": "largest over layers of distinct schedules measured "
            "(default included) / space",
        },
        "measure_wall_seconds_this_run": measure_wall,
        "wall_seconds": time.time() - t_start,
    }
    write_json(path, data)  # atomically: the other benchmark's keys are in the same file
    console.print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
