"""TE definitions of the accelerator layers on the packed DRAM layouts, and the names (attributes,
packed functions) the TIR flow shares."""

from __future__ import annotations

import functools
import json
import re

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
from .walk import TirLoweringError, buffer_shape, node_key, node_kind

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

#: Marks the output region of a stage in its name (``conv@1``); region 0 keeps the plain name.
REGION_MARK = "@"
_REGION_SUFFIX = re.compile(re.escape(REGION_MARK) + r"\d+")


# =============================================================================================
# output regions
def output_regions(oh: int, ow: int, tile_h: int, tile_w: int) -> list[dict]:
    """The output regions of a ``tile_h x tile_w`` tiling: each a rectangle of equal tiles.

    Row-band major, as the tiles run: the full tiles, the last column of tiles when
    ``tile_w`` does not divide ``ow``, then the last row of tiles when ``tile_h`` does not
    divide ``oh`` (full columns, then the corner).  Each region is a dict: first row and
    column ``y0`` / ``x0``, extent ``rows`` / ``cols`` and its tile ``tile_h`` / ``tile_w``
    (the planned tile, or the edge that is left).
    """

    def bands(extent, tile):
        full = extent - extent % tile
        out = [(0, full, tile)] if full else []
        if extent % tile:
            out.append((full, extent - full, extent - full))
        return out

    return [
        {"y0": y0, "rows": rows, "tile_h": th, "x0": x0, "cols": cols, "tile_w": tw}
        for y0, rows, th in bands(oh, tile_h)
        for x0, cols, tw in bands(ow, tile_w)
    ]


def region_stage(stage: str, region: int) -> str:
    """The name of ``stage`` (a block, its buffer) in output region ``region``."""
    return stage if region == 0 else f"{stage}{REGION_MARK}{region}"


def region_class(name: str) -> str:
    """A block or buffer name without its region: the copies of one stage (or of its on-chip
    buffer) in the regions of a layer share it."""
    return _REGION_SUFFIX.sub("", name)


# =============================================================================================
# TE definitions
def check_shift(shift: int) -> None:
    """Refuse a requantization shift outside ``[1, 62]`` (``REQUANT`` rounds half up by
    ``2**(shift-1)`` and works in int64)."""
    if not 1 <= shift <= 62:
        raise TirLoweringError(f"shift {shift} outside [1, 62]")


