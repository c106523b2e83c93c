"""The ``hapm`` command line: compile ONNX models for hapm_fpga, run them, read their programs.

Subcommands
-----------
``hapm compile MODEL.onnx --calibration DATA.npy -o OUT/``
    Import an ONNX model, quantize it with calibration samples and compile it for a hapm_fpga
    target.  Writes ``OUT/model.so`` (a TVM Relax executable), ``OUT/programs/<layer>.hapm`` and
    ``<layer>.s`` (the accelerator programs, binary and disassembled) and ``OUT/report.json``.
``hapm run OUT/ --input X.npy [--output Y.npy]``
    Load ``OUT/model.so``, run it on ``X`` and print the accelerator statistics of the run.
``hapm profile MODEL.onnx [--calibration DATA.npy] [--input X.npy] -o OUT/``
    Compile the model, run it once on the simulator with the timing model and write
    ``OUT/profile.json`` (per layer and total: cycles, ms, utilisation, roofline, stalls, DRAM
    traffic, energy) and ``OUT/trace.json`` (a Chrome/Perfetto trace of the load, compute and
    store modules and the arrays); print the profile as a table.
``hapm disasm FILE.hapm|DIR``
    Print the header and the numbered instructions of accelerator programs.
``hapm demo [--out DIR]``
    Quantize, compile and evaluate the bundled digits CNN on the bundled test set.
``hapm presets``
    List the hardware presets.

User errors (missing or malformed files, data of the wrong shape, unknown targets) print one
line on standard error and exit with status 2; no traceback is shown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from . import atomic

__all__ = ["CliError", "main"]

#: Exit status of a user error.
EXIT_USER_ERROR = 2

MODEL_LIB = "model.so"
REPORT_JSON = "report.json"
PROGRAM_DIR = "programs"


class CliError(Exception):
    """A user error: reported as one line on standard error, exit status 2."""


# ---------------------------------------------------------------------------------- progress
class _StatusColumn(SpinnerColumn):
    """A spinner while a stage runs, then ``done``, or ``failed`` for a stage that raised."""

    def render(self, task):
        if task.fields.get("failed"):
            return Text("failed", style="bold red")
        return super().render(task)


@contextlib.contextmanager
def _progress(console: Console) -> Iterator[Progress]:
    """A rich progress display with one line per stage (spinner, bar, count, elapsed time)."""
    progress = Progress(
        _StatusColumn(finished_text=Text("done", style="green")),
        TextColumn("{task.description:<28}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        yield progress


@contextlib.contextmanager
def _stage(progress: Progress, description: str, total: int = 1):
    """Show one stage; yields ``advance(n=1)``. The stage is completed when the block ends.

    On an exception, the stage is marked as failed and the exception propagates.
    """
    task = progress.add_task(description, total=total)
    try:
        yield lambda n=1: progress.advance(task, n)
    except BaseException:
        progress.update(task, failed=True)
        progress.stop_task(task)
        raise
    progress.update(task, completed=total)
    progress.stop_task(task)


# ---------------------------------------------------------------------------------- loading
def _existing_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{what} not found: {p}")
    if not p.is_file():
        raise CliError(f"{what} is not a file: {p}")
    return p


def load_onnx(path: str | Path):
    """Load and check an ONNX model.

    Parameters
    ----------
    path : str or Path
        The ``.onnx`` file.

    Returns
    -------
    onnx.ModelProto

    Raises
    ------
    CliError
        The file is missing, cannot be parsed or fails ``onnx.checker``.
    """
    import onnx

    p = _existing_file(path, "ONNX model")
    try:
        model = onnx.load(str(p))
        onnx.checker.check_model(model)
    except Exception as err:
        raise CliError(f"{p} is not a valid ONNX model: {_one_line(err)}") from None
    if not model.graph.node:
        raise CliError(f"{p} is not a valid ONNX model: the graph has no nodes")
    return model


def model_input(model) -> tuple[str, list, str]:
    """The single graph input of an ONNX model: ``(name, shape, dtype)``.

    Dimensions without a fixed size are returned as their symbolic name (a string).
    """
    import onnx

    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise CliError(f"hapm supports models with one input; this model has {len(names)}: {names}")
    tt = inputs[0].type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    return inputs[0].name, shape, dtype


def fix_batch(model, batch: int):
    """Fix a symbolic leading (batch) dimension of the model's input and output to ``batch``."""
    from .data import set_batch

    _, shape, _ = model_input(model)
    if any(isinstance(d, str) for d in shape[1:]):
        raise CliError(f"the model input has symbolic dimensions beyond the batch: {shape}")
    if shape and isinstance(shape[0], str):
        return set_batch(model, batch)
    return model


def import_onnx(model):
    """Import an ONNX model into Relax; unsupported models raise :class:`CliError`."""
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(model)
    except Exception as err:
        raise CliError(f"cannot import the ONNX model into TVM: {_one_line(err)}") from None


def load_npy(path: str | Path, what: str = "data") -> np.ndarray:
    """Load a numeric ``.npy`` array (no pickles).

    Parameters
    ----------
    path : str or Path
        The ``.npy`` file.
    what : str
        What the file is, for error messages.

    Returns
    -------
    numpy.ndarray
    """
    p = _existing_file(path, f"{what} file")
    with p.open("rb") as f:
        magic = f.read(6)
    if magic[:2] == b"PK":
        raise CliError(f"{p} holds several arrays (.npz); give a single-array .npy file")
    if magic != b"\x93NUMPY":
        raise CliError(f"{p} is not a .npy file (no NumPy header); save arrays with numpy.save")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as err:
        raise CliError(f"{p} is not a valid .npy file: {_one_line(err)}") from None
    if arr.dtype.kind not in "biuf":
        raise CliError(f"{p}: expected a numeric array, got dtype {arr.dtype}")
    return arr


