"""HAPM vs standard (unstructured magnitude) and filter pruning: ResNet-20 on digits-32.

Run: ``python benchmarks/hapm_vs_standard.py [--sparsities 0.3 0.5 0.7] [--max-steps 16]``.

For each weight sparsity and method the bundled model is pruned
(:func:`tvm_hapm.flow.prune_onnx`) and recovered the same way for every method
(:func:`tvm_hapm.flow.recover`): layer-wise least-squares reconstruction on 256 training images,
then fine-tuning inside TVM with the masks held fixed, keeping the better of the two on a
validation split of the training images.  Then it is quantized to int8 and compiled for
hapm_fpga.

HAPM prunes whole hardware groups and spreads the network-wide weight sparsity by importance per
multiply-accumulate saved (``ranking="per_mac"``, at most 87.5% of any layer): a weight of a
32x32 layer costs 16x the array time of one of an 8x8 layer.  ``hapm_layer`` is the same group
pruning with every layer at the target sparsity (the benchmark's HAPM before this ranking).

Filter pruning removes a fraction of *channels*; the benchmark picks the fraction whose weight
sparsity is nearest the target (reported as ``sparsity_filter``) and deploys the model with the
channels removed (:func:`tvm_hapm.flow.filter_deploy_pass`), after checking that the shrunk
float model computes what the masked one does.

Accuracy is the int8 model's top-1 on the 450 test images (computed with TVM's llvm build of the
quantized module, which the accelerator equals bit for bit: ``tests/test_onnx_e2e.py``); latency
and energy are one image on the simulated accelerator (timing model).  Everything runs side by
side in one process.  Writes ``benchmarks/results/hapm_vs_standard.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from tvm_hapm.data import load_bundled_resnet20, load_digits, set_batch
from tvm_hapm.flow import (
    evaluate_deployed,
    filter_deploy_pass,
    filter_fraction,
    prune_onnx,
    recover,
    sparsity_of,
)
from tvm_hapm.target.config import get_config

RESULTS = Path(__file__).resolve().parent / "results" / "hapm_vs_standard.json"
# label -> (pruning method, ranking): HAPM allocates the network-wide sparsity by importance per
# MAC saved (flow.prune_onnx ranking="per_mac"); "hapm_layer" is the same group pruning with
# every layer at the target, shown for comparison
METHODS = {
    "standard": ("unstructured", "layer"),
    "filter": ("filter", "layer"),
    "hapm": ("hapm", "per_mac"),
    "hapm_layer": ("hapm", "layer"),
}


def check_shrink(model, fraction, cfg, x) -> float:
    """Largest difference between the masked and the channel-removed float model."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    masked = from_onnx(set_batch(model, len(x)))
    outs = []
    for mod in (masked, filter_deploy_pass(fraction, cfg)(masked)):
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    diff = float(np.abs(outs[0] - outs[1]).max())
    if diff > 1e-3:
        raise AssertionError(f"the shrunk filter-pruned model differs from the masked one: {diff}")
    return diff


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument(
        "--max-steps", type=int, default=24, help="cap on fine-tuning steps (batch 32)"
    )
    parser.add_argument("--target", default="hapm_fpga")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--calibration", type=int, default=256, help="images to reconstruct on")
    args = parser.parse_args(argv)
    console = Console()
    cfg = get_config(args.target)
    x_train, y_train, x_test, y_test = load_digits(size=32, channels=3)
    base = load_bundled_resnet20(batch=1)
    d = evaluate_deployed(base, args.target, x_train, x_test, y_test)
    dense = (d.accuracy, d.latency_ms, d.energy_uj, d.gemms)
    console.print(f"dense: acc {dense[0]:.2f}%  latency {dense[1]:.3f} ms  {dense[2]:.1f} uJ")
    results = {}
    for s in args.sparsities:
        row = {
            "acc_dense": dense[0],
            "lat_dense": dense[1],
            "energy_dense": dense[2],
            "gemm_dense": dense[3],
        }
        for label, (method, ranking) in METHODS.items():
            t0 = time.perf_counter()
            ratio, transform = s, None
            if method == "filter":
                ratio, _ = filter_fraction(base, s, cfg)
                transform = filter_deploy_pass(ratio, cfg)
                row["filter_channel_fraction"] = ratio
            pruned, _ = prune_onnx(base, method, ratio, config=cfg, ranking=ranking)
            tuned, info = recover(
                pruned,
                base,
                (x_train, y_train),
                steps=args.max_steps,
                lr=args.lr,
                calibration=args.calibration,
            )
            if method == "filter":
                row["filter_shrink_max_diff"] = check_shrink(tuned, ratio, cfg, x_test[:8])
            r = evaluate_deployed(
                set_batch(tuned, 1), args.target, x_train, x_test, y_test, transform=transform
            )
            acc, lat, energy, gemms = r.accuracy, r.latency_ms, r.energy_uj, r.gemms
            row.update(
                {
                    f"acc_{label}": acc,
                    f"lat_{label}": lat,
                    f"energy_{label}": energy,
                    f"gemm_{label}": gemms,
                    f"sparsity_{label}": sparsity_of(tuned),
                    f"reconstruction_error_{label}": float(
                        np.mean([e["rel_error_after"] for e in info["reconstruction"]] or [0.0])
                    ),
                    f"finetune_images_per_s_{label}": info.get("finetune_images_per_s"),
                    f"val_{label}": {
                        k: info.get(k) for k in ("val_pruned", "val_reconstructed", "val_finetuned")
                    },
                    f"kept_{label}": info["kept"],
                    f"seconds_{label}": time.perf_counter() - t0,
                }
            )
            console.print(f"{s:.0%} {label}: acc {acc:.2f}%  latency {lat:.3f} ms")
        row["hapm_vs_standard_speedup"] = row["lat_standard"] / row["lat_hapm"]
        row["hapm_vs_dense_speedup"] = row["lat_dense"] / row["lat_hapm"]
        row["hapm_vs_filter_speedup"] = row["lat_filter"] / row["lat_hapm"]
        row["hapm_layer_vs_dense_speedup"] = row["lat_dense"] / row["lat_hapm_layer"]
        results[f"{s:g}"] = row
    table = Table(title=f"ResNet-20 / digits-32 on {cfg.name}: int8 accuracy after fine-tuning")
    for col in ("sparsity", "method", "top-1 %", "latency ms", "energy µJ", "GEMMs", "vs dense"):
        table.add_column(col, justify="right")
    for s, row in results.items():
        for label in ("dense", *METHODS):
            table.add_row(
                s,
                label,
                f"{row[f'acc_{label}']:.2f}",
                f"{row[f'lat_{label}']:.3f}",
                f"{row[f'energy_{label}']:.1f}",
                f"{row[f'gemm_{label}']:,}",
                f"{row['lat_dense'] / row[f'lat_{label}']:.2f}x",
            )
    console.print(table)
    payload = dict(results)
    payload["meta"] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.name,
        "max_steps": args.max_steps,
        "lr": args.lr,
        "accuracy": "int8 top-1 on the 450 digits test images (%)",
        "latency": "one image on the simulated accelerator (ms)",
        "calibration_images": args.calibration,
        "recovery": "tvm_hapm.flow.recover: least-squares reconstruction, then fine-tuning "
        "(Adam, batch 32); the better of the two on a 200-image validation split of the "
        "training data is kept (kept_<method>)",
        "filter": "sparsity = nearest weight sparsity reachable by removing channels",
        "rankings": {label: ranking for label, (_, ranking) in METHODS.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return results


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
