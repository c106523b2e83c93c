"""The integer vocabulary of a quantized hapm_fpga network, as plain Relax operators.

A quantized model is an ordinary Relax module whose accelerated layers are written with integer
Relax operators, so that TVM's own llvm build of the same module is an independent reference of
the accelerator's arithmetic.  This module is the one place that spells those operator chains;
the quantizer emits them (:mod:`tvm_hapm.passes.quantize`) and the partitioner matches them
(:mod:`tvm_hapm.passes.partition`).

Requantization (the ALU ``REQUANT`` instruction, ``docs/isa.md``)::

    y = clip((int64(acc) * M[c] + 2**(S-1)) >> S, lo, hi).astype(act)

Residual add (ALU ``MUL``/``ADD``/``SHR``/``MIN``/``MAX`` on int32)::

    y = clip((int32(a) * Ma + int32(b) * Mb + 2**(S-1)) >> S, lo, hi).astype(act)

Convolution with a fused residual add (the shortcut enters the accumulator, ``docs/pruning.md``)::

    acc = conv(x, W) + bias + int32(s) * K[c]          (int32, wrapping)
    y = clip((int64(acc) * M[c] + 2**(S-1)) >> S, lo, hi).astype(act)
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

__all__ = [
    "choose_multiplier",
    "emit_quantize",
    "emit_dequantize",
    "emit_requantize",
    "RequantChain",
    "rounds_half_up",
    "emit_conv2d",
    "emit_conv2d_residual",
    "emit_dense",
    "emit_add",
    "emit_global_avg_pool",
    "REQUANT_MULT_BITS",
]

#: Bits of the largest requantization multiplier (int64 product: acc needs at most 32 bits).
REQUANT_MULT_BITS = 15


def add_mult_bits(act_bits: int) -> int:
    """Multiplier bits of a residual add: ``|a*Ma| + |b*Mb| < 2**31`` in int32, and the
    multipliers fit the ALU's 16-bit signed immediate."""
    return min(15, 30 - act_bits)


def choose_multiplier(real_scales, mult_bits: int = REQUANT_MULT_BITS):
    """Fixed-point form ``M / 2**S`` of positive real scales sharing one shift ``S``.

    The largest multiplier lands in ``[2**(mult_bits-1), 2**mult_bits)`` where the shift allows
    (``1 <= S <= 62``).  Returns ``(M, S)`` with ``M`` an int64 array of the input's shape.
    """
    real = np.asarray(real_scales, dtype=np.float64)
    if not np.all(np.isfinite(real)) or np.any(real < 0):
        raise ValueError(f"requantization scales must be finite and >= 0, got {real}")
    peak = float(real.max()) if real.size else 0.0
    if peak == 0.0:
        return np.zeros(real.shape, np.int64), 1
    shift = mult_bits - 1 - math.floor(math.log2(peak))
    shift = int(min(max(shift, 1), 62))
    mult = np.round(real * (1 << shift)).astype(np.int64)
    if mult.max() >= (1 << 31):
        raise ValueError(f"requantization scale {peak} is too large for an int32 multiplier")
    return mult, shift


def _const(value, dtype):
    return relax.const(np.asarray(value, dtype=dtype), dtype)


def emit_quantize(bb: relax.BlockBuilder, x, scale: float, dtype: str = "int8"):
    """Float tensor -> integer, ``clip(round(x / scale))`` (runs on the host)."""
    info = np.iinfo(dtype)
    y = bb.emit(relax.op.divide(x, _const(scale, "float32")))
    y = bb.emit(relax.op.round(y))
    y = bb.emit(relax.op.clip(y, int(info.min), int(info.max)))
    return bb.emit(relax.op.astype(y, dtype))


def emit_dequantize(bb: relax.BlockBuilder, q, scale: float):
    """Integer tensor -> float32, ``q * scale`` (runs on the host)."""
    y = bb.emit(relax.op.astype(q, "float32"))
    return bb.emit(relax.op.multiply(y, _const(scale, "float32")))


