"""TE definitions of the accelerator layers on the packed DRAM layouts, and the names (attributes,
packed functions) the TIR flow shares."""

from __future__ import annotations

import json

import tvm
import tvm_ffi
from tvm import s_tir, te, tirx

from ..config import HardwareConfig
from ..intrin import SCOPE_ACC, SCOPE_INP, SCOPE_WGT
from ..isa import Buffer
from ..schedule import (
    RESIDUAL_CONST_ROWS,
    conv_output_size,
)
from .walk import TirLoweringError, node_key, node_kind

KERNEL_ATTR = "hapm_fpga.kernel"
#: PrimFunc attribute with the layer constants (JSON), set by :func:`conv2d_primfunc`.
LAYER_ATTR = "hapm_fpga.layer"
#: PrimFunc attribute with the tile plan (JSON), set by :func:`schedule_conv2d`.
SCHEDULE_ATTR = "hapm_fpga.schedule"
#: PrimFunc attribute marking a function already lowered by :func:`LowerToAccelerator`.
LOWERED_ATTR = "hapm_fpga.lowered"
#: Global function the built host code calls to run an accelerator program.
RUN_TIR_FUNC = "hapm_fpga.run_tir"
DMA_LOAD = "hapm_fpga.dma_load"
DMA_STORE = "hapm_fpga.dma_store"

SCOPE_BUFFER = {SCOPE_INP: Buffer.INP, SCOPE_WGT: Buffer.WGT, SCOPE_ACC: Buffer.ACC}


# =============================================================================================
# TE definitions
def requant_stages(cfg: HardwareConfig, acc: te.Tensor, mult_at, shift: int, clip):
    """The requantization of an int32 stage ``acc`` (the ALU's ``REQUANT``): stage ``requant``,
    ``(acc * mult + 2**(shift-1)) >> shift`` in int64 saturated to the activation range, with
    ``mult_at(*index)`` the multiplier of an element, then stage ``clip`` when ``clip`` is
    narrower than that range.  Returns the last stage (int32); the one definition of the TE
    requantization, for every layer that ends with it."""
    i64 = "int64"
    amin, amax = cfg.act_range
    lo, hi = clip

    def requantized(*i):
        v = acc[i].astype(i64) * mult_at(*i).astype(i64) + tirx.const(1 << (shift - 1), i64)
        v = tirx.min(v >> tirx.const(shift, i64), tirx.const(amax, i64))
        return tirx.max(v, tirx.const(amin, i64)).astype("int32")

    requant = te.compute(acc.shape, requantized, name="requant")
    if lo <= amin and hi >= amax:
        return requant

    def clipped(*i):
        v = requant[i]
        if lo > amin:
            v = tirx.max(v, lo)
        if hi < amax:
            v = tirx.min(v, hi)
        return v

    return te.compute(acc.shape, clipped, name="clip")


