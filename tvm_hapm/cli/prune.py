"""``hapm prune`` and ``hapm optimize``: pruning an ONNX model at a given sparsity (optionally
recovering it on training data), and the HW-Flow search of per-layer pruning ratios."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .. import atomic
from .errors import CliError, one_line
from .io import (
    MODEL_LIB,
    add_target_args,
    compile_model,
    existing_file,
    fix_batch,
    import_onnx,
    json_default,
    load_onnx,
    non_negative_int,
    output_dir,
    positive_int,
    quantize_module,
    resolve_target,
    write_artifacts,
)
from .ui import progress_display, stage


# ---------------------------------------------------------------------------------- prune
def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hapm prune``."""
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--method", default="hapm", help="hapm | unstructured | filter")
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument(
        "--ranking",
        default=None,
        help="where the sparsity goes: layer (every layer at --sparsity) | global | per_mac "
        "(HAPM: by importance per MAC saved; the default for hapm, layer for the others)",
    )
    p.add_argument(
        "--max-layer-sparsity", type=float, default=None, metavar="CAP",
        help="hapm with the global or per_mac ranking: no layer pruned beyond CAP "
        "(per_mac default 0.875)",
    )  # fmt: skip
    add_target_args(p)
    p.add_argument(
        "--data", default=None, metavar="DATA.npz", help="x_train/y_train to fine-tune on"
    )
    p.add_argument("--finetune-steps", type=non_negative_int, default=20)
    p.add_argument(
        "--engine", choices=("auto", "torch", "tvm"), default="auto",
        help="fine-tuning engine: PyTorch (batch 128) when installed, else TVM (batch 32)",
    )  # fmt: skip
    p.add_argument(
        "--no-reconstruct",
        dest="reconstruct",
        action="store_false",
        help="skip the least-squares reconstruction that precedes fine-tuning when --data is given",
    )
    p.add_argument(
        "--stages",
        type=positive_int,
        default=1,
        help="iterative pruning: rounds of prune + recover (cubic schedule) up to --sparsity",
    )
    p.add_argument(
        "--teacher", choices=("dense", "previous"), default="dense",
        help="with --stages > 1: reconstruct every round towards the dense model, or towards the "
        "model the round prunes (better when the rounds fine-tune for long)",
    )  # fmt: skip
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("-o", "--output", required=True, metavar="OUT")


