"""``hapm demo``: a trained CNN deployed int8 on the simulated accelerator (digits or
Fashion-MNIST), then ResNet-20 pruned three ways (unstructured, filter, HAPM), recovered and
deployed, with a latency / accuracy plot."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .. import atomic
from .errors import CliError, one_line
from .io import (
    compile_model,
    import_onnx,
    import_tvm,
    output_dir,
    positive_int,
    program_rows,
    quantize_module,
    resolve_target,
    run_batches,
    write_artifacts,
)
from .ui import placement_table, progress_display, run_stats_table, stage


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hapm demo``."""
    p.add_argument("--out", default=None, metavar="DIR", help="also write the compiled model")
    p.add_argument(
        "--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto",
        help="auto: Fashion-MNIST when installed, else digits",
    )  # fmt: skip
    p.add_argument(
        "--batch", type=positive_int, default=25, help="batch size of the compiled model"
    )
    p.add_argument(
        "--images", type=positive_int, default=500, help="Fashion-MNIST test images to simulate"
    )
    p.add_argument("--sparsity", type=float, default=0.5, help="pruning part: weight sparsity")
    p.add_argument(
        "--pruning-steps", type=int, default=None,
        help="fine-tuning steps per pruned ResNet-20 (0: none; -1 skips the pruning part; "
        "default: a quarter epoch of batch 128 on Fashion-MNIST, 16 of batch 32 on digits)",
    )  # fmt: skip


def cmd_demo(args, console: Console) -> int:
    """``hapm demo``: a trained network deployed int8 on the simulated accelerator, then HAPM vs
    standard and filter pruning at one sparsity.  Fashion-MNIST when it is installed (ResNet-20
    trained on it), else scikit-learn's digits (the bundled digits CNN and ResNet-20)."""
    from ..data import DatasetNotFoundError, load_fashion_mnist

    dataset, dense_int8 = None, None
    if args.dataset in ("auto", "fashion-mnist"):
        try:
            dataset = load_fashion_mnist()
        except DatasetNotFoundError as err:
            if args.dataset == "fashion-mnist":
                raise CliError(one_line(err, 1000)) from None
            console.print(f"[yellow]{err}[/yellow]\nFalling back to scikit-learn's digits.\n")
    if dataset is None:
        _demo_digits(args, console)
    else:
        dense_int8 = _demo_fashion(args, console, dataset)
    if args.pruning_steps is None or args.pruning_steps >= 0:
        _demo_pruning(args, console, dataset, dense_int8)
    return 0


def _demo_digits(args, console: Console) -> None:
    """Part one on digits: the bundled digits CNN, float vs int8 on hapm_fpga, 450 images."""
    from ..data import load_bundled_model, load_digits

    batch = min(args.batch, 450)
    tvm = import_tvm()
    tgt, cfg = resolve_target("hapm_fpga", None)
    with progress_display(console) as progress:
        with stage(progress, "import model and data"):
            x_train, _, x_test, y_test = load_digits(size=16, channels=1)
            mod = import_onnx(load_bundled_model(batch=batch))
            # The last batch is padded with repeated images whose outputs are dropped.
            test_batches = [
                _fill_batch(x_test[i : i + batch], batch) for i in range(0, len(x_test), batch)
            ]
        with stage(progress, "quantize (32 samples)"):
            qmod = quantize_module(mod, [_fill_batch(x_train[:32], batch)], cfg)
        with stage(progress, f"compile for {cfg.name} + llvm"):
            ex, programs, report = compile_model(qmod, tgt, cfg)
            float_ex = tvm.compile(mod, "llvm")
        _demo_export(args, progress, ex, programs, cfg, report, "bundled digits CNN", batch,
                     [1, 16, 16])  # fmt: skip
        with stage(progress, "run float (llvm)", total=len(test_batches)) as advance:
            y_float, _ = run_batches(tvm.relax.VirtualMachine(float_ex, tvm.cpu()), test_batches,
                                     advance)  # fmt: skip
        with stage(progress, "run int8 (hapm_fpga)", total=len(test_batches)) as advance:
            y_int8, runs = run_batches(tvm.relax.VirtualMachine(ex, tvm.cpu()), test_batches,
                                       advance)  # fmt: skip
    n = len(y_test)
    top_f, top_q = y_float[:n].argmax(1), y_int8[:n].argmax(1)
    table = Table(title=f"Digits CNN, {n} test images")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_row("float32 (llvm)", f"{(top_f == y_test).mean():.2%}")
    table.add_row("int8 (hapm_fpga)", f"{(top_q == y_test).mean():.2%}")
    table.add_row("top-1 agreement float vs int8", f"{(top_f == top_q).mean():.2%}")
    _demo_deploy_tables(console, table, programs, report, runs, batch, args)


