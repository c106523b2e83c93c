"""Train the bundled digits CNN in pure NumPy and export it to ONNX.

The network (16x16 grayscale digits from scikit-learn, fixed split of ``tvm_hapm.data``)::

    Conv 3x3 1->8 pad 1 (+bias) - ReLU - MaxPool 2x2      16x16 -> 8x8
    Conv 3x3 8->16 pad 1 (+bias) - ReLU - MaxPool 2x2     8x8 -> 4x4
    Flatten (256) - Gemm 256->10 (logits)

It is trained with softmax cross-entropy and Adam from a fixed seed; convolutions use im2col.
The script writes ``tvm_hapm/data/digits_cnn.onnx`` (batch 1; use
``tvm_hapm.data.load_bundled_model(batch=N)`` for other batch sizes) and ``digits_cnn.json``,
then checks with TVM (llvm) that the ONNX model reproduces the NumPy logits and accuracy.

Usage::

    python examples/train_digits_cnn.py [--epochs 30] [--seed 0] [--out-dir tvm_hapm/data]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tvm_hapm.data import load_digits  # noqa: E402  (after the sys.path entry)

ARCH = [
    ("conv", {"cin": 1, "cout": 8, "k": 3, "pad": 1}),
    ("relu", {}),
    ("maxpool", {"k": 2}),
    ("conv", {"cin": 8, "cout": 16, "k": 3, "pad": 1}),
    ("relu", {}),
    ("maxpool", {"k": 2}),
    ("flatten", {}),
    ("dense", {"cin": 16 * 4 * 4, "cout": 10}),
]


# --- layers: forward returns (y, cache); backward returns (dx, grads) -------------------------
def im2col(x, k, pad):
    """(N, C, H, W) -> columns (N*H*W, C*k*k) for a stride-1 'same' conv."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))  # N,C,H,W,k,k
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * k * k)


def col2im(cols, shape, k, pad):
    """Adjoint of :func:`im2col`: scatter-add columns back to a (N, C, H, W) gradient."""
    n, c, h, w = shape
    cols = cols.reshape(n, h, w, c, k, k)
    dxp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), cols.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i : i + h, j : j + w] += cols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, pad : pad + h, pad : pad + w]


def conv_forward(x, p, k, pad):
    n, _, h, w = x.shape
    cols = im2col(x, k, pad)
    y = cols @ p["w"].reshape(len(p["w"]), -1).T + p["b"]
    return y.reshape(n, h, w, -1).transpose(0, 3, 1, 2), (cols, x.shape)


def conv_backward(dy, p, cache, k, pad):
    cols, xshape = cache
    dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, dy.shape[1])
    grads = {"w": (dy2.T @ cols).reshape(p["w"].shape), "b": dy2.sum(0)}
    dx = col2im(dy2 @ p["w"].reshape(len(p["w"]), -1), xshape, k, pad)
    return dx, grads


