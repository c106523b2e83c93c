"""Train the bundled CIFAR-style ResNet-20 on 32x32 digits in pure NumPy and export it to ONNX.

The network is exactly :func:`tvm_hapm.models.zoo.resnet_cifar` (``depth=20``, ``in_ch=3``,
``width=16``, 32x32 input): a 3x3 conv-BN-ReLU stem, three stages of three basic blocks
(16, 32, 64 channels; strided 3x3 conv and 1x1 conv-BN projection shortcut at the start of
stages 2 and 3), global average pooling, flatten and a fully connected layer. Convolutions have
no bias; every one is followed by BatchNormalization, trained with batch statistics and exported
with its running statistics (ONNX ``BatchNormalization`` in inference form).

The data are scikit-learn's handwritten digits from ``tvm_hapm.data.load_digits(size=32,
channels=3)`` (the fixed split: 1347 training, 450 test images). Training uses AdamW (decoupled
weight decay), a warm-up + cosine learning rate, and random translations of up to 2 pixels as
augmentation, from a fixed seed.

Why NumPy and not ``tvm.relax.training``: both were measured on this 2-core machine (shared
with other jobs). TVM's trainer (``tvm_hapm.compress.relax_training.finetune``) runs ResNet-20 at
~6.5-9.3 images/s
(batch 32, depending on the load): its conv2d kernels and their gradients are legalized
TOPI loop nests that the CPU pipeline does not schedule (no dlight CPU rule for convolutions,
no BLAS in the wheel, MetaSchedule tuning far too slow here), i.e. 2.5-3.5 minutes per epoch. The
NumPy im2col trainer (NHWC, BLAS matmuls) runs ~35 images/s, 40-60 s per epoch; 5 epochs
reach 99.6 % test accuracy in ~6 minutes. ``tvm_hapm.compress.relax_training.finetune`` does use
``tvm.relax.training`` for short recovery fine-tuning, where a few hundred steps suffice.

The script writes the ONNX model (batch 1; see ``tvm_hapm.data.load_bundled_resnet20``) and a
JSON record, then checks through TVM (``from_onnx`` + ``tvm.compile`` llvm) that the ONNX
model reproduces the NumPy logits and test accuracy.

Usage::

    python examples/train_resnet20_digits.py [--epochs 5] [--seed 0] [--out-dir tvm_hapm/data]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tvm_hapm.data import load_digits, set_batch  # noqa: E402  (after the sys.path entry)
from tvm_hapm.models.zoo import resnet_cifar  # noqa: E402

DEPTH, WIDTH, IN_CH, HW, CLASSES = 20, 16, 3, 32, 10
EPS, BN_MOMENTUM = 1e-5, 0.1


# --- layers (NHWC internally); forward returns (y, cache), backward returns (dx, grads) -------
def conv_forward(x, w, stride, pad):
    """Conv without bias. ``x`` (N, H, W, C), ``w`` (Cout, C, k, k) -> (N, Ho, Wo, Cout)."""
    n, h, wd, c = x.shape
    cout, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    cols = np.empty((n, ho, wo, k, k, c), np.float32)
    for i in range(k):
        for j in range(k):
            cols[:, :, :, i, j] = xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride]
    cols = cols.reshape(-1, k * k * c)
    w2 = w.transpose(0, 2, 3, 1).reshape(cout, -1)  # (Cout, k*k*C)
    y = (cols @ w2.T).reshape(n, ho, wo, cout)
    return y, (cols, x.shape, stride, pad, k)


def conv_backward(dy, w, cache):
    """Gradients of :func:`conv_forward` with respect to its input and weight."""
    cols, (n, h, wd, c), stride, pad, k = cache
    cout = w.shape[0]
    _, ho, wo, _ = dy.shape
    dy2 = dy.reshape(-1, cout)
    dw = (cols.T @ dy2).T.reshape(cout, k, k, c).transpose(0, 3, 1, 2)
    dxp = np.zeros((n, h + 2 * pad, wd + 2 * pad, c), dy.dtype)
    for i in range(k):
        for j in range(k):
            dcol = (dy2 @ np.ascontiguousarray(w[:, :, i, j])).reshape(n, ho, wo, c)
            dxp[:, i : i + stride * ho : stride, j : j + stride * wo : stride] += dcol
    return dxp[:, pad : pad + h, pad : pad + wd], dw


def bn_forward(x, p, train):
    """BatchNormalization over (N, H, W); updates the running statistics when training."""
    if train:
        mu = x.mean((0, 1, 2))
        var = x.var((0, 1, 2))
        m = x.size // x.shape[-1]
        p["mean"] = (1 - BN_MOMENTUM) * p["mean"] + BN_MOMENTUM * mu
        p["var"] = (1 - BN_MOMENTUM) * p["var"] + BN_MOMENTUM * var * m / (m - 1)
    else:
        mu, var = p["mean"], p["var"]
    inv = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mu) * inv
    return (xhat * p["scale"] + p["bias"]).astype(np.float32), (xhat, inv)


def bn_backward(dy, p, cache):
    """Gradients of training-mode :func:`bn_forward`."""
    xhat, inv = cache
    dbeta = dy.sum((0, 1, 2))
    dgamma = (dy * xhat).sum((0, 1, 2))
    m = dy.size // dy.shape[-1]
    dx = (p["scale"] * inv / m) * (m * dy - dbeta - xhat * dgamma)
    return dx.astype(np.float32), dgamma, dbeta


class ResNetCifar:
    """NumPy ResNet with the layer order (and hence names) of ``zoo.resnet_cifar``.

    ``self.units[i]`` is the i-th conv-BN pair, i.e. ONNX ``conv{i}.weight`` and
    ``bn{i}.{scale,bias,mean,var}``; ``self.fc`` is ``fc0.{weight,bias}``.
    """

    def __init__(self, depth, width, in_ch, classes, rng):
        self.units = []  # dicts: w, scale, bias, mean, var, stride, pad
        self.blocks = []  # (i_conv1, i_conv2, i_shortcut or None)

        def unit(cin, cout, k, stride, gamma=1.0):
            w = rng.normal(0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)
            self.units.append(
                {
                    "w": w,
                    "scale": np.full(cout, gamma, np.float32),
                    "bias": np.zeros(cout, np.float32),
                    "mean": np.zeros(cout, np.float32),
                    "var": np.ones(cout, np.float32),
                    "stride": stride,
                    "pad": k // 2,
                }
            )
            return len(self.units) - 1

        n = (depth - 2) // 6
        self.stem = unit(in_ch, width, 3, 1)
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                a = unit(cin, cout, 3, stride)
                b = unit(cout, cout, 3, 1, gamma=0.0)  # zero-init residual branches
                s = unit(cin, cout, 1, stride) if stride != 1 or cin != cout else None
                self.blocks.append((a, b, s))
                cin = cout
        self.fc = {
            "w": rng.normal(0, np.sqrt(1.0 / cin), (classes, cin)).astype(np.float32),
            "b": np.zeros(classes, np.float32),
        }

    def _unit_fwd(self, i, x, train, relu):
        u = self.units[i]
        y, cc = conv_forward(x, u["w"], u["stride"], u["pad"])
        y, cb = bn_forward(y, u, train)
        if relu:
            y = np.maximum(y, 0)
        return y, (cc, cb, y if relu else None)

    def _unit_bwd(self, i, dy, cache, grads):
        u = self.units[i]
        cc, cb, yr = cache
        if yr is not None:
            dy = dy * (yr > 0)
        dy, dg, db = bn_backward(dy, u, cb)
        dx, dw = conv_backward(dy, u["w"], cc)
        grads[i] = {"w": dw, "scale": dg, "bias": db}
        return dx

    def forward(self, x_nchw, train=False):
        x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
        caches = {}
        x, caches["stem"] = self._unit_fwd(self.stem, x, train, True)
        for bi, (a, b, s) in enumerate(self.blocks):
            y, ca = self._unit_fwd(a, x, train, True)
            y, cb = self._unit_fwd(b, y, train, False)
            sc, cs = self._unit_fwd(s, x, train, False) if s is not None else (x, None)
            out = np.maximum(y + sc, 0)
            caches[bi] = (ca, cb, cs, out)
            x = out
        feat = x.mean((1, 2))
        caches["gap"] = x.shape
        caches["feat"] = feat
        return feat @ self.fc["w"].T + self.fc["b"], caches

    def backward(self, dlogits, caches):
        grads = {}
        feat = caches["feat"]
        grads["fc"] = {"w": dlogits.T @ feat, "b": dlogits.sum(0)}
        n, h, w, c = caches["gap"]
        dfeat = dlogits @ self.fc["w"]
        dx = np.broadcast_to(dfeat[:, None, None, :] / (h * w), (n, h, w, c))
        for bi in reversed(range(len(self.blocks))):
            a, b, s = self.blocks[bi]
            ca, cb, cs, out = caches[bi]
            dsum = dx * (out > 0)
            dy = self._unit_bwd(b, dsum, cb, grads)
            dxa = self._unit_bwd(a, dy, ca, grads)
            dxs = self._unit_bwd(s, dsum, cs, grads) if s is not None else dsum
            dx = dxa + dxs
        self._unit_bwd(self.stem, dx, caches["stem"], grads)
        return grads

    def param_groups(self):
        """(dict, key, decay) for every trainable tensor (BN affine and biases: no decay)."""
        out = []
        for i in range(len(self.units)):
            out += [(i, "w", True), (i, "scale", False), (i, "bias", False)]
        out += [("fc", "w", True), ("fc", "b", False)]
        return out

    def tensor(self, key, name):
        return (self.fc if key == "fc" else self.units[key])[name]

    def predict(self, x, batch=250):
        return np.concatenate([self.forward(x[i : i + batch])[0] for i in range(0, len(x), batch)])


def softmax_xent(logits, y, smoothing=0.0):
    """Mean softmax cross-entropy (optionally label-smoothed) and its gradient."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    t = np.full_like(p, smoothing / p.shape[1])
    t[np.arange(len(y)), y] += 1 - smoothing
    loss = -(t * np.log(p + 1e-12)).sum(1).mean()
    return loss, ((p - t) / len(y)).astype(np.float32)


