"""Accuracy and speed of the coarse / mid / fine cost models against the simulator.

Run from the repository root::

    python benchmarks/cost_model.py                       # results/cost_model.json
    python benchmarks/cost_model.py --presets zedboard --sparsities 0 0.5

Held-out layers (the bundled fine model is trained without these shapes, see
``docs/cost_model.md``): the unique conv / dense layers of ResNet-18 at 224x224 and of the
MobileNet-style network (``tvm_hapm.models.zoo``), on each preset, with the compiler's default
schedule and a few fractions of randomly placed all-zero weight blocks (an exact block mask per
point).

**Reference.**  For every (layer, preset, mask) point the simulator's cycles and energy: the
layer's program from ``tir.conv2d_program`` (the compiler's code generation, random non-zero
weights with the mask's zero blocks) replayed on the timing model and the energy model
(``TimingModel.run`` + ``EnergyModel.estimate``: the simulator's timing path; timing does not
depend on data, so no functional simulation).  Reported per level: MAPE of cycles and energy,
Spearman rank correlation (``scipy.stats.spearmanr``).

**What is timed** (the same points, the same quantity: cycles and energy of each point, in one
process, interleaved):

* ``simulate_seconds``: the timing + energy replay of every point's already generated program
  (code generation excluded), median over ``--sim-passes`` passes (per preset block);
* ``compile_seconds``: the code generation of every point (once);
* ``<level>_predict_seconds``: one ``predict_batch`` of all the points, from ``(layer, config,
  schedule=None, BlockSparsity mask)`` to ``(cycles, energy)``: the mid analysis (including the
  compiler's schedule choice), the feature matrix and the XGBoost booster (one thread, two
  outputs: cycles and energy);
  median over the repetitions run between the simulation passes, with the per-(layer, config)
  caches of a previous call warm;
* ``<level>_cold_predict_seconds``: the same call with those caches emptied first
  (``analytic.clear_caches``), as in a fresh process once the compiled code is loaded;
* ``jit_warmup_seconds``: what a process pays once, before the first prediction, for the
  compiled code (numba's import, the kernels of ``tvm_hapm.cost._jit`` from numba's disk cache,
  the fine model's compiled copy of its trees built and checked against xgboost), measured
  before anything else is timed; ``jit_compile_seconds``: the kernels' compilation in a fresh
  interpreter with an empty numba cache (what the first run after an install or a change of
  ``_jit.py`` pays).

``<level>_speedup_vs_sim`` = ``simulate_seconds / <level>_predict_seconds`` (the conservative
figure: the simulator is not charged for code generation nor for functional execution),
``..._vs_sim_cold`` with the cold prediction, ``..._vs_compile_sim`` with code generation +
replay (what answering a query by simulation costs: the model's inputs are those of the code
generator), ``..._vs_full_sim`` against ``full_simulate_seconds``: the bit-exact simulator
(``Simulator.run(timing=True)``, functional execution + timing, one pass; ``--no-full-sim``
skips it), whose cycles are checked to equal the timing replay's.  ``fine_breakdown``
splits the fine model's time into analysis, features and the trees (the compiled copy the
model uses; ``xgboost_call``: xgboost's own prediction of the same rows, for comparison).
``fine_model_check``
re-measures a sample of the bundled model's training records with the current code generator
and timing model: if they all agree, the model was trained on the current simulator.
Existing keys of the JSON file that this script does not produce are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
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
from tvm_hapm.cost.analytic import analyze_batch, clear_caches, jit_kernels
from tvm_hapm.cost.dataset import load_samples, measure_spec, random_weights, source_fingerprint
from tvm_hapm.cost.features import features_from_batch
from tvm_hapm.cost.models import predict_dense
from tvm_hapm.passes.qops import choose_multiplier
from tvm_hapm.runtime import Simulator
from tvm_hapm.runtime.energy import EnergyModel
from tvm_hapm.runtime.timing import TimingModel
from tvm_hapm.target.config import PRESETS
from tvm_hapm.target.tir import conv2d_program

RESULTS = Path(__file__).resolve().parent / "results" / "cost_model.json"


def held_out_layers():
    layers, seen = [], set()
    for net in ("resnet18_imagenet", "mobilenet_style"):
        for layer in zoo_layers(net):
            if layer.shape_key() not in seen:
                seen.add(layer.shape_key())
                layers.append(layer)
    return layers


def _compile(layer, cfg, mask, seed):
    """The point's program, as ``dataset.measure`` builds it (random non-zero weights with the
    mask's zero blocks, random bias, requantization, ReLU clip)."""
    rng = np.random.default_rng(seed)
    weight = random_weights(layer, cfg, mask, rng)
    bias = rng.integers(-1000, 1000, layer.cout).astype(np.int32)
    mult, shift = choose_multiplier(rng.uniform(0.001, 0.004, layer.cout))
    prog, consts = conv2d_program(
        cfg, layer.name or "layer", layer.data_shape(), weight, bias, mult, shift,
        (0, cfg.act_range[1]), layer.strides, layer.padding, layer.dilation, layer.groups,
    )  # fmt: skip
    return prog, consts