def maxpool_forward(x, k):
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // k, k, w // k, k).transpose(0, 1, 2, 4, 3, 5)
    win = win.reshape(n, c, h // k, w // k, k * k)
    idx = win.argmax(-1)
    return np.take_along_axis(win, idx[..., None], -1)[..., 0], (idx, x.shape)


def maxpool_backward(dy, cache, k):
    idx, (n, c, h, w) = cache
    dwin = np.zeros((*dy.shape, k * k), dy.dtype)
    np.put_along_axis(dwin, idx[..., None], dy[..., None], -1)
    dwin = dwin.reshape(n, c, h // k, w // k, k, k).transpose(0, 1, 2, 4, 3, 5)
    return dwin.reshape(n, c, h, w)


class NumpyCNN:
    """Sequential CNN over :data:`ARCH` with He-initialised parameters."""

    def __init__(self, arch, rng):
        self.arch = arch
        self.params = []
        for kind, a in arch:
            p = {}
            if kind == "conv":
                fan_in = a["cin"] * a["k"] ** 2
                p["w"] = rng.normal(0, np.sqrt(2 / fan_in), (a["cout"], a["cin"], a["k"], a["k"]))
                p["b"] = np.zeros(a["cout"])
            elif kind == "dense":
                p["w"] = rng.normal(0, np.sqrt(1 / a["cin"]), (a["cout"], a["cin"]))
                p["b"] = np.zeros(a["cout"])
            self.params.append({n: v.astype(np.float32) for n, v in p.items()})

    def forward(self, x):
        caches = []
        for (kind, a), p in zip(self.arch, self.params):
            if kind == "conv":
                x, c = conv_forward(x, p, a["k"], a["pad"])
            elif kind == "relu":
                c, x = x > 0, np.maximum(x, 0)
            elif kind == "maxpool":
                x, c = maxpool_forward(x, a["k"])
            elif kind == "flatten":
                c, x = x.shape, x.reshape(len(x), -1)
            elif kind == "dense":
                c, x = x, x @ p["w"].T + p["b"]
            caches.append(c)
        return x, caches

    def backward(self, dy, caches):
        grads = [None] * len(self.arch)
        for i in reversed(range(len(self.arch))):
            (kind, a), p, c = self.arch[i], self.params[i], caches[i]
            if kind == "conv":
                dy, grads[i] = conv_backward(dy, p, c, a["k"], a["pad"])
            elif kind == "relu":
                dy = dy * c
            elif kind == "maxpool":
                dy = maxpool_backward(dy, c, a["k"])
            elif kind == "flatten":
                dy = dy.reshape(c)
            elif kind == "dense":
                grads[i] = {"w": dy.T @ c, "b": dy.sum(0)}
                dy = dy @ p["w"]
        return grads

    def predict(self, x, batch=256):
        return np.concatenate([self.forward(x[i : i + batch])[0] for i in range(0, len(x), batch)])


def softmax_xent(logits, y):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
    p[np.arange(len(y)), y] -= 1
    return loss, p / len(y)


class Adam:
    """Adam (Kingma & Ba) over a list of parameter dicts, updated in place."""

    def __init__(self, params, lr=3e-3, b1=0.9, b2=0.999, eps=1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps, self.t = params, lr, b1, b2, eps, 0
        self.m = [{k: np.zeros_like(v) for k, v in p.items()} for p in params]
        self.v = [{k: np.zeros_like(v) for k, v in p.items()} for p in params]

    def step(self, grads, lr=None):
        self.t += 1
        lr = self.lr if lr is None else lr
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            for k in p:
                m[k] = self.b1 * m[k] + (1 - self.b1) * g[k]
                v[k] = self.b2 * v[k] + (1 - self.b2) * g[k] ** 2
                p[k] -= (lr * (m[k] / c1) / (np.sqrt(v[k] / c2) + self.eps)).astype(np.float32)


def train(epochs, seed, batch_size=32, lr=3e-3):
    """Train on the fixed digits split; returns (model, test accuracy, seconds, data)."""
    x_tr, y_tr, x_te, y_te = load_digits(size=16, channels=1)
    rng = np.random.default_rng(seed)
    net = NumpyCNN(ARCH, rng)
    opt = Adam(net.params, lr=lr)
    steps = epochs * -(-len(x_tr) // batch_size)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(x_tr))
        losses = []
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            logits, caches = net.forward(x_tr[idx])
            loss, dlogits = softmax_xent(logits, y_tr[idx])
            # cosine learning-rate decay over all steps
            opt.step(net.backward(dlogits, caches), lr * 0.5 * (1 + np.cos(np.pi * opt.t / steps)))
            losses.append(loss)
        acc = (net.predict(x_te).argmax(1) == y_te).mean()
        print(f"epoch {epoch + 1:2d}  loss {np.mean(losses):.4f}  test acc {acc:.4f}")
    seconds = time.perf_counter() - t0
    acc = float((net.predict(x_te).argmax(1) == y_te).mean())
    return net, acc, seconds, (x_tr, y_tr, x_te, y_te)


def export_onnx(net, batch=1):
    """Export the trained network: Conv(+bias), Relu, MaxPool, Flatten, Gemm (opset 17)."""
    nodes, inits, x = [], [], "input"
    for i, ((kind, a), p) in enumerate(zip(net.arch, net.params)):
        out = f"{kind}{i}"
        inits += [numpy_helper.from_array(v, f"{out}.{k}") for k, v in p.items()]
        if kind == "conv":
            op, attrs = "Conv", {"kernel_shape": [a["k"]] * 2, "pads": [a["pad"]] * 4}
        elif kind == "maxpool":
            op, attrs = "MaxPool", {"kernel_shape": [a["k"]] * 2, "strides": [a["k"]] * 2}
        else:
            op, attrs = {"relu": "Relu", "flatten": "Flatten", "dense": "Gemm"}[kind], {}
            attrs = {"transB": 1} if kind == "dense" else attrs
        ins = [x] + [f"{out}.{k}" for k in p]
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        x = out
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="train_digits_cnn"
    )
    model.ir_version = 8
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
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "tvm_hapm" / "data")
    ap.add_argument("--no-verify", action="store_true", help="skip the TVM check")
    args = ap.parse_args(argv)

    net, acc, seconds, (_, _, x_te, y_te) = train(args.epochs, args.seed)
    print(f"numpy test accuracy {acc:.4f} ({len(y_te)} samples), trained in {seconds:.1f} s")
    model = export_onnx(net)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.out_dir / "digits_cnn.onnx"))

    info = {
        "test_accuracy": acc,
        "test_samples": len(y_te),
        "seed": args.seed,
        "epochs": args.epochs,
        "optimizer": "Adam lr=3e-3 cosine decay, batch 32, softmax cross-entropy",
        "train_seconds": round(seconds, 1),
        "data": "tvm_hapm.data.load_digits(size=16, channels=1) (test_size=0.25, random_state=0)",
        "input": {"name": "input", "shape": [1, 1, 16, 16], "dtype": "float32", "range": [0, 1]},
        "output": {"name": "output", "shape": [1, 10], "meaning": "logits"},
        "architecture": [{"layer": kind, **a} for kind, a in ARCH],
        "command": f"python examples/train_digits_cnn.py --epochs {args.epochs} --seed {args.seed}",
    }
    if not args.no_verify:
        from tvm_hapm.data import set_batch

        ref = net.predict(x_te)
        got = tvm_logits(set_batch(model, len(x_te)), x_te)
        diff = float(np.abs(got - ref).max())
        tvm_acc = float((got.argmax(1) == y_te).mean())
        print(f"TVM llvm: max |logit diff| {diff:.2e}, accuracy {tvm_acc:.4f}")
        assert diff < 1e-3 and tvm_acc == acc, "TVM output does not match the NumPy model"
        info["tvm_accuracy"] = tvm_acc
        info["tvm_max_abs_logit_diff"] = diff
    (args.out_dir / "digits_cnn.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out_dir / 'digits_cnn.onnx'} and digits_cnn.json")


if __name__ == "__main__":
    main()
