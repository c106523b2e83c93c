"""The accelerator's RTL against the Python simulator and the timing model, network by network.

Run from the repository root (needs Verilator; Yosys for ``--resources``)::

    python benchmarks/rtl.py                 # results/rtl.json
    python benchmarks/rtl.py --quick         # the digits CNN and ResNet-20 only
    python benchmarks/rtl.py --skip-synthesis   # every network, the recorded resources kept
    python benchmarks/rtl.py --resources-only   # only the presets' synthesis

Every accelerator layer of one inference is run on the RTL (Verilator) and on the Python
simulator with the same DRAM contents (``tvm_hapm.rtl.cosimulate_model``): the DRAM slots must
agree byte for byte, and the RTL's cycle count is compared with the timing model's, per layer
and for the network (its layers run one after the other).  Networks, all on ``zedboard``:

* the bundled digits CNN, on a scikit-learn digits test image;
* the bundled ResNet-20 trained on Fashion-MNIST, dense and with HAPM pruning at 50% (the
  structure the bypass and the pruned schedules see; accuracy is not the point here), on a
  Fashion-MNIST test image;
* ResNet-18 at 224x224 (random weights and input), every layer (about 10 M cycles; with
  ``--quick`` left out).

Reported per network: ``bit_exact``, ``max_layer_cycle_rel_diff``, ``network_cycle_rel_diff``
(``(model - rtl) / rtl``), the RTL's simulation speed (cycles per second of the Verilator run)
and the seconds of the whole co-simulation.  Targets (issue 16): bit-exact everywhere, layers
within 3%, networks within 1%.

``resources`` (not with ``--quick``): every preset's whole RTL synthesised with Yosys for its
part (``tvm_hapm.rtl.synth``; the accumulator is banked by array, three two-port copies per bank,
so Yosys maps it to block RAM or UltraRAM like the other buffers): LUT, FF, DSP, BRAM36 and
URAM against the part's budget, and ``fits``.  See ``docs/resources.md``.  The same counts go to
the energy model's table, ``tvm_hapm/data/rtl_resources.json`` (``tvm_hapm.rtl.resources``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import tvm
from common import RESULTS as RESULTS_DIR
from common import machine_info, read_json, write_json
from rich.console import Console
from rich.table import Table
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

import tvm_hapm
from tvm_hapm.rtl import RtlSimulator, cosimulate_model, summarize
from tvm_hapm.target.config import get_config

RESULTS = RESULTS_DIR / "rtl.json"
PRESET = "zedboard"


def _cosim(model, x, cfg, rtl) -> dict:
    """Compile ``model`` (float ONNX) int8 for ``cfg`` (calibrated on ``x``) and co-simulate
    one inference on ``x``, every accelerator layer."""
    qmod = tvm_hapm.quantize(from_onnx(model), calibration=[x], config=cfg)
    ex = tvm.compile(qmod, target=f"hapm_fpga-{cfg.name}")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    t0 = time.perf_counter()
    results = cosimulate_model(lambda: vm["main"](tvm.runtime.tensor(x)), rtl=rtl)
    return {**summarize(results), "cosim_seconds": round(time.perf_counter() - t0, 2)}


def _entry(cfg, res) -> dict:
    """The record of one preset: ``res`` (its whole RTL) against its part's budget, and the
    rest without the accumulator (``res`` less the block RAM or UltraRAM, flip-flops and LUTs
    :func:`~tvm_hapm.rtl.synth.buffer_costs` gives the RTL's accumulator structure; what
    ``tvm_hapm.rtl.resources.estimate_resources`` fits other configs to)."""
    from tvm_hapm.rtl.synth import RTL_ACCUMULATOR, buffer_costs, part_budget, prefers_uram

    budget = part_budget(cfg.part)
    acc = next(c for c in buffer_costs(cfg) if c.buffer == "acc" and c.scheme == RTL_ACCUMULATOR)
    on_uram = prefers_uram(acc, res.family)
    return {
        "part": cfg.part,
        "lut": res.lut_total,
        "ff": res.ff,
        "dsp": res.dsp,
        "bram36": res.bram36,
        "uram": res.uram,
        "fits": res.fits(budget),
        "over": res.over_budget(budget),
        "family": res.family,
        "accumulator": RTL_ACCUMULATOR,
        "without_accumulator": {
            "lut": max(0, res.lut_total - acc.lut), "ff": max(0, res.ff - acc.ff),
            "dsp": res.dsp, "bram36": res.bram36 - (0 if on_uram else acc.bram36),
            "uram": res.uram - (acc.uram if on_uram else 0),
        },
        "budget": {"lut": budget.lut, "ff": budget.ff, "dsp": budget.dsp,
                   "bram36": budget.bram36, "uram": budget.uram},
        "yosys_seconds": round(res.seconds, 1),
    }  # fmt: skip


def _resources(console) -> dict:
    """Yosys resources of every preset against its part (see the module docstring)."""
    from tvm_hapm.rtl.synth import part_budget, synthesize
    from tvm_hapm.target.config import PRESETS

    out = {}
    for name, cfg in PRESETS.items():
        with console.status(f"{name}: Yosys synth_xilinx for {cfg.part}"):
            res = synthesize(cfg, timeout=3600)
        out[name] = _entry(cfg, res)
        console.print(res.summary(part_budget(cfg.part)))
    return out


def _record_resources(console, payload: dict) -> None:
    """Synthesise the presets into ``payload["resources"]`` and write ``payload`` and the
    energy model's resource table (``tvm_hapm/data/rtl_resources.json``)."""
    from tvm_hapm.rtl.resources import table_from_rtl_record, write_resource_table
    from tvm_hapm.target.config import PRESETS

    payload["resources"] = _resources(console)
    payload["resources_meta"] = machine_info()
    write_json(RESULTS, payload)
    console.print(f"wrote {RESULTS}")
    path = write_resource_table(table_from_rtl_record(payload, PRESETS))
    console.print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the digits CNN and ResNet-20 only")
    ap.add_argument(
        "--resources-only", action="store_true",
        help="only the synthesis of the presets: update the resources of results/rtl.json",
    )  # fmt: skip
    ap.add_argument(
        "--skip-synthesis", action="store_true",
        help="every network, but keep the resources results/rtl.json records",
    )  # fmt: skip
    args = ap.parse_args(argv)
    console = Console()
    if args.resources_only:
        payload = read_json(RESULTS)
        _record_resources(console, payload)
        return 0 if all(r["fits"] for r in payload["resources"].values()) else 1
    cfg = get_config(PRESET)
    rtl = {cfg.name: RtlSimulator(cfg)}
    with console.status("building the RTL (Verilator)"):
        t0 = time.perf_counter()
        rtl[cfg.name].executable  # noqa: B018  (build, or find the cached build)
        build_seconds = time.perf_counter() - t0

    from tvm_hapm.compress.flow import prune_onnx
    from tvm_hapm.data import (
        load_bundled_model,
        load_digits,
        load_fashion_mnist,
        load_fashion_resnet,
    )

    networks = {}
    digits = load_digits(size=16, channels=1)
    fashion = load_fashion_mnist()
    x_fashion = fashion[4][:1].astype(np.float32)  # the first test image
    resnet20 = load_fashion_resnet(20, 1)
    cases = [
        ("digits_cnn", lambda: (load_bundled_model(1), digits[2][:1].astype(np.float32))),
        ("resnet20_fashion_dense", lambda: (resnet20, x_fashion)),
        (
            "resnet20_fashion_hapm50",
            lambda: (prune_onnx(resnet20, "hapm", 0.5, config=cfg)[0], x_fashion),
        ),
    ]
    if not args.quick:
        from tvm_hapm.models import resnet18_imagenet

        x18 = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        cases.append(
            ("resnet18", lambda: (resnet18_imagenet(input_hw=(224, 224)), x18))
        )  # fmt: skip
    for name, make in cases:
        with console.status(f"{name}: compile and co-simulate"):
            model, x = make()
            networks[name] = _cosim(model, x, cfg, rtl)
        r = networks[name]
        console.print(
            f"{name}: {len(r['layers'])} layers, bit-exact {r['bit_exact']}, max layer "
            f"{r['max_layer_cycle_rel_diff']:.3%}, network {r['network_cycle_rel_diff']:+.3%}, "
            f"RTL {r['rtl_cycles_per_second']:,} cycles/s, {r['cosim_seconds']} s"
        )
    table = Table(title=f"RTL vs simulator and timing model ({PRESET})")
    for col in ("network", "layers", "bit-exact", "RTL cycles", "max layer err", "network err"):
        table.add_column(col, justify="left" if col == "network" else "right")
    for name, r in networks.items():
        table.add_row(
            name, str(len(r["layers"])), str(r["bit_exact"]), f"{r['network_rtl_cycles']:,}",
            f"{r['max_layer_cycle_rel_diff']:.3%}", f"{r['network_cycle_rel_diff']:+.3%}",
        )  # fmt: skip
    console.print(table)
    payload = {
        "meta": {**machine_info(), "preset": PRESET, "rtl_build_seconds": round(build_seconds, 1)},
        "bit_exact": all(r["bit_exact"] for r in networks.values()),
        "max_layer_cycle_rel_diff": max(r["max_layer_cycle_rel_diff"] for r in networks.values()),
        "network_cycle_rel_diff": max(abs(r["network_cycle_rel_diff"]) for r in networks.values()),
        "networks": networks,
    }
    if args.quick or args.skip_synthesis:
        if args.skip_synthesis and RESULTS.exists():
            old = read_json(RESULTS)
            for key in ("resources", "resources_meta"):
                if key in old:
                    payload[key] = old[key]
        write_json(RESULTS, payload)
        console.print(f"wrote {RESULTS}")
    else:
        _record_resources(console, payload)
    return 0 if payload["bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