def _simulate(cfg, prog):
    res = TimingModel(cfg).run(prog.instructions)
    return res.cycles, EnergyModel(cfg).estimate(res).total_uj


def _full_simulate(cfg, prog, consts, seed):
    """The bit-exact simulator on the program (functional execution + timing and energy), on
    a random input: what ``Simulator.run(..., timing=True)`` costs."""
    rng = np.random.default_rng(seed)
    lo, hi = cfg.act_range
    it = iter(consts)
    dram = []
    for slot in prog.slots:
        if slot.role == "const":
            dram.append(np.asarray(next(it)).reshape(-1).astype(slot.dtype))
        elif slot.role == "input":
            dram.append(rng.integers(lo, hi + 1, slot.dram_elems).astype(slot.dtype))
        else:
            dram.append(np.zeros(slot.dram_elems, slot.dtype))
    stats = Simulator(cfg).run(prog.instructions, dram, timing=True)
    return stats.cycles, stats.energy_uj


def check_bundled_model(model, n: int, seed: int = 1) -> dict:
    """Re-measure ``n`` random records of the model's training data (the cache its metadata
    names; models trained before that was recorded used ``cost_samples_v2.jsonl``) with the
    current code generator and timing model."""
    name = model.meta.get("cache", "cost_samples_v2.jsonl")
    path = Path.home() / ".cache" / "tvm_hapm" / name
    recs = [r for r in load_samples(path) if "result" in r]
    if not recs or n <= 0:
        return {"checked": 0, "note": f"no training cache at {path}"}
    pick = np.random.default_rng(seed).choice(len(recs), min(n, len(recs)), replace=False)
    differing = []
    for i in pick.tolist():
        r = recs[i]
        new = measure_spec({k: v for k, v in r.items() if k not in ("result", "error")})
        a, b = r["result"], new.get("result", {})
        if a["cycles"] != b.get("cycles") or not np.isclose(a["energy_uj"], b.get("energy_uj")):
            differing.append(int(r["id"]))
    return {"checked": len(pick), "differing": len(differing), "differing_ids": differing[:20],
            "cache": str(path), "source_fingerprint": source_fingerprint()}  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.3, 0.6])
    ap.add_argument("--output", default=str(RESULTS))
    ap.add_argument("--sim-passes", type=int, default=3, help="timing passes over the programs")
    ap.add_argument("--reps", type=int, default=5, help="prediction reps after each sim pass")
    ap.add_argument("--check-model", type=int, default=60, help="training records re-measured")
    ap.add_argument("--no-full-sim", action="store_true", help="skip the functional simulation")
    ap.add_argument("--note", default=None, help="free text stored as cost_model_note")
    args = ap.parse_args(argv)
    console = Console(width=150)
    t_start = time.time()
    layers = held_out_layers()
    models = {"coarse": CoarseModel(), "mid": MidModel(), "fine": load_bundled_fine_model()}
    # every point's mask first: the prediction batch is known before anything is simulated
    blocks = []  # per preset: [(layer, cfg, mask, seed)]
    items = []
    for pname in args.presets:
        cfg = PRESETS[pname]
        block = []
        for li, layer in enumerate(layers):
            for si, sp in enumerate(args.sparsities):
                mask = block_mask(layer, cfg, BlockSparsity(sp), rng=[li, si, 7])
                block.append((layer, cfg, mask, li))
                items.append((layer, cfg, None, BlockSparsity.from_mask(mask)))
        blocks.append(block)

    jit = {"jit_compile_seconds": _jit_compile_seconds()}
    t0 = time.perf_counter()  # the once-per-process cost of the compiled code
    jit_kernels()
    models["fine"].log_ratios(np.zeros((1, len(models["fine"].feature_names)), np.float32))
    jit["jit_warmup_seconds"] = time.perf_counter() - t0
    cold = {}
    for name, model in models.items():
        clear_caches()
        t0 = time.perf_counter()
        model.predict_batch(items)
        cold[name] = time.perf_counter() - t0
    pred_times = {name: [] for name in models}
    sims, sim_s, compile_s, full_s = [], 0.0, 0.0, 0.0
    with console.status("simulating held-out layers") as status:
        for pname, block in zip(args.presets, blocks):
            status.update(f"{pname}: code generation of {len(block)} points")
            progs, consts = [], []
            for layer, cfg, mask, seed in block:
                t0 = time.perf_counter()
                prog, const = _compile(layer, cfg, mask, seed)
                compile_s += time.perf_counter() - t0
                progs.append(prog)
                consts.append(const)
            passes = []
            for k in range(args.sim_passes):
                status.update(f"{pname}: timing pass {k + 1}/{args.sim_passes}")
                t0 = time.perf_counter()
                out = [_simulate(cfg, prog) for (_, cfg, _, _), prog in zip(block, progs)]
                passes.append(time.perf_counter() - t0)
                if k == 0:
                    sims += out
                elif out != sims[-len(out) :]:
                    raise RuntimeError("the timing model is not deterministic")
                for name, model in models.items():  # prediction reps between the passes
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        model.predict_batch(items)
                        pred_times[name].append(time.perf_counter() - t0)
            sim_s += float(np.median(passes))
            if not args.no_full_sim:
                status.update(f"{pname}: functional + timing simulation")
                t0 = time.perf_counter()
                full = [
                    _full_simulate(cfg, prog, const, seed)
                    for (_, cfg, _, seed), prog, const in zip(block, progs, consts)
                ]
                full_s += time.perf_counter() - t0
                if [c for c, _ in full] != [c for c, _ in sims[-len(full) :]]:
                    raise RuntimeError("Simulator.run and TimingModel.run disagree on cycles")
            del progs, consts
    sim_cycles = np.array([c for c, _ in sims], float)
    sim_energy = np.array([e for _, e in sims], float)

    out: dict = {}
    table = Table(title=f"cost models vs simulator: {len(items)} held-out layer points")
    for col in ("level", "cycles MAPE", "energy MAPE", "Spearman", "predictions/s",
                "x sim", "x sim (cold)", "x compile+sim", "x full sim"):  # fmt: skip
        table.add_column(col, justify="right")
    for name, model in models.items():
        preds = model.predict_batch(items)
        pred_s = float(np.median(pred_times[name]))
        pc, pe = preds[:, 0], preds[:, 1]
        m_c = float(np.mean(np.abs(pc - sim_cycles) / sim_cycles))
        m_e = float(np.mean(np.abs(pe - sim_energy) / sim_energy))
        rho = float(spearmanr(pc, sim_cycles).statistic)
        rho_e = float(spearmanr(pe, sim_energy).statistic)
        speed, speed_cold = sim_s / pred_s, sim_s / cold[name]
        speed_c = (sim_s + compile_s) / pred_s
        if full_s:
            out[f"{name}_speedup_vs_full_sim"] = full_s / pred_s
        out.update({
            f"{name}_mape": m_c, f"{name}_energy_mape": m_e, f"{name}_spearman": rho,
            f"{name}_energy_spearman": rho_e, f"{name}_predict_seconds": pred_s,
            f"{name}_predictions_per_second": len(items) / pred_s,
            f"{name}_speedup_vs_sim": speed, f"{name}_speedup_vs_compile_sim": speed_c,
            f"{name}_cold_predict_seconds": cold[name], f"{name}_speedup_vs_sim_cold": speed_cold,
        })  # fmt: skip
        row = (f"{100 * m_c:.2f}%", f"{100 * m_e:.2f}%", f"{rho:.4f}")
        full = f"{full_s / pred_s:,.0f}" if full_s else ""
        table.add_row(name, *row, f"{len(items) / pred_s:,.0f}", f"{speed:,.0f}",
                      f"{speed_cold:,.0f}", f"{speed_c:,.0f}", full)  # fmt: skip
    table.add_row("simulator", "", "", "", f"{len(items) / sim_s:,.0f}", "1", "", "", "")
    table.add_row("compile+sim", "", "", "", f"{len(items) / (sim_s + compile_s):,.1f}",
                  "", "", "", "")  # fmt: skip
    if full_s:
        table.add_row("full sim", "", "", "", f"{len(items) / full_s:,.1f}", "", "", "", "")
    console.print(table)

    fine = models["fine"]
    reps = max(5, args.reps)
    ba = analyze_batch(items)
    X = features_from_batch(ba)
    mids = np.stack([ba.cycles, ba.energy_uj], axis=1)
    X32 = np.ascontiguousarray(X, np.float32)
    out["fine_breakdown_seconds"] = {
        "analysis": _median_time(lambda: analyze_batch(items), reps),
        "features": _median_time(lambda: features_from_batch(ba), reps),
        "trees": _median_time(lambda: fine.predict_matrix(X, mids), reps),
        "xgboost_call": _median_time(lambda: predict_dense(fine.boosters["both"], X32), reps),
    }
    out.update(jit)
    out["fine_model_check"] = check_bundled_model(fine, args.check_model)
    console.print({"fine_breakdown_seconds": out["fine_breakdown_seconds"], **jit,
                   "fine_model_check": out["fine_model_check"]})  # fmt: skip
    out.update({
        "points": len(items),
        "layers": len(layers),
        "presets": args.presets,
        "sparsities": args.sparsities,
        "simulate_seconds": sim_s,
        "compile_seconds": compile_s,
        "simulations_per_second": len(items) / sim_s,
        "compile_simulations_per_second": len(items) / (sim_s + compile_s),
        "full_simulate_seconds": full_s or None,
        "held_out": "unique conv/dense layers of resnet18_imagenet (224x224) and mobilenet_style",
        "fine_model_meta": {k: v for k, v in fine.meta.items() if k != "params"},
        "prediction_timing": (
            f"one predict_batch of all {len(items)} points (layer, config, default schedule, "
            "exact block mask) -> (cycles, energy): mid analysis incl. the compiler's schedule "
            "(numpy and two compiled numba kernels), features, the booster's "
            f"{fine.meta.get('rounds', '?')} two-output trees (compiled copy, bit-identical to "
            "xgboost's prediction) on one thread; median "
            f"of {args.reps * args.sim_passes * len(args.presets)} calls interleaved with the "
            "simulation passes, per-(layer, config) caches warm; cold: caches emptied first; "
            "the compiled code's one-time load (jit_warmup_seconds) paid before any timing"
        ),
        "simulation_timing": (
            "per point TimingModel.run + EnergyModel.estimate on the generated program (the "
            "simulator's timing path, no functional simulation, code generation excluded); "
            f"median of {args.sim_passes} passes per preset, summed; compile_seconds: "
            "conv2d_program of every point; full_simulate_seconds: one pass of the bit-exact "
            "simulator (Simulator.run(timing=True): functional execution on a random input + "
            "timing + energy, same cycles) over the generated programs"
        ),
        "wall_seconds": time.time() - t_start,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()),
        },
    })  # fmt: skip
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    old.pop("cost_model_note", None)  # a note describes one run
    if args.note:
        out["cost_model_note"] = args.note
    old.update(out)
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    console.print(f"wrote {path}")
    return out


def _jit_compile_seconds() -> float | None:
    """Seconds a fresh interpreter takes to import ``tvm_hapm.cost._jit`` with an empty numba
    cache (the kernels compile; numba's own import excluded)."""
    code = (
        "import time, numba; t = time.perf_counter(); import tvm_hapm.cost._jit; "
        "print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NUMBA_CACHE_DIR": tmp}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=False)  # fmt: skip
    try:
        return float(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _median_time(f, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


if __name__ == "__main__":
    main()
