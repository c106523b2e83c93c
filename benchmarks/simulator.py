"""Timing model cross-check with SCALE-Sim, roofline of ResNet-18, and simulator speed.

Run from the repository root::

    python benchmarks/simulator.py                  # everything, results/simulator.json
    python benchmarks/simulator.py --skip-speed     # only the SCALE-Sim cross-check and roofline
    python benchmarks/simulator.py --array 8        # cross-check on one 8x8 array

Three measurements, in one process:

1. **SCALE-Sim cross-check.**  For every dense (groups = 1) convolution of ResNet-18 (224x224)
   and CIFAR ResNet-20, the layer runs on one weight-stationary array of ``R x C`` (default
   16 x 16) in both simulators.  Ours: the layer's program from ``tir.conv2d_program`` on a
   single-array config with large buffers, replayed on the timing model; the figure is the
   array's busy cycles (the sum of its GEMM cycles).  SCALE-Sim: the ``scalesim`` package's
   weight-stationary compute model (``scalesim.compute.systolic_compute_ws``) on the operand
   matrices of its ``operand_matrix``; the figure is the length of its stall-free demand
   schedule, which is the compute-cycle count SCALE-Sim reports when its SRAMs hold the layer
   (the memory simulation only adds stalls).  SCALE-Sim is run twice per layer: on the layer as
   is, and with the input channels zero-padded to a multiple of ``R`` (our mapping: one weight
   block holds ``R`` channels of one kernel position).  ``docs/timing.md`` explains the
   differences.
2. **Roofline** of the dense ResNet-18 convolutions on the default preset with the default
   schedules: the sum of the roofline bounds over the sum of the cycles, per layer and in total.
3. **Speed**: wall time of one VM run of int8 ResNet-18 on hapm_fpga (functional simulation plus
   timing model, host operators included) over one VM run of TVM's llvm build of the float model,
   measured alternately in the same process after a warm-up run of each (median of ``--reps``).
   The first (cold) hapm_fpga run, which also decodes and validates the programs, is reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results" / "simulator.json"

_SCALESIM_CFG = """[general]
run_name = hapm

[architecture_presets]
ArrayHeight: {R}
ArrayWidth: {C}
IfmapSramSzkB: 1048576
FilterSramSzkB: 1048576
OfmapSramSzkB: 1048576
IfmapOffset: 0
FilterOffset: 100000000
OfmapOffset: 200000000
Dataflow: ws
Bandwidth: 10
ReadRequestBuffer: 32
WriteRequestBuffer: 32

[layout]
IfmapCustomLayout: False
IfmapSRAMBankBandwidth: 10
IfmapSRAMBankNum: 1
IfmapSRAMBankPort: 1
FilterCustomLayout: False
FilterSRAMBankBandwidth: 10
FilterSRAMBankNum: 1
FilterSRAMBankPort: 1

[sparsity]
SparsitySupport: false
SparseRep: ellpack_block
OptimizedMapping: false
BlockSize: 8
RandomNumberGeneratorSeed: 40

[run_presets]
InterfaceBandwidth: CALC
UseRamulatorTrace: False
"""


# ---------------------------------------------------------------------------------- layers
def conv_layers(model) -> list[dict]:
    """Dense convolutions of an ONNX model: name, input (C, H, W), weight shape, stride, pads."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("group", 1) != 1:
            continue
        w = inits[node.input[1]]
        _, cin, h, wd = shapes[node.input[0]]
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        out.append(
            {
                "name": node.name or node.output[0],
                "cin": int(cin),
                "h": int(h),
                "w": int(wd),
                "cout": int(w.shape[0]),
                "kh": int(w.shape[2]),
                "kw": int(w.shape[3]),
                "stride": int(attrs.get("strides", [1, 1])[0]),
                "pads": (int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3])),
            }
        )
    return out


def unique_layers(layers: list[dict]) -> list[dict]:
    """Distinct layer shapes, with the number of times each occurs."""
    seen: dict = {}
    for lay in layers:
        key = (lay["cin"], lay["h"], lay["w"], lay["cout"], lay["kh"], lay["kw"], lay["stride"],
               lay["pads"])  # fmt: skip
        if key in seen:
            seen[key]["count"] += 1
        else:
            seen[key] = {**lay, "count": 1}
    return list(seen.values())


