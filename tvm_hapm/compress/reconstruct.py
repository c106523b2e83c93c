"""Layer-wise least-squares reconstruction of pruned weights (recovery before fine-tuning).

Pruning zeroes weights; the weights that remain were trained to work *together with* the
removed ones, so a freshly pruned network is far from its best for its sparsity pattern. With
hardware-aware pruning the loss is large: removing half of ResNet-20's hardware groups (whole
``R``-channel input blocks of one kernel tap for a whole output-channel group) takes the bundled
digits model from 99.6 % to about 11 %.

:func:`reconstruct` refits, layer by layer in graph order, the weights that survived so that
each pruned layer reproduces the **dense** network's output of that layer from the input the
**pruned** network gives it (so that every layer also compensates the error of the layers before
it), by ridge-regularised least squares over sampled output positions of a small calibration
set. This is the reconstruction step of channel pruning (He et al., *Channel Pruning for
Accelerating Very Deep Neural Networks*, ICCV 2017) and of ThiNet (Luo et al., ICCV 2017),
applied to any mask: rows of the weight matrix that share a mask (a HAPM group's output
channels) share one solve. The mask is held fixed (pruned weights stay exactly zero), and a
per-channel intercept is fitted too: into the conv's bias when it has one, else into the mean
of the BatchNormalization that follows it.

It needs only two forward passes (NumPy, :class:`~tvm_hapm.compress.numpynet.NumpyNet`) and one
small
solve per layer, so it costs seconds where gradient fine-tuning
(:func:`tvm_hapm.compress.relax_training.finetune`)
costs minutes; the two compose: reconstruct first, then fine-tune.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .numpynet import NumpyNet, im2col

__all__ = ["ReconstructError", "reconstruct"]


class ReconstructError(ValueError):
    """The models or data given to :func:`reconstruct` cannot be reconstructed."""


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _layers(model: onnx.ModelProto) -> dict[str, dict]:
    """Pruned Conv (group 1) and Gemm layers with initializer weights, by node output name."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is None or not (w == 0).any():
            continue
        a = _attrs(node)
        if node.op_type == "Conv" and (
            a.get("group", 1) != 1
            or tuple(a.get("dilations", (1, 1))) != (1, 1)
            or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        ):
            continue  # grouped, dilated or auto-padded convs are left as they are
        if node.op_type == "Gemm" and (
            a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0
        ):
            continue
        lay = {"node": node, "weight": node.input[1], "input": node.input[0], "attrs": a}
        lay["kernel"] = tuple(w.shape[2:])  # (kh, kw) of a conv
        lay["bias"] = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        lay["bn_mean"] = None
        users = consumers.get(node.output[0], [])
        if lay["bias"] is None and len(users) == 1 and users[0].op_type == "BatchNormalization":
            mean = users[0].input[3]
            if mean in inits and len(consumers.get(mean, [])) == 1:
                lay["bn_mean"] = mean
        out[node.output[0]] = lay
    return out


def _as_matrix(lay, w: np.ndarray) -> np.ndarray:
    """The weight as an ``(out, in)`` matrix whose columns match :func:`_design`."""
    if lay["node"].op_type == "Conv":
        return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)  # (O, kh*kw*I): im2col order
    return w if lay["attrs"].get("transB", 0) else w.T


def _from_matrix(lay, m: np.ndarray, like: np.ndarray) -> np.ndarray:
    if lay["node"].op_type == "Conv":
        o, i, kh, kw = like.shape
        return m.reshape(o, kh, kw, i).transpose(0, 3, 1, 2)
    return m if lay["attrs"].get("transB", 0) else m.T


def _design(lay, x: np.ndarray) -> np.ndarray:
    """Rows of the layer's input the weight matrix multiplies: im2col for a conv (``x`` NHWC)."""
    if lay["node"].op_type == "Conv":
        a = lay["attrs"]
        cols = im2col(x, lay["kernel"], a.get("strides", (1, 1)), a.get("pads", (0, 0, 0, 0)))
        return cols.reshape(-1, cols.shape[-1])
    return x.reshape(x.shape[0], -1)


