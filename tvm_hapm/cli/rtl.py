"""``hapm rtlsim``: run a compiled model's accelerator layers on the RTL (Verilator) and compare
each with the Python simulator, byte for byte, and with the timing model, cycle for cycle."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .. import atomic
from .errors import CliError, one_line
from .io import import_tvm, json_default, load_compiled, load_npy, model_batches
from .ui import progress_display, stage

RTLSIM_JSON = "rtlsim.json"


def add_rtlsim_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hapm rtlsim``."""
    p.add_argument("model_dir", metavar="OUT", help="directory written by hapm compile")
    p.add_argument("--input", required=True, metavar="X.npy", help="the first batch is used")
    p.add_argument("--report", default=None, metavar="FILE.json", help=f"default OUT/{RTLSIM_JSON}")


def _table(results: list) -> Table:
    table = Table(title="RTL co-simulation (RTL vs Python simulator and timing model)")
    for col in ("layer", "instructions", "bit-exact", "RTL cycles", "model cycles", "model err"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in results:
        table.add_row(
            r.layer,
            f"{r.instructions:,}",
            "yes" if r.bit_exact else "[bold red]NO[/]",
            f"{r.rtl_cycles:,}",
            f"{r.model_cycles:,}",
            f"{r.cycle_rel_diff:+.1%}",
        )
    return table


def cmd_rtlsim(args, console: Console) -> int:
    """``hapm rtlsim``: co-simulate every accelerator layer of one run of a compiled model."""
    from ..rtl import RtlError, RtlToolError, cosimulate_model, summarize

    out = Path(args.model_dir)
    x = load_npy(args.input, "input")
    with progress_display(console) as progress:
        with stage(progress, "load model"):
            vm, report = load_compiled(out)
        x = model_batches(report, x, f"input {args.input}")[0]
        tvm = import_tvm()
        t0 = time.perf_counter()
        with stage(progress, "co-simulate the layers", total=None) as advance:
            try:
                results = cosimulate_model(
                    lambda: vm["main"](tvm.runtime.tensor(x)),
                    progress=lambda done, total: advance(1),
                )
            except (RtlToolError, RtlError) as err:
                raise CliError(str(err)) from None
            except Exception as err:
                raise CliError(f"running the model failed: {one_line(err)}") from None
        seconds = time.perf_counter() - t0
    if not results:
        raise CliError("no layer of this model runs on the accelerator: nothing to co-simulate")
    result = summarize(results)
    result["seconds"] = round(seconds, 2)
    dest = Path(args.report) if args.report else out / RTLSIM_JSON
    atomic.write_text(dest, json.dumps(result, indent=2, default=json_default) + "\n")
    console.print(_table(results))
    verdict = "bit-exact" if result["bit_exact"] else "[bold red]MISMATCH[/]"
    console.print(
        f"{len(results)} layers {verdict}; network cycles: RTL {result['network_rtl_cycles']:,}, "
        f"timing model {result['network_model_cycles']:,} "
        f"({result['network_cycle_rel_diff']:+.2%}); {seconds:.1f} s; wrote {dest}"
    )
    return 0 if result["bit_exact"] else 1