def augment(x, rng, max_shift=4):
    """Random translations by up to ``max_shift`` pixels (zero fill: digits have black borders)."""
    n, _, h, w = x.shape
    out = np.zeros_like(x)
    xp = np.pad(x, ((0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
    for i in range(n):
        out[i] = xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


def train(epochs, seed, batch_size=32, lr=3e-3, weight_decay=1e-4, max_shift=2, log=print,
          exclude=None):  # fmt: skip
    """Train on the fixed digits split; returns (net, test accuracy, seconds, data, history).

    AdamW (decoupled weight decay on conv/fc weights), linear warm-up over the first half
    epoch then cosine decay, random translations of up to ``max_shift`` pixels.  ``exclude``:
    indices of training images left out (a validation split kept unseen).
    """
    x_tr, y_tr, x_te, y_te = load_digits(size=HW, channels=IN_CH)
    if exclude is not None:
        keep = np.setdiff1d(np.arange(len(x_tr)), np.asarray(exclude, int))
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    rng = np.random.default_rng(seed)
    net = ResNetCifar(DEPTH, WIDTH, IN_CH, CLASSES, rng)
    groups = net.param_groups()
    m1 = {(k, n): np.zeros_like(net.tensor(k, n)) for k, n, _ in groups}
    m2 = {(k, n): np.zeros_like(net.tensor(k, n)) for k, n, _ in groups}
    b1, b2, eps = 0.9, 0.999, 1e-8
    steps_per_epoch = -(-len(x_tr) // batch_size)
    total = epochs * steps_per_epoch
    warm = max(1, steps_per_epoch // 2)
    history = []
    t0 = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(len(x_tr))
        losses, correct = [], 0
        te = time.perf_counter()
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            xb = augment(x_tr[idx], rng, max_shift) if max_shift else x_tr[idx]
            logits, caches = net.forward(xb, train=True)
            loss, dlogits = softmax_xent(logits, y_tr[idx])
            grads = net.backward(dlogits, caches)
            if step < warm:
                cur = lr * (step + 1) / warm
            else:
                cur = lr * 0.5 * (1 + np.cos(np.pi * (step - warm) / (total - warm)))
            step += 1
            c1, c2 = 1 - b1**step, 1 - b2**step
            for k, n, decay in groups:
                p, g = net.tensor(k, n), grads[k][n]
                m, v = m1[(k, n)], m2[(k, n)]
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                upd = (m / c1) / (np.sqrt(v / c2) + eps) + (weight_decay * p if decay else 0.0)
                p -= (cur * upd).astype(np.float32)
            losses.append(loss)
            correct += int((logits.argmax(1) == y_tr[idx]).sum())
            if step % 10 == 0:
                log(f"  step {step}/{total}  loss {loss:.4f}  ({time.perf_counter() - t0:.0f} s)")
        acc = float((net.predict(x_te).argmax(1) == y_te).mean())
        rec = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "train_accuracy": correct / len(x_tr),
            "test_accuracy": acc,
            "seconds": round(time.perf_counter() - te, 1),
        }
        history.append(rec)
        log(
            f"epoch {epoch + 1:2d}  loss {rec['loss']:.4f}  train acc {rec['train_accuracy']:.4f}"
            f"  test acc {acc:.4f}  ({rec['seconds']} s)"
        )
    seconds = time.perf_counter() - t0
    acc = float((net.predict(x_te).argmax(1) == y_te).mean())
    return net, acc, seconds, (x_tr, y_tr, x_te, y_te), history


def export_onnx(net, batch=1):
    """Write the trained tensors into ``zoo.resnet_cifar``'s graph (identical structure)."""
    model = resnet_cifar(DEPTH, CLASSES, IN_CH, WIDTH, (HW, HW), batch=batch, seed=0)
    model.graph.name = "resnet20_digits"
    model.producer_name = "train_resnet20_digits"
    values = {"fc0.weight": net.fc["w"], "fc0.bias": net.fc["b"]}
    for i, u in enumerate(net.units):
        values[f"conv{i}.weight"] = u["w"]
        for k in ("scale", "bias", "mean", "var"):
            values[f"bn{i}.{k}"] = u[k]
    inits = model.graph.initializer
    if {t.name for t in inits} != set(values):
        raise RuntimeError("NumPy network and resnet_cifar disagree on the tensors")
    for t in inits:
        v = np.ascontiguousarray(values[t.name], dtype=np.float32)
        if tuple(t.dims) != v.shape:
            raise RuntimeError(f"shape mismatch for {t.name}: {tuple(t.dims)} vs {v.shape}")
        t.CopyFrom(numpy_helper.from_array(v, t.name))
    onnx.checker.check_model(model)
    return model


def tvm_logits(model, x):
    """Run an ONNX model on ``x`` with TVM (llvm) and return the output as NumPy."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    ex = tvm.compile(from_onnx(model), target="llvm")
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "tvm_hapm" / "data")
    ap.add_argument("--no-verify", action="store_true", help="skip the TVM check")
    args = ap.parse_args(argv)

    net, acc, seconds, (_, _, x_te, y_te), history = train(args.epochs, args.seed)
    print(f"numpy test accuracy {acc:.4f} ({len(y_te)} samples), trained in {seconds:.1f} s")
    model = export_onnx(net)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.out_dir / "resnet20_digits.onnx"))

    info = {
        "test_accuracy": acc,
        "test_samples": len(y_te),
        "seed": args.seed,
        "epochs": args.epochs,
        "trainer": "pure NumPy (im2col convolutions, NHWC, training-mode BatchNorm)",
        "optimizer": (
            "AdamW lr 3e-3 (half-epoch linear warm-up, cosine decay), decoupled weight "
            "decay 1e-4 on conv/fc weights, batch 32, softmax cross-entropy, random "
            "translations of up to 2 px"
        ),
        "train_seconds": round(seconds, 1),
        "machine": f"{os.cpu_count()} CPU cores",
        "history": history,
        "data": (
            f"tvm_hapm.data.load_digits(size={HW}, channels={IN_CH}) "
            "(test_size=0.25, random_state=0)"
        ),
        "input": {
            "name": "input",
            "shape": [1, IN_CH, HW, HW],
            "dtype": "float32",
            "range": [0, 1],
        },
        "output": {"name": "output", "shape": [1, CLASSES], "meaning": "logits"},
        "architecture": {
            "builder": "tvm_hapm.models.zoo.resnet_cifar",
            "depth": DEPTH,
            "width": WIDTH,
            "in_ch": IN_CH,
            "num_classes": CLASSES,
            "input_hw": [HW, HW],
            "ops": sorted({n.op_type for n in model.graph.node}),
            "parameters": int(sum(np.prod(t.dims) for t in model.graph.initializer)),
        },
        "command": f"python examples/train_resnet20_digits.py --epochs {args.epochs} "
        f"--seed {args.seed}",
    }
    if not args.no_verify:
        ref = net.predict(x_te)
        got = tvm_logits(set_batch(model, len(x_te)), x_te)
        diff = float(np.abs(got - ref).max())
        tvm_acc = float((got.argmax(1) == y_te).mean())
        print(f"TVM llvm: max |logit diff| {diff:.2e}, accuracy {tvm_acc:.4f}")
        assert diff < 1e-3 and tvm_acc == acc, "TVM output does not match the NumPy model"
        info["tvm_accuracy"] = tvm_acc
        info["tvm_max_abs_logit_diff"] = diff
    (args.out_dir / "resnet20_digits.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out_dir / 'resnet20_digits.onnx'} and resnet20_digits.json")


if __name__ == "__main__":
    main()