def reconstruct(
    pruned: onnx.ModelProto,
    dense: onnx.ModelProto,
    x: np.ndarray,
    max_rows: int = 8192,
    ridge: float = 1e-3,
    seed: int = 0,
    progress=None,
) -> tuple[onnx.ModelProto, list[dict]]:
    """Refit the surviving weights of every pruned layer of ``pruned`` by least squares.

    One forward sweep of the dense model records each pruned layer's dense output on sampled
    positions; one sweep of the pruned model then refits each layer, in graph order, from the
    input it receives there (already through the refitted layers before it).  Forward passes
    use :class:`~tvm_hapm.compress.numpynet.NumpyNet`.

    Parameters
    ----------
    pruned : onnx.ModelProto
        The pruned model (zeros mark pruned weights). It is not changed.
    dense : onnx.ModelProto
        The model it was pruned from: the same graph with the original weights.
    x : numpy.ndarray
        Calibration inputs for the model's first input (a few hundred images are plenty).
    max_rows : int
        Output positions sampled per layer for the regression (fixed ``seed``).
    ridge : float
        Strength, relative to the mean diagonal of the Gram matrix, of the pull towards the
        pruned model's weights: it keeps the solve well posed when kept inputs are collinear
        or never active (those weights then stay as they were).
    seed : int
        Seed of the position sampling; the result is deterministic for a given seed.
    progress : callable, optional
        Called as ``progress(done, total)`` after each layer.

    Returns
    -------
    model : onnx.ModelProto
        A copy of ``pruned`` whose pruned layers hold the refitted weights (still exactly zero
        where they were zero) and intercepts.
    report : list of dict
        Per reconstructed layer: ``layer``, ``weight``, ``sparsity``, ``rows`` and the relative
        error of its output against the dense layer's, before and after.

    Raises
    ------
    ReconstructError
        Different graphs, empty data, bad parameters, or an operator the NumPy forward pass
        does not implement (the message names it).
    """
    if len(pruned.graph.node) != len(dense.graph.node) or any(
        a.op_type != b.op_type or list(a.input) != list(b.input)
        for a, b in zip(pruned.graph.node, dense.graph.node)
    ):
        raise ReconstructError("pruned and dense models do not have the same graph")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise ReconstructError(f"calibration data must be a non-empty batch, got shape {x.shape}")
    if max_rows < 1 or ridge < 0:
        raise ReconstructError("max_rows must be positive and ridge non-negative")
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    layers = _layers(out)
    if not layers:
        return out, []
    rng = np.random.default_rng(seed)
    targets: dict[str, tuple] = {}

    def record(node, env, values):
        lay = layers.get(node.output[0]) if node.op_type in ("Conv", "Gemm") else None
        if lay is None:
            return None
        a = _design(lay, env[lay["input"]])
        rows = (
            np.sort(rng.choice(len(a), size=max_rows, replace=False)) if len(a) > max_rows else None
        )
        a = a if rows is None else a[rows]
        w = _as_matrix(lay, values[lay["weight"]]).astype(np.float64)
        targets[node.output[0]] = (rows, a.astype(np.float64) @ w.T)
        return None

    inits = {i.name: i for i in out.graph.initializer}
    report = []

    def refit(node, env, values):
        lay = layers.get(node.output[0]) if node.op_type in ("Conv", "Gemm") else None
        if lay is None:
            return None
        rows, target = targets[node.output[0]]
        a = _design(lay, env[lay["input"]])
        a = (a if rows is None else a[rows]).astype(np.float64)
        w_old = values[lay["weight"]]
        w0 = _as_matrix(lay, w_old).astype(np.float64)
        intercept = lay["bias"] is not None or lay["bn_mean"] is not None
        w_new, delta = _solve(a, target, w0, ridge, intercept)
        live = (w0 != 0).any(axis=1)
        report.append(
            {
                "layer": node.name or node.output[0],
                "weight": lay["weight"],
                "sparsity": float((w_old == 0).mean()),
                "rows": int(len(a)),
                # over the output channels that keep weights (a removed filter's error stays)
                "rel_error_before": _rel_err(a @ w0.T, target, live),
                "rel_error_after": _rel_err(a @ w_new.T + delta, target, live),
            }
        )
        updated = _write_back(lay, inits, _from_matrix(lay, w_new, w_old), delta, values)
        if progress is not None:
            progress(len(report), len(layers))
        return updated

    try:
        NumpyNet(dense).forward(x, before_node=record)
        NumpyNet(out).forward(x, before_node=refit)
    except NotImplementedError as err:
        raise ReconstructError(str(err)) from None
    return out, report


