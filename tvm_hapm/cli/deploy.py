"""``hapm compile``, ``run``, ``profile``, ``disasm`` and ``presets``: compiling a model for
hapm_fpga, running it, profiling it with the timing model, reading its programs, and the hardware
presets."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .. import atomic
from .errors import CliError, one_line
from .io import (
    MODEL_LIB,
    PROGRAM_DIR,
    REPORT_JSON,
    add_target_args,
    batches,
    calibration_batches,
    compile_model,
    existing_file,
    fix_batch,
    import_onnx,
    import_tvm,
    json_default,
    known_targets,
    load_compiled,
    load_npy,
    load_onnx,
    model_batches,
    model_input,
    non_negative_int,
    output_dir,
    positive_int,
    program_listing,
    quantize_module,
    read_program,
    resolve_target,
    run_batches,
    to_numpy,
    write_artifacts,
)
from .ui import placement_table, progress_display, run_stats_table, stage


# ---------------------------------------------------------------------------------- compile
def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hapm compile``."""
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--calibration", required=True, metavar="DATA.npy", help="calibration inputs")
    p.add_argument(
        "--calibration-samples",
        type=positive_int,
        default=16,
        metavar="K",
        help="use the first K samples of the calibration data (default 16)",
    )
    add_target_args(p)
    p.add_argument(
        "--batch", type=positive_int, default=1, help="batch size if the model's batch is symbolic"
    )
    p.add_argument("--tuning-db", default=None, metavar="DB.json", help="schedules from hapm tune")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")


def _tuning_database(path):
    """The tuning database to apply during a compile, or a no-op context."""
    if path is None:
        return contextlib.nullcontext()
    from ..cost.tune import TuningDatabase

    existing_file(path, "tuning database")
    try:
        return TuningDatabase(path)
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise CliError(f"{path}: not a tuning database ({err})") from None


def cmd_compile(args, console: Console) -> int:
    """``hapm compile``: import, quantize, compile, write the artifacts and a summary."""
    tgt, cfg = resolve_target(args.target, args.config)
    out = Path(args.output)
    with progress_display(console) as progress:
        with stage(progress, "import ONNX"):
            model = fix_batch(load_onnx(args.model), args.batch)
            name, shape, dtype = model_input(model)
            calib = calibration_batches(args, shape, dtype)
            mod = import_onnx(model)
        with stage(progress, f"quantize ({len(calib)} batches)"):
            qmod = quantize_module(mod, calib, cfg)
        with stage(progress, f"compile for {cfg.name}"):
            t0 = time.perf_counter()
            with _tuning_database(args.tuning_db):
                ex, programs, report = compile_model(qmod, tgt, cfg)
            seconds = time.perf_counter() - t0
        with stage(progress, "export"), output_dir(out) as staged:
            full = write_artifacts(
                staged,
                ex,
                programs,
                cfg,
                report=report,
                extra={
                    "model": str(args.model),
                    "target": str(tgt.attrs.get("model", cfg.name)),
                    "input": {"name": name, "shape": [int(s) for s in shape], "dtype": dtype},
                    "calibration": {
                        "file": str(args.calibration),
                        "samples": sum(int(b.shape[0]) for b in calib),
                    },
                    "compile_seconds": round(seconds, 3),
                },
            )
    console.print(placement_table(full["accelerator"], full["host"]))
    total = sum(r["instructions"] for r in full["accelerator"])
    console.print(
        f"{len(full['accelerator'])} accelerator layers, {total:,} instructions; "
        f"wrote {out / MODEL_LIB}, {out / PROGRAM_DIR}/, {out / REPORT_JSON}"
    )
    return 0


