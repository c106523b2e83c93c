"""Compile time of hapm_fpga against TVM's own llvm build, for ResNet-18 and CIFAR ResNet-20.

Run from the repository root::

    python benchmarks/compile_time.py            # both models, results/compile_time.json
    python benchmarks/compile_time.py --reps 5 --models resnet20

For each model, in one process:

* ``llvm``: ``tvm.compile(from_onnx(model), "llvm")`` of the float model (the import is not
  timed, it is reported as ``import_seconds``);
* ``hapm_fpga``: ``tvm.compile(qmod, "hapm_fpga")`` of the model quantized with two random
  calibration samples (quantization is not timed, it is reported as ``quantize_seconds``),
  each repetition a cold compile (:func:`cold_compile`);
* the breakdown of the hapm_fpga compile: ``offload_seconds`` is the offload passes alone
  (partitioning, code generation and dependency tokens of every accelerator layer), and the
  accelerator programs they produce (layers, instructions, bytes);
* ``llvm_quantized_seconds``: the quantized model built entirely for the CPU, for reference.

Each figure is the median of ``--reps`` repetitions (default 5); the llvm and hapm_fpga compiles
alternate (:func:`timed_side_by_side`), so that both see the same machine, and ``pair_ratios``
keeps the ratio of each pair.  Repetitions stop early when they would exceed ``--max-seconds``.
A warm-up compile of a tiny model runs first so that one-time costs (LLVM initialisation, lazy
imports) are not charged to the first model.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tvm
from common import RESULTS as RESULTS_DIR
from common import machine_info, write_json
from rich.console import Console
from rich.table import Table
from tvm.relax.frontend.onnx import from_onnx

import tvm_hapm
from tvm_hapm.models import resnet18_imagenet, resnet_cifar, tiny_cnn
from tvm_hapm.passes import offload_passes
from tvm_hapm.target.config import get_config
from tvm_hapm.target.tir import clear_lowered_cache

RESULTS = RESULTS_DIR / "compile_time.json"
TARGET = "hapm_fpga"

MODELS = {
    "resnet18": ("ResNet-18 (ImageNet, 224x224)", lambda: resnet18_imagenet(input_hw=(224, 224))),
    "resnet20": ("ResNet-20 (CIFAR, 32x32)", lambda: resnet_cifar(depth=20)),
}


def timed(fn, reps: int, max_seconds: float) -> tuple[float, list[float], object]:
    """Median wall time of ``fn()`` over up to ``reps`` runs.

    Parameters
    ----------
    fn : callable
        The work to time.
    reps : int
        Maximum number of repetitions.
    max_seconds : float
        Budget: after the first run, only as many repetitions as fit in it are made.

    Returns
    -------
    median : float
        Median seconds.
    times : list of float
        Every measurement.
    result : object
        What the last call returned.
    """
    times: list[float] = []
    result = None
    while len(times) < reps:
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        if sum(times) + times[0] > max_seconds:
            break
    return statistics.median(times), times, result


def timed_side_by_side(fa, fb, reps: int, max_seconds: float) -> tuple[list, list]:
    """Wall times of ``fa()`` and ``fb()`` run alternately, up to ``reps`` pairs: on a shared
    machine whose speed drifts (this one's compile times move by 30% within minutes), each
    pair sees the same conditions, where all of one then all of the other would not.

    Returns
    -------
    times_a, times_b : list of float
        Every measurement of each.
    """
    times_a: list[float] = []
    times_b: list[float] = []
    while len(times_a) < reps:
        for fn, times in ((fa, times_a), (fb, times_b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if sum(times_a) + sum(times_b) + times_a[0] + times_b[0] > max_seconds:
            break
    return times_a, times_b


def input_shape(model) -> list[int]:
    """The static input shape of a single-input ONNX model."""
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def warm_up() -> None:
    """Compile a tiny model for llvm and hapm_fpga once, untimed."""
    model = tiny_cnn()
    x = np.random.default_rng(0).random(input_shape(model), dtype=np.float32)
    tvm.compile(from_onnx(model), "llvm")
    tvm.compile(tvm_hapm.quantize(from_onnx(model), [x]), TARGET)


def cold_compile(qmod):
    """``tvm.compile(qmod, "hapm_fpga")`` as the first compile of the model in a process: the
    lowered functions the code generator keeps across compiles are forgotten first (a
    repetition would otherwise find every layer of the previous one)."""
    clear_lowered_cache()
    return tvm.compile(qmod, TARGET)


def measure(name: str, reps: int, max_seconds: float, console: Console) -> dict:
    """All figures of one model (see the module docstring)."""
    title, build = MODELS[name]
    model = build()
    shape = input_shape(model)

    t0 = time.perf_counter()
    mod = from_onnx(model)
    import_seconds = time.perf_counter() - t0

    with console.status(f"{title}: quantize (2 random calibration samples, not timed)"):
        rng = np.random.default_rng(0)
        calibration = [rng.random(shape, dtype=np.float32) for _ in range(2)]
        t0 = time.perf_counter()
        qmod = tvm_hapm.quantize(from_onnx(model), calibration)
        quantize_seconds = time.perf_counter() - t0

    with console.status(f"{title}: llvm compile of the float model and {TARGET} compile of "
                        "the quantized one, alternately"):  # fmt: skip
        llvm_times, hapm_times = timed_side_by_side(
            lambda: tvm.compile(mod, "llvm"), lambda: cold_compile(qmod), reps, max_seconds,
        )  # fmt: skip
        llvm, hapm = statistics.median(llvm_times), statistics.median(hapm_times)

    with console.status(f"{title}: offload passes alone, llvm build of the quantized model"):
        cfg = get_config(TARGET)

        def offload():
            programs: list = []
            clear_lowered_cache()
            offload_passes(cfg, programs)(qmod)
            return programs

        offload_s, _, programs = timed(offload, 1, max_seconds)
        llvm_q, _, _ = timed(lambda: tvm.compile(qmod, "llvm"), 1, max_seconds)

    return {
        "model": title,
        "input_shape": shape,
        "reps": {"llvm": len(llvm_times), "hapm_fpga": len(hapm_times)},
        "llvm_seconds": llvm,
        "hapm_fpga_seconds": hapm,
        "ratio": hapm / llvm,
        "llvm_times": llvm_times,
        "hapm_fpga_times": hapm_times,
        "pair_ratios": [b / a for a, b in zip(llvm_times, hapm_times, strict=True)],
        "offload_seconds": offload_s,
        "offload_seconds_per_1000_instructions": 1000
        * offload_s
        / max(1, sum(len(p.instructions) for p in programs)),
        "host_build_seconds": max(hapm - offload_s, 0.0),
        "llvm_quantized_seconds": llvm_q,
        "import_seconds": import_seconds,
        "quantize_seconds": quantize_seconds,
        "config": cfg.name,
        "accelerator_layers": len(programs),
        "instructions": sum(len(p.instructions) for p in programs),
        "program_bytes": sum(len(p.to_bytes()) for p in programs),
    }


def results_table(results: dict) -> Table:
    """The rich table printed at the end: llvm and hapm_fpga side by side."""
    table = Table(title=f"Compile time, {TARGET} vs TVM llvm (median seconds)")
    table.add_column("model", no_wrap=True)
    for col in ("llvm", TARGET, "ratio", "offload", "llvm int8", "instructions"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(
            f"{name} {'x'.join(map(str, r['input_shape'][2:]))}",
            f"{r['llvm_seconds']:.2f}",
            f"{r['hapm_fpga_seconds']:.2f}",
            f"{r['ratio']:.2f}x",
            f"{r['offload_seconds']:.2f}",
            f"{r['llvm_quantized_seconds']:.2f}",
            f"{r['instructions']:,}",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and write the JSON results.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--reps", type=int, default=5, help="repetitions (median), default 5")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="time budget of one measurement: slow compiles are repeated less (default 60)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args(argv)

    # Off a terminal rich assumes 80 columns; the table needs a little more.
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)
    info = machine_info()
    with console.status("warm-up compile of a tiny model"):
        warm_up()
    results = {name: measure(name, args.reps, args.max_seconds, console) for name in args.models}
    console.print(results_table(results))

    out = {f"{name}_ratio": r["ratio"] for name, r in results.items()}
    out.update(
        {
            "ratio_definition": f"{TARGET} compile seconds / llvm compile seconds (medians)",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": info,
            "models": results,
        }
    )
    write_json(args.output, out)
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
