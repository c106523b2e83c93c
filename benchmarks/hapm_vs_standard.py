"""HAPM vs standard (unstructured magnitude) and filter pruning on Fashion-MNIST.

Run: ``python benchmarks/hapm_vs_standard.py [--models resnet20 resnet56] [--epochs 2]``
(about 1 h for ResNet-20 and 2-3 h for ResNet-56 on 2 cores), or ``--dataset digits`` for the
quick variant on the bundled digits ResNet-20 (the project's first benchmark).

For each network (the bundled ``resnet<depth>_fashion.onnx``, trained by
``examples/train_fashion_mnist.py``), weight sparsity and method, the model is pruned
(:func:`tvm_hapm.flow.prune_onnx`) and recovered the same way for every method
(:func:`tvm_hapm.flow.recover`): layer-wise least-squares reconstruction on 256 training images,
then ``--epochs`` of PyTorch fine-tuning with the masks held (SGD with Nesterov momentum, batch
128, learning rate 0.01 decayed to zero by a cosine, random crops and flips), keeping the
better of the two on the 5,000-image validation split.  It is then quantized to int8 (calibrated
on 256 training images, with the activation percentile chosen on validation when the network
was trained) and deployed on hapm_fpga.

Methods: ``standard`` (unstructured magnitude pruning, every layer at the target), ``filter``
(whole channels, at the channel fraction whose weight sparsity is nearest the target, deployed
with the channels removed), ``hapm`` (whole hardware groups, the network-wide sparsity spread by
importance per multiply-accumulate saved: ``ranking="per_mac"``) and ``hapm_layer`` (the same
groups, every layer at the target); ``hapm_val`` and ``hapm_cal`` are ``hapm`` with its per-layer
cap chosen on validation (``hapm_cal``: against what the row's recovered HAPM runs say recovery
achieves, :func:`calibrated_cap`).  The first and the last layer stay dense.

Accuracy is the int8 model's top-1 on all 10,000 test images (the quantized module run by
:class:`tvm_hapm.torch.QuantizedRunner`, bit-exact with TVM's llvm build, which the accelerator
equals bit for bit), with a 95% paired-bootstrap interval of each model's drop against dense;
latency and energy are one image on the simulated accelerator.  Nothing is selected on the test
set.  Results are written after every method to ``benchmarks/results/hapm_vs_standard.json``
(digits: ``hapm_vs_standard_digits.json``; another ``--epochs`` than 2: ``..._<epochs>ep.json``).
``--resume`` skips what a previous invocation of the same run (the same settings but for the
sparsities) finished, and ``--merge`` adds the rows of invocations run in parallel, e.g. one
process per group of methods::

    run="python hapm_vs_standard.py --models resnet20 --sparsities 0.5"
    $run --methods standard hapm_layer hapm_val --out a.json &
    $run --methods filter hapm --out b.json; wait
    $run --methods hapm_cal --merge a.json b.json  # hapm_cal calibrates on their rows
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import (
    RESULTS,
    machine_info,
    pack_correct,
    paired_drop_interval,
    records_of_run,
    unpack_correct,
    write_json,
)
from rich.console import Console
from rich.table import Table

from tvm_hapm.data import (
    fashion_resnet_info,
    load_bundled_resnet20,
    load_digits,
    load_fashion_mnist,
    load_fashion_resnet,
    set_batch,
)
from tvm_hapm.flow import (
    evaluate_deployed,
    filter_deploy_pass,
    filter_fraction,
    float_accuracy,
    prune_iteratively,
    prune_onnx,
    recover,
    simulate,
    sparsity_of,
)
from tvm_hapm.target.config import get_config

#: the fine-tuning budget of the headline results (other budgets write their own file)
EPOCHS = 2.0
# label -> (pruning method, ranking)
METHODS = {
    "standard": ("unstructured", "layer"),
    "filter": ("filter", "layer"),
    "hapm": ("hapm", "per_mac"),
    "hapm_layer": ("hapm", "layer"),
    "hapm_val": ("hapm", "per_mac"),  # with the per-layer cap chosen on validation
    "hapm_cal": ("hapm", "per_mac"),  # cap chosen on validation, calibrated against recovery
}
#: the per-layer caps ``hapm_val`` chooses from (0.875 is ``hapm``'s)
CAPS = (0.5, 0.625, 0.75, 0.875)
#: the per-layer caps ``hapm_cal`` chooses from
CAPS_FINE = (0.5, 0.5625, 0.625, 0.6875, 0.75, 0.8125, 0.875)
#: the HAPM runs whose recovery calibrates ``hapm_cal`` (whichever of them the row has)
CALIBRATING = ("hapm_layer", "hapm", "hapm_val")
#: the HAPM variants (speed-ups and targets are reported for each)
HAPM_LABELS = tuple(label for label, (method, _) in METHODS.items() if method == "hapm")


def check_shrink(model, fraction, cfg, x) -> float:
    """Largest difference between the masked and the channel-removed float model."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    masked = from_onnx(set_batch(model, len(x)))
    outs = []
    for mod in (masked, filter_deploy_pass(fraction, cfg)(masked)):
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    diff = float(np.abs(outs[0] - outs[1]).max())
    if diff > 1e-3:
        raise AssertionError(f"the shrunk filter-pruned model differs from the masked one: {diff}")
    return diff