class RequantChain:
    """The requantization that ends every convolution, dense layer and global average pooling,
    described once::

        int32 acc -> astype(int64) -> multiply(mult) -> add(2**(shift-1)) -> right_shift(shift)
                  -> clip(lo, hi) -> astype(out)

    The quantizer writes it (:meth:`emit`); the partitioner matches it (an instance is the
    pattern of the chain on top of an accumulator pattern, with its parts named in
    :meth:`annotations`); the lowering reads the parameters back from that match by those
    names (:meth:`read`), never by the position of a binding.
    """

    def __init__(self, acc):
        self.mult, self.round, self.shift = is_const(), is_const(), is_const()
        x = is_op("relax.astype")(acc)
        x = is_op("relax.multiply")(x, self.mult)
        x = is_op("relax.add")(x, self.round)
        x = is_op("relax.right_shift")(x, self.shift)
        self.clip = is_op("relax.clip")(x, wildcard(), wildcard())
        #: The pattern of the whole chain (its root: the final cast).
        self.pattern = is_op("relax.astype")(self.clip)

    def annotations(self) -> dict:
        """The chain's named parts, for a ``FusionPattern``'s annotation patterns."""
        return {
            "requant_mult": self.mult,
            "requant_round": self.round,
            "requant_shift": self.shift,
            "requant_clip": self.clip,
        }

    @staticmethod
    def emit(bb, acc, mult: np.ndarray, shift: int, lo: int, hi: int, out_dtype: str):
        """int32 accumulator -> ``out_dtype`` with per-channel multipliers ``mult`` (shaped to
        broadcast against ``acc``, e.g. ``(1, C, 1, 1)`` for NCHW) and one shift."""
        y = bb.emit(relax.op.astype(acc, "int64"))
        y = bb.emit(relax.op.multiply(y, _const(mult, "int64")))
        y = bb.emit(relax.op.add(y, _const(1 << (shift - 1), "int64")))
        y = bb.emit(relax.op.right_shift(y, _const(shift, "int64")))
        y = bb.emit(relax.op.clip(y, int(lo), int(hi)))
        return bb.emit(relax.op.astype(y, out_dtype))

    @staticmethod
    def read(parts: dict) -> tuple[np.ndarray, int, tuple[int, int]]:
        """``(mult, shift, (lo, hi))`` from a match's named parts (:meth:`annotations` names to
        the matched expressions); ``ValueError`` unless the rounding term is ``2**(shift-1)``
        (the hardware's rounding)."""
        mult = parts["requant_mult"].value.numpy().reshape(-1)
        shift = int(parts["requant_shift"].value.numpy())
        rounding = int(parts["requant_round"].value.numpy())
        if not rounds_half_up(rounding, shift):
            raise ValueError(f"requantization adds {rounding} before >> {shift}, not half up")
        clip = parts["requant_clip"]
        return mult, shift, (_prim(clip.args[1]), _prim(clip.args[2]))


def rounds_half_up(rounding: int, shift: int) -> bool:
    """Whether ``(x + rounding) >> shift`` is the hardware's rounding (half up: ``rounding`` is
    ``2**(shift-1)``), for every chain that shifts: the requantization and the add's rescale."""
    return shift >= 1 and rounding == 1 << (shift - 1)


def _prim(expr) -> int:
    return int(expr.value) if hasattr(expr, "value") else int(expr)


#: The quantizer's name for :meth:`RequantChain.emit`.
emit_requantize = RequantChain.emit


def _emit_conv_acc(bb, xq, wq: np.ndarray, bias, strides, padding, dilation, groups):
    """int conv2d (NCHW / OIHW) accumulating in int32, plus the int32 bias if any."""
    acc = bb.emit(
        relax.op.nn.conv2d(
            xq,
            relax.const(wq, str(wq.dtype)),
            strides=strides,
            padding=padding,
            dilation=dilation,
            groups=groups,
            out_dtype="int32",
        )
    )
    if bias is not None:
        acc = bb.emit(relax.op.add(acc, _const(bias.reshape(1, -1, 1, 1), "int32")))
    return acc