def _cast(x: np.ndarray, dtype: str, what: str) -> np.ndarray:
    if x.dtype == np.dtype(dtype):
        return np.ascontiguousarray(x)
    if np.dtype(dtype).kind == "f":
        return np.ascontiguousarray(x, dtype=dtype)
    raise CliError(f"{what} has dtype {x.dtype} but the model expects {dtype}")


def batches(x: np.ndarray, shape: list, dtype: str, what: str, limit: int | None = None) -> list:
    """Split ``x`` into arrays of the model's input ``shape``.

    ``x`` may be one sample without the batch axis, exactly one model input, or a stack of
    samples whose count is a multiple of the model's batch.  ``limit`` keeps the first ``limit``
    samples (at least one batch).
    """
    shape = [int(s) for s in shape]
    batch = shape[0] if shape else 1
    if list(x.shape) == shape[1:] and batch == 1:
        x = x[None]
    if list(x.shape[1:]) != shape[1:] or x.shape[0] < batch:
        raise CliError(
            f"{what} has shape {tuple(x.shape)}, but the model input expects {tuple(shape)} "
            f"(N samples of {tuple(shape[1:])}, N a multiple of the batch {batch})"
        )
    if limit is not None:
        x = x[: max(limit, batch)]
    if x.shape[0] % batch:
        if limit is None:
            raise CliError(
                f"{what} has {x.shape[0]} samples, not a multiple of the model's batch {batch}"
            )
        x = x[: x.shape[0] - x.shape[0] % batch]
    x = _cast(x, dtype, what)
    return [x[i : i + batch] for i in range(0, x.shape[0], batch)]


# ---------------------------------------------------------------------------------- compiling
def resolve_target(target: str | None, config: str | None):
    """The TVM target and hardware config of ``--target`` / ``--config``.

    Returns
    -------
    (tvm.target.Target, HardwareConfig)
    """
    from .target.config import HardwareConfig, HardwareConfigError, get_config, is_hapm_target
    from .target.tag import hapm_target

    try:
        if config is not None:
            cfg = HardwareConfig.from_json(_existing_file(config, "hardware config"))
            return hapm_target(cfg), cfg
        name = target or "hapm_fpga"
        if not is_hapm_target(name):
            raise CliError(f"unknown target {name!r}; known: {', '.join(known_targets())}")
        tgt = _tvm().target.Target(name)
        return tgt, get_config(tgt)
    except HardwareConfigError as err:
        raise CliError(str(err)) from None


def known_targets() -> list[str]:
    """The hapm_fpga target tags: ``hapm_fpga`` and ``hapm_fpga-<config>``."""
    from .target.config import list_configs

    return ["hapm_fpga"] + [f"hapm_fpga-{n}" for n in list_configs()]


def quantize_module(mod, calibration: list, config, percentile=None):
    """:func:`tvm_hapm.quantize` for ``config``; models it cannot handle raise :class:`CliError`."""
    from .passes.quantize import QuantizeError, quantize

    try:
        return quantize(mod, calibration, config, percentile=percentile)
    except QuantizeError as err:
        raise CliError(f"cannot quantize the model: {_one_line(err)}") from None


def compile_model(qmod, target, config) -> tuple:
    """Compile a quantized module for a hapm_fpga target, collecting the accelerator programs.

    Returns
    -------
    (executable, programs, report)
        The Relax executable, the generated :class:`~tvm_hapm.target.program.Program` objects
        and a copy of :func:`tvm_hapm.passes.last_compile_report`.
    """
    from .passes import hapm_pipeline, last_compile_report
    from .passes.lower import LoweringError

    programs: list = []
    try:
        ex = _tvm().compile(qmod, target=target, relax_pipeline=hapm_pipeline(config, programs))
    except LoweringError as err:
        raise CliError(f"cannot compile for {config.name}: {_one_line(err)}") from None
    return ex, programs, dict(last_compile_report())


def _tvm():
    import tvm

    from . import passes, runtime, target  # noqa: F401  (registrations)

    return tvm


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "layer"