# ---------------------------------------------------------------------------------- ours
def single_array_config(R: int, C: int):
    from tvm_hapm.target.config import HardwareConfig

    # Large buffers (the ISA's address fields allow a few MB): no tiling forced by capacity.
    return HardwareConfig(
        name=f"single-{R}x{C}",
        num_arrays=1,
        array_rows=R,
        array_cols=C,
        inp_buffer_bytes=min(4 << 20, (1 << 18) * R),
        wgt_buffer_bytes=min(16 << 20, (1 << 16) * R * C),
        acc_buffer_bytes=min(16 << 20, (1 << 18) * C * 4),
        dram_bytes_per_cycle=64,
    )


def our_gemm_cycles(cfg, lay: dict, seed: int = 0) -> dict:
    """Array busy cycles of the layer's program on the timing model, and its GEMM count."""
    from tvm_hapm.runtime.timing import TimingModel
    from tvm_hapm.target.isa import Opcode
    from tvm_hapm.target.tir import conv2d_program

    rng = np.random.default_rng(seed)
    w = rng.integers(1, 8, (lay["cout"], lay["cin"], lay["kh"], lay["kw"])).astype(np.int8)
    prog, _ = conv2d_program(
        cfg, "conv", (1, lay["cin"], lay["h"], lay["w"]), w, None,
        np.full(lay["cout"], 1 << 10), 20, (-128, 127),
        strides=(lay["stride"], lay["stride"]), padding=lay["pads"],
    )  # fmt: skip
    res = TimingModel(cfg).run(prog.instructions)
    gemms = [i for i in prog.instructions if i.opcode == Opcode.GEMM]
    vectors = sum(g.outer * g.inner for g in gemms)
    return {
        "cycles": int(res.array_busy.sum()),
        "gemms": len(gemms),
        "vectors": vectors,
        "total_cycles": int(res.cycles),
    }