def cmd_prune(args, console: Console) -> int:
    """``hapm prune``: prune an ONNX model (optionally fine-tune it), write ONNX and a report."""
    from ..compress.flow import PRUNE_METHODS, RANKINGS, prune_onnx, sparsity_of

    if args.method not in PRUNE_METHODS:
        raise CliError(f"--method {args.method}: choose from {', '.join(PRUNE_METHODS)}")
    ranking = args.ranking or ("per_mac" if args.method == "hapm" else "layer")
    if ranking not in RANKINGS:
        raise CliError(f"--ranking {ranking}: choose from {', '.join(RANKINGS)}")
    if not 0.0 <= args.sparsity < 1.0:
        raise CliError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    _, cfg = resolve_target(args.target, args.config)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with progress_display(console) as progress:
        with stage(progress, "load ONNX"):
            model = load_onnx(args.model)
        if args.stages > 1 and not args.data:
            raise CliError("--stages > 1 (iterative pruning) needs --data to recover on")
        rounds = None
        if args.data:  # prune and recover (flow.recover), in one round or several
            from ..compress.flow import prune_iteratively

            data = _load_training_data(args.data)
            how = "reconstruct + " if args.reconstruct else ""
            desc = (
                f"prune ({args.method}, {ranking}, {args.sparsity:.0%}), {how}fine-tune "
                f"{args.finetune_steps} steps"
            )
            if args.stages > 1:
                desc = f"{args.stages} rounds of: {desc}"
            with stage(progress, desc):
                try:
                    pruned, rounds = prune_iteratively(
                        model, args.method, args.sparsity, data, stages=args.stages,
                        steps=args.finetune_steps, config=cfg, seed=args.seed,
                        reconstruct=args.reconstruct, ranking=ranking, engine=args.engine,
                        max_layer_sparsity=args.max_layer_sparsity, teacher=args.teacher,
                    )  # fmt: skip
                except ValueError as err:
                    raise CliError(str(err)) from None
            report = rounds[-1].pop("report")  # the last round's pass: the final mask
            for r in rounds[:-1]:
                r.pop("report")
        else:
            with stage(progress, f"prune ({args.method}, {ranking}, {args.sparsity:.0%})"):
                try:
                    pruned, report = prune_onnx(
                        model, args.method, args.sparsity, config=cfg, ranking=ranking,
                        max_layer_sparsity=args.max_layer_sparsity,
                    )  # fmt: skip
                except ValueError as err:
                    raise CliError(str(err)) from None
    path = out / "pruned.onnx"
    atomic.write_bytes(path, pruned.SerializeToString())
    summary = {
        "model": str(args.model),
        "method": args.method,
        "ranking": ranking,
        "target_sparsity": args.sparsity,
        "achieved_sparsity": sparsity_of(pruned),
        "config": cfg.name,
        "stages": args.stages,
        "teacher": args.teacher if args.stages > 1 else None,
        "layers": report,
        # per round: sparsity, validation accuracies (pruned / reconstructed / fine-tuned), the
        # stage kept, timings and the per-layer reconstruction record (flow.recover)
        "rounds": rounds,
    }
    atomic.write_text(
        out / "prune_report.json",
        json.dumps(summary, indent=2, sort_keys=True, default=json_default),
    )
    table = Table(title=f"{args.method} pruning of {Path(args.model).name}")
    table.add_column("layer")
    table.add_column("sparsity", justify="right")
    for entry in report:
        if "layer" in entry:
            table.add_row(str(entry["layer"]), f"{entry.get('sparsity', 0):.1%}")
    console.print(table)
    for r in rounds or []:
        speed = r.get("finetune_images_per_s")
        tuned = f", fine-tuned at {speed:,.0f} images/s" if speed else ""
        console.print(
            f"round {r['round']}: recovered with {r['engine']}{tuned}; kept the {r['kept']} "
            f"weights (validation: " + ", ".join(
                f"{k[4:]} {v:.2%}" for k, v in r.items()
                if k.startswith("val_") and isinstance(v, float)
            ) + ")"
        )  # fmt: skip
    console.print(
        f"sparsity {summary['achieved_sparsity']:.1%}; wrote {path} and {out / 'prune_report.json'}"
    )
    return 0


