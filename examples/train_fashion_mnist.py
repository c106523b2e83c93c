"""Train a CIFAR-style ResNet on Fashion-MNIST with PyTorch and ship it as ONNX.

The network is :func:`tvm_hapm.torch.resnet_cifar` (``depth`` 20 or 56, one input channel,
width 16), whose ONNX export has exactly the layers of
:func:`tvm_hapm.models.zoo.resnet_cifar`: conv-BN-ReLU stem, three stages of basic blocks with
strided 1x1 projection shortcuts, global average pooling, a linear classifier.  Inputs are the
28x28 images zero-padded to 32x32, in [0, 1] (:func:`tvm_hapm.data.load_fashion_mnist`).

Training (:func:`tvm_hapm.torch.fit`): 55,000 training images (the 5,000 of the fixed validation
split are never trained on), SGD with Nesterov momentum 0.9, batch 128, peak learning rate 0.1
after one warm-up epoch, cosine decay to zero, weight decay 5e-4 on conv and linear weights,
random crops (4-pixel zero padding) and horizontal flips.  Nothing is selected on the test
set: the schedule is fixed in advance, the validation accuracy is recorded after every epoch and
the test images are evaluated once, on the final weights.

The script writes ``resnet<depth>_fashion.onnx`` (batch 1) and a JSON record beside it: epochs,
seed, seconds, images/s, validation history, float test accuracy, and the int8 test accuracy of
the model quantized for hapm_fpga (calibrated on training images; computed with the quantized
module's bit-exact PyTorch execution, checked against TVM's llvm build on the first test
images).  Training resumes from ``--work-dir`` after an interruption.

Usage::

    python examples/train_fashion_mnist.py --depth 20 [--epochs 30] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tvm_hapm import atomic  # noqa: E402  (after the sys.path entry)
from tvm_hapm.data import load_fashion_mnist  # noqa: E402
from tvm_hapm.torch import TrainConfig, accuracy, export_onnx, fit, resnet_cifar  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "tvm_hapm" / "data")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/hapm_train"))
    ap.add_argument("--calibration", type=int, default=512, help="training images to calibrate on")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_fashion_mnist()
    model = resnet_cifar(args.depth, in_ch=1, seed=args.seed)
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.1, weight_decay=5e-4,
                      warmup_epochs=1.0, crop_padding=4, flip=True, seed=args.seed)  # fmt: skip
    name = f"resnet{args.depth}_fashion"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = args.work_dir / f"{name}_e{args.epochs:g}_s{args.seed}.pt"

    def log(rec):
        if rec.get("epoch_done"):
            print(
                f"epoch {rec['epoch']}: loss {rec['loss']:.4f} train {rec['train_accuracy']:.4f} "
                f"val {rec['val_accuracy']:.4f} {rec['images_per_s']:.0f} img/s",
                flush=True,
            )

    t0 = time.perf_counter()
    history = fit(model, (data.x_train, data.y_train), cfg, val_data=(data.x_val, data.y_val),
                  progress=log, checkpoint=ckpt)  # fmt: skip
    onnx_model = export_onnx(model, (1, 1, 32, 32))
    onnx_model.graph.name = name
    record = {
        "model": f"{name}.onnx",
        "architecture": {
            "builder": "tvm_hapm.torch.resnet_cifar (layers of tvm_hapm.models.zoo.resnet_cifar)",
            "depth": args.depth,
            "width": 16,
            "in_ch": 1,
            "num_classes": 10,
            "input_hw": [32, 32],
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "data": "tvm_hapm.data.load_fashion_mnist(size=32): 55,000 training images, the 5,000 of "
        "the seeded validation split held out, 10,000 test images",
        "train": history["config"],
        "epochs": history["epochs"],
        "seed": args.seed,
        "train_seconds": history["seconds"],
        "images_per_s": history["images_per_s"],
        "threads": history["threads"],
        "val_accuracy": accuracy(model, data.x_val, data.y_val),
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "test_images": len(data.y_test),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "command": "python examples/train_fashion_mnist.py " + " ".join(argv or sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    record["tvm_max_abs_logit_diff"] = tvm_check(onnx_model, model, data.x_test[:100])
    print(f"{name}: float val {record['val_accuracy']:.4f} test {record['test_accuracy']:.4f}")
    record.update(int8_record(onnx_model, data, args.calibration))
    # training resumes from its checkpoint: this is the time of this invocation only
    record["seconds_this_run"] = round(time.perf_counter() - t0, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(args.out_dir / f"{name}.onnx", onnx_model.SerializeToString())
    atomic.write_text(args.out_dir / f"{name}.json", json.dumps(record, indent=2) + "\n")
    return record


def int8_record(model, data, calibration: int) -> dict:
    """int8 accuracy of ``model`` quantized for hapm_fpga: the activation calibration (maximum
    or a percentile of |x| over ``calibration`` training images) is chosen on the validation
    split, then the test images are evaluated once, with the first batch checked bit for bit
    against TVM's llvm build."""
    from tvm_hapm.flow import int8_accuracy

    x_cal = data.x_train[:calibration]
    val = {}
    for pct in (None, 99.9, 99.99):
        val[str(pct)] = int8_accuracy(model, x_cal, data.x_val, data.y_val, percentile=pct).accuracy
    best = max(val, key=lambda k: (val[k], k == "None"))  # ties: the maximum (no percentile)
    pct = None if best == "None" else float(best)
    test = int8_accuracy(model, x_cal, data.x_test, data.y_test, percentile=pct, check=True)
    return {
        "int8_val_accuracy_by_percentile": val,
        "int8_calibration": {"images": calibration, "percentile": pct, "chosen_on": "validation"},
        "int8_val_accuracy": val[best],
        "int8_test_accuracy": test.accuracy,
        "int8_engine": test.engine,
        "int8_checked_against_llvm": test.checked,
    }


def tvm_check(model, module, x) -> float:
    """Largest logit difference between TVM's llvm build of the exported ONNX and the module."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from tvm_hapm.data import set_batch

    ex = tvm.compile(from_onnx(set_batch(model, len(x))), target="llvm")
    ours = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    with torch.no_grad():
        ref = module.eval()(torch.from_numpy(x)).numpy()
    return float(np.abs(ours - ref).max())


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