def _demo_fashion(args, console: Console, data) -> tuple | None:
    """Part one on Fashion-MNIST: the bundled ResNet-20 quantized and compiled; ``--images``
    test images run on the bit-exact simulator and compared with the int8 reference, which
    then gives the accuracy on all 10,000 test images.

    Returns ``(calibration images, int8 top-1 correctness per test image)`` when the reference
    ran on every test image (PyTorch), for part two's dense row; else None."""
    from ..compress import flow
    from ..data import fashion_resnet_info, load_fashion_resnet

    batch = args.batch
    tvm = import_tvm()
    tgt, cfg = resolve_target("hapm_fpga", None)
    pct = fashion_resnet_info(20)["int8_calibration"]["percentile"]
    x_test, y_test = data.x_test, data.y_test
    n_sim = min(args.images, len(x_test))
    sim_batches = [_fill_batch(x_test[i : min(i + batch, n_sim)], batch)
                   for i in range(0, n_sim, batch)]  # fmt: skip
    engine = flow.resolve_engine()
    with progress_display(console) as progress:
        with stage(progress, "import ResNet-20"):
            model = load_fashion_resnet(20, batch=batch)
            mod = import_onnx(model)
        calib = [data.x_train[k : k + batch] for k in range(0, 256 - batch + 1, batch)]
        with stage(progress, f"quantize ({len(calib) * batch} images)"):
            qmod = quantize_module(mod, calib, cfg, percentile=pct)
        with stage(progress, f"compile for {cfg.name}"):
            ex, programs, report = compile_model(qmod, tgt, cfg)
        _demo_export(args, progress, ex, programs, cfg, report, "ResNet-20 / Fashion-MNIST",
                     batch, [1, 32, 32])  # fmt: skip
        with stage(progress, f"simulate {n_sim} images", total=len(sim_batches)) as advance:
            y_sim, runs = run_batches(tvm.relax.VirtualMachine(ex, tvm.cpu()), sim_batches,
                                      advance)  # fmt: skip
        y_sim = y_sim[:n_sim]
        with stage(progress, f"int8 reference ({engine})"):
            if engine == "torch":  # the same quantized module, all test images
                from ..torch import QuantizedRunner

                y_ref = QuantizedRunner(qmod).predict(x_test)
            else:  # TVM's llvm build: the simulated images only (the whole set takes minutes)
                ref_ex = tvm.compile(qmod, "llvm")
                y_ref, _ = run_batches(tvm.relax.VirtualMachine(ref_ex, tvm.cpu()), sim_batches)
        with stage(progress, "float32"):
            acc_float = flow.float_accuracy(model, x_test, y_test, engine)
    same = int(np.all(y_sim == y_ref[:n_sim], axis=1).sum())
    table = Table(title="ResNet-20 on Fashion-MNIST")
    table.add_column("model")
    table.add_column("images", justify="right")
    table.add_column("top-1", justify="right")
    table.add_row("float32", f"{len(y_test):,}", f"{acc_float:.2%}")
    table.add_row("int8 (reference)", f"{len(y_ref):,}",
                  f"{(y_ref.argmax(1) == y_test[: len(y_ref)]).mean():.2%}")  # fmt: skip
    table.add_row("int8 on hapm_fpga (simulated)", f"{n_sim:,}",
                  f"{(y_sim.argmax(1) == y_test[:n_sim]).mean():.2%}")  # fmt: skip
    table.add_row("outputs bit-identical to the reference", f"{same:,} / {n_sim:,}", "")
    if same != n_sim:
        raise CliError(f"the simulated outputs differ from the int8 reference on "
                       f"{n_sim - same} images")  # fmt: skip
    _demo_deploy_tables(console, table, programs, report, runs, batch, args)
    if len(y_ref) < len(y_test):
        return None
    return np.concatenate(calib), y_ref.argmax(1) == y_test


def _demo_export(args, progress, ex, programs, cfg, report, name, batch, shape) -> None:
    if args.out:  # export before a VM loads the executable
        with stage(progress, "export"), output_dir(Path(args.out)) as staged:
            write_artifacts(
                staged, ex, programs, cfg, report=report,
                extra={"model": name, "input": {"name": "input", "shape": [batch, *shape],
                                                "dtype": "float32"}},
            )  # fmt: skip


def _demo_deploy_tables(console, accuracy, programs, report, runs, batch, args) -> None:
    console.print(accuracy)
    console.print(placement_table(program_rows(programs), report.get("host", {})))
    console.print(
        run_stats_table(runs[0], title=f"Accelerator statistics of one run (batch {batch})")
    )
    if args.out:
        console.print(f"wrote the compiled model to {args.out}")