def emit_conv2d(
    bb, xq, wq: np.ndarray, bias: np.ndarray | None, strides, padding, dilation, groups,
    mult, shift, lo, hi, out_dtype,
):  # fmt: skip
    """Quantized conv2d (NCHW / OIHW): int conv -> int32 (+ bias) -> requantize."""
    acc = _emit_conv_acc(bb, xq, wq, bias, strides, padding, dilation, groups)
    m = np.asarray(mult, np.int64).reshape(1, -1, 1, 1)
    return emit_requantize(bb, acc, m, shift, lo, hi, out_dtype)


def emit_conv2d_residual(
    bb, xq, wq: np.ndarray, bias: np.ndarray | None, strides, padding, dilation, groups,
    sq, k: np.ndarray, mult, shift, lo, hi, out_dtype,
):  # fmt: skip
    """Quantized conv2d with a fused residual add: the int8 shortcut ``sq`` (the output's shape)
    enters the int32 accumulator with per-channel integer weights ``k``, then one requantize."""
    acc = _emit_conv_acc(bb, xq, wq, bias, strides, padding, dilation, groups)
    r = bb.emit(relax.op.astype(sq, "int32"))
    r = bb.emit(relax.op.multiply(r, _const(np.asarray(k).reshape(1, -1, 1, 1), "int32")))
    acc = bb.emit(relax.op.add(acc, r))
    m = np.asarray(mult, np.int64).reshape(1, -1, 1, 1)
    return emit_requantize(bb, acc, m, shift, lo, hi, out_dtype)


def emit_dense(bb, xq, wq: np.ndarray, bias: np.ndarray | None, mult, shift, lo, hi, out_dtype):
    """Quantized dense: ``(N, K) x (K, M)`` int matmul -> int32 (+ bias) -> requantize."""
    acc = bb.emit(relax.op.matmul(xq, relax.const(wq, str(wq.dtype)), out_dtype="int32"))
    if bias is not None:
        acc = bb.emit(relax.op.add(acc, _const(bias.reshape(-1), "int32")))
    m = np.asarray(mult, np.int64).reshape(-1)
    return emit_requantize(bb, acc, m, shift, lo, hi, out_dtype)


def emit_add(bb, aq, bq, mult_a: int, mult_b: int, shift: int, lo: int, hi: int, out_dtype):
    """Quantized residual add of two integer tensors with different scales."""
    a = bb.emit(relax.op.astype(aq, "int32"))
    a = bb.emit(relax.op.multiply(a, _const(mult_a, "int32")))
    b = bb.emit(relax.op.astype(bq, "int32"))
    b = bb.emit(relax.op.multiply(b, _const(mult_b, "int32")))
    y = bb.emit(relax.op.add(a, b))
    y = bb.emit(relax.op.add(y, _const(1 << (shift - 1), "int32")))
    y = bb.emit(relax.op.right_shift(y, _const(shift, "int32")))
    y = bb.emit(relax.op.clip(y, int(lo), int(hi)))
    return bb.emit(relax.op.astype(y, out_dtype))


def emit_global_avg_pool(bb, xq, mult: int, shift: int, lo: int, hi: int, out_dtype):
    """Quantized global average pooling (NCHW, keepdims): int32 sum over H, W -> requantize
    with ``mult / 2**shift = scale_in / (scale_out * H * W)``."""
    s = bb.emit(relax.op.astype(xq, "int32"))
    s = bb.emit(relax.op.sum(s, axis=[2, 3], keepdims=True))
    return emit_requantize(bb, s, np.asarray([mult], np.int64), shift, lo, hi, out_dtype)