def write_programs(programs: list, out_dir: Path) -> list[dict]:
    """Write ``<layer>.hapm`` and ``<layer>.s`` for every program; returns one row per layer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = program_rows(programs)
    for prog, row in zip(programs, rows, strict=True):
        stem = _safe_name(prog.layer)
        (out_dir / f"{stem}.hapm").write_bytes(prog.to_bytes())
        (out_dir / f"{stem}.s").write_text(program_listing(prog, comment="; "))
        row["program"] = f"{PROGRAM_DIR}/{stem}.hapm"
    return rows


def _opcode_counts(instructions) -> dict:
    counts: dict = {}
    for insn in instructions:
        counts[insn.opcode.name] = counts.get(insn.opcode.name, 0) + 1
    return counts


def write_artifacts(out: Path, ex, programs, config, *, report: dict, extra: dict) -> dict:
    """Write ``model.so``, the programs and ``report.json`` into ``out``; returns the report."""
    import tvm

    out.mkdir(parents=True, exist_ok=True)
    try:
        ex.export_library(str(out / MODEL_LIB))
    except Exception as err:
        raise CliError(f"cannot export {out / MODEL_LIB}: {_one_line(err)}") from None
    layers = write_programs(programs, out / PROGRAM_DIR)
    full = {
        **extra,
        "config": config.to_dict(),
        "accelerator": layers,
        "host": dict(report.get("host", {})),
        "tvm_version": tvm.__version__,
    }
    (out / REPORT_JSON).write_text(json.dumps(full, indent=2, default=_json_default) + "\n")
    return full


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


# ---------------------------------------------------------------------------------- tables
def placement_table(accelerator: list[dict], host: dict, title: str = "What runs where") -> Table:
    """Accelerator layers (kind, instructions) and host operators (count)."""
    table = Table(title=title)
    table.add_column("where")
    table.add_column("layer / operator")
    table.add_column("kind")
    table.add_column("instructions", justify="right")
    table.add_column("count", justify="right")
    for row in accelerator:
        table.add_row(
            "[cyan]accelerator[/]",
            row["layer"],
            row.get("kind", ""),
            f"{row.get('instructions', 0):,}",
            "1",
        )
    if accelerator and host:
        table.add_section()
    for op, count in host.items():
        table.add_row("[yellow]host[/]", op.removeprefix("relax."), "operator", "", str(count))
    return table


def run_stats_table(layers: list, title: str = "Accelerator statistics") -> Table:
    """Per-layer instructions, MACs, DRAM bytes, cycles, latency, energy and roofline fraction
    of :class:`ExecutionStats` objects."""
    from .runtime import ExecutionStats

    table = Table(title=title)
    columns = ("layer", "instructions", "MACs", "DRAM bytes", "cycles", "ms", "µJ", "roofline")
    for col in columns:
        table.add_column(col, justify="left" if col == "layer" else "right")

    def add(s, style=None):
        table.add_row(
            s.layer,
            f"{s.instructions:,}",
            f"{s.macs:,}",
            f"{s.dram_bytes:,}",
            f"{s.cycles:,}",
            f"{s.latency_ms:.3f}",
            f"{s.energy_uj:.1f}",
            f"{s.roofline_fraction:.0%}",
            style=style,
        )

    for s in layers:
        add(s)
    if layers:
        table.add_section()
        add(ExecutionStats.total(layers, layer="total"), style="bold")
    return table


def _merge_by_layer(runs: list[list]) -> list:
    """Sum the per-layer stats of several runs (e.g. the batches of one input file)."""
    merged: dict = {}
    for layers in runs:
        for s in layers:
            merged[s.layer] = merged[s.layer] + s if s.layer in merged else s
    return list(merged.values())


# ---------------------------------------------------------------------------------- listing
def program_listing(prog, comment: str = "") -> str:
    """The header (layer, config, slots) and the numbered instructions of a program."""
    from .target import isa

    cfg = prog.config
    lines = [
        f"layer {prog.layer} (index {prog.layer_index}, {prog.info.get('kind', '?')})",
        f"config {cfg.name}: {cfg.num_arrays} arrays of {cfg.array_rows}x{cfg.array_cols}, "
        f"int{cfg.weight_bits} weights, int{cfg.act_bits} activations",
        f"slots ({len(prog.slots)}):",
    ]
    width = max((len(s.name) for s in prog.slots), default=0)
    for i, s in enumerate(prog.slots):
        vec = f" V={s.vector}" if s.packing == "act" else ""
        lines.append(
            f"  dram{i}: {s.name:<{width}} {s.role:<6} {s.dtype}{list(s.shape)} {s.packing}{vec}"
        )
    lines.append(f"instructions ({len(prog.instructions)}):")
    header = [comment + line for line in lines]
    width = len(str(max(len(prog.instructions) - 1, 0)))
    body = [f"{i:>{width}}: {isa.disassemble(insn)}" for i, insn in enumerate(prog.instructions)]
    return "\n".join(header + body) + "\n"


def read_program(path: Path):
    """Read a ``.hapm`` program; malformed files raise :class:`CliError`."""
    from .target.isa import IsaError
    from .target.program import Program, ProgramError

    try:
        return Program.from_bytes(path.read_bytes())
    except (ProgramError, IsaError, ValueError) as err:
        raise CliError(f"{path} is not a valid hapm_fpga program: {_one_line(err)}") from None


# ---------------------------------------------------------------------------------- commands
def _tuning_database(path):
    """The tuning database to apply during a compile, or a no-op context."""
    if path is None:
        return contextlib.nullcontext()
    from .cost.tune import TuningDatabase

    _existing_file(path, "tuning database")
    try:
        return TuningDatabase(path)
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise CliError(f"{path}: not a tuning database ({err})") from None


def cmd_compile(args, console: Console) -> int:
    """``hapm compile``: import, quantize, compile, write the artifacts and a summary."""
    tgt, cfg = resolve_target(args.target, args.config)
    if args.calibration_samples < 1:
        raise CliError("--calibration-samples must be at least 1")
    out = Path(args.output)
    with _progress(console) as progress:
        with _stage(progress, "import ONNX"):
            model = fix_batch(load_onnx(args.model), args.batch)
            name, shape, dtype = model_input(model)
            calib = batches(
                load_npy(args.calibration, "calibration"),
                shape,
                dtype,
                f"calibration data {args.calibration}",
                limit=args.calibration_samples,
            )
            mod = import_onnx(model)
        with _stage(progress, f"quantize ({len(calib)} batches)"):
            qmod = quantize_module(mod, calib, cfg)
        with _stage(progress, f"compile for {cfg.name}"):
            t0 = time.perf_counter()
            with _tuning_database(args.tuning_db):
                ex, programs, report = compile_model(qmod, tgt, cfg)
            seconds = time.perf_counter() - t0
        with _stage(progress, "export"):
            full = write_artifacts(
                out,
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


def cmd_tune(args, console: Console) -> int:
    """``hapm tune``: search the schedule of every convolution, write a tuning database."""
    from .cost.measure import LocalRunner, RPCRunner
    from .cost.tune import (
        TuningDatabase,
        extract_tasks,
        model_guided_search,
        random_search,
    )

    tgt, cfg = resolve_target(args.target, args.config)
    if args.trials < 1:
        raise CliError("--trials must be at least 1")
    if args.rpc:
        host, _, port = args.rpc.rpartition(":")
        if not host or not port.isdigit():
            raise CliError(f"--rpc wants HOST:PORT of an RPC tracker, got {args.rpc!r}")
        runner = RPCRunner(host, int(port), key=args.key, num_parallel=args.workers)
    else:
        runner = LocalRunner(args.workers)
    search = model_guided_search if args.strategy == "guided" else random_search
    db = TuningDatabase(args.output)
    with _progress(console) as progress:
        with _stage(progress, "import ONNX"):
            model = fix_batch(load_onnx(args.model), args.batch)
            _, shape, dtype = model_input(model)
            calib = (
                batches(load_npy(args.calibration, "calibration"), shape, dtype, "calibration")
                if args.calibration
                else [np.random.default_rng(0).uniform(0, 1, shape).astype(dtype)]
            )
            mod = import_onnx(model)
        with _stage(progress, "quantize"):
            qmod = quantize_module(mod, calib[:4], cfg)
        tasks = extract_tasks(qmod, cfg)
        rows = []
        with _stage(progress, f"tune {len(tasks)} layers ({args.strategy})", total=len(tasks)):
            task_id = progress.task_ids[-1]
            for task in tasks:
                result = search(task, args.trials, runner=runner, seed=args.seed)
                db.commit(task, result)
                rows.append((task.name, result))
                progress.advance(task_id)
    db.save()
    table = Table(title=f"Tuned schedules ({cfg.name}, {args.strategy}, {args.trials} trials)")
    for col in ("layer", "space", "default cycles", "tuned cycles", "speed-up", "schedule"):
        table.add_column(col, justify="left" if col in ("layer", "schedule") else "right")
    for name, r in rows:
        s = r.best
        table.add_row(
            name,
            str(r.space_size),
            f"{r.default_cycles:,}",
            f"{r.best_cycles:,}",
            f"{r.default_cycles / max(r.best_cycles, 1):.2f}x",
            f"{s.tile_h}x{s.tile_w} g{s.cob_group} k{s.cib_chunk}",
        )
    console.print(table)
    console.print(f"wrote {args.output}; apply it with hapm compile --tuning-db {args.output}")
    return 0


def cmd_prune(args, console: Console) -> int:
    """``hapm prune``: prune an ONNX model (optionally fine-tune it), write ONNX and a report."""
    from .flow import PRUNE_METHODS, RANKINGS, prune_onnx, sparsity_of

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
    with _progress(console) as progress:
        with _stage(progress, "load ONNX"):
            model = load_onnx(args.model)
        if args.stages > 1 and not args.data:
            raise CliError("--stages > 1 (iterative pruning) needs --data to recover on")
        rounds = None
        if args.data:  # prune and recover (flow.recover), in one round or several
            from .flow import prune_iteratively

            data = _load_training_data(args.data)
            how = "reconstruct + " if args.reconstruct else ""
            desc = (
                f"prune ({args.method}, {ranking}, {args.sparsity:.0%}), {how}fine-tune "
                f"{args.finetune_steps} steps"
            )
            if args.stages > 1:
                desc = f"{args.stages} rounds of: {desc}"
            with _stage(progress, desc):
                try:
                    pruned, rounds = prune_iteratively(
                        model, args.method, args.sparsity, data, stages=args.stages,
                        steps=args.finetune_steps, config=cfg, seed=args.seed,
                        reconstruct=args.reconstruct, ranking=ranking, engine=args.engine,
                    )  # fmt: skip
                except ValueError as err:
                    raise CliError(str(err)) from None
            report = rounds[-1].pop("report")  # the last round's pass: the final mask
            for r in rounds[:-1]:
                r.pop("report")
        else:
            with _stage(progress, f"prune ({args.method}, {ranking}, {args.sparsity:.0%})"):
                try:
                    pruned, report = prune_onnx(
                        model, args.method, args.sparsity, config=cfg, ranking=ranking
                    )
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
        "layers": report,
        # per round: sparsity, validation accuracies (pruned / reconstructed / fine-tuned), the
        # stage kept, timings and the per-layer reconstruction record (flow.recover)
        "rounds": rounds,
    }
    atomic.write_text(
        out / "prune_report.json",
        json.dumps(summary, indent=2, sort_keys=True, default=_json_default),
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
    """``x_train`` and ``y_train`` (and ``x_test``, ``y_test``) from an .npz file."""
    path = _existing_file(path, "training data")
    keys = ("x_train", "y_train") + (("x_test", "y_test") if with_test else ())
    try:
        with np.load(path, allow_pickle=False) as data:
            return tuple(
                np.asarray(data[k], np.float32 if k.startswith("x") else np.int64) for k in keys
            )
    except (KeyError, ValueError, OSError) as err:
        raise CliError(f"{path}: expected an .npz with {', '.join(keys)} ({err})") from None


def cmd_optimize(args, console: Console) -> int:
    """``hapm optimize``: HW-Flow search of per-layer pruning ratios, then prune, fine-tune,
    compile, simulate and report."""
    from . import hwflow

    tgt, cfg = resolve_target(args.target, args.config)
    if args.max_accuracy_drop < 0:
        raise CliError("--max-accuracy-drop must be >= 0 (percentage points)")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    data = _load_training_data(args.data, with_test=True)
    with _progress(console) as progress:
        with _stage(progress, "load ONNX"):
            model = fix_batch(load_onnx(args.model), 1)
        with _stage(progress, f"search ({args.method}, {args.level}, {args.episodes} episodes)"):
            try:
                env = hwflow.HWFlowEnv(
                    model, data[:2], cfg, args.objective, args.max_accuracy_drop, args.level,
                    finetune_steps=args.search_finetune_steps, seed=args.seed,
                    reconstruct=args.reconstruct,
                    calibration_percentile=args.calibration_percentile,
                )  # fmt: skip
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
        with _stage(progress, f"compile for {cfg.name}"):
            import onnx

            onnx.save(res.model, str(out / "pruned.onnx"))
            # the calibration finalize's int8 test accuracy used: the executable written is the
            # model that accuracy was measured on
            calib = list(env.x_tune[: hwflow.INT8_EVAL_BATCH, None])
            qmod = quantize_module(
                import_onnx(res.model), calib, cfg, percentile=args.calibration_percentile
            )
            ex, programs, report = compile_model(qmod, tgt, cfg)
            write_artifacts(out, ex, programs, cfg, report=report, extra={"model": args.model})
    (out / "optimize_report.json").write_text(
        json.dumps(res.to_dict(), indent=2, sort_keys=True, default=_json_default)
    )
    plot = hwflow.pareto_plot([res], out / "pareto.png", args.objective)
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


def load_compiled(out: Path):
    """Load ``OUT/model.so`` into a Relax VM; returns ``(vm, report or None)``."""
    if not out.is_dir():
        raise CliError(f"compiled model directory not found: {out}")
    lib = _existing_file(out / MODEL_LIB, "compiled model")
    tvm = _tvm()
    try:
        loaded = tvm.runtime.load_module(str(lib))
        vm = tvm.relax.VirtualMachine(loaded, tvm.cpu())
    except Exception as err:
        raise CliError(f"cannot load {lib}: {_one_line(err)}") from None
    report = None
    if (out / REPORT_JSON).is_file():
        try:
            report = json.loads((out / REPORT_JSON).read_text())
        except json.JSONDecodeError as err:
            raise CliError(f"{out / REPORT_JSON} is not valid JSON: {err}") from None
    return vm, report


def _to_numpy(result) -> np.ndarray:
    if hasattr(result, "numpy"):
        return result.numpy()
    items = list(result)
    if len(items) != 1:
        raise CliError(f"the model returns {len(items)} outputs; hapm run supports one")
    return _to_numpy(items[0])


def run_batches(vm, inputs: list, advance=None) -> tuple[np.ndarray, list]:
    """Run ``vm["main"]`` on each input; returns the concatenated output and per-run stats."""
    from .runtime import last_run_stats

    tvm = _tvm()
    outs, runs = [], []
    for x in inputs:
        outs.append(_to_numpy(vm["main"](tvm.runtime.tensor(x))))
        runs.append(list(last_run_stats().layers))
        if advance is not None:
            advance()
    return np.concatenate(outs, axis=0), runs


def cmd_run(args, console: Console) -> int:
    """``hapm run``: run a compiled model on a .npy input and print the accelerator stats."""
    out = Path(args.model_dir)
    x = load_npy(args.input, "input")
    with _progress(console) as progress:
        with _stage(progress, "load model"):
            vm, report = load_compiled(out)
        if report is not None and "input" in report:
            spec = report["input"]
            inputs = batches(x, spec["shape"], spec["dtype"], f"input {args.input}")
        else:
            inputs = [x]
        with _stage(progress, "run", total=len(inputs)) as advance:
            try:
                y, runs = run_batches(vm, inputs, advance)
            except CliError:
                raise
            except Exception as err:
                raise CliError(f"running the model failed: {_one_line(err)}") from None
    console.print(f"output shape {tuple(y.shape)}, dtype {y.dtype}")
    if y.ndim == 2:
        top = y.argmax(axis=1)
        shown = " ".join(map(str, top[:32])) + (" ..." if len(top) > 32 else "")
        console.print(f"argmax: {shown}")
    title = "Accelerator statistics" + (f" ({len(runs)} runs)" if len(runs) > 1 else "")
    console.print(run_stats_table(_merge_by_layer(runs), title=title))
    dest = Path(args.output) if args.output else out / "output.npy"
    np.save(dest, y)
    console.print(f"saved the output to {dest}")
    return 0


PROFILE_JSON = "profile.json"
TRACE_JSON = "trace.json"


def cmd_profile(args, console: Console) -> int:
    """``hapm profile``: compile, run once with the timing model, write profile and trace."""
    from .runtime import driver
    from .runtime.report import build_profile, chrome_trace, profile_table

    tgt, cfg = resolve_target(args.target, args.config)
    if args.calibration_samples < 1:
        raise CliError("--calibration-samples must be at least 1")
    out = Path(args.output)
    rng = np.random.default_rng(args.seed)
    with _progress(console) as progress:
        with _stage(progress, "import ONNX"):
            model = fix_batch(load_onnx(args.model), args.batch)
            name, shape, dtype = model_input(model)
            dims = [int(d) for d in shape]

            def random(what):
                if np.dtype(dtype).kind != "f":
                    raise CliError(f"the model input is {dtype}; give {what} as a .npy file")
                return rng.standard_normal(dims).astype(dtype)

            if args.calibration:
                calib = batches(
                    load_npy(args.calibration, "calibration"),
                    shape,
                    dtype,
                    f"calibration data {args.calibration}",
                    limit=args.calibration_samples,
                )
            else:
                calib = [random("--calibration")]
            if args.input:
                x = batches(load_npy(args.input, "input"), shape, dtype, f"input {args.input}")[0]
            else:
                x = random("--input")
            mod = import_onnx(model)
        with _stage(progress, f"quantize ({len(calib)} batches)"):
            qmod = quantize_module(mod, calib, cfg)
        with _stage(progress, f"compile for {cfg.name}"):
            ex, programs, _ = compile_model(qmod, tgt, cfg)
        if not programs:
            raise CliError("no layer of this model runs on the accelerator: nothing to profile")
        with _stage(progress, "run with the timing model"):
            tvm = _tvm()
            vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
            t0 = time.perf_counter()
            with driver.profile():
                try:
                    _to_numpy(vm["main"](tvm.runtime.tensor(x)))
                except CliError:
                    raise
                except Exception as err:
                    raise CliError(f"running the model failed: {_one_line(err)}") from None
            seconds = time.perf_counter() - t0
            stats = driver.last_run_stats()
        with _stage(progress, "write profile and trace"):
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
            (out / PROFILE_JSON).write_text(
                json.dumps(profile, indent=2, default=_json_default) + "\n"
            )
            with (out / TRACE_JSON).open("w") as f:
                json.dump(trace, f, separators=(",", ":"), default=_json_default)
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


def cmd_disasm(args, console: Console) -> int:
    """``hapm disasm``: print programs (a .hapm file or every .hapm file of a directory)."""
    path = Path(args.path)
    if path.is_dir():
        files = sorted(path.glob("*.hapm")) or sorted((path / PROGRAM_DIR).glob("*.hapm"))
        if not files:
            raise CliError(f"no .hapm programs in {path}")
    else:
        files = [_existing_file(path, "program")]
    texts = [program_listing(read_program(f)) for f in files]
    console.print("\n".join(texts), markup=False, highlight=False, end="")
    return 0


def cmd_presets(args, console: Console) -> int:
    """``hapm presets``: the hardware presets as a table."""
    from .target.config import DEFAULT_PRESET, PRESETS

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


def cmd_demo(args, console: Console) -> int:
    """``hapm demo``: a trained network deployed int8 on the simulated accelerator, then HAPM vs
    standard and filter pruning at one sparsity.  Fashion-MNIST when it is installed (ResNet-20
    trained on it), else scikit-learn's digits (the bundled digits CNN and ResNet-20)."""
    from .data import DatasetNotFoundError, load_fashion_mnist

    if args.batch < 1 or args.images < 1:
        raise CliError("--batch and --images must be >= 1")
    dataset = None
    if args.dataset in ("auto", "fashion-mnist"):
        try:
            dataset = load_fashion_mnist()
        except DatasetNotFoundError as err:
            if args.dataset == "fashion-mnist":
                raise CliError(_one_line(err, 1000)) from None
            console.print(f"[yellow]{err}[/yellow]\nFalling back to scikit-learn's digits.\n")
    if dataset is None:
        _demo_digits(args, console)
    else:
        _demo_fashion(args, console, dataset)
    if args.pruning_steps is None or args.pruning_steps >= 0:
        _demo_pruning(args, console, dataset)
    return 0


