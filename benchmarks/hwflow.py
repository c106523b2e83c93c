"""HW-Flow search (tvm_hapm.hwflow) on ResNet-20 (and ResNet-56) / digits-32.

Run: ``python benchmarks/hwflow.py [--models resnet20 resnet56] [--episodes 24] [--val-size 150]``.

For each model: dense reference (int8 test top-1 through TVM's llvm build of the quantized
module; latency and energy of one image on the simulated accelerator), then the RL agent guided
by each cost level (coarse, mid, fine), the greedy latency-saliency baseline guided by fine and
two no-search baselines: ``uniform`` (the largest feasible single ratio for every layer, by
bisection) and ``per_mac`` (HAPM's allocation of the largest feasible network-wide sparsity by
importance per MAC saved, by bisection).  The RL agent and greedy start from the better of the
two.  All runs have the same evaluation budget (``--episodes``) and the same accuracy estimate
(float
top-1 on a fixed validation split of the training images after least-squares reconstruction of
the pruned layers, ``--no-reconstruct`` for BN recalibration only; no short fine-tune unless
``--finetune-steps``).  Every winner is then (optionally fine-tuned with
``--final-steps``) quantized, its int8 test accuracy measured and simulated.  The headline row is
the winner (any method/level) with the lowest simulated objective whose int8 test drop is
within the budget.  The int8 models (dense and pruned) are calibrated on the 99.9th percentile of
each activation (``--calibration-percentile``; 0 for the maximum).  Writes
``benchmarks/results/hwflow.json`` and ``hwflow_<model>.png``.

ResNet-56 has no bundled weights: ``--models resnet56`` trains it first with the NumPy trainer
of ``examples/train_resnet20_digits.py`` (DEPTH=56, ``--r56-epochs``, cached in /tmp/hwflow_cache),
*without* the search's validation split (``hwflow.validation_split``), so that for ResNet-56 the
search judges accuracy on images the model has not seen.  The bundled ResNet-20 was trained on
all training images: its validation split is optimistic.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx

from tvm_hapm import hwflow
from tvm_hapm.data import load_bundled_resnet20, load_digits
from tvm_hapm.passes.quantize import DEFAULT_PERCENTILE
from tvm_hapm.target.config import get_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path("/tmp/hwflow_cache")


def train_resnet56(
    epochs: int = 4, seed: int = 0, cache: Path = CACHE, holdout=None
) -> onnx.ModelProto:
    """Train ResNet-56 (zoo.resnet_cifar(depth=56, in_ch=3, width=16)) on digits-32 with the
    NumPy trainer of examples/train_resnet20_digits.py (its DEPTH set to 56); cached.
    ``holdout``: training images left out (the search's validation split)."""
    tag = f"_h{len(holdout)}" if holdout is not None else ""
    path = Path(cache) / f"resnet56_digits_e{epochs}_s{seed}{tag}.onnx"
    if path.exists():
        return onnx.load(str(path))
    spec = importlib.util.spec_from_file_location(
        "_train_resnet", ROOT / "examples" / "train_resnet20_digits.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DEPTH = 56
    net, acc, seconds, _, history = mod.train(epochs, seed, exclude=holdout)
    model = mod.export_onnx(net, batch=1)
    model.graph.name = "resnet56_digits"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    meta = {"test_accuracy": acc, "seconds": seconds, "history": history, "epochs": epochs}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return model


def run_model(name, model, args, cfg, data, log=print) -> dict:
    x_tr, y_tr, x_te, y_te = data
    acc_cache: dict = {}
    pct = args.calibration_percentile
    dense_int8 = hwflow.int8_accuracy(model, cfg, x_tr, x_te, y_te, percentile=pct)
    d_lat, d_en, _, _ = hwflow.simulate(model, cfg, x_tr, x_te)
    log(f"[{name}] dense: int8 test {100 * dense_int8:.2f}%  {d_lat:.3f} ms  {d_en:.1f} uJ")
    runs = [("rl", lv) for lv in args.levels]
    runs += [(m, args.baseline_level) for m in ("greedy", "uniform", "per_mac")]
    out = {"dense": {"int8_test_accuracy": dense_int8, "sim_latency_ms": d_lat,
                     "sim_energy_uj": d_en}, "runs": {}}  # fmt: skip
    results = []
    for method, level in runs:
        t0 = time.perf_counter()
        try:
            env = hwflow.HWFlowEnv(
                model, (x_tr, y_tr), cfg, args.objective, args.max_drop, level,
                val_size=args.val_size, finetune_steps=args.finetune_steps, seed=args.seed,
                reconstruct=args.reconstruct, recal_size=args.recal_size,
                calibration_percentile=pct,
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001  (e.g. the bundled fine model is stale)
            out["runs"][f"{method}_{level}"] = {"error": f"{type(err).__name__}: {err}"}
            log(f"[{name}] {method}/{level}: {type(err).__name__}: {err}")
            continue
        env._acc_cache = acc_cache  # noqa: SLF001  (same val split and masks: share accuracies)
        res = hwflow.optimize(model, (x_tr, y_tr), cfg, method=method, episodes=args.episodes,
                              seed=args.seed, env=env)  # fmt: skip
        res.search_seconds = time.perf_counter() - t0
        hwflow.finalize(res, env, (x_te, y_te), args.final_steps, True, args.seed)
        f = res.final
        row = res.to_dict()
        row.update(
            {
                "latency_reduction": d_lat / f["sim_latency_ms"],
                "energy_reduction": d_en / f["sim_energy_uj"],
                "accuracy_drop": 100 * (dense_int8 - f["test_int8_accuracy"]),
                "table_seconds": env.table_seconds,
            }
        )
        out["runs"][f"{method}_{level}"] = row
        results.append(res)
        log(
            f"[{name}] {method}/{level}: sim {f['sim_latency_ms']:.3f} ms "
            f"({row['latency_reduction']:.2f}x)  {f['sim_energy_uj']:.1f} uJ "
            f"({row['energy_reduction']:.2f}x)  int8 test drop {row['accuracy_drop']:.2f} pt  "
            f"val drop {res.val_drop:.2f} pt  search {res.search_seconds:.0f} s"
        )
    hwflow.pareto_plot(results, RESULTS / f"hwflow_{name}.png")
    ok = [
        r
        for r in out["runs"].values()
        if "error" not in r and r["accuracy_drop"] <= args.max_drop + 1e-9
    ]
    key = "latency_reduction" if args.objective == "latency" else "energy_reduction"
    best = max(ok, key=lambda r: r[key]) if ok else None
    keys = ("latency_reduction", "energy_reduction", "accuracy_drop", "search_seconds")
    keys += ("val_drop", "ratios")
    out["by_level"] = {}
    for lv in args.levels:
        run = out["runs"][f"rl_{lv}"]
        if "error" in run:
            out["by_level"][lv] = run
            continue
        out["by_level"][lv] = {k: run[k] for k in keys} | {
            "sim_latency_ms": run["final"]["sim_latency_ms"],
            "sim_energy_uj": run["final"]["sim_energy_uj"],
        }
    if best is not None:
        out["winner"] = f"{best['method']}_{best['level']}"
        for k in ("latency_reduction", "energy_reduction", "accuracy_drop"):
            out[k] = best[k]
    else:
        out["winner"] = None
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20"])
    ap.add_argument("--levels", nargs="+", default=["coarse", "mid", "fine"])
    ap.add_argument("--baseline-level", default="fine")
    ap.add_argument("--objective", default="latency", choices=hwflow.OBJECTIVES)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--episodes", type=int, default=24)
    ap.add_argument("--val-size", type=int, default=150)
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--final-steps", type=int, default=0)
    ap.add_argument("--no-reconstruct", dest="reconstruct", action="store_false")
    ap.add_argument("--recal-size", type=int, default=128, help="images to reconstruct on")
    ap.add_argument("--r56-epochs", type=int, default=5)
    ap.add_argument("--target", default="hapm_fpga")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--calibration-percentile", type=float, default=DEFAULT_PERCENTILE,
        help="activation calibration of the int8 models (0: the maximum)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS / "hwflow.json")
    args = ap.parse_args(argv)
    args.calibration_percentile = args.calibration_percentile or None
    cfg = get_config(args.target)
    data = load_digits(size=32, channels=3)
    payload = {}
    t0 = time.perf_counter()
    for name in args.models:
        model = (
            load_bundled_resnet20(1)
            if name == "resnet20"
            else train_resnet56(
                args.r56_epochs,
                args.seed,
                holdout=hwflow.validation_split(len(data[0]), args.val_size, args.seed)[0],
            )  # fmt: skip
        )
        payload[name] = run_model(name, model, args, cfg, data)
    if "resnet56" not in payload:
        payload["resnet56"] = {"status": "not run: no trained ResNet-56 within this run's time "
                               "budget; run with --models resnet20 resnet56"}  # fmt: skip
    payload["meta"] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.name,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": time.perf_counter() - t0,
        "accuracy": "int8 top-1 on the 450 digits test images; the search used float top-1 on "
        "a seeded validation split of the training images (after reconstruction, or BN "
        "recalibration with --no-reconstruct)",
        "latency_energy": "one image on the simulated accelerator (timing + energy model)",
        "reductions": "dense / pruned; headline = best run whose int8 test drop <= max_drop",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))
    return payload


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
