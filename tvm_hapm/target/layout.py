"""How an accelerated layer's operands are laid out: checked geometry, weight blocks,
constant rows and DRAM slots.

These are facts of the hardware's dataflow (``docs/isa.md``), not of one code generator: the
production path (:mod:`tvm_hapm.target.tir`), the cost models and the pruning read them here, and
the tests' independent direct generator (:mod:`tvm_hapm.testing.direct_codegen`) builds on the
same definitions so that the two streams are compared with everything else equal.

Weight blocks: an OIHW weight becomes dense ``R x C`` blocks ``(COB, CIB, KH, KW, R, C)``
(:func:`expand_weight_blocks`; grouped and depthwise convolutions are block-diagonal); an
all-zero block is dropped at compile time (no load, no GEMM), which is what HAPM's pruning
exploits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import HardwareConfig
from .isa import MAX_INNER_STRIDE, MAX_PAD
from .program import Slot
from .schedule import conv_output_size

__all__ = [
    "CodegenError",
    "ConvGeometry",
    "bias_mult_rows",
    "check_clip",
    "conv_geometry",
    "conv_info",
    "conv_slots",
    "expand_weight_blocks",
]


class CodegenError(ValueError):
    """A layer the accelerator cannot execute (the partitioner keeps such layers on the host)."""


def check_clip(cfg, lo, hi):
    """``CodegenError`` unless the clip bounds lie inside the activation range."""
    amin, amax = cfg.act_range
    if not (amin <= lo <= hi <= amax):
        raise CodegenError(f"clip bounds [{lo}, {hi}] outside the activation range")


def expand_weight_blocks(cfg: HardwareConfig, weight: np.ndarray, groups: int) -> np.ndarray:
    """OIHW (grouped) integer weights -> dense blocks ``(COB, CIB, KH, KW, R, C)``.

    Block ``[cob, cib, kh, kw]`` holds ``W[cob*C + c, cib*R + r, kh, kw]`` at ``[r, c]``; a grouped
    convolution's weights become block-diagonal with zeros between groups.
    """
    R, C = cfg.array_rows, cfg.array_cols
    cout, cin_g, kh, kw = weight.shape
    cin = cin_g * groups
    cob, cib = -(-cout // C), -(-cin // R)
    dense = np.zeros((cob * C, cib * R, kh, kw), dtype=weight.dtype)
    cout_g = cout // groups
    for g in range(groups):
        dense[g * cout_g : (g + 1) * cout_g, g * cin_g : (g + 1) * cin_g] = weight[
            g * cout_g : (g + 1) * cout_g
        ]
    # (COB, C, CIB, R, KH, KW) -> (COB, CIB, KH, KW, R, C)
    return dense.reshape(cob, C, cib, R, kh, kw).transpose(0, 2, 4, 5, 3, 1)


def bias_mult_rows(
    cfg: HardwareConfig, layer: str, cout: int, bias, mult, residual=None
) -> np.ndarray:
    """The ``bias_mult`` constant ``(rows * COB, C)`` int32: per output block ``cob``, row
    ``rows*cob`` its bias, row ``rows*cob+1`` its requantization multipliers and, with a fused
    ``residual`` (the shortcut's integer weights per channel), row ``rows*cob+2`` those weights
    (``rows`` is 2 without, 3 with a residual)."""
    C = cfg.array_cols
    cob = -(-cout // C)
    rows = []
    for values in (bias, mult) if residual is None else (bias, mult, residual):
        full = np.zeros(cob * C, np.int64)
        if values is not None:
            full[:cout] = np.broadcast_to(np.asarray(values).reshape(-1), (cout,))
        if np.abs(full).max(initial=0) >= 2**31:
            raise CodegenError(f"{layer}: bias, multiplier or residual weight exceeds int32")
        rows.append(full.reshape(cob, C))
    return np.stack(rows, 1).reshape(len(rows) * cob, C).astype(np.int32)


@dataclass(frozen=True)
class ConvGeometry:
    """A checked convolution layer: integer geometry, output size and its weight blocks."""

    data_shape: tuple  # (n, cin, h, w)
    strides: tuple
    dilation: tuple
    padding: tuple  # (top, left, bottom, right)
    oh: int
    ow: int
    blocks: np.ndarray  # (COB, CIB, KH, KW, R, C), see expand_weight_blocks
    nonzero: np.ndarray  # (COB, CIB, KH, KW): the blocks the compiler keeps


def conv_geometry(cfg, layer, data_shape, weight, strides, padding, dilation, groups, clip):
    """Check a conv layer against the ISA's fields and compute its geometry and weight blocks;
    the one place both generators (this module and :mod:`tvm_hapm.target.tir`) do it."""
    n, cin, h, w = (int(v) for v in data_shape)
    cout, cin_g, kh, kw = weight.shape
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilation)
    pt, pl, pb, pr = (int(p) for p in padding)
    if cin_g * groups != cin or cout % groups:
        raise CodegenError(f"{layer}: weight {weight.shape} does not match {cin} input channels")
    if max(pt, pl, pb, pr) > MAX_PAD:
        raise CodegenError(f"{layer}: padding {padding} exceeds the DMA's pad field ({MAX_PAD})")
    if max(sh, sw, dh, dw) > MAX_INNER_STRIDE:
        raise CodegenError(
            f"{layer}: stride {strides} or dilation {dilation} exceeds the GEMM stride field "
            f"({MAX_INNER_STRIDE}), the limit partitioning applies"
        )
    oh, ow = conv_output_size(h, pt, pb, kh, sh, dh), conv_output_size(w, pl, pr, kw, sw, dw)
    if oh < 1 or ow < 1:
        raise CodegenError(f"{layer}: empty output")
    check_clip(cfg, *clip)
    blocks = expand_weight_blocks(cfg, weight, groups)
    nonzero = np.any(blocks != 0, axis=(4, 5))
    return ConvGeometry(
        (n, cin, h, w), (sh, sw), (dh, dw), (pt, pl, pb, pr), oh, ow, blocks, nonzero
    )


def conv_slots(cfg, g: ConvGeometry, cout: int, wblocks, bias_mult, fused: bool) -> list[Slot]:
    """The DRAM slots of a convolution program (both generators): data, [residual], the weight
    blocks and the bias / multiplier rows (constants), out."""
    R, C = cfg.array_rows, cfg.array_cols
    n, _, _, _ = g.data_shape
    out_shape = (n, cout, g.oh, g.ow)
    slots = [
        Slot("data", "input", cfg.act_dtype, tuple(g.data_shape), "act", R),
        Slot("weight_blocks", "const", cfg.weight_dtype, wblocks.shape),
        Slot("bias_mult", "const", "int32", bias_mult.shape),
        Slot("out", "output", cfg.act_dtype, out_shape, "act", C),
    ]
    if fused:
        slots.insert(1, Slot("residual", "input", cfg.act_dtype, out_shape, "act", C))
    return slots


def conv_info(g: ConvGeometry, weight_shape, nonzero_blocks: int, sched, fused: bool) -> dict:
    """The ``Program.info`` of a convolution program (both generators)."""
    n, _, _, _ = g.data_shape
    cout, cin_g, kh, kw = weight_shape
    info = {
        "kind": "conv2d_residual" if fused else "conv2d",
        "macs": int(n * g.oh * g.ow * cout * cin_g * kh * kw),
        "weight_blocks": int(g.blocks.shape[0] * g.blocks.shape[1] * kh * kw),
        "nonzero_blocks": int(nonzero_blocks),
        "schedule": sched.to_dict(),
    }
    if fused:
        info["residual"] = True
    return info