def _rel_err(pred: np.ndarray, target: np.ndarray, columns: np.ndarray) -> float:
    pred, target = pred[:, columns], target[:, columns]
    return float(np.linalg.norm(pred - target) / max(np.linalg.norm(target), 1e-30))


def _solve(a: np.ndarray, target: np.ndarray, w0: np.ndarray, ridge: float, intercept: bool):
    """Least squares per output row over its kept inputs (and an intercept), with a ridge
    towards the current weights ``w0`` (not towards zero: an input that never varies in the
    calibration data, e.g. a dead ReLU channel, keeps its weight instead of losing it).

    Rows with the same mask (non-zeros of ``w0``) share one factorisation.  Returns the new
    ``(out, in)`` weight (zero where ``w0`` is zero) and the per-output intercept.
    """
    keep = w0 != 0
    w0 = w0.astype(np.float64)
    mean_a = a.mean(axis=0) if intercept else np.zeros(a.shape[1])
    mean_t = target.mean(axis=0) if intercept else np.zeros(target.shape[1])
    ac = a - mean_a  # centring fits the intercept exactly
    gram = ac.T @ ac
    cross = ac.T @ (target - mean_t)
    lam = ridge * max(float(np.mean(np.diag(gram))), 1e-12)
    w_new = np.zeros(keep.shape, dtype=np.float64)
    patterns: dict[bytes, list[int]] = {}
    for o in range(keep.shape[0]):
        patterns.setdefault(np.packbits(keep[o]).tobytes(), []).append(o)
    for outs in patterns.values():
        idx = np.flatnonzero(keep[outs[0]])
        if idx.size == 0:
            continue
        g = gram[np.ix_(idx, idx)] + lam * np.eye(idx.size)
        rhs = cross[np.ix_(idx, outs)] + lam * w0[np.ix_(outs, idx)].T
        try:
            sol = np.linalg.solve(g, rhs)
        except np.linalg.LinAlgError:  # singular without a ridge: the minimum-norm solution
            sol = np.linalg.lstsq(g, rhs, rcond=None)[0]
        w_new[np.ix_(outs, idx)] = sol.T
    delta = mean_t - mean_a @ w_new.T
    delta[~keep.any(axis=1)] = 0.0  # a removed output channel (filter pruning) stays untouched
    return w_new, delta


def _write_back(lay, inits, w_new: np.ndarray, delta: np.ndarray, values: dict) -> dict:
    """Store the refitted weight and intercept in the model; returns the new initializer values."""
    old = values[lay["weight"]]
    w_store = np.where(old == 0, 0, w_new).astype(old.dtype)
    updated = {lay["weight"]: w_store}
    if lay["bias"] is not None:
        b = values[lay["bias"]]
        updated[lay["bias"]] = (b + delta).astype(b.dtype)
    elif lay["bn_mean"] is not None:
        m = values[lay["bn_mean"]]
        updated[lay["bn_mean"]] = (m - delta).astype(m.dtype)
    for name, value in updated.items():
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return updated