def requant_stages(cfg: HardwareConfig, acc: te.Tensor, mult_at, shift: int, clip, region=0):
    """The requantization of an int32 stage ``acc`` (the ALU's ``REQUANT``): stage ``requant``,
    ``(acc * mult + 2**(shift-1)) >> shift`` in int64 saturated to the activation range, with
    ``mult_at(*index)`` the multiplier of an element, then stage ``clip`` when ``clip`` is
    narrower than that range.  Returns the last stage (int32); the one definition of the TE
    requantization, for every layer that ends with it.  ``region`` names the stages of an
    output region (:func:`region_stage`)."""
    i64 = "int64"
    amin, amax = cfg.act_range
    lo, hi = clip

    def requantized(*i):
        v = acc[i].astype(i64) * mult_at(*i).astype(i64) + tirx.const(1 << (shift - 1), i64)
        v = tirx.min(v >> tirx.const(shift, i64), tirx.const(amax, i64))
        return tirx.max(v, tirx.const(amin, i64)).astype("int32")

    requant = te.compute(acc.shape, requantized, name=region_stage("requant", region))
    if lo <= amin and hi >= amax:
        return requant

    def clipped(*i):
        v = requant[i]
        if lo > amin:
            v = tirx.max(v, lo)
        if hi < amax:
            v = tirx.min(v, hi)
        return v

    return te.compute(acc.shape, clipped, name=region_stage("clip", region))


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
    tile: tuple[int, int] | None = None,
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
    tile : tuple of int, optional
        ``(tile_h, tile_w)``, the output tile the function is defined for.  The output is
        then made of the :func:`output_regions` of that tiling, each with its own stages
        (named by :func:`region_stage`: ``conv``, ``conv@1``, ...) and its own output
        ``out@<region>`` (:func:`~tvm_hapm.target.tir.schedule_conv2d` makes them one
        ``out``), so that every region is tiled by whole tiles: its last tiles (the edge left
        when ``tile_h`` or ``tile_w`` does not divide the output) are exact, with no
        predicate, which ``Schedule.tensorize`` refuses in TVM 0.27.  With a dividing tile
        there is one region: the stages of the function without ``tile``.

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
    check_shift(shift)
    cib, cob = -(-cin // R), -(-cout // C)
    oh, ow = conv_output_size(h, pt, pb, kh, sh, dh), conv_output_size(w, pl, pr, kw, sw, dw)
    act = cfg.act_dtype

    rows = RESIDUAL_CONST_ROWS if residual else 2  # constant rows per output block
    data = te.placeholder((n, cib, h, w, R), act, name="data")
    weight = te.placeholder((cob, cib, kh, kw, R, C), cfg.weight_dtype, name="weight")
    bias_mult = te.placeholder((rows * cob, C), "int32", name="bias_mult")
    res = te.placeholder((n, cob, oh, ow, C), act, name="residual") if residual else None
    regions = output_regions(oh, ow, *tile) if tile is not None else None
    whole = {"y0": 0, "rows": oh, "x0": 0, "cols": ow}
    geometry = ((sh, sw), (dh, dw), (pt, pl, pb, pr), shift, (lo, hi))
    outs = [
        _conv_region(cfg, (data, weight, bias_mult, res), geometry, r, region)
        for r, region in enumerate(regions or [whole])
    ]
    inputs = [data, res] if residual else [data]
    func = te.create_prim_func([*inputs, weight, bias_mult, *outs])
    for r in range(len(outs)) if residual else ():
        func = _reduction_init_from(func, region_stage("conv", r), region_stage("shortcut", r))
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
    if regions is not None:
        layer["tile"] = [int(t) for t in tile]
        layer["regions"] = regions
    return func.with_attr(LAYER_ATTR, json.dumps(layer, sort_keys=True))


def _conv_region(cfg: HardwareConfig, tensors, geometry, index: int, region: dict) -> te.Tensor:
    """The stages of output region ``index`` of :func:`conv2d_primfunc` (``region``: its first row
    and column ``y0``, ``x0`` and extent ``rows``, ``cols``): ``pad``, (``shortcut``,)
    ``conv``, ``bias``, ``requant``, (``clip``,) ``out``, named by :func:`region_stage`.
    ``tensors`` are the placeholders ``(data, weight, bias_mult, residual or None)``,
    ``geometry`` is ``(strides, dilation, padding, shift, clip)``; returns ``out``."""
    data, weight, bias_mult, res = tensors
    (sh, sw), (dh, dw), (pt, pl, pb, pr), shift, clip = geometry
    n, cib, h, w, R = (int(v) for v in data.shape)
    cob, _, kh, kw, _, C = (int(v) for v in weight.shape)
    rows = int(bias_mult.shape[0]) // cob  # constant rows per output block
    act = cfg.act_dtype
    stage = functools.partial(region_stage, region=index)
    y0, x0 = region["y0"], region["x0"]
    out_shape = (n, cob, region["rows"], region["cols"], C)
    if pt or pl or pb or pr:
        pad = te.compute(
            (n, cib, h + pt + pb, w + pl + pr, R),
            lambda b, k, y, x, r: tirx.if_then_else(
                tirx.all(y >= pt, y < h + pt, x >= pl, x < w + pl),
                data[b, k, y - pt, x - pl, r],
                tirx.const(0, act),
            ),
            name=stage("pad"),
        )
    else:
        pad = te.compute(data.shape, lambda *i: data[i], name=stage("pad"))
    rk = te.reduce_axis((0, cib), "rk")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rr = te.reduce_axis((0, R), "rr")
    shortcut = None
    if res is not None:
        shortcut = te.compute(
            out_shape,
            lambda b, co, y, x, c: (
                res[b, co, plus(y, y0), plus(x, x0), c].astype("int32")
                * bias_mult[rows * co + 2, c]
            ),
            name=stage("shortcut"),
        )
    conv = te.compute(
        out_shape,
        lambda b, co, y, x, c: te.sum(
            pad[b, rk, plus(y, y0) * sh + ry * dh, plus(x, x0) * sw + rx * dw, rr].astype("int32")
            * weight[co, rk, ry, rx, rr, c].astype("int32"),
            axis=[rk, ry, rx, rr],
            init=None if shortcut is None else shortcut[b, co, y, x, c],
        ),
        name=stage("conv"),
    )
    bias = te.compute(
        out_shape,
        lambda b, co, y, x, c: conv[b, co, y, x, c] + bias_mult[rows * co, c],
        name=stage("bias"),
    )
    last = requant_stages(
        cfg, bias, lambda b, co, y, x, c: bias_mult[rows * co + 1, c], shift, clip, index
    )
    return te.compute(out_shape, lambda *i: last[i].astype(act), name=stage("out"))


def plus(index, offset: int):
    """``index + offset``, without a ``+ 0`` in the expression of the first region."""
    return index + offset if offset else index


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


def merge_region_outputs(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` (a scheduled layer defined with output regions: :func:`conv2d_primfunc`,
    :func:`~tvm_hapm.target.tir.max_pool2d_primfunc`) with the regions' outputs ``out``,
    ``out@1``, ... made its one output ``out``: each region's stores and written regions move
    to the region's place in it (the outputs' last three axes are rows, columns and lanes).

    The regions keep separate outputs while they are scheduled: ``Schedule`` needs every
    stage to be the only writer of its buffer (a complete block) to move it.
    """
    L = layer_of(func)
    regions = L["regions"]
    params = list(func.params)
    outs, params = params[-len(regions) :], params[: -len(regions)]
    shape = buffer_shape(outs[0])
    shape[-3:-1] = L["oh"], L["ow"]  # (..., rows, columns, lanes)
    out = tirx.decl_buffer(shape, str(outs[0].ty.dtype), name="out")
    offsets = {node_key(b): (reg["y0"], reg["x0"]) for b, reg in zip(outs, regions, strict=True)}

    def shifted(buf, indices):
        y0, x0 = offsets[node_key(buf)]
        *outer, y, x, c = indices
        return [*outer, plus(y, y0), plus(x, x0), c]

    def on_store(store):
        if node_key(store.buffer) not in offsets:
            return store
        return tirx.BufferStore(out, store.value, shifted(store.buffer, store.indices))

    def on_region(region):
        buf = region.source
        if node_key(buf) not in offsets:
            return region
        y0, x0 = offsets[node_key(buf)]
        ranges = list(region.region)
        for axis, offset in ((-3, y0), (-2, x0)):
            rng = ranges[axis]
            ranges[axis] = tvm.ir.Range.from_min_extent(plus(rng.min, offset), rng.extent)
        return tirx.BufferRegion(out, ranges)

    def on_block(block):
        if not any(node_key(w.source) in offsets for w in block.writes):
            return block
        writes = [on_region(w) for w in block.writes]
        return s_tir.SBlock(
            block.iter_vars, block.reads, writes, block.name_hint, block.body, block.init,
            block.alloc_buffers, block.match_buffers, block.annotations,
        )  # fmt: skip

    body = tvm_ffi.structural_map(func.body, (tirx.BufferStore, on_store), order="post")
    body = tvm_ffi.structural_map(body, (s_tir.SBlock, on_block), order="post")
    return tirx.PrimFunc([*params, out], body, func.ret_type, func.attrs)


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