def _demo_digits(args, console: Console) -> None:
    """Part one on digits: the bundled digits CNN, float vs int8 on hapm_fpga, 450 images."""
    from .data import load_bundled_model, load_digits

    batch = min(args.batch, 450)
    tvm = _tvm()
    tgt, cfg = resolve_target("hapm_fpga", None)
    with _progress(console) as progress:
        with _stage(progress, "import model and data"):
            x_train, _, x_test, y_test = load_digits(size=16, channels=1)
            mod = import_onnx(load_bundled_model(batch=batch))
            # The last batch is padded with repeated images whose outputs are dropped.
            test_batches = [
                _fill_batch(x_test[i : i + batch], batch) for i in range(0, len(x_test), batch)
            ]
        with _stage(progress, "quantize (32 samples)"):
            qmod = quantize_module(mod, [_fill_batch(x_train[:32], batch)], cfg)
        with _stage(progress, f"compile for {cfg.name} + llvm"):
            ex, programs, report = compile_model(qmod, tgt, cfg)
            float_ex = tvm.compile(mod, "llvm")
        _demo_export(args, progress, ex, programs, cfg, report, "bundled digits CNN", batch,
                     [1, 16, 16])  # fmt: skip
        with _stage(progress, "run float (llvm)", total=len(test_batches)) as advance:
            y_float, _ = run_batches(tvm.relax.VirtualMachine(float_ex, tvm.cpu()), test_batches,
                                     advance)  # fmt: skip
        with _stage(progress, "run int8 (hapm_fpga)", total=len(test_batches)) as advance:
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