def load(dataset: str, name: str):
    """``(model, (x_train, y_train), (x_val, y_val) or None, (x_test, y_test), percentile)``."""
    if dataset == "digits":
        if name != "resnet20":
            raise SystemExit("the digits variant has only resnet20")
        x_tr, y_tr, x_te, y_te = load_digits(size=32, channels=3)
        return load_bundled_resnet20(1), (x_tr, y_tr), None, (x_te, y_te), None
    depth = int(name.removeprefix("resnet"))
    d = load_fashion_mnist()
    pct = fashion_resnet_info(depth)["int8_calibration"]["percentile"]
    model = load_fashion_resnet(depth, 1)
    return model, (d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test), pct


def train_config(args, dataset):
    from tvm_hapm.torch import TrainConfig

    # Fashion-MNIST: the augmentation the networks were trained with; digits: no flips
    fashion = dataset == "fashion-mnist"
    return TrainConfig(batch_size=128, lr=args.lr, weight_decay=5e-4,
                       crop_padding=4 if fashion else 2, flip=fashion, seed=args.seed,
                       distill=args.distill)  # fmt: skip


def select_cap(s, base, data, args, cfg, row, log) -> tuple[float, dict]:
    """The per-layer cap of HAPM's ``per_mac`` allocation at sparsity ``s``, chosen on the
    validation split: for each cap of :data:`CAPS`, prune, reconstruct (no fine-tuning) and
    measure the float validation accuracy and the simulated latency; keep the fastest cap whose
    accuracy is within 1 point of standard pruning's reconstructed accuracy at ``s``, or the
    most accurate one if none is."""
    if "val_standard" not in row:
        raise SystemExit("hapm_val compares with standard pruning: run --methods standard hapm_val")
    reference = row["val_standard"]["val_reconstructed"]
    log(f"{s:.0%} hapm_val: standard's reconstructed validation accuracy {reference:.4f}")
    trials = cap_trials(s, CAPS, base, data, args, cfg, lambda m: log(f"{s:.0%} hapm_val: {m}"))
    ok = [c for c, t in trials.items() if t["val_reconstructed"] >= reference - 0.01]
    return fastest_cap(trials, ok), trials


def cap_trials(s, caps, base, data, args, cfg, log) -> dict:
    """For each cap of ``caps`` that can reach sparsity ``s``: HAPM's ``per_mac`` allocation with
    that per-layer cap, pruned and reconstructed (no fine-tuning), its float validation accuracy
    and simulated latency."""
    (x_tr, y_tr), val, _, _ = data
    trials = {}
    for cap in caps:
        try:
            pruned, _ = prune_onnx(base, "hapm", s, config=cfg, ranking="per_mac",
                                   max_layer_sparsity=cap)  # fmt: skip
        except ValueError:  # a cap that cannot reach the sparsity
            continue
        rebuilt, info = recover(pruned, base, (x_tr, y_tr), steps=0, calibration=args.calibration,
                                val_data=val, engine=args.engine, seed=args.seed)  # fmt: skip
        lat = simulate(rebuilt, cfg, x_tr, x_tr)[0]  # any image: latency is data-independent
        trials[cap] = {"val_reconstructed": info["val_reconstructed"], "latency_ms": lat}
        log(f"cap {cap}: validation {info['val_reconstructed']:.4f}, {lat:.3f} ms")
    return trials