def _demo_pruning(args, console: Console, data, dense_int8=None) -> None:
    """Part two: ResNet-20 dense vs unstructured, filter and HAPM pruning at the same weight
    sparsity, each recovered the same way (least-squares reconstruction, then fine-tuning with
    the masks held: PyTorch when installed, else TVM), deployed int8 on the simulated
    accelerator.  On Fashion-MNIST every model's int8 accuracy is measured on the 10,000 test
    images and the recovery chooses on part of the validation split.

    ``dense_int8``: part one's calibration images and the dense int8 model's correctness on
    every test image (the same network and calibration, so the same int8 model: measured
    once)."""
    from ..compress import flow
    from ..data import (
        fashion_resnet_info,
        load_bundled_resnet20,
        load_digits,
        load_fashion_resnet,
    )

    engine = flow.resolve_engine()
    if data is None:
        name, pct, val, train_config = "digits", None, None, None
        x_train, y_train, x_test, y_test = load_digits(size=32, channels=3)
        base = load_bundled_resnet20(batch=1)
        steps = 16 if args.pruning_steps is None else args.pruning_steps
    else:
        # the recovery only chooses between reconstructed and fine-tuned weights: 2,000
        # validation images do (the benchmarks use all 5,000)
        name, val = "Fashion-MNIST", (data.x_val[:2000], data.y_val[:2000])
        x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
        base = load_fashion_resnet(20, batch=1)
        pct = fashion_resnet_info(20)["int8_calibration"]["percentile"]
        # a quarter of an epoch of PyTorch fine-tuning (batch 128) keeps the demo near 10 min
        per_epoch = len(x_train) // 128
        steps = per_epoch // 4 if args.pruning_steps is None else args.pruning_steps
        train_config = None
        if engine == "torch":
            from ..torch import TrainConfig

            train_config = TrainConfig(lr=0.01, crop_padding=4, flip=True)
    x_cal = x_train[:256] if dense_int8 is None else dense_int8[0]
    rows, kept = {}, {}
    with progress_display(console) as progress:
        with stage(progress, "ResNet-20 dense: deploy"):
            # part one, when it ran, measured this int8 model on every test image
            rows["dense"] = flow.evaluate_deployed(
                base, "hapm_fpga", x_cal, x_test, y_test, percentile=pct, engine=engine,
                correct=None if dense_int8 is None else dense_int8[1],
            )  # fmt: skip
        # HAPM with every layer at the target: on Fashion-MNIST the per_mac allocation's default
        # cap costs 2-5 points, and the cap benchmarks/hapm_vs_standard.py chose on validation
        # at 50% (0.5) is this allocation (docs/pruning.md)
        for label, method, ranking in (("unstructured", "unstructured", "layer"),
                                       ("filter", "filter", "layer"),
                                       ("HAPM", "hapm", "layer")):  # fmt: skip
            desc = f"{label} {args.sparsity:.0%}: prune, recover ({steps} steps), deploy"
            with stage(progress, desc):
                ratio, transform = args.sparsity, None
                if method == "filter":
                    ratio, _ = flow.filter_fraction(base, args.sparsity)
                    transform = flow.filter_deploy_pass(ratio)
                pruned, _ = flow.prune_onnx(base, method, ratio, ranking=ranking)
                pruned, info = flow.recover(pruned, base, (x_train, y_train), steps=steps,
                                            val_data=val, engine=engine,
                                            train_config=train_config)  # fmt: skip
                kept[label] = info["kept"]
                rows[label] = flow.evaluate_deployed(
                    pruned, "hapm_fpga", x_cal, x_test, y_test, transform=transform,
                    percentile=pct, engine=engine,
                )  # fmt: skip
    dense = rows["dense"]
    table = Table(title=f"ResNet-20 / {name} on hapm_fpga, {args.sparsity:.0%} weight sparsity, "
                  f"int8 top-1 on {len(y_test):,} test images")  # fmt: skip
    for col in ("model", "int8 top-1", "latency ms", "energy µJ", "GEMMs", "speed-up"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, r in rows.items():
        table.add_row(label, f"{r.accuracy:.2f}%", f"{r.latency_ms:.3f}", f"{r.energy_uj:.1f}",
                      f"{r.gemms:,}", f"{dense.latency_ms / r.latency_ms:.2f}x")  # fmt: skip
    console.print(table)
    how = "PyTorch" if engine == "torch" else "TVM"
    console.print(
        "Every pruned model was recovered the same way: least-squares reconstruction of the "
        f"pruned layers, then {steps} fine-tuning steps in {how}, keeping the better on a "
        f"validation split ({', '.join(f'{k}: {v}' for k, v in kept.items())}). HAPM removes "
        "whole dispatch groups of the arrays (fewer GEMMs and weight loads); filter pruning "
        "removes channels (smaller tensors); unstructured zeros leave the work in place."
    )
    plot = Path(args.out or ".") / "hapm_demo.png"
    _latency_accuracy_plot(rows, plot, args.sparsity, name)
    console.print(f"wrote {plot}")


def _latency_accuracy_plot(rows: dict, path: Path, sparsity: float, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, r in rows.items():
        ax.scatter(r.latency_ms, r.accuracy, s=60)
        ax.annotate(label, (r.latency_ms, r.accuracy), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("latency on hapm_fpga (ms, simulated)")
    ax.set_ylabel(f"int8 top-1 on {dataset} test (%)")
    ax.set_title(f"ResNet-20, {sparsity:.0%} sparsity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic.write_figure(path, fig)
    plt.close(fig)


def _fill_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """Repeat the samples of ``x`` cyclically to fill a batch of ``batch``.

    Used for calibration (a max-abs calibration sees exactly the statistics of ``x``) and to pad
    the last test batch.
    """
    idx = np.arange(batch) % len(x)
    return np.ascontiguousarray(x[idx])