def _demo_fashion(args, console: Console, data) -> None:
    """Part one on Fashion-MNIST: the bundled ResNet-20 quantized and compiled; ``--images``
    test images run on the bit-exact simulator and compared with the int8 reference, which
    then gives the accuracy on all 10,000 test images."""
    from . import flow
    from .data import fashion_resnet_info, load_fashion_resnet

    batch = args.batch
    tvm = _tvm()
    tgt, cfg = resolve_target("hapm_fpga", None)
    pct = fashion_resnet_info(20)["int8_calibration"]["percentile"]
    x_test, y_test = data.x_test, data.y_test
    n_sim = min(args.images, len(x_test))
    sim_batches = [_fill_batch(x_test[i : min(i + batch, n_sim)], batch)
                   for i in range(0, n_sim, batch)]  # fmt: skip
    engine = flow.resolve_engine()
    with _progress(console) as progress:
        with _stage(progress, "import ResNet-20"):
            model = load_fashion_resnet(20, batch=batch)
            mod = import_onnx(model)
        calib = [data.x_train[k : k + batch] for k in range(0, 256 - batch + 1, batch)]
        with _stage(progress, f"quantize ({len(calib) * batch} images)"):
            qmod = quantize_module(mod, calib, cfg, percentile=pct)
        with _stage(progress, f"compile for {cfg.name}"):
            ex, programs, report = compile_model(qmod, tgt, cfg)
        _demo_export(args, progress, ex, programs, cfg, report, "ResNet-20 / Fashion-MNIST",
                     batch, [1, 32, 32])  # fmt: skip
        with _stage(progress, f"simulate {n_sim} images", total=len(sim_batches)) as advance:
            y_sim, runs = run_batches(tvm.relax.VirtualMachine(ex, tvm.cpu()), sim_batches,
                                      advance)  # fmt: skip
        y_sim = y_sim[:n_sim]
        with _stage(progress, f"int8 reference ({engine})"):
            if engine == "torch":  # the same quantized module, all test images
                from .torch import QuantizedRunner

                y_ref = QuantizedRunner(qmod).predict(x_test)
            else:  # TVM's llvm build: the simulated images only (the whole set takes minutes)
                ref_ex = tvm.compile(qmod, "llvm")
                y_ref, _ = run_batches(tvm.relax.VirtualMachine(ref_ex, tvm.cpu()), sim_batches)
        with _stage(progress, "float32"):
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


