"""Accuracy and speed of the coarse / mid / fine cost models against the simulator.

Run from the repository root::

    python benchmarks/cost_model.py                       # results/cost_model.json
    python benchmarks/cost_model.py --presets zedboard --sparsities 0 0.5

Held-out layers (the bundled fine model is trained without these shapes, see
``docs/cost_model.md``): the unique conv / dense layers of ResNet-18 at 224x224 and of the
MobileNet-style network (``tvm_hapm.models.zoo``), on each preset, with the compiler's default
schedule and a few fractions of randomly placed all-zero weight blocks.

For every (layer, preset, sparsity) the reference is the simulator: ``conv2d_program`` (code
generation) then the timing and energy models.  Reported per level: MAPE of cycles and energy,
Spearman rank correlation of cycles (``scipy.stats.spearmanr``), and the prediction throughput
next to the simulation throughput, both simulation only (timing + energy model on the generated
program) and compile + simulate.  Prediction throughput: ``predict_batch`` of all the points at
once (one vectorised mid analysis, one feature matrix, one XGBoost call per target), median of
``--reps`` repetitions after a warm-up (``<level>_predict_seconds``); the first call of the
run, with cold per-layer caches (compiler schedule, structural blocks), is
``<level>_cold_predict_seconds``.
The simulation is timed per point (it cannot batch): ``simulate_seconds`` is the sum.  Existing
keys of the JSON file that this script does not produce are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from tvm_hapm.cost import (
    BlockSparsity,
    CoarseModel,
    MidModel,
    block_mask,
    load_bundled_fine_model,
    zoo_layers,
)
from tvm_hapm.cost.dataset import measure
from tvm_hapm.target.config import PRESETS

RESULTS = Path(__file__).resolve().parent / "results" / "cost_model.json"


def held_out_layers():
    layers, seen = [], set()
    for net in ("resnet18_imagenet", "mobilenet_style"):
        for layer in zoo_layers(net):
            if layer.shape_key() not in seen:
                seen.add(layer.shape_key())
                layers.append(layer)
    return layers


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.3, 0.6])
    ap.add_argument("--output", default=str(RESULTS))
    ap.add_argument("--reps", type=int, default=20, help="repetitions of the prediction timing")
    ap.add_argument("--note", default=None, help="free text stored as cost_model_note")
    args = ap.parse_args(argv)
    console = Console()
    layers = held_out_layers()
    items, sims = [], []
    t_start = time.time()
    with console.status("simulating held-out layers") as status:
        for pname in args.presets:
            cfg = PRESETS[pname]
            for li, layer in enumerate(layers):
                for si, sp in enumerate(args.sparsities):
                    mask = block_mask(layer, cfg, BlockSparsity(sp), rng=[li, si, 7])
                    r = measure(layer, cfg, None, mask, seed=li)
                    items.append((layer, cfg, None, BlockSparsity.from_mask(mask)))
                    sims.append(r)
                    status.update(f"simulating {pname} {layer.name} sparsity {sp}")
    sim_cycles = np.array([r["cycles"] for r in sims], float)
    sim_energy = np.array([r["energy_uj"] for r in sims], float)
    sim_s = float(sum(r["simulate_s"] for r in sims))
    compile_s = float(sum(r["compile_s"] for r in sims))

    models = {"coarse": CoarseModel(), "mid": MidModel(), "fine": load_bundled_fine_model()}
    out: dict = {}
    table = Table(title=f"cost models vs simulator: {len(items)} held-out layer points")
    for col in ("level", "cycles MAPE", "energy MAPE", "Spearman", "predictions/s",
                "x sim", "x compile+sim"):  # fmt: skip
        table.add_column(col, justify="right")
    for name, model in models.items():
        t0 = time.perf_counter()
        model.predict_batch(items)  # first call: cold caches
        cold_s = time.perf_counter() - t0
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            preds = model.predict_batch(items)
            times.append(time.perf_counter() - t0)
        pred_s = float(np.median(times))
        pc, pe = preds[:, 0], preds[:, 1]
        m_c = float(np.mean(np.abs(pc - sim_cycles) / sim_cycles))
        m_e = float(np.mean(np.abs(pe - sim_energy) / sim_energy))
        rho = float(spearmanr(pc, sim_cycles).statistic)
        rho_e = float(spearmanr(pe, sim_energy).statistic)
        speed = sim_s / pred_s
        speed_c = (sim_s + compile_s) / pred_s
        out.update({
            f"{name}_mape": m_c, f"{name}_energy_mape": m_e, f"{name}_spearman": rho,
            f"{name}_energy_spearman": rho_e, f"{name}_predict_seconds": pred_s,
            f"{name}_predictions_per_second": len(items) / pred_s,
            f"{name}_speedup_vs_sim": speed, f"{name}_speedup_vs_compile_sim": speed_c,
            f"{name}_cold_predict_seconds": cold_s,
        })  # fmt: skip
        row = (f"{100 * m_c:.2f}%", f"{100 * m_e:.2f}%", f"{rho:.4f}")
        table.add_row(name, *row, f"{len(items) / pred_s:,.0f}", f"{speed:,.0f}", f"{speed_c:,.0f}")
    table.add_row("simulator", "", "", "", f"{len(items) / sim_s:,.0f}", "1", "")
    table.add_row("compile+sim", "", "", "", f"{len(items) / (sim_s + compile_s):,.1f}", "", "")
    console.print(table)
    out.update({
        "points": len(items),
        "layers": len(layers),
        "presets": args.presets,
        "sparsities": args.sparsities,
        "simulate_seconds": sim_s,
        "compile_seconds": compile_s,
        "simulations_per_second": len(items) / sim_s,
        "compile_simulations_per_second": len(items) / (sim_s + compile_s),
        "held_out": "unique conv/dense layers of resnet18_imagenet (224x224) and mobilenet_style",
        "fine_model_meta": {k: v for k, v in models["fine"].meta.items() if k != "params"},
        "prediction_timing": f"predict_batch of all points, median of {args.reps} reps",
        "wall_seconds": time.time() - t_start,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()),
        },
    })  # fmt: skip
    if args.note:
        out["cost_model_note"] = args.note
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(out)
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    console.print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
