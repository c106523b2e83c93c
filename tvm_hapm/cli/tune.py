"""``hapm tune``: autotuning the convolution schedules of an ONNX model into a tuning database
(applied by ``hapm compile --tuning-db``)."""

from __future__ import annotations

import argparse

import numpy as np
from rich.console import Console
from rich.table import Table

from .errors import CliError
from .io import (
    add_target_args,
    batches,
    fix_batch,
    import_onnx,
    load_npy,
    load_onnx,
    model_input,
    non_negative_int,
    positive_int,
    quantize_module,
    resolve_target,
)
from .ui import progress_display, stage


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hapm tune``."""
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument(
        "--calibration", default=None, metavar="DATA.npy", help="default: one random sample"
    )
    add_target_args(p)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--trials", type=positive_int, default=16, help="measurements per layer")
    p.add_argument("--strategy", choices=("guided", "random"), default="guided")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--workers", type=positive_int, default=1, help="local worker processes / RPC sessions"
    )
    p.add_argument(
        "--rpc", default=None, metavar="HOST:PORT", help="measure through a TVM RPC tracker"
    )
    p.add_argument("--key", default="hapm_fpga", help="RPC device key")
    p.add_argument("-o", "--output", required=True, metavar="DB.json")


def cmd_tune(args, console: Console) -> int:
    """``hapm tune``: search the schedule of every convolution, write a tuning database."""
    from ..cost.measure import LocalRunner, RPCRunner
    from ..cost.tune import TuningDatabase, model_guided_search, random_search
    from ..passes.tasks import extract_tasks

    tgt, cfg = resolve_target(args.target, args.config)
    if args.rpc:
        host, _, port = args.rpc.rpartition(":")
        if not host or not port.isdigit():
            raise CliError(f"--rpc wants HOST:PORT of an RPC tracker, got {args.rpc!r}")
        runner = RPCRunner(host, int(port), key=args.key, num_parallel=args.workers)
    else:
        runner = LocalRunner(args.workers)
    search = model_guided_search if args.strategy == "guided" else random_search
    db = TuningDatabase(args.output)
    with progress_display(console) as progress:
        with stage(progress, "import ONNX"):
            model = fix_batch(load_onnx(args.model), args.batch)
            _, shape, dtype = model_input(model)
            calib = (
                batches(load_npy(args.calibration, "calibration"), shape, dtype, "calibration")
                if args.calibration
                else [np.random.default_rng(0).uniform(0, 1, shape).astype(dtype)]
            )
            mod = import_onnx(model)
        with stage(progress, "quantize"):
            qmod = quantize_module(mod, calib[:4], cfg)
        tasks = extract_tasks(qmod, cfg)
        rows = []
        with stage(progress, f"tune {len(tasks)} layers ({args.strategy})", total=len(tasks)):
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
