"""Float forward pass of ONNX CNNs in NumPy (im2col + BLAS), for fast accuracy estimates.

TVM's unscheduled llvm build of ResNet-20 runs ~24 images/s on two cores; this runs several
times faster, which the HW-Flow search (many accuracy estimates) and the layer-wise weight
reconstruction (a forward sweep with a per-node hook) need.  ``tests/test_hwflow.py`` checks
it against TVM (``tvm_hapm.compress.relax_training.evaluate``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["NumpyNet", "im2col"]


class NumpyNet:
    """Float forward pass of an ONNX CNN in NumPy (Conv, BatchNormalization, Relu, Clip, Add,
    MaxPool, AveragePool, GlobalAveragePool, Flatten, Reshape, Gemm, MatMul).

    Used for the search's accuracy estimate (TVM's unscheduled llvm build of ResNet-20 runs
    ~24 images/s; im2col + BLAS is much faster).  ``tests/test_hwflow.py`` checks it against
    ``tvm_hapm.compress.relax_training.evaluate``.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.nodes = list(model.graph.node)
        self.input = next(i.name for i in model.graph.input if i.name not in self.inits)

    def forward(self, x, values: dict | None = None, recalibrate: bool = False, before_node=None):
        """Logits of ``x``; ``values`` overrides initializers.  With ``recalibrate`` every
        BatchNormalization uses the batch statistics of its input and the new running mean /
        variance are returned too (``(logits, {name: array})``).

        ``before_node(node, activations, values)``, if given, is called before each node runs,
        with the activations computed so far (NHWC for 4-D tensors) and the current values of
        the initializers; it may return a dict of new initializer values, used from that node on
        (layer-by-layer reconstruction refits a layer from the input it actually receives).
        """
        p = dict(self.inits)
        if values:
            p.update(values)
        # NHWC inside (im2col + one BLAS matmul per conv); NCHW at Flatten / Reshape / output
        env = {self.input: np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))}
        new_stats = {}
        for n in self.nodes:
            if before_node is not None:
                p.update(before_node(n, env, p) or {})
            a = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
            ins = [env[i] if i in env else p.get(i) if i else None for i in n.input]
            op = n.op_type
            if op == "Conv":
                y = _conv(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a)
            elif op == "BatchNormalization":
                xx, sc, b, mu, var = ins
                if recalibrate:
                    mu = xx.mean(axis=(0, 1, 2))
                    var = xx.var(axis=(0, 1, 2))
                    new_stats[n.input[3]], new_stats[n.input[4]] = mu, var
                k = sc / np.sqrt(var + a.get("epsilon", 1e-5))
                y = xx * k + (b - mu * k)
            elif op == "Relu":
                y = np.maximum(ins[0], 0)
            elif op == "Clip":
                lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min", -np.inf)
                hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max", np.inf)
                y = np.clip(ins[0], lo, hi)
            elif op == "Add":
                y = ins[0] + ins[1]
            elif op == "GlobalAveragePool":
                y = ins[0].mean(axis=(1, 2), keepdims=True)
            elif op in ("MaxPool", "AveragePool"):
                y = _pool(ins[0], a, op)
            elif op == "Flatten":
                y = ins[0].transpose(0, 3, 1, 2).reshape(ins[0].shape[0], -1)
            elif op == "Reshape":
                shape = [int(s) for s in ins[1]]
                shape[0] = ins[0].shape[0] if shape[0] in (0, -1, 1) else shape[0]
                y = ins[0].transpose(0, 3, 1, 2).reshape(shape)
            elif op == "Gemm":
                aa = ins[0].T if a.get("transA", 0) else ins[0]
                bb = ins[1].T if a.get("transB", 0) else ins[1]
                y = a.get("alpha", 1.0) * aa @ bb
                if len(ins) > 2 and ins[2] is not None:
                    y = y + a.get("beta", 1.0) * ins[2]
            elif op == "MatMul":
                y = ins[0] @ ins[1]
            else:
                raise NotImplementedError(f"NumpyNet: ONNX op {op} is not supported")
            env[n.output[0]] = y.astype(np.float32, copy=False)
        out = env[self.model.graph.output[0].name]
        if out.ndim == 4:
            out = out.transpose(0, 3, 1, 2)
        return (out, new_stats) if recalibrate else out

    def accuracy(self, x, y, values=None, batch: int = 200) -> float:
        correct = 0
        for s in range(0, len(x), batch):
            correct += int(
                (self.forward(x[s : s + batch], values).argmax(1) == y[s : s + batch]).sum()
            )
        return correct / max(len(x), 1)


def _windows(x, kernel, strides, pads, fill=0.0) -> list:
    """The ``kh*kw`` shifted, strided views of NHWC ``x`` (padded with ``fill``) that a
    ``kernel`` window reads, one ``(N, OH, OW, C)`` array per kernel position (row-major)."""
    (kh, kw), (sh, sw) = kernel, strides
    if any(pads):
        pad = ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0))
        x = np.pad(x, pad, constant_values=fill)
    _, h, wd, _ = x.shape
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    return [
        x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]


def im2col(x, kernel, strides, pads):
    """Patches of NHWC ``x``: ``(N, OH, OW, kh*kw*C)``, columns in ``(kh, kw, C)`` order (the
    order of an OIHW weight transposed to ``(O, kh, kw, I)``)."""
    cols = _windows(x, kernel, strides, pads)
    return np.concatenate(cols, axis=3) if len(cols) > 1 else cols[0]


def _conv(x, w, b, a):
    """NHWC convolution: ``x`` (N, H, W, C), ``w`` OIHW."""
    cout, cin_g, kh, kw = w.shape
    if tuple(a.get("dilations", [1, 1])) != (1, 1):
        raise NotImplementedError("NumpyNet: dilated convolutions")
    groups = a.get("group", 1)
    cout_g = cout // groups
    outs = []
    for g in range(groups):
        xg = x[..., g * cin_g : (g + 1) * cin_g]
        col = im2col(xg, (kh, kw), a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0]))
        n, oh, ow, _ = col.shape
        wg = w[g * cout_g : (g + 1) * cout_g].transpose(2, 3, 1, 0).reshape(-1, cout_g)
        outs.append(col.reshape(-1, col.shape[3]) @ wg)
    y = np.concatenate(outs, axis=1) if groups > 1 else outs[0]
    y = y.reshape(n, oh, ow, cout)
    if b is not None:
        y = y + b
    return y


def _pool(x, a, op):
    fill = -np.inf if op == "MaxPool" else 0.0
    wins = _windows(
        x, a["kernel_shape"], a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0]), fill
    )
    return np.max(wins, axis=0) if op == "MaxPool" else np.mean(wins, axis=0)