# ---------------------------------------------------------------------------------- run
def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hapm run``."""
    p.add_argument("model_dir", metavar="OUT", help="directory written by hapm compile")
    p.add_argument("--input", required=True, metavar="X.npy")
    p.add_argument("--output", default=None, metavar="Y.npy", help="default OUT/output.npy")


def _merge_by_layer(runs: list[list]) -> list:
    """Sum the per-layer stats of several runs (e.g. the batches of one input file)."""
    merged: dict = {}
    for layers in runs:
        for s in layers:
            merged[s.layer] = merged[s.layer] + s if s.layer in merged else s
    return list(merged.values())


def cmd_run(args, console: Console) -> int:
    """``hapm run``: run a compiled model on a .npy input and print the accelerator stats."""
    out = Path(args.model_dir)
    x = load_npy(args.input, "input")
    with progress_display(console) as progress:
        with stage(progress, "load model"):
            vm, report = load_compiled(out)
        inputs = model_batches(report, x, f"input {args.input}")
        with stage(progress, "run", total=len(inputs)) as advance:
            try:
                y, runs = run_batches(vm, inputs, advance)
            except CliError:
                raise
            except Exception as err:
                raise CliError(f"running the model failed: {one_line(err)}") from None
    console.print(f"output shape {tuple(y.shape)}, dtype {y.dtype}")
    if y.ndim == 2:
        top = y.argmax(axis=1)
        shown = " ".join(map(str, top[:32])) + (" ..." if len(top) > 32 else "")
        console.print(f"argmax: {shown}")
    title = "Accelerator statistics" + (f" ({len(runs)} runs)" if len(runs) > 1 else "")
    console.print(run_stats_table(_merge_by_layer(runs), title=title))
    dest = Path(args.output) if args.output else out / "output.npy"
    buffer = io.BytesIO()
    np.save(buffer, y)
    atomic.write_bytes(dest, buffer.getvalue())  # an interrupted run keeps the old file
    console.print(f"saved the output to {dest}")
    return 0


# ---------------------------------------------------------------------------------- profile
def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hapm profile``."""
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument(
        "--calibration", default=None, metavar="DATA.npy", help="default: one random sample"
    )
    p.add_argument("--calibration-samples", type=positive_int, default=16, metavar="K")
    add_target_args(p)
    p.add_argument("--input", default=None, metavar="X.npy", help="default: a random input")
    p.add_argument(
        "--batch", type=positive_int, default=1, help="batch size if the model's batch is symbolic"
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the random data (default 0)"
    )
    p.add_argument(
        "--trace-limit",
        type=non_negative_int,
        default=1_000_000,
        metavar="N",
        help="at most N instruction events in trace.json (0: no limit; default 1,000,000)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")


#: The profile ``hapm profile`` writes (per layer and total).
PROFILE_JSON = "profile.json"
#: The Chrome/Perfetto trace ``hapm profile`` writes.
TRACE_JSON = "trace.json"


def cmd_profile(args, console: Console) -> int:
    """``hapm profile``: compile, run once with the timing model, write profile and trace."""
    from ..runtime import driver
    from ..runtime.report import build_profile, chrome_trace, profile_table

    tgt, cfg = resolve_target(args.target, args.config)
    out = Path(args.output)
    rng = np.random.default_rng(args.seed)
    with progress_display(console) as progress:
        with stage(progress, "import ONNX"):
            model = fix_batch(load_onnx(args.model), args.batch)
            name, shape, dtype = model_input(model)
            dims = [int(d) for d in shape]

            def random(what):
                if np.dtype(dtype).kind != "f":
                    raise CliError(f"the model input is {dtype}; give {what} as a .npy file")
                return rng.standard_normal(dims).astype(dtype)

            if args.calibration:
                calib = calibration_batches(args, shape, dtype)
            else:
                calib = [random("--calibration")]
            if args.input:
                x = batches(load_npy(args.input, "input"), shape, dtype, f"input {args.input}")[0]
            else:
                x = random("--input")
            mod = import_onnx(model)
        with stage(progress, f"quantize ({len(calib)} batches)"):
            qmod = quantize_module(mod, calib, cfg)
        with stage(progress, f"compile for {cfg.name}"):
            ex, programs, _ = compile_model(qmod, tgt, cfg)
        if not programs:
            raise CliError("no layer of this model runs on the accelerator: nothing to profile")
        with stage(progress, "run with the timing model"):
            tvm = import_tvm()
            vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
            t0 = time.perf_counter()
            with driver.profile():
                try:
                    to_numpy(vm["main"](tvm.runtime.tensor(x)))
                except CliError:
                    raise
                except Exception as err:
                    raise CliError(f"running the model failed: {one_line(err)}") from None
            seconds = time.perf_counter() - t0
            stats = driver.last_run_stats()
        with stage(progress, "write profile and trace"):
            profile = build_profile(stats, cfg)
            profile["model"] = str(args.model)
            profile["target"] = str(tgt.attrs.get("model", cfg.name))
            profile["input"] = {
                "file": str(args.input) if args.input else f"random normal (seed {args.seed})",
                "shape": dims,
                "dtype": dtype,
            }
            profile["simulation_seconds"] = round(seconds, 3)
            trace = chrome_trace(stats.traces, max_events=args.trace_limit or None)
            out.mkdir(parents=True, exist_ok=True)
            atomic.write_text(
                out / PROFILE_JSON, json.dumps(profile, indent=2, default=json_default) + "\n"
            )
            atomic.write_text(
                out / TRACE_JSON, json.dumps(trace, separators=(",", ":"), default=json_default)
            )
    console.print(profile_table(profile, title=f"Accelerator profile ({cfg.name})"))
    total = profile["total"]
    truncated = trace["otherData"]["truncated"]
    note = " (instruction events truncated: --trace-limit)" if truncated else ""
    console.print(
        f"{total['cycles']:,} cycles = {total['latency_ms']:.3f} ms at {cfg.clock_mhz:g} MHz, "
        f"{total['roofline_fraction']:.0%} of the roofline bound, {total['energy_uj']:,.1f} µJ; "
        f"wrote {out / PROFILE_JSON}, {out / TRACE_JSON}{note}"
    )
    return 0


