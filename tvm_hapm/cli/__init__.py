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
``hapm rtlsim OUT/ --input X.npy``
    Run every accelerator layer of one run of a compiled model on the RTL of the accelerator
    (Verilator) and compare it with the Python simulator byte for byte and with the timing
    model cycle for cycle; writes ``OUT/rtlsim.json``; exit status 1 on a mismatch.
``hapm disasm FILE.hapm|DIR``
    Print the header and the numbered instructions of accelerator programs.
``hapm prune MODEL.onnx --method hapm|unstructured|filter --sparsity S [--data DATA.npz] -o OUT/``
    Prune (HAPM hardware groups with the ``layer``, ``global`` or ``per_mac`` ranking, or the
    baselines) and, with ``--data``, recover (least-squares reconstruction, then fine-tuning in
    PyTorch when installed, else TVM); writes ``OUT/pruned.onnx`` and ``OUT/prune_report.json``.
``hapm optimize MODEL.onnx --data DATA.npz -o OUT/``
    HW-Flow: search per-layer HAPM ratios under an accuracy budget with the hardware judged at
    the coarse, mid, fine or simulator level; writes the pruned model, the executable, a report
    and a Pareto plot.
``hapm tune MODEL.onnx --calibration DATA.npy -o DB.json``
    Autotune the layer schedules (locally or over a TVM RPC tracker); ``hapm compile
    --tuning-db DB.json`` uses the records.
``hapm demo [--out DIR] [--dataset auto|fashion-mnist|digits]``
    The bundled ResNet-20 trained on Fashion-MNIST (when installed; else the digits CNN)
    quantized, compiled and run on the simulated accelerator and checked against the int8
    reference, then dense vs unstructured, filter and HAPM pruning at one sparsity, each
    recovered and deployed.
``hapm presets``
    List the hardware presets.

User errors (missing or malformed files, data of the wrong shape, unknown targets) print one
line on standard error and exit with status 2; no traceback is shown.

Modules
-------
This module wires the parser (:data:`SUBCOMMANDS`) and runs a command (:func:`main`).  The
commands live in ``deploy`` (compile, run, profile, disasm, presets), ``prune`` (prune,
optimize), ``tune``, ``rtl`` (rtlsim) and ``demo``; they share ``io`` (reading inputs,
resolving targets, quantizing, compiling, writing artifacts), ``ui`` (progress display, tables)
and ``errors``
(:class:`CliError`).  Command modules import the shared modules, never each other.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings

from rich.console import Console
from rich.markup import escape

from . import demo, deploy, prune, rtl, tune
from .errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, CliError

__all__ = ["CliError", "main", "run"]

#: The subcommands in the order ``hapm --help`` lists them: name, one-line help, the function
#: that adds the command's arguments to its parser, and the command, ``(args, console) -> int``.
SUBCOMMANDS = (
    ("compile", "quantize and compile an ONNX model for hapm_fpga",
     deploy.add_compile_arguments, deploy.cmd_compile),
    ("prune", "prune an ONNX model (hapm, unstructured or filter)",
     prune.add_prune_arguments, prune.cmd_prune),
    ("optimize", "HW-Flow: search per-layer pruning ratios on hardware",
     prune.add_optimize_arguments, prune.cmd_optimize),
    ("tune", "autotune the convolution schedules of an ONNX model",
     tune.add_tune_arguments, tune.cmd_tune),
    ("run", "run a compiled model on a .npy input",
     deploy.add_run_arguments, deploy.cmd_run),
    ("profile", "compile, run once with the timing model, write a profile and a trace",
     deploy.add_profile_arguments, deploy.cmd_profile),
    ("rtlsim", "co-simulate a compiled model's layers on the accelerator's RTL",
     rtl.add_rtlsim_arguments, rtl.cmd_rtlsim),
    ("disasm", "disassemble .hapm programs",
     deploy.add_disasm_arguments, deploy.cmd_disasm),
    ("demo", "a trained CNN int8 on the accelerator, then HAPM vs standard pruning",
     demo.add_demo_arguments, demo.cmd_demo),
    ("presets", "list the hardware presets",
     deploy.add_presets_arguments, deploy.cmd_presets),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``hapm`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="hapm",
        description="Compile and run ONNX CNNs on the (simulated) hapm_fpga accelerator.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, command in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(func=command)
    return parser


@contextlib.contextmanager
def _interrupt_flag():
    """A list that becomes non-empty on SIGINT, which still raises KeyboardInterrupt; the
    previous handler is restored on exit (``main`` also runs in-process)."""
    flag: list = []
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        flag.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


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
    errors = Console(stderr=True, soft_wrap=True)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        errors.print(f"[bold yellow]hapm {args.command}: warning:[/] {escape(str(message))}",
                     highlight=False)  # fmt: skip

    with _interrupt_flag() as interrupted:
        try:
            with warnings.catch_warnings():
                # The project's warnings (a skipped tuning record, a layer left on the host, a
                # degenerate calibration) are part of the command's output.
                warnings.showwarning = show_warning
                return int(args.func(args, console) or 0)
        except CliError as err:
            if not interrupted:
                errors.print(f"[bold red]hapm {args.command}: error:[/] {escape(str(err))}",
                             highlight=False)  # fmt: skip
                return EXIT_USER_ERROR
        except KeyboardInterrupt:
            pass
        except Exception:
            if not interrupted:
                raise
        # Ctrl-C: a KeyboardInterrupt raised inside a TVM callback reaches us as another
        # exception (TVM's FFI converts it), hence the flag.
        errors.print("interrupted")
        return EXIT_INTERRUPTED


def run(argv: list[str] | None = None) -> None:
    """The ``hapm`` console script: :func:`main`, then the process exits with its status.

    Once the command is over its outputs are complete, so a Ctrl-C during the interpreter's
    teardown (the exit handlers of TVM and PyTorch, which TVM's FFI imports when it is
    installed) is ignored rather than printed as a traceback from an exit handler.
    """
    try:
        status = main(argv)
    except KeyboardInterrupt:  # in the instant between the command's end and the next line
        Console(stderr=True).print("interrupted")
        status = EXIT_INTERRUPTED
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)