def fastest_cap(trials: dict, ok) -> float:
    """The fastest of the caps ``ok`` (the larger on a tie), or the most accurate of ``trials``
    when none is."""
    if ok:
        return min(ok, key=lambda c: (trials[c]["latency_ms"], -c))
    return max(trials, key=lambda c: (trials[c]["val_reconstructed"], c))


def recovered_val(row: dict, label: str) -> float:
    """The float validation accuracy of the weights ``recover`` kept for ``label``."""
    val = row[f"val_{label}"]
    return val["val_finetuned"] if row[f"kept_{label}"] == "finetuned" else val["val_reconstructed"]


def calibrated_cap(s, base, data, args, cfg, row, log) -> tuple[float, dict]:
    """The per-layer cap of HAPM's ``per_mac`` allocation at sparsity ``s``, chosen on the
    validation split against what recovery achieves (``hapm_val``'s rule compares accuracies
    before fine-tuning, which on Fashion-MNIST are several points more pessimistic).

    The reference is the better of the dense model's and standard pruning's recovered float
    validation accuracy.  The HAPM runs of the row already recovered (:data:`CALIBRATING`) give
    pairs (drop after reconstruction, drop after recovery);
    :func:`tvm_hapm.hwflow.budget_from_points` turns them into the reconstruction drop at which
    the recovered drop reaches 1 point.  Every cap of :data:`CAPS_FINE` is then pruned,
    reconstructed (no fine-tuning) and simulated; the fastest whose reconstruction drop is
    within that budget is kept, or the most accurate if none is.  The test set plays no part."""
    from tvm_hapm.hwflow import budget_from_points

    val = data[1]
    if args.stages > 1:
        # its calibration pairs one round's reconstruction drop with recovery; iterative
        # pruning's last round reconstructs an already adapted model, so they do not pair
        raise SystemExit("hapm_cal is calibrated on one-shot recovery: run it with --stages 1")
    if val is None:
        raise SystemExit("hapm_cal needs the validation split of a real dataset (Fashion-MNIST)")
    done = [label for label in CALIBRATING if f"val_{label}" in row]
    if "val_standard" not in row or not done:
        raise SystemExit("hapm_cal is calibrated on recovered runs: run --methods standard "
                         "hapm_layer (or hapm) first")  # fmt: skip
    dense_val = float_accuracy(base, *val, args.engine)
    reference = max(dense_val, recovered_val(row, "standard"))
    points = {
        label: {"reconstructed_drop": 100 * (reference - row[f"val_{label}"]["val_reconstructed"]),
                "recovered_drop": 100 * (reference - recovered_val(row, label))}
        for label in done
    }  # fmt: skip
    budget = budget_from_points([p["reconstructed_drop"] for p in points.values()],
                                [p["recovered_drop"] for p in points.values()], 1.0)  # fmt: skip
    log(f"{s:.0%} hapm_cal: reference {reference:.4f} (dense {dense_val:.4f}), budget "
        f"{budget:.2f} pt before fine-tuning from {points}")  # fmt: skip
    trials = cap_trials(s, CAPS_FINE, base, data, args, cfg,
                        lambda m: log(f"{s:.0%} hapm_cal: {m}"))  # fmt: skip
    for t in trials.values():
        t["drop"] = 100 * (reference - t["val_reconstructed"])
    cap = fastest_cap(trials, [c for c, t in trials.items() if t["drop"] <= budget + 1e-9])
    record = {"reference_val": reference, "dense_val": dense_val, "points": points,
              "budget": budget, "trials": trials}  # fmt: skip
    return cap, record