def conv2d_primfunc(
    cfg: HardwareConfig,
    n: int,
    cin: int,
    h: int,
    w: int,
    cout: int,
    kh: int,
    kw: int,
    strides=(1, 1),
    padding=(0, 0, 0, 0),
    dilation=(1, 1),
    shift: int = 8,
    clip: tuple[int, int] | None = None,
    kind: str = "conv2d",
    residual: bool = False,
) -> tirx.PrimFunc:
    """A quantized conv2d on the packed DRAM layouts (module docstring), as a TE PrimFunc.

    Parameters
    ----------
    cfg : HardwareConfig
        The accelerator; gives the block sizes ``R``, ``C`` and the activation type.
    n, cin, h, w : int
        Input batch, channels and size (``cin`` is rounded up to whole blocks of ``R``).
    cout, kh, kw : int
        Output channels (rounded up to blocks of ``C``) and kernel size.
    strides, padding, dilation : tuple of int
        ``(sh, sw)``, ``(top, left, bottom, right)`` and ``(dh, dw)``.
    shift : int
        Right shift of the requantization, in ``[1, 62]``.
    clip : tuple of int, optional
        Output bounds inside the activation range (default: the activation range).
    kind : str
        ``"conv2d"`` or ``"dense"``, recorded for the codegen report.
    residual : bool
        A fused residual add (``kind`` ``"conv2d_residual"``): a second input
        ``residual (N, COB, OH, OW, C)`` (the shortcut, the output's layout) and three rows
        per output block in ``bias_mult`` (``3*cob``: bias, ``3*cob+1``: multipliers,
        ``3*cob+2``: the shortcut's integer weights ``K``).  The stage ``shortcut`` is
        ``int32(residual) * K`` and the ``conv`` reduction starts from it
        (``te.sum(..., init=shortcut)``) instead of 0.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``main(data, weight, bias_mult, out)`` (``main(data, residual, weight, bias_mult,
        out)`` with ``residual``) with the layer constants in its ``"hapm_fpga.layer"``
        attribute.  Stages: ``pad``, (``shortcut``,) ``conv`` (int32 reduction over
        ``(cib, kh, kw, r)``), ``bias``, ``requant`` (with saturation), ``clip``
        (only if ``clip`` is narrower than the activation range) and ``out`` (the cast).
    """
    R, C = cfg.array_rows, cfg.array_cols
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilation)
    pt, pl, pb, pr = (int(p) for p in padding)
    amin, amax = cfg.act_range
    lo, hi = clip if clip is not None else (amin, amax)
    if not amin <= lo <= hi <= amax:
        raise TirLoweringError(f"clip bounds [{lo}, {hi}] outside the activation range")
    if not 1 <= shift <= 62:
        raise TirLoweringError(f"shift {shift} outside [1, 62]")
    cib, cob = -(-cin // R), -(-cout // C)
    oh, ow = conv_output_size(h, pt, pb, kh, sh, dh), conv_output_size(w, pl, pr, kw, sw, dw)
    act = cfg.act_dtype

    rows = RESIDUAL_CONST_ROWS if residual else 2  # constant rows per output block
    data = te.placeholder((n, cib, h, w, R), act, name="data")
    weight = te.placeholder((cob, cib, kh, kw, R, C), cfg.weight_dtype, name="weight")
    bias_mult = te.placeholder((rows * cob, C), "int32", name="bias_mult")
    out_shape = (n, cob, oh, ow, C)
    if pt or pl or pb or pr:
        pad = te.compute(
            (n, cib, h + pt + pb, w + pl + pr, R),
            lambda b, k, y, x, r: tirx.if_then_else(
                tirx.all(y >= pt, y < h + pt, x >= pl, x < w + pl),
                data[b, k, y - pt, x - pl, r],
                tirx.const(0, act),
            ),
            name="pad",
        )
    else:
        pad = te.compute(data.shape, lambda *i: data[i], name="pad")
    rk = te.reduce_axis((0, cib), "rk")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rr = te.reduce_axis((0, R), "rr")
    shortcut = None
    if residual:
        res = te.placeholder(out_shape, act, name="residual")
        shortcut = te.compute(
            out_shape,
            lambda b, co, y, x, c: (
                res[b, co, y, x, c].astype("int32") * bias_mult[rows * co + 2, c]
            ),
            name="shortcut",
        )
    conv = te.compute(
        out_shape,
        lambda b, co, y, x, c: te.sum(
            pad[b, rk, y * sh + ry * dh, x * sw + rx * dw, rr].astype("int32")
            * weight[co, rk, ry, rx, rr, c].astype("int32"),
            axis=[rk, ry, rx, rr],
            init=None if shortcut is None else shortcut[b, co, y, x, c],
        ),
        name="conv",
    )
    bias = te.compute(
        out_shape,
        lambda b, co, y, x, c: conv[b, co, y, x, c] + bias_mult[rows * co, c],
        name="bias",
    )
    last = requant_stages(
        cfg, bias, lambda b, co, y, x, c: bias_mult[rows * co + 1, c], shift, (lo, hi)
    )
    out = te.compute(out_shape, lambda *i: last[i].astype(act), name="out")
    if residual:
        func = te.create_prim_func([data, res, weight, bias_mult, out])
        func = _reduction_init_from(func, "conv", "shortcut")
    else:
        func = te.create_prim_func([data, weight, bias_mult, out])
    layer = {
        "kind": "conv2d_residual" if residual else kind,
        "config": cfg.name,
        "n": n,
        "cin": cin,
        "h": h,
        "w": w,
        "cout": cout,
        "kh": kh,
        "kw": kw,
        "strides": [sh, sw],
        "padding": [pt, pl, pb, pr],
        "dilation": [dh, dw],
        "shift": shift,
        "clip": [lo, hi],
        "oh": oh,
        "ow": ow,
        "cib": cib,
        "cob": cob,
    }
    if residual:
        layer["residual"] = True
    return func.with_attr(LAYER_ATTR, json.dumps(layer, sort_keys=True))


def blocks_named(stmt, *names) -> dict:
    found = {}

    def on_block(block):
        if str(block.name_hint) in names:
            found[str(block.name_hint)] = block

    tvm_ffi.structural_walk(stmt, (s_tir.SBlock, on_block))
    return found


def _reduction_init_from(func: tirx.PrimFunc, reduction: str, stage: str) -> tirx.PrimFunc:
    """``func`` with the init of block ``reduction`` reading ``stage`` at the same indices.

    ``te.sum(..., init=stage[...])`` states it, but ``te.create_prim_func`` (0.27) keeps the
    ``stage`` block and initialises the reduction to 0: the init and the read are put back.
    """
    blocks = blocks_named(func.body, reduction, stage)
    src = blocks[stage].writes[0].source
    one = tirx.const(1, "int32")

    def _fix(block):
        if str(block.name_hint) != reduction:
            return block
        init = block.init
        if node_kind(init) != "BufferStore" or node_kind(init.value) != "IntImm":
            raise TirLoweringError(f"{reduction}: unexpected reduction init {init}")
        idx = list(init.indices)
        region = tirx.BufferRegion(src, [tvm.ir.Range.from_min_extent(i, one) for i in idx])
        return s_tir.SBlock(
            block.iter_vars, [*block.reads, region], block.writes, block.name_hint, block.body,
            tirx.BufferStore(init.buffer, tirx.BufferLoad(src, idx), idx), block.alloc_buffers,
            block.match_buffers, block.annotations,
        )  # fmt: skip

    return func.with_body(tvm_ffi.structural_map(func.body, (s_tir.SBlock, _fix), order="post"))


def init_reads_fixed(func: tirx.PrimFunc, reduction: str) -> tirx.PrimFunc:
    """``func`` after ``decompose_reduction`` of block ``reduction`` whose init reads a buffer:
    0.27 leaves that read on ``<reduction>_update`` and none on ``<reduction>_init``; the
    regions are put where the accesses are."""
    init_name, update_name = f"{reduction}_init", f"{reduction}_update"
    init = blocks_named(func.body, init_name)[init_name]
    buffers = {p: p for p in func.params}
    tvm_ffi.structural_walk(
        func.body, (s_tir.SBlock, lambda b: buffers.update({a: a for a in b.alloc_buffers}))
    )
    reads = s_tir.analysis.get_sblock_read_write_region(init, buffers)[0]
    only_init = {node_key(r.source) for r in reads}

    def _fix(block):
        name = str(block.name_hint)
        if name == init_name:
            new_reads = reads
        elif name == update_name:
            new_reads = [r for r in block.reads if node_key(r.source) not in only_init]
        else:
            return block
        return s_tir.SBlock(
            block.iter_vars, new_reads, block.writes, block.name_hint, block.body, block.init,
            block.alloc_buffers, block.match_buffers, block.annotations,
        )  # fmt: skip

    return func.with_body(tvm_ffi.structural_map(func.body, (s_tir.SBlock, _fix), order="post"))


def dense_primfunc(
    cfg: HardwareConfig, n: int, k: int, m: int, shift: int = 8, clip=None
) -> tirx.PrimFunc:
    """A quantized ``(N, K) x (K, M)`` matmul: the 1x1 convolution of a 1x1 image.

    The layouts are those of :func:`conv2d_primfunc` with ``H = W = KH = KW = 1``.
    """
    return conv2d_primfunc(cfg, n, k, 1, 1, m, 1, 1, shift=shift, clip=clip, kind="dense")


def layer_of(func: tirx.PrimFunc) -> dict:
    attrs = func.attrs
    if attrs is None or LAYER_ATTR not in attrs:
        raise TirLoweringError(f"the PrimFunc has no '{LAYER_ATTR}' attribute")
    return json.loads(str(attrs[LAYER_ATTR]))