# ---------------------------------------------------------------------------------- disasm
def add_disasm_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hapm disasm``."""
    p.add_argument("path", metavar="FILE.hapm|DIR")


def cmd_disasm(args, console: Console) -> int:
    """``hapm disasm``: print programs (a .hapm file or every .hapm file of a directory)."""
    path = Path(args.path)
    if path.is_dir():
        files = sorted(path.glob("*.hapm")) or sorted((path / PROGRAM_DIR).glob("*.hapm"))
        if not files:
            raise CliError(f"no .hapm programs in {path}")
    else:
        files = [existing_file(path, "program")]
    texts = [program_listing(read_program(f)) for f in files]
    console.print("\n".join(texts), markup=False, highlight=False, end="")
    return 0


# ---------------------------------------------------------------------------------- presets
def add_presets_arguments(p: argparse.ArgumentParser) -> None:
    """``hapm presets`` takes no arguments."""


def cmd_presets(args, console: Console) -> int:
    """``hapm presets``: the hardware presets as a table."""
    from ..target.config import DEFAULT_PRESET, PRESETS

    # One column per preset: the properties are many, the presets few.
    table = Table(title=f"hapm_fpga hardware presets (default: {DEFAULT_PRESET})")
    table.add_column("")
    for name in PRESETS:
        table.add_column(name, justify="right")
    rows = {
        "board": lambda c: c.board,
        "part": lambda c: c.part,
        "arrays": lambda c: str(c.num_arrays),
        "RxC": lambda c: f"{c.array_rows}x{c.array_cols}",
        "MACs/cycle": lambda c: f"{c.macs_per_cycle:,}",
        "input buf": lambda c: f"{c.inp_buffer_bytes // 1024} KiB",
        "weight buf": lambda c: f"{c.wgt_buffer_bytes // 1024} KiB",
        "acc buf": lambda c: f"{c.acc_buffer_bytes // 1024} KiB",
        "DRAM port": lambda c: f"{c.dram_bytes_per_cycle} B/cycle",
        "bandwidth": lambda c: f"{c.dram_bytes_per_cycle * c.clock_mhz / 1e3:.1f} GB/s",
        "clock": lambda c: f"{c.clock_mhz:g} MHz",
        "peak GOPS": lambda c: f"{c.peak_gops:.1f}",
    }
    for label, fmt in rows.items():
        table.add_row(label, *(fmt(c) for c in PRESETS.values()))
    console.print(table)
    console.print("targets: " + ", ".join(known_targets()))
    return 0