def recovered_twin(label: str, s: float, base, cfg, row: dict) -> str | None:
    """The HAPM variant of ``row`` already recovered whose one-shot pruning at ``s`` gives
    exactly ``label``'s pruned model (e.g. ``hapm_val`` choosing the cap that makes ``per_mac``
    the per-layer allocation), or None.  Caps are the row's ``<label>_cap``."""

    def pruned(variant):
        model, _ = prune_onnx(base, "hapm", s, config=cfg, ranking=METHODS[variant][1],
                              max_layer_sparsity=row.get(f"{variant}_cap"))  # fmt: skip
        return [t.SerializeToString() for t in model.graph.initializer]

    done = [v for v in HAPM_LABELS if v != label and f"acc_{v}" in row]
    if not done:
        return None
    mine = pruned(label)
    return next((v for v in done if pruned(v) == mine), None)


def run_sparsity(s, base, data, args, cfg, dense, log, row=None, checkpoint=None) -> dict:
    """The row of sparsity ``s``: every method of ``args.methods`` the row does not have yet.

    ``checkpoint(row)``, when given, is called after each method (a ResNet-56 method is ~25 min
    on one core, so ``--resume`` keeps every finished one).
    """
    (x_tr, y_tr), val, (x_te, y_te), pct = data
    x_cal = x_tr[: args.calibration]
    steps = int(round(args.epochs * (len(x_tr) // 128)))
    row = dict(row or {})
    row.update({f"{k}_dense": v for k, v in dense.items() if k != "correct"})
    row["correct_dense"] = pack_correct(dense["correct"])
    for label in args.methods:
        if f"acc_{label}" in row:
            continue
        method, ranking = METHODS[label]
        t0 = time.perf_counter()
        ratio, transform, cap = s, None, None
        if method == "filter":
            ratio, _ = filter_fraction(base, s, cfg)
            transform = filter_deploy_pass(ratio, cfg)
            row["filter_channel_fraction"] = ratio
        if label == "hapm_val":
            cap, row["hapm_val_trials"] = select_cap(s, base, data, args, cfg, row, log)
            row["hapm_val_cap"] = cap
        if label == "hapm_cal":
            cap, row["hapm_cal_choice"] = calibrated_cap(s, base, data, args, cfg, row, log)
            row["hapm_cal_cap"] = cap
        twin = args.stages == 1 and method == "hapm" and recovered_twin(label, s, base, cfg, row)
        if twin:
            # the same pruned model, recovered the same way (deterministic): its figures
            row.update({k.replace(f"_{twin}", f"_{label}"): v for k, v in row.items()
                        if k.endswith(f"_{twin}") and k != f"seconds_{twin}"})  # fmt: skip
            row[f"{label}_model_of"] = twin
            log(f"{s:.0%} {label}: the same pruned model as {twin}: its model and figures")
            if checkpoint is not None:
                checkpoint(row)
            continue
        # one round (prune, then recover) or several (iterative pruning), the budget shared
        tuned, rounds = prune_iteratively(
            base, method, ratio, (x_tr, y_tr), stages=args.stages, steps=steps // args.stages,
            config=cfg, schedule=args.schedule, seed=args.seed, ranking=ranking,
            engine=args.engine, val_data=val, train_config=train_config(args, args.dataset),
            max_layer_sparsity=cap, calibration=args.calibration, teacher="previous",
        )  # fmt: skip
        info = rounds[-1]
        if args.stages > 1:
            row[f"rounds_{label}"] = [
                {k: r.get(k) for k in ("target", "sparsity", "val_pruned", "val_reconstructed",
                                       "val_finetuned", "kept", "finetune_steps")}
                for r in rounds
            ]  # fmt: skip
        if method == "filter":
            row["filter_shrink_max_diff"] = check_shrink(tuned, ratio, cfg, x_te[:8])
        r = evaluate_deployed(
            set_batch(tuned, 1), args.target, x_cal, x_te, y_te, transform=transform, config=cfg,
            percentile=pct, engine=args.engine,
        )  # fmt: skip
        row.update({
            f"acc_{label}": r.accuracy,
            f"acc_float_{label}": 100 * float_accuracy(tuned, x_te, y_te, args.engine),
            f"lat_{label}": r.latency_ms,
            f"energy_{label}": r.energy_uj,
            f"gemm_{label}": r.gemms,
            f"sparsity_{label}": sparsity_of(tuned),
            f"ci_drop_{label}": paired_drop_interval(dense["correct"], r.correct, args.seed),
            f"correct_{label}": pack_correct(r.correct),
            f"reconstruction_error_{label}": float(
                np.mean([e["rel_error_after"] for e in info["reconstruction"]] or [0.0])
            ),
            f"finetune_images_per_s_{label}": info.get("finetune_images_per_s"),
            f"val_{label}": {k: info.get(k) for k in
                             ("val_pruned", "val_reconstructed", "val_finetuned")},
            f"kept_{label}": info["kept"],
            f"seconds_{label}": time.perf_counter() - t0,
        })  # fmt: skip
        ci = row[f"ci_drop_{label}"]
        log(
            f"{s:.0%} {label}: int8 {r.accuracy:.2f}% (drop in [{ci[0]:.2f}, {ci[1]:.2f}]) "
            f"{r.latency_ms:.3f} ms, kept {info['kept']}, {time.perf_counter() - t0:.0f} s"
        )
        if checkpoint is not None:
            checkpoint(row)
    add_speedups(row)
    add_gap_intervals(row, len(y_te), args.seed)
    return row


def add_gap_intervals(row: dict, images: int | None, seed: int = 0) -> None:
    """``ci_gap_<method>`` of a row: the 95% paired-bootstrap interval of standard pruning's
    accuracy minus the method's over the ``images`` test images, where the row has both
    per-image results (rows written before they were kept have none)."""
    if not images or "correct_standard" not in row:
        return
    ref = unpack_correct(row["correct_standard"], images)
    for label in ("filter", *HAPM_LABELS):
        if f"correct_{label}" in row:
            new = unpack_correct(row[f"correct_{label}"], images)
            row[f"ci_gap_{label}"] = paired_drop_interval(ref, new, seed)


def add_speedups(row: dict) -> None:
    """``<hapm variant>_vs_<standard|filter|dense>_speedup`` of a row, from its latencies."""
    for label in HAPM_LABELS:
        if f"lat_{label}" not in row:
            continue
        for other in ("standard", "filter", "dense"):
            if f"lat_{other}" in row:
                row[f"{label}_vs_{other}_speedup"] = row[f"lat_{other}"] / row[f"lat_{label}"]


def targets(model_rows: dict) -> dict:
    """The issue's targets, checked on one network's rows for each HAPM variant run."""
    out = {}
    for s, row in model_rows.items():
        for label in HAPM_LABELS:
            if f"acc_{label}" not in row or "acc_standard" not in row:
                continue
            got = {
                "vs_standard_speedup>=1.45": row[f"{label}_vs_standard_speedup"] >= 1.45,
                "within_1pt_of_standard": row["acc_standard"] - row[f"acc_{label}"] <= 1.0,
            }
            if s == "0.5":
                got["vs_dense_speedup>=1.8"] = row[f"{label}_vs_dense_speedup"] >= 1.8
                got["drop<=1pt"] = row["acc_dense"] - row[f"acc_{label}"] <= 1.0
            out.setdefault(s, {})[label] = got
    return out


def table(name, rows, cfg) -> Table:
    t = Table(title=f"{name} on {cfg.name}: int8 top-1 after recovery")
    for col in ("sparsity", "method", "top-1 %", "drop (95% CI)", "latency ms", "energy µJ",
                "GEMMs", "vs dense"):  # fmt: skip
        t.add_column(col, justify="right")
    for s, row in rows.items():
        for label in ("dense", *METHODS):
            if f"acc_{label}" not in row:
                continue
            ci = row.get(f"ci_drop_{label}")
            t.add_row(
                s, label, f"{row[f'acc_{label}']:.2f}",
                f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "",
                f"{row[f'lat_{label}']:.3f}", f"{row[f'energy_{label}']:.1f}",
                f"{row[f'gemm_{label}']:,}", f"{row['lat_dense'] / row[f'lat_{label}']:.2f}x",
            )  # fmt: skip
    return t


def default_out(dataset: str, epochs: float, stages: int = 1, distill: float = 0.0) -> Path:
    """``results/hapm_vs_standard[_digits][_<epochs>ep][_<stages>stages][_kd<distill>].json``:
    the headline file is the one-shot Fashion-MNIST run at :data:`EPOCHS` without distillation;
    a run with another budget, iterative pruning or distillation does not overwrite it."""
    name = "hapm_vs_standard" + "_digits" * (dataset == "digits")
    name += f"_{epochs:g}ep" * (epochs != EPOCHS) + f"_{stages}stages" * (stages > 1)
    return RESULTS / f"{name}{f'_kd{distill:g}' * (distill > 0)}.json"


#: options that say where and which part of a run an invocation does, not what the run is
NOT_SETTINGS = ("out", "resume", "merge", "models", "methods")
#: settings added after results were written, and the value a file without them ran with
LATER_SETTINGS = {"stages": 1, "schedule": "cubic", "distill": 0.0}


def same_run(previous: dict, settings: dict) -> bool:
    """Whether rows written with ``previous`` settings belong to a run with ``settings`` (a run's
    sparsities are its rows: invocations may do different ones)."""

    def fixed(s):
        return {**LATER_SETTINGS, **{k: v for k, v in s.items() if k != "sparsities"}}

    return fixed(previous) == fixed(settings)


def work_of(meta: dict) -> dict:
    """The part of a run a results file's invocation did: its models, methods and sparsities."""
    return {"models": meta.get("models"), "methods": meta.get("methods"),
            "sparsities": meta.get("settings", {}).get("sparsities")}  # fmt: skip


def resumed(paths, settings: dict, out: Path) -> tuple[dict, list]:
    """The per-model records kept from ``paths`` (the output being resumed, then files of the
    same run written in parallel) and the invocations that wrote them
    (:func:`common.records_of_run`), with ``settings["sparsities"]`` widened to the rows kept.

    Rows of the same network and sparsity are merged method by method; where two files ran the
    same method (a deterministic run gives the same figures) the first file's is kept.  A file
    of another run is refused, except ``out`` itself, which is then started afresh.  Speed-ups
    and targets are recomputed over the merged rows."""
    records, earlier = records_of_run(paths, lambda s: same_run(s, settings), out, work_of)
    old = {}
    for prev in records:
        for key, value in prev.items():
            if key.startswith("resnet"):
                rows = old.setdefault(key, {})
                for s, row in value.items():
                    rows[s] = {**row, **rows.get(s, {})}
            elif key.startswith("meta_") or key == "test_images":
                old.setdefault(key, value)
        done = set(prev["meta"]["settings"].get("sparsities", [])) | set(settings["sparsities"])
        settings["sparsities"] = sorted(done)
    for key in [k for k in old if k.startswith("resnet")]:
        for row in old[key].values():
            add_speedups(row)
            add_gap_intervals(row, old.get("test_images"), settings.get("seed", 0))
        old[f"targets_{key}"] = targets(old[key])
    return old, earlier


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--epochs", type=float, default=EPOCHS, help="fine-tuning budget per model")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--stages", type=int, default=1,
                    help="iterative pruning: rounds of prune + recover raising the sparsity to "
                    "the target (flow.prune_iteratively), sharing the --epochs budget")  # fmt: skip
    ap.add_argument("--schedule", choices=("cubic", "linear"), default="cubic",
                    help="the rounds' sparsities (with --stages > 1)")  # fmt: skip
    ap.add_argument("--distill", type=float, default=0.0,
                    help="fine-tune with this weight of distillation from the model recovery "
                    "reconstructs towards (the dense one; temperature 4)")  # fmt: skip
    ap.add_argument("--target", default="hapm_fpga-zedboard")
    ap.add_argument("--calibration", type=int, default=256,
                    help="training images to reconstruct and to calibrate int8 on")  # fmt: skip
    ap.add_argument("--engine", default="auto", choices=("auto", "torch", "tvm"))
    ap.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
        help="methods to run (with --resume: added to the rows already there)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="default: results/hapm_vs_standard"
                    "[_digits][_<epochs>ep].json")  # fmt: skip
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of --out written by the same run")  # fmt: skip
    ap.add_argument(
        "--merge",
        nargs="*",
        type=Path,
        default=[],
        help="also keep the rows of these files, written by invocations of the same run in "
        "parallel (e.g. --methods or --sparsities split over cores)",
    )
    args = ap.parse_args(argv)
    if args.stages < 1:
        ap.error(f"--stages must be >= 1, got {args.stages}")
    try:  # TrainConfig checks --distill (and --lr) before any work is done
        train_config(args, args.dataset)
    except ValueError as err:
        ap.error(str(err))
    args.out = args.out or default_out(args.dataset, args.epochs, args.stages, args.distill)
    args.methods = [m for m in METHODS if m in args.methods]  # standard before hapm_val
    console = Console()
    cfg = get_config(args.target)
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    settings["sparsities"] = [float(s) for s in args.sparsities]
    meta = {"settings": settings, "machine": machine_info(), "models": args.models,
            "methods": args.methods}  # fmt: skip
    payload = {"dataset": args.dataset, "meta": meta}
    old, meta["earlier"] = resumed([args.out] * args.resume + args.merge, settings, args.out)
    payload.update(old)
    t_all = time.perf_counter()
    for name in args.models:
        base, train, val, test, pct = load(args.dataset, name)
        payload["test_images"] = len(test[1])
        rows = payload.setdefault(name, {})
        t0 = time.perf_counter()
        x_cal = train[0][: args.calibration]
        d = evaluate_deployed(base, args.target, x_cal, test[0], test[1], config=cfg,
                              percentile=pct, engine=args.engine)  # fmt: skip
        dense = {"acc": d.accuracy, "lat": d.latency_ms, "energy": d.energy_uj,
                 "gemm": d.gemms, "correct": d.correct}  # fmt: skip
        console.print(f"\\[{name}] dense: int8 {d.accuracy:.2f}%  {d.latency_ms:.3f} ms  "
                      f"{d.energy_uj:.1f} µJ  ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        for s in args.sparsities:

            def save(row, key=f"{s:g}", rows=rows):
                rows[key] = row
                write_json(args.out, payload)

            rows[f"{s:g}"] = run_sparsity(
                s, base, (train, val, test, pct), args, cfg, dense,
                lambda msg, n=name: console.print(f"\\[{n}] {msg}"), rows.get(f"{s:g}"),
                checkpoint=save,
            )  # fmt: skip
            payload[f"targets_{name}"] = targets(rows)
            write_json(args.out, payload)
        console.print(table(name, rows, cfg))
        payload[f"meta_{name}"] = {"int8_calibration_percentile": pct,
                                   "seconds": time.perf_counter() - t0}  # fmt: skip
        write_json(args.out, payload)
    meta["seconds"] = time.perf_counter() - t_all
    iterative = (
        f"; iterative (flow.prune_iteratively): {args.stages} rounds of prune + recover on a "
        f"{args.schedule} schedule, {args.epochs / args.stages:g} epochs each, every round "
        "reconstructing towards the model it prunes (rounds_<method>)"
    ) * (args.stages > 1)
    meta["description"] = {
        "accuracy": f"int8 top-1 (%) on all {payload['test_images']} test images",
        "ci_drop": "95% paired-bootstrap interval (BCa, 10,000 resamples) of dense minus the "
        "method, in points, over the test images; ci_gap: the same of standard minus the method",
        "correct": "per-image int8 correctness (correct_<method>: base64 of the packed bits, "
        "common.unpack_correct)",
        "latency_energy": "one image on the simulated accelerator (ms, µJ)",
        "recovery": "tvm_hapm.flow.recover: reconstruction on 256 training images, then "
        f"{args.epochs:g} epochs of PyTorch fine-tuning; the better on validation is kept"
        + iterative
        + f"; fine-tuning distills from the model reconstruction targets (weight {args.distill:g}, "
        "temperature 4)" * (args.distill > 0),
        "filter": "sparsity = the weight sparsity nearest the target reachable by removing "
        "channels (sparsity_filter)",
        "rankings": {label: ranking for label, (_, ranking) in METHODS.items()},
        "hapm_val": "per_mac with the per-layer cap chosen on validation among "
        f"{list(CAPS)}: the fastest whose reconstructed float validation accuracy is within 1 "
        "point of standard pruning's (hapm_val_trials); hapm is per_mac with cap 0.875",
        "hapm_cal": "per_mac with the per-layer cap chosen on validation among "
        f"{list(CAPS_FINE)}: the fastest whose reconstruction drop is within the budget at which "
        "the row's recovered HAPM runs reach 1 point of recovered drop against the better of "
        "dense and standard (hapm_cal_choice)",
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