# ---------------------------------------------------------------------------------- SCALE-Sim
def scalesim_cycles(lay: dict, R: int, C: int, cin: int | None = None) -> dict:
    """SCALE-Sim weight-stationary compute cycles of the layer (stall-free demand schedule)."""
    from scalesim.compute.operand_matrix import operand_matrix
    from scalesim.compute.systolic_compute_ws import systolic_compute_ws
    from scalesim.layout_utils import layouts
    from scalesim.scale_config import scale_config
    from scalesim.topology_utils import topologies

    cin = lay["cin"] if cin is None else cin
    pt, pl, pb, pr = lay["pads"]
    s, kh, kw = lay["stride"], lay["kh"], lay["kw"]
    # SCALE-Sim convolutions have no padding and its output size rounds differently: give it the
    # padded input rows and columns the output pixels actually read, (out - 1) * stride + k.
    oh = (lay["h"] + pt + pb - kh) // s + 1
    ow = (lay["w"] + pl + pr - kw) // s + 1
    H, W = (oh - 1) * s + kh, (ow - 1) * s + kw
    row = ["L", H, W, lay["kh"], lay["kw"], cin, lay["cout"], lay["stride"]]
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, topo_path, lay_path = (os.path.join(tmp, n) for n in ("s.cfg", "t.csv", "l.csv"))
        Path(cfg_path).write_text(_SCALESIM_CFG.format(R=R, C=C))
        Path(topo_path).write_text(
            "Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, "
            "Num Filter, Strides,\n" + ",".join(map(str, row)) + ",\n"
        )
        Path(lay_path).write_text(
            "Layer," + ",".join(f"c{i}" for i in range(1, 22)) + ",\nL," + "1," * 21 + "\n"
        )
        config = scale_config()
        config.read_conf_file(cfg_path)
        topo = topologies()
        topo.load_arrays(topofile=topo_path)
        lays = layouts()
        lays.load_arrays(layoutfile=lay_path)
    op = operand_matrix()
    op.set_params(config_obj=config, topoutil_obj=topo, layoututil_obj=lays, layer_id=0)
    _, ifmap = op.get_ifmap_matrix()
    _, filt = op.get_filter_matrix()
    _, ofmap = op.get_ofmap_matrix()
    ws = systolic_compute_ws()
    ws.set_params(
        config_obj=config, ifmap_op_mat=ifmap, filter_op_mat=filt, ofmap_op_mat=ofmap,
        ifmap_op_mat_original=op.ifmap_addr_matrix_original,
        sparsity_filter_array=op.sparse_filter_array,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        _, _, ofmap_demand = ws.get_demand_matrices()
    return {
        "cycles": int(ofmap_demand.shape[0]),
        "folds": int(ws.row_fold_demand_matrices * ws.col_fold),
        "T": int(ws.T),
    }


def cross_check(R: int, C: int, console: Console) -> dict:
    from tvm_hapm.models import resnet18_imagenet, resnet_cifar

    cfg = single_array_config(R, C)
    nets = {
        "resnet18": resnet18_imagenet(input_hw=(224, 224)),
        "resnet20": resnet_cifar(depth=20),
    }
    rows = []
    for net, model in nets.items():
        for lay in unique_layers(conv_layers(model)):
            ours = our_gemm_cycles(cfg, lay)
            raw = scalesim_cycles(lay, R, C)
            padded_cin = -(-lay["cin"] // R) * R
            padded = raw if padded_cin == lay["cin"] else scalesim_cycles(lay, R, C, padded_cin)
            rows.append(
                {
                    "net": net,
                    "layer": f"{lay['kh']}x{lay['kw']}/{lay['stride']} {lay['cin']}->"
                    f"{lay['cout']} @{lay['h']}x{lay['w']}",
                    "count": lay["count"],
                    "ours_cycles": ours["cycles"],
                    "ours_gemms": ours["gemms"],
                    "ours_vectors": ours["vectors"],
                    "scalesim_cycles": padded["cycles"],
                    "scalesim_folds": padded["folds"],
                    "scalesim_T": padded["T"],
                    "rel_diff": ours["cycles"] / padded["cycles"] - 1,
                    "scalesim_cycles_unpadded": raw["cycles"],
                    "rel_diff_unpadded": ours["cycles"] / raw["cycles"] - 1,
                }
            )
            r = rows[-1]
            console.log(
                f"{net} {r['layer']}: ours {ours['cycles']:,}, SCALE-Sim {padded['cycles']:,} "
                f"({r['rel_diff']:+.1%})"
            )
    return {
        "array": f"{R}x{C}",
        "layers": rows,
        "max_abs_rel_diff": max(abs(r["rel_diff"]) for r in rows),
        "max_abs_rel_diff_unpadded": max(abs(r["rel_diff_unpadded"]) for r in rows),
    }


# ---------------------------------------------------------------------------------- roofline
def resnet18_roofline(console: Console) -> dict:
    """Per-layer roofline fraction of the dense ResNet-18 convolutions on the default preset."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    import tvm_hapm
    from tvm_hapm.models import resnet18_imagenet
    from tvm_hapm.runtime.report import build_profile

    model = resnet18_imagenet(input_hw=(224, 224))
    mod = from_onnx(model)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32")
    qmod = tvm_hapm.quantize(mod, calibration=[x])
    ex = tvm.compile(qmod, target="hapm_fpga")
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    with tvm_hapm.runtime.profile():
        vm["main"](tvm.runtime.tensor(x))
    prof = build_profile(tvm_hapm.runtime.last_run_stats())
    convs = [r for r in prof["layers"] if r.get("kind", "").startswith("conv")]
    bound = sum(r["roofline_cycles"] for r in convs)
    cycles = sum(r["cycles"] for r in convs)
    keep = ("layer", "kind", "cycles", "roofline_cycles", "roofline_fraction", "bound",
            "utilisation", "stalls_by_wait")  # fmt: skip
    return {
        "config": prof["config"]["name"],
        "conv_layers": [{k: r.get(k) for k in keep} for r in convs],
        "conv_roofline_fraction": bound / cycles if cycles else 0.0,
        "network_roofline_fraction": prof["total"]["roofline_fraction"],
        "network_cycles": prof["total"]["cycles"],
        "network_latency_ms": prof["total"]["latency_ms"],
        "network_energy_uj": prof["total"]["energy_uj"],
        "_vm": vm,
        "_x": x,
        "_mod": mod,
    }


# ---------------------------------------------------------------------------------- speed
def speed(roof: dict, reps: int, console: Console) -> dict:
    import tvm

    from tvm_hapm.runtime import driver

    x = tvm.runtime.tensor(roof["_x"])
    vm = roof["_vm"]
    fvm = tvm.relax.VirtualMachine(tvm.compile(roof["_mod"], target="llvm"), tvm.cpu())
    # A cold hapm run: fresh simulators (programs decoded and validated again).
    driver.clear_program_cache()
    t0 = time.perf_counter()
    vm["main"](x)
    cold = time.perf_counter() - t0
    fvm["main"](x)  # warm-up
    sim, llvm = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        vm["main"](x)
        sim.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fvm["main"](x)
        llvm.append(time.perf_counter() - t0)
    s, f = statistics.median(sim), statistics.median(llvm)
    return {
        "sim_seconds": s,
        "llvm_seconds": f,
        "sim_cold_seconds": cold,
        "sim_times": sim,
        "llvm_times": llvm,
        "ratio": s / f,
        "cold_ratio": cold / f,
    }


# ---------------------------------------------------------------------------------- main
def machine() -> dict:
    import tvm

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "tvm": tvm.__version__,
        "numpy": np.__version__,
        "load_average": list(os.getloadavg()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--array", type=int, default=16, help="R = C of the single array")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    console = Console(width=140)
    info = machine()
    check = cross_check(args.array, args.array, console)
    table = Table(title=f"Compute cycles on one {check['array']} weight-stationary array")
    for col in ("net", "layer", "n", "ours", "GEMMs", "SCALE-Sim", "folds", "diff",
                "SCALE-Sim (Cin as is)", "diff"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("net", "layer") else "right")
    for r in check["layers"]:
        table.add_row(
            r["net"], r["layer"], str(r["count"]), f"{r['ours_cycles']:,}",
            f"{r['ours_gemms']:,}", f"{r['scalesim_cycles']:,}", f"{r['scalesim_folds']:,}",
            f"{r['rel_diff']:+.1%}", f"{r['scalesim_cycles_unpadded']:,}",
            f"{r['rel_diff_unpadded']:+.1%}",
        )  # fmt: skip
    console.print(table)

    roof = resnet18_roofline(console)
    table = Table(title=f"ResNet-18 dense convolutions on {roof['config']}: roofline")
    for col in ("layer", "cycles", "bound cycles", "fraction", "bound", "util"):
        table.add_column(col, justify="left" if col in ("layer", "bound") else "right")
    for r in roof["conv_layers"]:
        table.add_row(
            r["layer"],
            f"{r['cycles']:,}",
            f"{r['roofline_cycles']:,.0f}",
            f"{r['roofline_fraction']:.0%}",
            r["bound"],
            f"{r['utilisation']:.0%}",
        )
    console.print(table)
    console.print(f"aggregate roofline fraction of the dense convolutions: "
                  f"{roof['conv_roofline_fraction']:.1%} (whole network "
                  f"{roof['network_roofline_fraction']:.1%})")  # fmt: skip

    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "scalesim_max_layer_rel_diff": check["max_abs_rel_diff"],
        "resnet18_roofline_fraction": roof["conv_roofline_fraction"],
        "sim_vs_llvm_time_ratio": None,
        "scalesim": check,
        "roofline": {k: v for k, v in roof.items() if not k.startswith("_")},
    }
    if not args.skip_speed:
        sp = speed(roof, args.reps, console)
        result["sim_vs_llvm_time_ratio"] = sp["ratio"]
        result["speed"] = sp
        console.print(
            f"int8 ResNet-18 on the simulator {sp['sim_seconds']:.2f} s (cold "
            f"{sp['sim_cold_seconds']:.2f} s), float ResNet-18 on llvm {sp['llvm_seconds']:.2f} s:"
            f" ratio {sp['ratio']:.2f} (cold {sp['cold_ratio']:.2f})"
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
