"""Emission: the quantized function written in the integer chains of :mod:`~tvm_hapm.passes.qops`.

:class:`Emitter` re-emits the planned function (:class:`~tvm_hapm.passes.quantize.plan.Step`
by step) in one dataflow block, once the activation scales are calibrated: per-output-channel
weights and int32 biases, requantization multipliers and activation bounds of every layer, a
residual add fused into the conv2d producing one operand where its shortcut weights qualify
(:data:`RESIDUAL_MIN_K`), and quantize/dequantize pairs around the host float ops (the scheme is
in :mod:`tvm_hapm.passes.quantize`).
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from .. import qops
from ..relax_util import static_shape
from .graph import QuantizeError, Rebuilder, int_list, tensor_shape
from .plan import NOT_AN_OP, Step

__all__ = ["RESIDUAL_MIN_K", "Emitter"]

_INF = math.inf
#: Smallest integer shortcut weight of a fused residual add: widening a weight scale to make
#: the shortcut exact costs at most 1/RESIDUAL_MIN_K of the weights' resolution.
RESIDUAL_MIN_K = 16
_KIND_LABEL = {
    "conv": "conv2d",
    "dense": "dense",
    "avgpool": "avg pool as all-ones depthwise conv",
    "gap": "global avg pool",
    "add": "residual add",
}


class Emitter(Rebuilder):
    """Writes the quantized function of a plan: :meth:`emit_steps` emits each step with its
    ``emit_<kind>`` method and reports it.

    Parameters
    ----------
    graph : Graph
        The normalised float function.
    cfg : HardwareConfig
        The accelerator config (activation and weight widths, accumulator width).
    scales : dict
        Var -> calibrated activation scale.
    steps : list of Step
        The plan (:class:`~tvm_hapm.passes.quantize.plan.Planner`).
    report : list or None
        Receives one line per reported op.
    """

    def __init__(self, graph, cfg, scales, steps, report):
        super().__init__(graph, cfg, scales)
        self.steps = steps
        self.report = report
        lo, hi = cfg.act_range
        self.act_lo, self.act_hi = lo, hi

    def qbounds(self, lo: float, hi: float, scale: float) -> tuple[int, int]:
        """Activation bounds in the quantized domain of ``scale``."""
        qlo = self.act_lo if lo == -_INF else max(self.act_lo, int(np.round(lo / scale)))
        qhi = self.act_hi if hi == _INF else min(self.act_hi, int(np.round(hi / scale)))
        qlo = min(qlo, self.act_hi)
        return qlo, max(qhi, qlo)

    def multiplier(self, real, step, mult_bits=qops.REQUANT_MULT_BITS):
        try:
            return qops.choose_multiplier(real, mult_bits)
        except ValueError as err:
            raise QuantizeError(f"{step.ops[0]} -> {step.out.name}: {err}") from None

    def quantize_weights(self, w: np.ndarray, bias, s_in: float, s_w_min=None):
        """Per-output-channel symmetric weights (channel on axis 0) and int32 bias.

        ``s_w_min`` (per channel) raises the weight scales to at least those values."""
        cfg = self.cfg
        w_hi = cfg.weight_range[1]
        flat = w.reshape(w.shape[0], -1)
        s_w = np.abs(flat).max(axis=1) / w_hi
        zero = s_w == 0
        # an all-zero channel (e.g. pruned) gets the largest scale of the layer, so it neither
        # widens the shared requantization shift nor overflows its (bias-only) accumulator
        s_w[zero] = s_w[~zero].max() if (~zero).any() else 1.0 / w_hi
        # The accumulator of a channel is bounded by in_peak * sum|wq| + |bq| with
        # |wq| <= |w| / s_w + 1/2 and |bq| <= |b| / (s_in * s_w) + 1/2; wide (int16) configs can
        # exceed int32, so the smallest scale keeping that bound below acc_max is enforced
        # (int8 layers never reach it).
        acc_max = float((1 << (cfg.acc_bits - 1)) - 1)
        in_peak = float(1 << (cfg.act_bits - 1))
        room = acc_max - in_peak * 0.5 * flat.shape[1] - 0.5
        if room <= 0:
            raise QuantizeError(
                f"a reduction of {flat.shape[1]} {cfg.act_dtype} products cannot fit the "
                f"int{cfg.acc_bits} accumulator"
            )
        b_abs = np.abs(bias) if bias is not None else 0.0
        s_w = np.maximum(s_w, (in_peak * np.abs(flat).sum(axis=1) + b_abs / s_in) / room)
        if s_w_min is not None:
            s_w = np.maximum(s_w, s_w_min)
        wq = np.clip(np.round(flat / s_w[:, None]), -w_hi, w_hi)
        bq = np.round(bias / (s_in * s_w)) if bias is not None else None
        wq = wq.reshape(w.shape).astype(cfg.weight_dtype)
        return wq, (bq.astype(np.int32) if bq is not None else None), s_w

    # ---------------------------------------------------------------- steps
    def emit_steps(self) -> None:
        """Emit every step of the plan in order (the ``emit_body`` of :meth:`build`)."""
        for step in self.steps:
            getattr(self, f"emit_{step.kind}")(step)
            self.report_step(step)

    def report_step(self, step: Step) -> None:
        if self.report is None:
            return
        chain = "+".join(step.ops)
        shape = tensor_shape(step.out)
        where = f"{chain} -> {step.out.name} {tuple(shape) if shape is not None else ''}".rstrip()
        dt = self.cfg.act_dtype
        if step.kind == "alias" or step.reason == NOT_AN_OP:
            return  # tuples and renames are bookkeeping, not ops
        if step.kind == "host":
            self.report.append(f"{where}: host float ({step.reason})")
        elif step.kind == "fused":
            return  # reported with the residual add that emits it
        elif step.kind in ("int", "clip"):
            self.report.append(f"{where}: quantized ({dt} {step.ops[0]}, scale kept)")
        else:
            label = _KIND_LABEL[step.kind]
            if step.kind == "conv" and step.ops[0] != "conv2d":
                label = "per-channel affine as depthwise 1x1 conv"
            if step.kind == "add" and step.residual is not None:
                conv = step.residual
                where = f"{'+'.join(conv.ops)}+{where}"
                label = "conv2d with the residual add fused"
            self.report.append(f"{where}: quantized ({label}, {dt})")

    def emit_host(self, step) -> None:
        self.emit_binding(self.g.bindings[step.index])

    def emit_alias(self, step) -> None:
        src = step.src[0]
        if src in self.qmap:
            self.qmap[step.out] = self.qmap[src]
        if src in self.fmap:
            self.fmap[step.out] = self.fmap[src]

    def emit_int(self, step) -> None:
        call = self.g.bindings[step.index].value
        xq, s = self.q(step.src[0])
        new = relax.Call(call.op, [xq, *call.args[1:]], call.attrs, call.ty_args)
        self.qmap[step.out] = (self.bb.emit(new), s)

    def emit_clip(self, step) -> None:
        xq, s = self.q(step.src[0])
        lo, hi = self.qbounds(step.lo, step.hi, s)
        self.qmap[step.out] = (self.bb.emit(relax.op.clip(xq, lo, hi)), s)

    def emit_conv(self, step) -> None:
        c = step.conv
        xq, s_in = self.q(step.src[0])
        s_out = self.scales[step.out]
        wq, bq, s_w = self.quantize_weights(step.weight, step.bias, s_in)
        mult, shift = self.multiplier(s_in * s_w / s_out, step)
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        y = qops.emit_conv2d(
            self.bb, xq, wq, bq, c["strides"], c["padding"], c["dilation"], c["groups"],
            mult, shift, lo, hi, self.cfg.act_dtype,
        )  # fmt: skip
        self.qmap[step.out] = (y, s_out)

    def emit_dense(self, step) -> None:
        xq, s_in = self.q(step.src[0])
        s_out = self.scales[step.out]
        # weights are (K, M): quantize per output column with the channel on axis 0
        wq_t, bq, s_w = self.quantize_weights(step.weight.T, step.bias, s_in)
        mult, shift = self.multiplier(s_in * s_w / s_out, step)
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        wq = np.ascontiguousarray(wq_t.T)
        y = qops.emit_dense(self.bb, xq, wq, bq, mult, shift, lo, hi, self.cfg.act_dtype)
        self.qmap[step.out] = (y, s_out)

    def emit_avgpool(self, step) -> None:
        a = self.g.bindings[step.index].value.attrs
        x = step.src[0]
        xq, s_in = self.q(x)
        s_out = self.scales[step.out]
        channels = static_shape(x)[1]
        kh, kw = int_list(a.pool_size)
        ones = np.ones((channels, 1, kh, kw), self.cfg.weight_dtype)
        mult, shift = self.multiplier(np.full(channels, s_in / (s_out * kh * kw)), step)
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        y = qops.emit_conv2d(
            self.bb, xq, ones, None, int_list(a.strides), int_list(a.padding), int_list(a.dilation),
            channels, mult, shift, lo, hi, self.cfg.act_dtype,
        )  # fmt: skip
        self.qmap[step.out] = (y, s_out)

    def emit_gap(self, step) -> None:
        call = self.g.bindings[step.index].value
        x = step.src[0]
        xq, s_in = self.q(x)
        s_out = self.scales[step.out]
        _, _, h, w = static_shape(x)
        mult, shift = self.multiplier(s_in / (s_out * h * w), step)
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        y = qops.emit_global_avg_pool(self.bb, xq, int(mult), shift, lo, hi, self.cfg.act_dtype)
        if not bool(call.attrs.keepdims):
            y = self.bb.emit(relax.op.reshape(y, static_shape(call)))
        self.qmap[step.out] = (y, s_out)

    def emit_fused(self, step) -> None:
        """Nothing here: the residual add that consumes this conv emits it."""

    def _residual_weights(self, conv: Step, s_in: float, s_s: float):
        """Weights, bias, scales and shortcut weights ``K`` of a conv with a fused residual, or
        None when ``K`` would be below ``RESIDUAL_MIN_K`` or the accumulator could overflow."""
        cfg = self.cfg
        _, _, s_w = self.quantize_weights(conv.weight, conv.bias, s_in)
        k = np.floor(s_s / (s_in * s_w))
        if k.min() < RESIDUAL_MIN_K or k.max() >= 2**31:
            return None
        s_w = s_s / (s_in * k)  # >= the channel's own scale: its weights still fit
        wq, bq, s_w2 = self.quantize_weights(conv.weight, conv.bias, s_in, s_w_min=s_w)
        if not np.array_equal(s_w2, s_w):  # an overflow bound widened a scale: K inexact
            return None
        in_peak = float(1 << (cfg.act_bits - 1))
        flat = np.abs(wq.reshape(wq.shape[0], -1).astype(np.float64)).sum(axis=1)
        b_abs = np.abs(bq).astype(np.float64) if bq is not None else 0.0
        if np.max(in_peak * (flat + k) + b_abs) >= 2.0 ** (cfg.acc_bits - 1):
            return None
        return wq, bq, s_w, k.astype(np.int32)

    def _scale(self, var) -> float:
        return self.qmap[var][1] if var in self.qmap else self.scales[var]

    def emit_add(self, step) -> None:
        found = short = None
        for conv in step.fusable:  # the first whose shortcut weights qualify
            short = step.src[1] if step.src[0].same_as(conv.out) else step.src[0]
            s_in = self._scale(conv.src[0])
            found = self._residual_weights(conv, s_in, self._scale(short))
            if found is not None:
                step.residual = conv
                break
        for conv in step.fusable:  # the others run as ordinary convs, emitted here
            if conv is not step.residual:
                conv.kind = "conv"
                self.emit_conv(conv)
                self.report_step(conv)
        if step.residual is not None:
            self._emit_add_fused(step, short, *found)
            return
        aq, s_a = self.q(step.src[0])
        bq, s_b = self.q(step.src[1])
        s_out = self.scales[step.out]
        mult, shift = self.multiplier(
            [s_a / s_out, s_b / s_out], step, qops.add_mult_bits(self.cfg.act_bits)
        )
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        y = qops.emit_add(
            self.bb, aq, bq, int(mult[0]), int(mult[1]), shift, lo, hi, self.cfg.act_dtype
        )
        self.qmap[step.out] = (y, s_out)

    def _emit_add_fused(self, step, short, wq, bq, s_w, k) -> None:
        conv = step.residual
        xq, s_in = self.q(conv.src[0])
        sq, _ = self.q(short)
        s_out = self.scales[step.out]
        mult, shift = self.multiplier(s_in * s_w / s_out, step)
        lo, hi = self.qbounds(step.lo, step.hi, s_out)
        c = conv.conv
        y = qops.emit_conv2d_residual(
            self.bb, xq, wq, bq, c["strides"], c["padding"], c["dilation"], c["groups"],
            sq, k, mult, shift, lo, hi, self.cfg.act_dtype,
        )  # fmt: skip
        self.qmap[step.out] = (y, s_out)