def _demo_export(args, progress, ex, programs, cfg, report, name, batch, shape) -> None:
    if args.out:  # export before a VM loads the executable
        with _stage(progress, "export"):
            write_artifacts(
                Path(args.out), ex, programs, cfg, report=report,
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


def _demo_pruning(args, console: Console, data) -> None:
    """Part two: ResNet-20 dense vs unstructured, filter and HAPM pruning at the same weight
    sparsity, each recovered the same way (least-squares reconstruction, then fine-tuning with
    the masks held: PyTorch when installed, else TVM), deployed int8 on the simulated
    accelerator.  On Fashion-MNIST every model's int8 accuracy is measured on the 10,000 test
    images and the recovery chooses on the validation split."""
    from . import flow
    from .data import (
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
        name, val = "Fashion-MNIST", (data.x_val, data.y_val)
        x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
        base = load_fashion_resnet(20, batch=1)
        pct = fashion_resnet_info(20)["int8_calibration"]["percentile"]
        # a quarter of an epoch of PyTorch fine-tuning (batch 128) keeps the demo near 10 min
        per_epoch = len(x_train) // 128
        steps = per_epoch // 4 if args.pruning_steps is None else args.pruning_steps
        train_config = None
        if engine == "torch":
            from .torch import TrainConfig

            train_config = TrainConfig(lr=0.01, crop_padding=4, flip=True)
    x_cal = x_train[:256]
    rows, kept = {}, {}
    with _progress(console) as progress:
        with _stage(progress, "ResNet-20 dense: deploy"):
            rows["dense"] = flow.evaluate_deployed(base, "hapm_fpga", x_cal, x_test, y_test,
                                                   percentile=pct, engine=engine)  # fmt: skip
        for label, method, ranking in (("unstructured", "unstructured", "layer"),
                                       ("filter", "filter", "layer"),
                                       ("HAPM", "hapm", "per_mac")):  # fmt: skip
            desc = f"{label} {args.sparsity:.0%}: prune, recover ({steps} steps), deploy"
            with _stage(progress, desc):
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def program_rows(programs) -> list[dict]:
    """One placement row per program: layer, kind, instruction count and per-opcode counts."""
    return [
        {
            "layer": p.layer,
            "kind": p.info.get("kind", ""),
            "instructions": len(p.instructions),
            "by_opcode": _opcode_counts(p.instructions),
        }
        for p in programs
    ]


def _fill_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """Repeat the samples of ``x`` cyclically to fill a batch of ``batch``.

    Used for calibration (a max-abs calibration sees exactly the statistics of ``x``) and to pad
    the last test batch.
    """
    idx = np.arange(batch) % len(x)
    return np.ascontiguousarray(x[idx])


# ---------------------------------------------------------------------------------- parser
def _add_target_args(p: argparse.ArgumentParser) -> None:
    """``--target`` or ``--config``: the accelerator a subcommand compiles for."""
    grp = p.add_mutually_exclusive_group()
    grp.add_argument("--target", default=None, help="hapm_fpga target tag (default hapm_fpga)")
    grp.add_argument("--config", default=None, metavar="CONFIG.json", help="custom hardware")


def build_parser() -> argparse.ArgumentParser:
    """The ``hapm`` argument parser."""
    from .hwflow import METHODS as HWFLOW_METHODS

    parser = argparse.ArgumentParser(
        prog="hapm",
        description="Compile and run ONNX CNNs on the (simulated) hapm_fpga accelerator.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="quantize and compile an ONNX model for hapm_fpga")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--calibration", required=True, metavar="DATA.npy", help="calibration inputs")
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=16,
        metavar="K",
        help="use the first K samples of the calibration data (default 16)",
    )
    _add_target_args(p)
    p.add_argument(
        "--batch", type=int, default=1, help="batch size if the model's batch is symbolic"
    )
    p.add_argument("--tuning-db", default=None, metavar="DB.json", help="schedules from hapm tune")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("prune", help="prune an ONNX model (hapm, unstructured or filter)")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--method", default="hapm", help="hapm | unstructured | filter")
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument(
        "--ranking",
        default=None,
        help="where the sparsity goes: layer (every layer at --sparsity) | global | per_mac "
        "(HAPM: by importance per MAC saved; the default for hapm, layer for the others)",
    )
    _add_target_args(p)
    p.add_argument(
        "--data", default=None, metavar="DATA.npz", help="x_train/y_train to fine-tune on"
    )
    p.add_argument("--finetune-steps", type=int, default=20)
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
        type=int,
        default=1,
        help="iterative pruning: rounds of prune + recover (cubic schedule) up to --sparsity",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("optimize", help="HW-Flow: search per-layer pruning ratios on hardware")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument(
        "--data", required=True, metavar="DATA.npz", help="x_train, y_train, x_test, y_test"
    )
    _add_target_args(p)
    p.add_argument("--objective", choices=("latency", "energy"), default="latency")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, help="percentage points")
    p.add_argument("--level", choices=("coarse", "mid", "fine", "sim"), default="fine")
    p.add_argument("--method", choices=HWFLOW_METHODS, default="rl")
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--search-finetune-steps", type=int, default=0)
    p.add_argument("--finetune-steps", type=int, default=0, help="fine-tuning of the winner")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("tune", help="autotune the convolution schedules of an ONNX model")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument(
        "--calibration", default=None, metavar="DATA.npy", help="default: one random sample"
    )
    _add_target_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--trials", type=int, default=16, help="measurements per layer")
    p.add_argument("--strategy", choices=("guided", "random"), default="guided")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="local worker processes / RPC sessions")
    p.add_argument(
        "--rpc", default=None, metavar="HOST:PORT", help="measure through a TVM RPC tracker"
    )
    p.add_argument("--key", default="hapm_fpga", help="RPC device key")
    p.add_argument("-o", "--output", required=True, metavar="DB.json")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("run", help="run a compiled model on a .npy input")
    p.add_argument("model_dir", metavar="OUT", help="directory written by hapm compile")
    p.add_argument("--input", required=True, metavar="X.npy")
    p.add_argument("--output", default=None, metavar="Y.npy", help="default OUT/output.npy")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "profile", help="compile, run once with the timing model, write a profile and a trace"
    )
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument(
        "--calibration", default=None, metavar="DATA.npy", help="default: one random sample"
    )
    p.add_argument("--calibration-samples", type=int, default=16, metavar="K")
    _add_target_args(p)
    p.add_argument("--input", default=None, metavar="X.npy", help="default: a random input")
    p.add_argument(
        "--batch", type=int, default=1, help="batch size if the model's batch is symbolic"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random data (default 0)")
    p.add_argument(
        "--trace-limit",
        type=int,
        default=1_000_000,
        metavar="N",
        help="at most N instruction events in trace.json (0: no limit; default 1,000,000)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("disasm", help="disassemble .hapm programs")
    p.add_argument("path", metavar="FILE.hapm|DIR")
    p.set_defaults(func=cmd_disasm)

    p = sub.add_parser(
        "demo", help="a trained CNN int8 on the accelerator, then HAPM vs standard pruning"
    )
    p.add_argument("--out", default=None, metavar="DIR", help="also write the compiled model")
    p.add_argument(
        "--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto",
        help="auto: Fashion-MNIST when installed, else digits",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=25, help="batch size of the compiled model")
    p.add_argument("--images", type=int, default=500, help="Fashion-MNIST test images to simulate")
    p.add_argument("--sparsity", type=float, default=0.5, help="pruning part: weight sparsity")
    p.add_argument(
        "--pruning-steps", type=int, default=None,
        help="fine-tuning steps per pruned ResNet-20 (0: none; -1 skips the pruning part; "
        "default: a quarter epoch of batch 128 on Fashion-MNIST, 16 of batch 32 on digits)",
    )  # fmt: skip
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("presets", help="list the hardware presets")
    p.set_defaults(func=cmd_presets)
    return parser


def _one_line(err: BaseException, limit: int = 300) -> str:
    """The message of ``err`` on one line (lines joined), shortened to ``limit`` characters."""
    text = " ".join(ln.strip() for ln in str(err).splitlines() if ln.strip())
    text = text or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run the ``hapm`` command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 2 on a user error (usage, missing or malformed files,
        wrong data shapes, unknown targets).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0)
        return int(exc.code or 0)
    # Off a terminal rich assumes 80 columns; the tables read better a little wider.
    width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120
    console = Console(width=width)
    try:
        return int(args.func(args, console) or 0)
    except CliError as err:
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]hapm {args.command}: error:[/] {escape(str(err))}", highlight=False
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