def _load_training_data(path, with_test: bool = False) -> tuple:
    """``x_train`` and ``y_train`` (and ``x_test``, ``y_test``) from an .npz file; a file that is
    not such an archive, NaN images or labels that are not class indices raise :class:`CliError`."""
    path = existing_file(path, "training data")
    keys = ("x_train", "y_train") + (("x_test", "y_test") if with_test else ())
    want = f"expected an .npz archive with {', '.join(keys)} (numpy.savez)"
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise CliError(f"{path}: {want} ({one_line(err)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CliError(f"{path}: {want}, not a single array")
    with data:
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise CliError(f"{path}: {want}; missing {', '.join(missing)}")
        arrays = {k: data[k] for k in keys}
    for split in ("train", "test") if with_test else ("train",):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype.kind not in "biuf" or x.ndim < 2 or not np.isfinite(x).all():
            raise CliError(f"{path}: x_{split} must be a finite numeric array of images")
        if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu" or (y < 0).any():
            raise CliError(
                f"{path}: y_{split} must be {len(x)} non-negative integer class indices, one per "
                f"image of x_{split}"
            )
    return tuple(np.asarray(arrays[k], np.float32 if k.startswith("x") else np.int64) for k in keys)


# ---------------------------------------------------------------------------------- optimize
def add_optimize_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hapm optimize``."""
    from ..hwflow import METHODS as HWFLOW_METHODS

    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument(
        "--data", required=True, metavar="DATA.npz", help="x_train, y_train, x_test, y_test"
    )
    add_target_args(p)
    p.add_argument("--objective", choices=("latency", "energy"), default="latency")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, help="percentage points")
    p.add_argument("--level", choices=("coarse", "mid", "fine", "sim"), default="fine")
    p.add_argument("--method", choices=HWFLOW_METHODS, default="rl")
    p.add_argument("--episodes", type=positive_int, default=60)
    p.add_argument("--search-finetune-steps", type=non_negative_int, default=0)
    p.add_argument(
        "--finetune-steps", type=non_negative_int, default=0, help="fine-tuning of the winner"
    )
    p.add_argument(
        "--no-reconstruct",
        dest="reconstruct",
        action="store_false",
        help="judge candidates after BN recalibration only, without least-squares reconstruction",
    )
    p.add_argument(
        "--calibration-percentile",
        type=float,
        default=None,
        metavar="P",
        help="calibrate int8 activations on their P-th percentile (e.g. 99.9) instead of the "
        "maximum",
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("-o", "--output", required=True, metavar="OUT")


def cmd_optimize(args, console: Console) -> int:
    """``hapm optimize``: HW-Flow search of per-layer pruning ratios, then prune, fine-tune,
    compile, simulate and report."""
    from .. import hwflow

    tgt, cfg = resolve_target(args.target, args.config)
    if args.max_accuracy_drop < 0:
        raise CliError("--max-accuracy-drop must be >= 0 (percentage points)")
    out = Path(args.output)
    data = _load_training_data(args.data, with_test=True)
    with progress_display(console) as progress:
        with stage(progress, "load ONNX"):
            model = fix_batch(load_onnx(args.model), 1)
        with stage(progress, f"search ({args.method}, {args.level}, {args.episodes} episodes)"):
            try:
                options = hwflow.EnvOptions(
                    objective=args.objective, max_accuracy_drop=args.max_accuracy_drop,
                    level=args.level, finetune_steps=args.search_finetune_steps,
                    seed=args.seed, reconstruct=args.reconstruct,
                    calibration_percentile=args.calibration_percentile,
                )  # fmt: skip
                env = hwflow.HWFlowEnv(model, data[:2], cfg, options)
                res = hwflow.optimize(
                    model,
                    data,
                    method=args.method,
                    episodes=args.episodes,
                    seed=args.seed,
                    env=env,
                    final_finetune_steps=args.finetune_steps,
                    simulate_result=True,
                )
            except ValueError as err:
                raise CliError(str(err)) from None
        with stage(progress, f"compile for {cfg.name}"), output_dir(out) as staged:
            (staged / "pruned.onnx").write_bytes(res.model.SerializeToString())
            # the calibration finalize's int8 test accuracy used: the executable written is the
            # model that accuracy was measured on
            calib = list(env.x_tune[: hwflow.INT8_EVAL_BATCH, None])
            qmod = quantize_module(
                import_onnx(res.model), calib, cfg, percentile=args.calibration_percentile
            )
            ex, programs, report = compile_model(qmod, tgt, cfg)
            write_artifacts(staged, ex, programs, cfg, report=report, extra={"model": args.model})
            (staged / "optimize_report.json").write_text(
                json.dumps(res.to_dict(), indent=2, sort_keys=True, default=json_default)
            )
            hwflow.pareto_plot([res], staged / "pareto.png", args.objective)
    plot = out / "pareto.png"
    table = Table(title=f"HW-Flow ({args.method} guided by {args.level}, {args.objective})")
    for col in ("", "latency ms", "energy µJ"):
        table.add_column(col, justify="left" if not col else "right")
    pred = res.predicted.get(args.level, {})
    fin = res.final

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    table.add_row(
        f"dense ({args.level})",
        fmt(pred.get("dense_latency_ms"), ".3f"),
        fmt(pred.get("dense_energy_uj"), ".1f"),
    )
    table.add_row(
        f"searched ({args.level})",
        fmt(pred.get("latency_ms"), ".3f"),
        fmt(pred.get("energy_uj"), ".1f"),
    )
    table.add_row(
        "searched (simulated)",
        fmt(fin.get("sim_latency_ms"), ".3f"),
        fmt(fin.get("sim_energy_uj"), ".1f"),
    )
    console.print(table)
    console.print(
        f"validation accuracy drop {res.val_drop:.2f} points (budget {args.max_accuracy_drop}); "
        f"ratios: " + ", ".join(f"{k} {v:.1f}" for k, v in res.ratios.items() if v)
    )
    console.print(f"wrote {out / 'pruned.onnx'}, {out / MODEL_LIB}, {plot} and the reports")
    return 0
