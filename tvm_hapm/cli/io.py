"""Inputs and outputs of the ``hapm`` commands: ONNX and ``.npy`` loading and checks, batches,
target resolution, the quantize and compile wrappers, the artifacts of a compile (model library,
programs, report) and running a compiled model.

Every failure a user can cause raises :class:`~tvm_hapm.cli.errors.CliError`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from .. import atomic
from .errors import CliError, one_line

#: The Relax executable in a directory written by ``hapm compile``.
MODEL_LIB = "model.so"
#: The compile report (config, placement, host operators) in that directory.
REPORT_JSON = "report.json"
#: The subdirectory of the accelerator programs (``<layer>.hapm`` and ``<layer>.s``).
PROGRAM_DIR = "programs"


# ---------------------------------------------------------------------------------- arguments
def positive_int(text: str) -> int:
    """``type=`` of an integer option that must be at least 1 (a usage error otherwise)."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """``type=`` of an integer option that must be at least 0 (a usage error otherwise)."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is not >= {low}")
    return value


# ---------------------------------------------------------------------------------- loading
def existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`; a missing file or a directory raises
    :class:`CliError` (``what`` names the file in the message)."""
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

    p = existing_file(path, "ONNX model")
    try:
        model = onnx.load(str(p))
        onnx.checker.check_model(model)
    except Exception as err:
        raise CliError(f"{p} is not a valid ONNX model: {one_line(err)}") from None
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
    from ..data import set_batch

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
        raise CliError(f"cannot import the ONNX model into TVM: {one_line(err)}") from None


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
    p = existing_file(path, f"{what} file")
    with p.open("rb") as f:
        magic = f.read(6)
    if magic[:2] == b"PK":
        raise CliError(f"{p} holds several arrays (.npz); give a single-array .npy file")
    if magic != b"\x93NUMPY":
        raise CliError(f"{p} is not a .npy file (no NumPy header); save arrays with numpy.save")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as err:
        raise CliError(f"{p} is not a valid .npy file: {one_line(err)}") from None
    if arr.dtype.kind not in "biuf":
        raise CliError(f"{p}: expected a numeric array, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise CliError(
                f"{p}: {int(arr.size - finite.sum())} NaN or infinite value(s) in the {what} "
                f"(the first at index {first}); a quantized model cannot represent them"
            )
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


def model_batches(report: dict, x: np.ndarray, what: str) -> list:
    """``x`` as batches of the input a compiled model's report records (one array when the
    report has no input record)."""
    if "input" not in report:
        return [x]
    spec = report["input"]
    return batches(x, spec["shape"], spec["dtype"], what)


def calibration_batches(args, shape: list, dtype: str) -> list:
    """The ``--calibration`` file of a command as batches of the model's input shape, at most
    ``--calibration-samples`` of them."""
    return batches(
        load_npy(args.calibration, "calibration"), shape, dtype,
        f"calibration data {args.calibration}", limit=args.calibration_samples,
    )  # fmt: skip


# ---------------------------------------------------------------------------------- compiling
def import_tvm():
    """The ``tvm`` module, with this plugin's registrations (passes, runtime, target) loaded."""
    import tvm

    from .. import passes, runtime, target  # noqa: F401  (registrations)

    return tvm


def resolve_target(target: str | None, config: str | None):
    """The TVM target and hardware config of ``--target`` / ``--config``.

    Returns
    -------
    (tvm.target.Target, HardwareConfig)
    """
    from ..target.config import HardwareConfig, HardwareConfigError, get_config, is_hapm_target
    from ..target.tag import hapm_target

    try:
        if config is not None:
            cfg = HardwareConfig.from_json(existing_file(config, "hardware config"))
            return hapm_target(cfg), cfg
        name = target or "hapm_fpga"
        if not is_hapm_target(name):
            raise CliError(f"unknown target {name!r}; known: {', '.join(known_targets())}")
        tgt = import_tvm().target.Target(name)
        return tgt, get_config(tgt)
    except HardwareConfigError as err:
        raise CliError(str(err)) from None


def known_targets() -> list[str]:
    """The hapm_fpga target tags: ``hapm_fpga`` and ``hapm_fpga-<config>``."""
    from ..target.config import list_configs

    return ["hapm_fpga"] + [f"hapm_fpga-{n}" for n in list_configs()]


def add_target_args(p: argparse.ArgumentParser) -> None:
    """``--target`` or ``--config``: the accelerator a subcommand compiles for."""
    grp = p.add_mutually_exclusive_group()
    grp.add_argument("--target", default=None, help="hapm_fpga target tag (default hapm_fpga)")
    grp.add_argument("--config", default=None, metavar="CONFIG.json", help="custom hardware")


def quantize_module(mod, calibration: list, config, percentile=None):
    """:func:`tvm_hapm.quantize` for ``config``; models it cannot handle raise :class:`CliError`."""
    from ..passes.quantize import QuantizeError, quantize

    try:
        return quantize(mod, calibration, config, percentile=percentile)
    except QuantizeError as err:
        raise CliError(f"cannot quantize the model: {one_line(err)}") from None


def compile_model(qmod, target, config) -> tuple:
    """Compile a quantized module for a hapm_fpga target, collecting the accelerator programs.

    Returns
    -------
    (executable, programs, report)
        The Relax executable, the generated :class:`~tvm_hapm.target.program.Program` objects
        and a copy of :func:`tvm_hapm.passes.last_compile_report`.
    """
    from ..passes import hapm_pipeline, last_compile_report
    from ..passes.lower import LoweringError

    programs: list = []
    try:
        ex = import_tvm().compile(
            qmod, target=target, relax_pipeline=hapm_pipeline(config, programs)
        )
    except LoweringError as err:
        raise CliError(f"cannot compile for {config.name}: {one_line(err)}") from None
    return ex, programs, dict(last_compile_report())


# ---------------------------------------------------------------------------------- artifacts
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


def _opcode_counts(instructions) -> dict:
    counts: dict = {}
    for insn in instructions:
        counts[insn.opcode.name] = counts.get(insn.opcode.name, 0) + 1
    return counts


@contextlib.contextmanager
def output_dir(out: Path, marker: str = REPORT_JSON):
    """A fresh folder to write a command's outputs into, which replaces ``out`` only once the
    block completes (:func:`tvm_hapm.atomic.replaced_dir`): an interrupted or failed command
    leaves the previous output as it was, and a new output leaves no stale file of the old one.
    A file at ``out``, or a non-empty folder without ``marker`` (not a previous output), is a
    :class:`CliError`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = atomic.replaced_dir(out, marker)
    try:
        tmp = staged.__enter__()
    except (NotADirectoryError, FileExistsError) as err:
        raise CliError(f"-o {out}: {err}") from None
    with contextlib.ExitStack() as stack:
        stack.push(staged)
        yield tmp


def write_artifacts(out: Path, ex, programs, config, *, report: dict, extra: dict) -> dict:
    """Write ``model.so``, the programs and ``report.json`` into ``out`` (a folder from
    :func:`output_dir`); returns the report."""
    import tvm

    out.mkdir(parents=True, exist_ok=True)
    try:
        ex.export_library(str(out / MODEL_LIB))
    except Exception as err:
        raise CliError(f"cannot export {out / MODEL_LIB}: {one_line(err)}") from None
    layers = write_programs(programs, out / PROGRAM_DIR)
    full = {
        **extra,
        "config": config.to_dict(),
        "accelerator": layers,
        "host": dict(report.get("host", {})),
        "tvm_version": tvm.__version__,
        "sha256": {
            str(p.relative_to(out)): file_sha256(p)
            for p in sorted([out / MODEL_LIB, *(out / PROGRAM_DIR).iterdir()])
        },
    }
    (out / REPORT_JSON).write_text(json.dumps(full, indent=2, default=json_default) + "\n")
    return full


def json_default(obj):
    """``default`` of :func:`json.dumps` for reports: NumPy scalars as numbers, others as text."""
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


# ---------------------------------------------------------------------------------- programs
def program_listing(prog, comment: str = "") -> str:
    """The header (layer, config, slots) and the numbered instructions of a program."""
    from ..target import isa

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
    from ..target.isa import IsaError
    from ..target.program import Program, ProgramError

    try:
        return Program.from_bytes(path.read_bytes())
    except (ProgramError, IsaError, ValueError) as err:
        raise CliError(f"{path} is not a valid hapm_fpga program: {one_line(err)}") from None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- running
def load_compiled(out: Path):
    """Load ``OUT/model.so`` into a Relax VM; returns ``(vm, report)``.

    The library is checked against the SHA-256 that ``report.json`` records for it before it is
    loaded: a truncated or altered ``model.so`` is a :class:`CliError`, not a crash of the
    dynamic loader or a different result.
    """
    if not out.is_dir():
        raise CliError(f"compiled model directory not found: {out}")
    lib = existing_file(out / MODEL_LIB, "compiled model")
    report_path = existing_file(out / REPORT_JSON, "compile report")
    try:
        report = json.loads(report_path.read_text())
        recorded = report["sha256"][MODEL_LIB]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CliError(f"{report_path} is not valid JSON: {err}") from None
    except (KeyError, TypeError):
        raise CliError(
            f"{report_path} records no SHA-256 of {MODEL_LIB}: not written by this version of "
            f"hapm compile; compile the model again"
        ) from None
    if file_sha256(lib) != recorded:
        raise CliError(
            f"{lib} does not match the SHA-256 in {report_path}: the file is corrupt or was "
            f"changed after compiling; compile the model again"
        )
    tvm = import_tvm()
    try:
        loaded = tvm.runtime.load_module(str(lib))
        vm = tvm.relax.VirtualMachine(loaded, tvm.cpu())
    except Exception as err:
        raise CliError(f"cannot load {lib}: {one_line(err)}") from None
    return vm, report


def to_numpy(result) -> np.ndarray:
    """The single output of a VM call as a NumPy array; several outputs raise :class:`CliError`."""
    if hasattr(result, "numpy"):
        return result.numpy()
    items = list(result)
    if len(items) != 1:
        raise CliError(f"the model returns {len(items)} outputs; hapm run supports one")
    return to_numpy(items[0])


def run_batches(vm, inputs: list, advance=None) -> tuple[np.ndarray, list]:
    """Run ``vm["main"]`` on each input; returns the concatenated output and per-run stats."""
    from ..runtime import last_run_stats

    tvm = import_tvm()
    outs, runs = [], []
    for x in inputs:
        outs.append(to_numpy(vm["main"](tvm.runtime.tensor(x))))
        runs.append(list(last_run_stats().layers))
        if advance is not None:
            advance()
    return np.concatenate(outs, axis=0), runs
