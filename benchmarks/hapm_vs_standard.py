"""HAPM vs standard (unstructured magnitude) pruning on the bundled ResNet-20 / digits-32.

Run: ``python benchmarks/hapm_vs_standard.py [--sparsities 0.3 0.5 0.7] [--epochs 1]``.

For each sparsity and method the bundled model is pruned (:func:`tvm_hapm.flow.prune_onnx`),
fine-tuned inside TVM with the masks held fixed (:func:`tvm_hapm.train.finetune`), quantized to
int8 and compiled for hapm_fpga.  Accuracy is the int8 model's top-1 on the 450 test images
(computed with TVM's llvm build of the quantized module, which the accelerator equals bit for
bit: ``tests/test_onnx_e2e.py``); latency and energy are one image on the simulated accelerator
(timing model).  Everything runs side by side in one process.  Writes
``benchmarks/results/hapm_vs_standard.json``.
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
from tvm_hapm.flow import evaluate_deployed, prune_onnx, sparsity_of
from tvm_hapm.target.config import get_config
from tvm_hapm.train import extract_masks, finetune

RESULTS = Path(__file__).resolve().parent / "results" / "hapm_vs_standard.json"
METHODS = {"standard": "unstructured", "hapm": "hapm"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per model")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="cap on fine-tuning steps (batch 32)"
    )
    parser.add_argument("--target", default="hapm_fpga")
    parser.add_argument("--lr", type=float, default=1e-3)
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
            "acc_filter": None,  # FilterPrune shrinks tensors: no ONNX round trip yet
            "lat_filter": None,
            "energy_filter": None,
        }
        for label, method in METHODS.items():
            t0 = time.perf_counter()
            pruned, _ = prune_onnx(base, method, s, config=cfg)
            tuned, history = finetune(
                set_batch(pruned, 32),
                (x_train, y_train),
                masks=extract_masks(pruned),
                epochs=args.epochs,
                batch_size=32,
                lr=args.lr,
                seed=0,
                max_steps=args.max_steps,
            )
            r = evaluate_deployed(set_batch(tuned, 1), args.target, x_train, x_test, y_test)
            acc, lat, energy, gemms = r.accuracy, r.latency_ms, r.energy_uj, r.gemms
            row.update(
                {
                    f"acc_{label}": acc,
                    f"lat_{label}": lat,
                    f"energy_{label}": energy,
                    f"gemm_{label}": gemms,
                    f"sparsity_{label}": sparsity_of(tuned),
                    f"finetune_images_per_s_{label}": history["images_per_s"],
                    f"seconds_{label}": time.perf_counter() - t0,
                }
            )
            console.print(f"{s:.0%} {label}: acc {acc:.2f}%  latency {lat:.3f} ms")
        row["hapm_vs_standard_speedup"] = row["lat_standard"] / row["lat_hapm"]
        row["hapm_vs_dense_speedup"] = row["lat_dense"] / row["lat_hapm"]
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
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "lr": args.lr,
        "accuracy": "int8 top-1 on the 450 digits test images (%)",
        "latency": "one image on the simulated accelerator (ms)",
        "filter": "not measured: FilterPrune output cannot be written back to ONNX yet",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return results


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
