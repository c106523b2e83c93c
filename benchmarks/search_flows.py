"""How long the flows that compile many small layers take: HW-Flow's ``sim`` level and the cost
model's samples (issue 14 asks both to gain with the compiler).

Run from the repository root::

    python benchmarks/search_flows.py              # ~1 minute on 2 cores
    python benchmarks/search_flows.py --reps 3 --samples 240

* ``sim_level_seconds``: the cost table of HW-Flow's ``sim`` level for the bundled digits
  ResNet-20 on zedboard, 10 grid ratios (``HWFlowEnv(..., EnvOptions(level="sim"))
  .table_seconds``: quantize each uniformly pruned model and time its accelerator programs,
  :func:`tvm_hapm.compress.flow.time_programs`), with the table's total cycles as a check;
* ``samples_seconds``: ``--samples`` samples of the cost model's stream 0 measured in this
  process (:func:`tvm_hapm.cost.dataset.measure_spec`: compile one random layer through TIR and
  time it), after one untimed sample; wall and CPU seconds (the CPU time moves less on a
  shared machine).

Each repetition starts cold, as a new process would: the code generator's kept lowered
functions and the quantizer's kept calibration builds are forgotten first.  The median of
``--reps`` repetitions is reported beside every measurement.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import RESULTS as RESULTS_DIR
from common import machine_info, write_json
from rich.console import Console

from tvm_hapm.cost.dataset import measure_spec, sample_spec
from tvm_hapm.data import load_bundled_resnet20, load_digits
from tvm_hapm.hwflow import EnvOptions, HWFlowEnv
from tvm_hapm.passes.quantize.calibrate import clear_calibration_builds
from tvm_hapm.target import tir

OUT = RESULTS_DIR / "search_flows.json"


def cold() -> None:
    """Forget what a previous repetition left for reuse (the lowered functions are looked up,
    so that the script also runs at commits from before they were kept)."""
    clear_calibration_builds()
    clear_lowered = getattr(tir, "clear_lowered_cache", None)
    if clear_lowered is not None:
        clear_lowered()


def sim_level() -> tuple[float, int]:
    """Seconds of the ``sim`` cost table and its total cycles."""
    x, y, _, _ = load_digits(size=32, channels=3)
    env = HWFlowEnv(load_bundled_resnet20(), (x, y), "zedboard", EnvOptions(level="sim"))
    return env.table_seconds, int(env.tables["sim"][:, :, 0].sum())


def samples(n: int) -> tuple[float, float, int]:
    """Wall and CPU seconds of ``n`` samples of stream 0, and their total cycles."""
    specs = [sample_spec(0, i) for i in range(n + 1)]
    measure_spec(specs[0])  # lazy imports and the first intrinsics, untimed
    t0, c0 = time.perf_counter(), time.process_time()
    records = [measure_spec(s) for s in specs[1:]]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, sum(r["result"]["cycles"] for r in records if "result" in r)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--samples", type=int, default=120)
    ap.add_argument("--output", type=Path, default=OUT)
    args = ap.parse_args(argv)
    console = Console()
    machine = machine_info()
    sim, sample_wall, sample_cpu = [], [], []
    cycles = {}
    for rep in range(args.reps):
        cold()
        seconds, cycles["sim_level_table_cycles"] = sim_level()
        sim.append(seconds)
        cold()
        wall, cpu, cycles["samples_cycles"] = samples(args.samples)
        sample_wall.append(wall)
        sample_cpu.append(cpu)
        console.print(
            f"rep {rep + 1}: sim level {seconds:.2f} s; {args.samples} samples {wall:.2f} s wall, "
            f"{cpu:.2f} s CPU"
        )
    result = {
        "machine": machine,
        "samples": args.samples,
        "sim_level_seconds": statistics.median(sim),
        "sim_level_times": sim,
        "samples_seconds": statistics.median(sample_wall),
        "samples_cpu_seconds": statistics.median(sample_cpu),
        "samples_times": sample_wall,
        "samples_cpu_times": sample_cpu,
        "ms_per_sample_cpu": 1000 * statistics.median(sample_cpu) / args.samples,
        **cycles,
    }
    write_json(args.output, result)
    console.print(f"written {args.output}")
    return result


if __name__ == "__main__":
    main()
