"""Lowering of accelerator layers through TIR: TE definition, schedule, TIR passes, codegen.

The flow mirrors VTA's: a layer is written with :mod:`tvm.te` on the accelerator's packed DRAM
layouts (:func:`conv2d_primfunc`, :func:`dense_primfunc`), scheduled with
:class:`tvm.s_tir.Schedule` onto the on-chip buffers and the registered tensor intrinsic
(:func:`schedule_conv2d`), transformed by the plugin's TIR passes (:func:`LowerToAccelerator`,
which runs TVM's buffer compaction and then :func:`InjectDMA`), and finally walked in execution
order by :func:`emit_program`, which turns copy intrinsics into LOAD / STORE, tensorized products
into GEMM and the epilogue loops on the accumulator into ALU instructions.  Dependency tokens are
the last codegen step (:func:`~tvm_hapm.target.dependency.insert_dependency_tokens`).

``tvm.build(mod, target="hapm_fpga")`` runs TVM's default TIR pipeline, which this module wraps:
a PrimFunc carrying the ``"hapm_fpga.kernel"`` attribute (set by :func:`schedule_conv2d`) is
compiled to an accelerator program and its body replaced by a call of the packed function
``"hapm_fpga.run_tir"`` (the simulator); every other function is compiled exactly as before.

Layouts (``R`` x ``C`` arrays)::

    data       (N, CIB, H, W, R)         int8   input-channel blocks of R
    residual   (N, COB, OH, OW, C)       int8   a fused residual add's shortcut (only then)
    weight     (COB, CIB, KH, KW, R, C)  int8   one R x C block per (cob, cib, kh, kw)
    bias_mult  (2*COB, C)                int32  row 2*cob: bias, row 2*cob+1: multipliers
                                                (3*COB rows with a residual: row 3*cob+2 K)
    out        (N, COB, OH, OW, C)       int8

The result is ``clip(((acc + bias) * mult + 2**(shift-1)) >> shift)`` with an int32 accumulator,
an int64 product and saturation to the activation range, exactly what the simulator computes.
With a fused residual the accumulator starts from ``int32(residual) * K`` instead of 0.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, te, tirx
from tvm.tirx import compilation_pipeline as _tir_pipeline

from .config import HardwareConfig, get_config, is_hapm_target
from .dependency import insert_dependency_tokens
from .intrin import GEMM_MARKER, SCOPE_ACC, SCOPE_INP, SCOPE_WGT, gemv_intrin
from .isa import ELEM_CODE, MAX_LOOP, MAX_TRANSFER, AluOp, Buffer, Instruction, Opcode
from .program import Program, Slot
from .schedule import (
    RESIDUAL_CONST_ROWS,
    ConvSchedule,
    assign_arrays,
    conv_output_size,
    conv_stream_passes,
    fit_double_buffer,
    pipeline_operand_loads,
    plan_conv,
    residual_rows,
)

__all__ = [
    "KERNEL_ATTR",
    "RUN_TIR_FUNC",
    "TirLoweringError",
    "conv2d_primfunc",
    "dense_primfunc",
    "tir_conv_schedule",
    "schedule_conv2d",
    "InjectDMA",
    "LowerToAccelerator",
    "OffloadHapmKernels",
    "emit_program",
    "build_program",
    "hapm_tir_pipeline",
    "SparseWeights",
    "conv2d_program",
    "dense_program",
    "add_primfunc",
    "add_program",
]

#: PrimFunc attribute naming the accelerator kernel a scheduled function implements.
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

_SCOPE_BUFFER = {SCOPE_INP: Buffer.INP, SCOPE_WGT: Buffer.WGT, SCOPE_ACC: Buffer.ACC}


class TirLoweringError(ValueError):
    """A TIR function the accelerator lowering does not understand."""


# =============================================================================================
# TE definitions
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
    i64 = "int64"
    requant = te.compute(
        out_shape,
        lambda b, co, y, x, c: tirx.max(
            tirx.min(
                (
                    bias[b, co, y, x, c].astype(i64) * bias_mult[rows * co + 1, c].astype(i64)
                    + tirx.const(1 << (shift - 1), i64)
                )
                >> tirx.const(shift, i64),
                tirx.const(amax, i64),
            ),
            tirx.const(amin, i64),
        ).astype("int32"),
        name="requant",
    )
    last = requant
    if lo > amin or hi < amax:

        def _clip(b, co, y, x, c):
            v = requant[b, co, y, x, c]
            if lo > amin:
                v = tirx.max(v, lo)
            if hi < amax:
                v = tirx.min(v, hi)
            return v

        last = te.compute(out_shape, _clip, name="clip")
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
        if _kind(init) != "BufferStore" or _kind(init.value) != "IntImm":
            raise TirLoweringError(f"{reduction}: unexpected reduction init {init}")
        idx = list(init.indices)
        region = tirx.BufferRegion(src, [tvm.ir.Range.from_min_extent(i, one) for i in idx])
        return s_tir.SBlock(
            block.iter_vars, [*block.reads, region], block.writes, block.name_hint, block.body,
            tirx.BufferStore(init.buffer, tirx.BufferLoad(src, idx), idx), block.alloc_buffers,
            block.match_buffers, block.annotations,
        )  # fmt: skip

    return func.with_body(tvm_ffi.structural_map(func.body, (s_tir.SBlock, _fix), order="post"))


def _init_reads_fixed(func: tirx.PrimFunc, reduction: str) -> tirx.PrimFunc:
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
    only_init = {_key(r.source) for r in reads}

    def _fix(block):
        name = str(block.name_hint)
        if name == init_name:
            new_reads = reads
        elif name == update_name:
            new_reads = [r for r in block.reads if _key(r.source) not in only_init]
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


# =============================================================================================
# schedule
def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def tir_conv_schedule(cfg: HardwareConfig, layer: dict, sched: ConvSchedule | None = None):
    """The plan the TIR schedule uses: ``sched`` (default: :func:`plan_conv`) with every tile
    shrunk to a divisor of its dimension.

    ``Schedule.tensorize`` refuses a block under the predicate a partial tile needs, so a
    dimension is tiled by its largest divisor not above the planned tile.
    """
    L = layer
    if sched is None:
        sched = plan_conv(
            cfg, L["h"], L["w"], L["oh"], L["ow"], L["kh"], L["kw"], L["strides"],
            L["dilation"], L["cib"], L["cob"], residual=bool(L.get("residual")),
        )  # fmt: skip
    return ConvSchedule(
        _largest_divisor(L["oh"], sched.tile_h),
        _largest_divisor(L["ow"], sched.tile_w),
        _largest_divisor(L["cob"], sched.cob_group),
        _largest_divisor(L["cib"], sched.cib_chunk),
        sched.double_buffer,
    )


def schedule_conv2d(
    func: tirx.PrimFunc,
    cfg: HardwareConfig | None = None,
    sched: ConvSchedule | None = None,
    weight_blocks: int | None = None,
) -> s_tir.Schedule:
    """Schedule a :func:`conv2d_primfunc` onto the accelerator.

    Loop order (that of :func:`~tvm_hapm.target.codegen.conv2d_program`)::

        n, oh_o, ow_o, cob_group, cib_chunk, cib_in_chunk, kh, kw, cob_in_group, oh_i, ow_i, [c, r]

    (one dispatch of the arrays: the blocks of the group's output-channel blocks at one
    ``(cib, kh, kw)``).  With ``sched.double_buffer`` (kept when the tiles fit twice, see
    :func:`~tvm_hapm.target.schedule.fit_double_buffer`) the walker alternates input tiles,
    weight chunks and output regions between two halves of their buffers.

    ``[c, r]`` is tensorized with the accelerator's GEMV intrinsic.  The padded input tile
    lives in ``global.hapm_inp`` (computed per spatial tile when one chunk holds all input
    channels, else per chunk), the weight blocks in ``global.hapm_wgt`` (all of them, loaded
    once, when they fit; else per chunk), the accumulator, the bias / multiplier rows and the
    epilogue stages in ``global.hapm_acc``.  The reduction's init is split off above the chunk
    loop: it becomes the reset flag of each output block's first GEMM.

    With a fused residual (the layer's ``"residual"``) every block's constant rows are loaded
    once, first, and the init (``conv_init``) reads the ``shortcut`` stage, which is inlined
    into it: per output block of the group, ``int32(residual) * K`` into the region
    (:func:`InjectDMA` makes the shortcut tile a DMA into the region), ahead of the chunk
    loop; the GEMMs accumulate onto it.

    ``weight_blocks`` is the number of weight blocks the layer really loads (the non-zero
    ones, see :class:`SparseWeights`; default: all): they stay resident when they fit.

    Returns
    -------
    tvm.s_tir.Schedule
        Its ``mod["main"]`` carries ``"hapm_fpga.kernel"`` and the plan in
        ``"hapm_fpga.schedule"``.
    """
    layer = layer_of(func)
    cfg = get_config(cfg if cfg is not None else layer["config"])
    L = layer
    n_blocks = L["cob"] * L["cib"] * L["kh"] * L["kw"] if weight_blocks is None else weight_blocks
    fused = bool(L.get("residual"))
    plan = fit_double_buffer(
        cfg, tir_conv_schedule(cfg, layer, sched), L["kh"], L["kw"], L["strides"],
        L["dilation"], n_blocks, residual_rows(L["cob"], fused),
    )  # fmt: skip
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    conv = sch.get_sblock("conv")
    b, co, y, x, c, k, ky, kx, r = sch.get_loops(conv)
    y_o, y_i = sch.split(y, [None, plan.tile_h])
    x_o, x_i = sch.split(x, [None, plan.tile_w])
    cg, g = sch.split(co, [None, plan.cob_group])
    kc, ki = sch.split(k, [None, plan.cib_chunk])
    sch.reorder(b, y_o, x_o, cg, kc, ki, ky, kx, g, y_i, x_i, c, r)
    sch.set_scope(conv, 0, SCOPE_ACC)

    # Epilogue per output block of the group, after the group's reduction.
    epilogue = ("bias", "requant", "clip")
    stages = [s for s in epilogue if _has_block(sch, s)]
    first = sch.get_sblock(stages[0])
    sch.reverse_compute_at(first, cg, preserve_unit_loops=True)
    block_loop = sch.get_loops(first)[5]  # b, oh_o, ow_o, cob_group, n, [cob_in_group]
    for name in stages[1:] + ["out"]:
        sch.reverse_compute_at(sch.get_sblock(name), block_loop, preserve_unit_loops=True)
    for name in stages:
        sch.set_scope(sch.get_sblock(name), 0, SCOPE_ACC)

    # Bias and multiplier rows of the group: first thing of the group, as in the codegen.
    # With a fused residual every block's rows (bias, multiplier, K) stay on chip, loaded
    # once before everything else.
    bias_mult = sch.cache_read(first, 1, SCOPE_ACC)
    if not fused:
        sch.compute_at(bias_mult, cg, preserve_unit_loops=True, index=-2)

    # Weight blocks: resident when they all fit, else one chunk at a time.
    weights = sch.cache_read(conv, 1, SCOPE_WGT)
    one_chunk = plan.cib_chunk == L["cib"]
    if n_blocks > cfg.wgt_depth:
        if one_chunk:
            sch.compute_at(weights, cg, preserve_unit_loops=True, index=-2)
        else:
            sch.compute_at(weights, kc, preserve_unit_loops=True)

    # Padded input tile: shared by all groups when one chunk holds every input channel.
    pad = sch.get_sblock("pad")
    sch.set_scope(pad, 0, SCOPE_INP)
    if one_chunk:
        sch.compute_at(pad, x_o, preserve_unit_loops=True)
    else:  # the chunk's input tile first, then its weights (the load module's order)
        sch.compute_at(pad, kc, preserve_unit_loops=True, index=0)

    sch.decompose_reduction(conv, kc)
    if fused:
        # The init reads the shortcut stage: declare it there (not on the update), then
        # inline the stage, so the init loads the shortcut tile and scales it.
        sch = s_tir.Schedule(tvm.IRModule({"main": _init_reads_fixed(sch.mod["main"], "conv")}))
        sch.compute_inline(sch.get_sblock("shortcut"))
        c = sch.get_loops(sch.get_sblock("conv_update"))[-2]
    sch.tensorize(c, gemv_intrin(cfg))
    new = sch.mod["main"].with_attrs(
        {KERNEL_ATTR: L["kind"], SCHEDULE_ATTR: json.dumps(plan.to_dict(), sort_keys=True)}
    )
    sch = s_tir.Schedule(tvm.IRModule({"main": new}))
    return sch


def _has_block(sch, name) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:
        return False
    return True


# =============================================================================================
# expression helpers
def _key(obj) -> int:
    """Identity of a TVM object (Python wrappers of one node are different objects)."""
    return obj.__chandle__()


def _kind(node) -> str:
    return type(node).__name__


def _int(expr) -> int:
    if isinstance(expr, int):
        return expr
    if _kind(expr) != "IntImm":
        expr = tvm.sym.Analyzer().simplify(expr)
        if _kind(expr) != "IntImm":
            raise TirLoweringError(f"expected a constant, got {expr}")
    return int(expr.value)


def _buffer_shape(buf) -> list[int]:
    return [_int(s) for s in buf.ty.shape]


def _buffer_scope(buf) -> str:
    return str(buf.ty.storage_scope)


def _flat_index(buf, indices):
    """Row-major element offset of ``buf[indices]`` as one expression."""
    shape = _buffer_shape(buf)
    offset = tirx.const(0, "int32")
    for size, idx in zip(shape, indices, strict=True):
        offset = offset * size + idx
    return offset


def _linear(expr, loop_vars):
    """``(coefficients, base)`` of ``expr`` affine in ``loop_vars``; coefficients are ints."""
    if not loop_vars:
        return [], tvm.sym.Analyzer().simplify(expr)
    coeffs = tvm.sym.detect_linear_equation(expr, list(loop_vars))
    if len(coeffs) != len(loop_vars) + 1:
        raise TirLoweringError(f"index {expr} is not affine in {list(loop_vars)}")
    return [_int(c) for c in coeffs[:-1]], tvm.sym.Analyzer().simplify(coeffs[-1])


def is_call(node, name: str | None = None) -> bool:
    if _kind(node) != "Call":
        return False
    if name is None:
        return True
    op = str(node.op.name) if hasattr(node.op, "name") else ""
    if op == "tirx.call_extern":
        return str(node.args[0].value) == name
    return op == name


def _strip_cast(expr):
    while _kind(expr) == "Cast":
        expr = expr.value
    return expr


# =============================================================================================
# loop nests
class _Nest:
    """A perfect loop nest: the loops (outermost first), the predicates met on the way and the
    leaf statement (a BufferStore or an Evaluate)."""

    def __init__(self, loops, predicates, leaf):
        self.loops = loops
        self.predicates = predicates
        self.leaf = leaf

    @property
    def loop_vars(self):
        return [f.loop_var for f in self.loops]

    @property
    def extents(self):
        return [_int(f.extent) for f in self.loops]


def _perfect_nest(stmt) -> _Nest | None:
    loops, predicates = [], []
    while True:
        kind = _kind(stmt)
        if kind == "For":
            if _int(stmt.min) != 0:
                return None
            loops.append(stmt)
            stmt = stmt.body
        elif kind == "SBlockRealize":
            pred = stmt.predicate
            if not (_kind(pred) == "IntImm" and int(pred.value) == 1):
                predicates.append(pred)
            stmt = stmt.block
        elif kind == "SBlock":
            if len(stmt.alloc_buffers):
                return None
            stmt = stmt.body
        elif kind in ("BufferStore", "Evaluate"):
            return _Nest(loops, predicates, stmt)
        else:
            return None


# =============================================================================================
# InjectDMA
def _entry_elems(cfg: HardwareConfig, scope: str) -> int:
    R, C = cfg.array_rows, cfg.array_cols
    return {SCOPE_INP: R, SCOPE_WGT: R * C, SCOPE_ACC: C}[scope]


def _copy_parts(store):
    """``(src_load, condition or None, pad_min)`` of a copy ``dst[...] = [cast](src[...])`` with
    optional ``if_then_else(cond, src[...], v)`` padding, ``v`` 0 or (``pad_min``) the minimum
    of the source's element type; ``None`` if the store is not a copy."""
    value = _strip_cast(store.value)
    cond, pad_min = None, 0
    if is_call(value, "prim.if_then_else") or is_call(value, "tirx.if_then_else"):
        cond, then, other = value.args
        other = _strip_cast(other)
        value = _strip_cast(then)
        if _kind(other) != "IntImm" or _kind(value) != "TensorLoad":
            return None
        lowest = -(1 << (tvm.DataType(str(value.source.ty.dtype)).bits - 1))
        if int(other.value) == lowest:
            pad_min = 1
        elif int(other.value) != 0:
            return None
    if _kind(value) != "TensorLoad":
        return None
    return value, cond, pad_min


def _conjuncts(cond):
    if _kind(cond) == "And":
        return _conjuncts(cond.a) + _conjuncts(cond.b)
    return [cond]


def _bounds(cond, var, other_vars):
    """Lower (inclusive) and upper (exclusive) bounds on ``var`` implied by ``cond``."""
    lows, highs = [], []
    for term in _conjuncts(cond):
        kind = _kind(term)
        if kind not in ("LT", "LE", "GT", "GE"):
            raise TirLoweringError(f"padding condition {term} is not a comparison")
        a, b = term.a, term.b
        # Normalise to `diff >= 0`.
        diff = {"LE": b - a, "LT": b - a - 1, "GE": a - b, "GT": a - b - 1}[kind]
        coeffs = tvm.sym.detect_linear_equation(diff, [var] + list(other_vars))
        if len(coeffs) != len(other_vars) + 2:
            raise TirLoweringError(f"padding condition {term} is not affine")
        cv = _int(coeffs[0])
        if any(_int(c) for c in coeffs[1:-1]):
            if cv:
                raise TirLoweringError(f"padding condition {term} mixes two dimensions")
            continue
        base = coeffs[-1]
        if cv == 1:
            lows.append(-base)  # var + base >= 0
        elif cv == -1:
            highs.append(base + 1)  # base - var >= 0
        elif cv != 0:
            raise TirLoweringError(f"padding condition {term}: coefficient {cv}")
    return lows, highs


def _predicate_highs(predicates, loop_vars, extents) -> list:
    """Per loop of a nest, the exclusive upper bound (an expression of the enclosing loops, or
    ``None``) that the nest's block predicates (a partial tile) put on it.  Unit loops are
    taken at 0; a predicate giving a lower bound is refused."""
    ana = tvm.sym.Analyzer()
    for v, e in zip(loop_vars, extents, strict=True):
        if e == 1:
            ana.bind(v, tirx.const(0, "int32"))
    highs = [None] * len(loop_vars)
    for pred in predicates:
        pred = ana.simplify(pred)
        for j, (v, e) in enumerate(zip(loop_vars, extents, strict=True)):
            if e == 1:
                continue
            others = [w for w, f in zip(loop_vars, extents, strict=True) if w is not v and f > 1]
            lows, his = _bounds(pred, v, others)
            if lows:
                raise TirLoweringError(f"predicate {pred} bounds a tile from below")
            for hi_ in his:
                highs[j] = hi_ if highs[j] is None else tirx.min(highs[j], hi_)
    return highs


def _dma_call(cfg: HardwareConfig, nest: _Nest):
    """The ``hapm_fpga.dma_load`` / ``dma_store`` call replacing a copy nest, or ``None`` when
    the nest is not (yet) the 2-D region of one DMA."""
    store = nest.leaf
    if _kind(store) != "BufferStore":
        return None
    parts = _copy_parts(store)
    if parts is None:
        return None
    load, cond, pad_min = parts
    dst, src = store.buffer, load.source
    dst_scope, src_scope = _buffer_scope(dst), _buffer_scope(src)
    if dst_scope in _SCOPE_BUFFER and src_scope not in _SCOPE_BUFFER:
        name, chip_scope = DMA_LOAD, dst_scope
    elif src_scope == SCOPE_ACC and dst_scope not in _SCOPE_BUFFER:
        name, chip_scope = DMA_STORE, src_scope
    else:
        return None
    if nest.predicates and cond is not None:
        raise TirLoweringError("a padded copy under a predicate (partial tile) has no DMA form")
    E = _entry_elems(cfg, chip_scope)
    loop_vars, extents = nest.loop_vars, nest.extents
    d_coef, d_base = _linear(_flat_index(dst, store.indices), loop_vars)
    s_coef, s_base = _linear(_flat_index(src, load.indices), loop_vars)
    # Innermost loops covering one entry contiguously on both sides are the vector lanes.
    lanes, span = 0, 1
    while span < E and lanes < len(loop_vars):
        j = len(loop_vars) - 1 - lanes
        if d_coef[j] != span or s_coef[j] != span:
            break
        span *= extents[j]
        lanes += 1
    if span != E:
        return None
    outer = len(loop_vars) - lanes
    dims = []  # entry-level loops: [extent, dst stride, src stride, var]
    for j in range(outer):
        if d_coef[j] % E or s_coef[j] % E:
            return None
        dims.append([extents[j], d_coef[j] // E, s_coef[j] // E, loop_vars[j]])
    if chip_scope == SCOPE_WGT and cond is None:
        # Weight blocks move as runs: merge loops contiguous on both sides.
        merged = []
        for dim in dims:
            if merged and merged[-1][1] == dim[0] * dim[1] and merged[-1][2] == dim[0] * dim[2]:
                merged[-1] = [merged[-1][0] * dim[0], dim[1], dim[2], None]
            else:
                merged.append(list(dim))
        dims = merged
    if len(dims) > 2:
        return None  # the caller descends to the inner loops
    while len(dims) < 2:
        dims.insert(0, [1, 0, 0, None])
    (rows, d_row, s_row, row_var), (cols, d_col, s_col, col_var) = dims
    chip_col, chip_row = (d_col, d_row) if name == DMA_LOAD else (s_col, s_row)
    dram_col, dram_row = (s_col, s_row) if name == DMA_LOAD else (d_col, d_row)
    if cols > 1 and (chip_col != 1 or dram_col != 1):
        return None
    if rows > 1 and chip_row != cols:
        return None
    if rows > 1 or row_var is not None:
        stride = dram_row  # the DRAM pitch, also for a loop of one row (a field all the same)
    else:
        stride = cols if chip_scope == SCOPE_WGT else 0  # a run (as _load_rows) / one row
    zero = tirx.const(0, "int32")
    pads = [zero, zero, zero, zero]
    row_count, col_count = tirx.const(rows, "int32"), tirx.const(cols, "int32")
    src_first = s_base
    if cond is not None:
        others = [v for v in loop_vars if v is not row_var and v is not col_var]
        padded = []
        for var, ext, coef in ((row_var, rows, s_row * E), (col_var, cols, s_col * E)):
            if var is None:
                padded.append((zero, zero, tirx.const(ext, "int32")))
                continue
            lows, highs = _bounds(cond, var, [v for v in others if v is not var])
            before = zero
            for lo in lows:
                before = tirx.max(before, lo)
            before = tirx.min(before, ext)
            end = tirx.const(ext, "int32")
            for hi_ in highs:
                end = tirx.min(end, hi_)
            end = tirx.max(end, before)
            padded.append((before, ext - end, end - before))
            src_first = src_first + before * coef
        (pads[0], pads[1], row_count), (pads[2], pads[3], col_count) = padded
    stride_expr = tirx.const(stride, "int32")
    if nest.predicates:
        # A partial tile: the rows / columns beyond the predicate's bound are not moved.
        highs = dict(
            zip(
                (_key(v) for v in loop_vars),
                _predicate_highs(nest.predicates, loop_vars, extents),
                strict=True,
            )
        )
        bounded = {k for k, h in highs.items() if h is not None}
        used = {_key(v) for v in (row_var, col_var) if v is not None}
        if bounded - used:
            raise TirLoweringError("a predicate bounds a DMA's vector lanes")
        if row_var is not None and highs[_key(row_var)] is not None:
            row_count = tirx.max(tirx.min(row_count, highs[_key(row_var)]), 0)
        if col_var is not None and highs[_key(col_var)] is not None:
            col_count = tirx.max(tirx.min(col_count, highs[_key(col_var)]), 0)
        if rows == 1:
            stride_expr = col_count  # one row: a run of entries (codegen._load_rows)
    ana = tvm.sym.Analyzer()
    args = [
        tirx.op.buffer_data(dst),
        ana.simplify(d_base),
        tirx.op.buffer_data(src),
        ana.simplify(src_first),
        ana.simplify(row_count),
        ana.simplify(col_count),
        ana.simplify(stride_expr),
        *(ana.simplify(p) for p in pads),
    ]
    if pad_min:
        args.append(tirx.const(1, "int32"))  # the padding is the element type's minimum
    return tirx.Evaluate(tirx.call_extern("int32", name, *args))


def _operand_dma(cfg: HardwareConfig, nest: _Nest, loop):
    """A computation into the accumulator on one DRAM operand (a fused residual's init,
    ``acc = int32(shortcut) * K + bias``) as ``SeqStmt(DMA of the operand into the
    destination entries, the computation in place)``, or ``None``."""
    store = nest.leaf
    if _kind(store) != "BufferStore" or _buffer_scope(store.buffer) != SCOPE_ACC:
        return None
    dram = []

    def on_load(load):
        if _buffer_scope(load.source) not in _SCOPE_BUFFER:
            dram.append(load)

    tvm_ffi.structural_walk(store.value, (tvm.ir.expr.TensorLoad, on_load))
    if len(dram) != 1 or _kind(_strip_cast(store.value)) == "TensorLoad":
        return None  # not one DRAM operand, or a copy (_dma_call refused it)
    operand = dram[0]
    dtype = str(store.buffer.ty.dtype)
    copy = tirx.BufferStore(store.buffer, tirx.Cast(dtype, operand), store.indices)
    dma = _dma_call(cfg, _Nest(nest.loops, nest.predicates, copy))
    if dma is None:
        return None
    in_place = tirx.BufferLoad(store.buffer, list(store.indices))

    def _operand(expr):
        return in_place if _strip_cast(expr).same_as(operand) else expr

    value = tvm_ffi.structural_map(store.value, (tirx.Cast, _operand), order="pre")
    value = tvm_ffi.structural_map(value, (tvm.ir.expr.TensorLoad, _operand), order="pre")
    leaf = tirx.BufferStore(store.buffer, value, store.indices)

    def _leaf(st):
        return leaf if st.same_as(store) else st

    return tirx.SeqStmt([dma, tvm_ffi.structural_map(loop, (tirx.BufferStore, _leaf))])


def InjectDMA(cfg: HardwareConfig | None = None):  # noqa: N802 - TVM pass naming
    """Rewrite each copy loop nest between DRAM and an on-chip scope into one DMA intrinsic.

    A copy ``chip[...] = dram[...]`` (optionally ``if_then_else(cond, dram[...], 0)``, the
    padding of a convolution's input) or ``dram[...] = cast(acc[...])`` is recognised on the
    flattened, affine index expressions: the innermost loops covering one on-chip entry are the
    vector lanes, the next two loops the rows and columns of a 2-D region, and any outer loop
    stays a loop around the call.  Weight-block copies merge loops contiguous on both sides
    into runs.  The call is::

        hapm_fpga.dma_load(dst, dst_elem_offset, src, src_elem_offset, rows, cols, x_stride,
                           pad_top, pad_bottom, pad_left, pad_right[, pad_min])
        hapm_fpga.dma_store(dst, dst_elem_offset, src, src_elem_offset, rows, cols, x_stride,
                            0, 0, 0, 0)

    ``rows`` / ``cols`` count the DRAM entries moved, the pads the entries generated on chip,
    ``x_stride`` is the DRAM row pitch in entries and the offsets (in elements) address the
    first moved DRAM entry and the first (padded) on-chip entry.  A padding by the minimum of
    the element type (``if_then_else(cond, dram[...], -2**(bits-1))``, max pooling) adds the
    argument ``pad_min = 1``.  Pads and offsets are
    expressions of the enclosing loops.

    A computation into the accumulator on one DRAM operand (a fused residual's init
    ``acc = int32(shortcut) * K + bias``) becomes the DMA of that operand into the destination
    entries followed by the computation in place (``acc = acc * K + bias``, ALU instructions).
    """

    def _rewrite(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
        config = get_config(cfg if cfg is not None else layer_of(func)["config"])

        def _for(loop):
            nest = _perfect_nest(loop)
            if nest is None:
                return loop
            call = _dma_call(config, nest)
            if call is None:
                call = _operand_dma(config, nest, loop)
            return loop if call is None else call

        body = tvm_ffi.structural_map(func.body, (tirx.For, _for), order="pre")
        return func.with_body(body)

    return tvm.tirx.transform.prim_func_pass(_rewrite, opt_level=0, name="hapm_fpga.InjectDMA")


def LowerToAccelerator(cfg: HardwareConfig | None = None):  # noqa: N802 - TVM pass naming
    """Prepare a scheduled accelerator PrimFunc for :func:`emit_program`.

    Runs TVM's ``PlanAndUpdateBufferAllocationLocation``, ``ConvertBlocksToOpaque``,
    ``CompactBufferAllocation`` (each on-chip buffer shrinks to the tile it holds, so its
    indices become tile-relative, i.e. on-chip addresses) and ``LowerMatchBuffer`` (the
    intrinsic's element offsets become explicit), then :func:`InjectDMA`.  Loops of extent one
    are kept: their strides are fields of the instructions.
    """
    passes = tvm.transform.Sequential(
        [
            s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
            s_tir.transform.ConvertBlocksToOpaque(),
            s_tir.transform.CompactBufferAllocation(),
            s_tir.transform.LowerMatchBuffer(),
            InjectDMA(cfg),
        ],
        name="hapm_fpga.LowerToAccelerator",
    )

    @tvm.transform.module_pass(opt_level=0, name="hapm_fpga.LowerToAccelerator")
    def _lower(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        todo = {
            gv: f
            for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc)
            and f.attrs is not None
            and KERNEL_ATTR in f.attrs
            and LOWERED_ATTR not in f.attrs
        }
        if not todo:
            return mod
        lowered = passes(tvm.IRModule({gv: f for gv, f in todo.items()}))
        out = tvm.IRModule(dict(mod.functions_items()))
        for gv, f in lowered.functions_items():
            out[gv] = f.with_attr(LOWERED_ATTR, True)
        return out

    return _lower


# =============================================================================================
# codegen
_PY_BINOPS = {
    "Add": "({} + {})",
    "Sub": "({} - {})",
    "Mul": "({} * {})",
    "FloorDiv": "({} // {})",
    "FloorMod": "({} % {})",
    "Min": "min({}, {})",
    "Max": "max({}, {})",
    "LT": "({} < {})",
    "LE": "({} <= {})",
    "GT": "({} > {})",
    "GE": "({} >= {})",
    "EQ": "({} == {})",
    "NE": "({} != {})",
    "And": "({} and {})",
    "Or": "({} or {})",
}


class _Evaluator:
    """Integer expressions of loop variables, compiled once to Python and cached per node."""

    def __init__(self):
        self.env: dict[int, int] = {}
        self._cache: dict[int, object] = {}

    def _source(self, expr) -> str:
        kind = _kind(expr)
        if kind == "IntImm":
            return str(int(expr.value))
        if kind == "Var":
            return f"env[{_key(expr)}]"
        if kind == "Cast":
            return self._source(expr.value)
        if kind in _PY_BINOPS:
            return _PY_BINOPS[kind].format(self._source(expr.a), self._source(expr.b))
        if kind == "Not":
            return f"(not {self._source(expr.a)})"
        if kind == "Select":
            c, t, f = (self._source(e) for e in (expr.condition, expr.true_value, expr.false_value))
            return f"({t} if {c} else {f})"
        raise TirLoweringError(f"cannot evaluate {kind} expression {expr}")

    def __call__(self, expr) -> int:
        if isinstance(expr, int):
            return expr
        k = _key(expr)
        hit = self._cache.get(k)
        if hit is None:
            fn = eval(f"lambda env: {self._source(expr)}")
            hit = self._cache[k] = (fn, expr)  # keep the node alive: its handle is the key
        return int(hit[0](self.env))


class _Emitter:
    """Walks a lowered accelerator PrimFunc in execution order and emits instructions."""

    def __init__(self, cfg: HardwareConfig, func: tirx.PrimFunc, weights=None):
        self.cfg = cfg
        self.ev = _Evaluator()
        self.slots = {_key(p): i for i, p in enumerate(func.params)}
        self.base: dict[int, int] = {}  # on-chip buffer -> first entry
        self.top = {scope: 0 for scope in _SCOPE_BUFFER}
        self.depth = {
            SCOPE_INP: cfg.inp_depth,
            SCOPE_WGT: cfg.wgt_depth,
            SCOPE_ACC: cfg.acc_depth,
        }
        self.pending_reset: set[int] = set()
        self.seq: list[Instruction] = []
        #: The GEMMs' accumulator buffers.
        self.gemm_acc: set[int] = set()

        def on_eval(ev):
            if is_call(ev.value, GEMM_MARKER):
                self.gemm_acc.add(_key(ev.value.args[5].args[0]))

        tvm_ffi.structural_walk(func.body, (tirx.Evaluate, on_eval))
        #: An ALU-only layer (no GEMM): a reduction's init ``acc = v`` is ``MUL 0`` (then
        #: ``ADD v``), not a reset flag.
        self.alu_only = not self.gemm_acc
        #: A reduction's init computed into a GEMM accumulator (a fused residual: the shortcut
        #: tile's DMA and ``MUL``) is the region's *prologue*: ``[start, p0, p1]``
        #: per region, as :func:`~tvm_hapm.target.schedule.hoist_prologues` takes them.  A
        #: region starts where the previous one's last store ends (the first one: at the
        #: first loop, after the resident weights and constant rows).
        self.regions: list[list[int]] = []
        self._first_loop: int | None = None
        self._last_store = 0
        layer = (
            json.loads(str(func.attrs[LAYER_ATTR]))
            if func.attrs and LAYER_ATTR in func.attrs
            else {}
        )
        #: Whether contiguous ALU loop nests become one run (``outer = 1``), as the direct
        #: generator's convolution and add epilogues are; its pooling layers keep the loops.
        self.alu_runs = bool(layer.get("alu_runs", True))
        self.weights: SparseWeights | None = weights
        wparam = 2 if layer.get("residual") else 1  # (data, [residual], weight, ...)
        if weights is not None:
            weights.param = _key(func.params[wparam])
        attrs = func.attrs
        plan = json.loads(str(attrs[SCHEDULE_ATTR])) if attrs and SCHEDULE_ATTR in attrs else {}
        #: Double buffering (the plan's ``double_buffer``): input tiles, weight chunks (when
        #: not resident) and output regions alternate between two halves; in an ALU-only
        #: layer, the accumulator tiles its DMAs load (the element-wise operands).
        self.double = bool(plan.get("double_buffer", False))
        self.parity: dict[int, int] = {}  # doubled buffer -> half of its next allocation
        self.wgt_total = (
            int(np.prod(_buffer_shape(func.params[wparam]))) // (cfg.array_rows * cfg.array_cols)
            if len(func.params) > wparam
            else 0
        )
        # per-node analyses, computed on first visit
        self._nests: dict[int, tuple] = {}
        self._dma: dict[int, tuple] = {}
        self._gemm: dict[int, tuple] = {}
        self._reset: dict[int, tuple] = {}
        self._alu: dict[int, tuple] = {}
        self._init: dict[int, tuple] = {}

    # ------------------------------------------------------------------ walk
    def visit(self, stmt) -> None:
        kind = _kind(stmt)
        if kind == "SeqStmt":
            for s in stmt.seq:
                self.visit(s)
        elif kind == "For":
            self.visit_for(stmt)
        elif kind == "SBlockRealize":
            if self.ev(stmt.predicate):
                self.visit(stmt.block)
        elif kind == "SBlock":
            mark = dict(self.top)
            self.allocate(stmt)
            self.visit(stmt.body)
            self.top = mark
        elif kind == "Evaluate":
            self.visit_leaf(_Nest([], [], stmt))
        elif kind == "BufferStore":
            self.visit_leaf(_Nest([], [], stmt))
        elif kind == "IfThenElse":
            if self.ev(stmt.condition):
                self.visit(stmt.then_case)
            elif stmt.else_case is not None:
                self.visit(stmt.else_case)
        else:
            raise TirLoweringError(f"unexpected {kind} in an accelerator function")

    def visit_for(self, loop) -> None:
        k = _key(loop)
        hit = self._nests.get(k)
        if hit is None:
            nest = _perfect_nest(loop)
            folds = (
                nest is not None and (not nest.predicates or self._is_alu(nest)) and self.fold(nest)
            )
            hit = self._nests[k] = (nest, folds, loop)
        nest, folds = hit[0], hit[1]
        if folds:
            self.visit_leaf(nest)
            return
        if self._first_loop is None:
            self._first_loop = len(self.seq)
        var = _key(loop.loop_var)
        start = self.ev(loop.min)
        body = loop.body
        env = self.ev.env
        for v in range(start, start + self.ev(loop.extent)):
            env[var] = v
            self.visit(body)

    def fold(self, nest: _Nest) -> bool:
        """Whether one instruction covers the whole nest (all its loops become fields)."""
        leaf = nest.leaf
        if _kind(leaf) == "Evaluate":
            if is_call(leaf.value, GEMM_MARKER):
                return len(nest.loops) <= 2 and not self._vars_in(
                    leaf.value.args[4], nest.loop_vars
                )
            return False
        value = leaf.value
        if _kind(value) == "IntImm" and not self.alu_only:
            return True  # the reduction's init: a reset region, any shape
        return len(nest.loops) <= 3  # two entry loops and the lanes

    @staticmethod
    def _is_alu(nest: _Nest) -> bool:
        leaf = nest.leaf
        return _kind(leaf) == "BufferStore" and _kind(leaf.value) != "IntImm"

    @staticmethod
    def _vars_in(expr, loop_vars) -> bool:
        keys = {_key(v) for v in loop_vars}
        found = []
        tvm_ffi.structural_walk(expr, (tirx.Var, lambda v: found.append(_key(v) in keys) and None))
        return any(found)

    # ------------------------------------------------------------------ on-chip allocation
    def allocate(self, block) -> None:
        """Place the block's on-chip buffers, in order of first use.  Buffers written by
        epilogue stages are not placed: the ALU computes them in place of their operand."""
        if not len(block.alloc_buffers):
            return
        first_use: dict[int, int] = {}
        placed: set[int] = set()
        dma_loaded: set[int] = set()
        order = [0]

        def note(buf, placed_kind: bool):
            k = _key(buf)
            if k not in first_use:
                first_use[k] = order[0]
                order[0] += 1
            if placed_kind:
                placed.add(k)

        def on_eval(ev):
            call = ev.value
            if is_call(call, DMA_LOAD):
                note(call.args[1].args[0], True)
                dma_loaded.add(_key(call.args[1].args[0]))
            elif is_call(call, GEMM_MARKER):
                note(call.args[5].args[0], True)

        def on_store(st):
            note(st.buffer, _kind(st.value) == "IntImm")

        tvm_ffi.structural_walk(
            block.body, [(tirx.Evaluate, on_eval), (tirx.BufferStore, on_store)], order="pre"
        )
        bufs = [b for b in block.alloc_buffers if _key(b) in placed]
        bufs.sort(key=lambda b: first_use[_key(b)])
        for buf in bufs:
            scope = _buffer_scope(buf)
            if scope not in _SCOPE_BUFFER:
                raise TirLoweringError(f"buffer {buf.name} in scope {scope!r} is not on chip")
            entries = -(-int(np.prod(_buffer_shape(buf))) // _entry_elems(self.cfg, scope))
            k = _key(buf)
            doubled = self.double and (
                scope == SCOPE_INP
                # the GEMMs' output region (also when its init loads a shortcut tile); in an
                # ALU-only layer also the loaded operands
                or (
                    scope == SCOPE_ACC
                    and (k not in dma_loaded or k in self.gemm_acc or self.alu_only)
                )
                or (scope == SCOPE_WGT and entries < self.wgt_total)  # weights not resident
            )
            half = 0
            if doubled and scope == SCOPE_WGT and self.weights is not None:
                self.weights.half = entries  # the sparse walker picks the half at each load
            elif doubled:
                half = self.parity.get(k, 0)
                self.parity[k] = 1 - half
            self.base[k] = self.top[scope] + half * entries
            self.top[scope] += 2 * entries if doubled else entries
            if self.top[scope] > self.depth[scope] and not (
                scope == SCOPE_WGT and self.weights is not None  # compacted: checked by the plan
            ):
                raise TirLoweringError(
                    f"{buf.name}: {scope} overflows ({self.top[scope]} > {self.depth[scope]})"
                )

    def _chip_addr(self, buf, elem_offset: int) -> int:
        E = _entry_elems(self.cfg, _buffer_scope(buf))
        if elem_offset % E:
            raise TirLoweringError(f"{buf.name}: offset {elem_offset} is not a whole entry")
        return self.base[_key(buf)] + elem_offset // E

    def _prologue(self, first: int) -> None:
        """Note ``seq[first:]`` (just emitted) as part of the current region's prologue."""
        end = len(self.seq)
        if self.regions and self.regions[-1][2] == first:
            self.regions[-1][2] = end
        else:
            start = self._last_store if self.regions else self._first_loop
            self.regions.append([first if start is None else start, first, end])

    # ------------------------------------------------------------------ leaves
    def visit_leaf(self, nest: _Nest) -> None:
        leaf = nest.leaf
        if _kind(leaf) == "Evaluate":
            call = leaf.value
            if is_call(call, DMA_LOAD) or is_call(call, DMA_STORE):
                self.emit_dma(call)
            elif is_call(call, GEMM_MARKER):
                self.emit_gemm(call, nest)
            else:
                raise TirLoweringError(f"unexpected call {call}")
            return
        if _kind(leaf.value) == "IntImm":
            if self.alu_only:
                self.emit_init(nest)
            else:
                self.mark_reset(nest)
        else:
            self.emit_alu(nest)

    def emit_dma(self, call) -> None:
        k = _key(call)
        info = self._dma.get(k)
        if info is None:
            a = call.args
            is_load = is_call(call, DMA_LOAD)
            dst, src = a[1].args[0], a[3].args[0]
            chip, dram = (dst, src) if is_load else (src, dst)
            chip_off, dram_off = (a[2], a[4]) if is_load else (a[4], a[2])
            scope = _buffer_scope(chip)
            bits = tvm.DataType(str(dram.ty.dtype)).bits
            fields = {
                "buffer": int(_SCOPE_BUFFER[scope]),
                "dram_slot": self.slots[_key(dram)],
                "elem_bits_code": ELEM_CODE[bits],
            }
            if len(a) > 12 and _int(a[12]):
                fields["pad_min"] = 1
            info = (
                is_load, chip, dram, chip_off, dram_off, _entry_elems(self.cfg, scope), fields,
                list(a[5:12]),
            )  # fmt: skip
            self._dma[k] = info
        is_load, chip, dram, chip_off, dram_off, E, fields, sizes = info
        first = len(self.seq)
        dram_elem = self.ev(dram_off)
        if dram_elem % E:
            raise TirLoweringError(f"{dram.name}: DRAM offset {dram_elem} is not a whole entry")
        sram = self._chip_addr(chip, self.ev(chip_off))
        dram_addr = dram_elem // E
        rows, cols, stride, *pads = (self.ev(s) for s in sizes)
        opcode = Opcode.LOAD if is_load else Opcode.STORE
        if self.weights is not None and _key(dram) == self.weights.param:
            self.weights.load(self, sram, dram_addr, rows, cols, stride, fields)
            return
        if rows == 1 and cols > MAX_TRANSFER:
            self.seq += _runs(opcode, sram, dram_addr, cols, fields)
        else:
            self.seq.append(
                Instruction(
                    opcode, sram_addr=sram, dram_addr=dram_addr, y_size=rows, x_size=cols,
                    x_stride=stride, y_pad_top=pads[0], y_pad_bottom=pads[1],
                    x_pad_left=pads[2], x_pad_right=pads[3], **fields,
                )
            )  # fmt: skip
        if not is_load:
            self._last_store = len(self.seq)
        elif _key(chip) in self.gemm_acc:  # a shortcut tile into a GEMM region
            self._prologue(first)

    def _loop_fields(self, nest: _Nest, exprs_entries):
        """Extents ``[outer, inner]`` and, per address, ``(base expression, [so, si])`` of
        affine entry addresses over the nest's loops (at most two, padded with unit loops)."""
        loop_vars, extents = nest.loop_vars, nest.extents
        out = []
        for expr, E in exprs_entries:
            coef, base = _linear(expr, loop_vars)
            if any(c % E for c in coef):
                raise TirLoweringError(f"stride of {expr} is not a whole entry")
            out.append((base, [c // E for c in coef]))
        while len(extents) < 2:
            extents = [1] + extents
            out = [(b, [0] + c) for b, c in out]
        return extents, out

    def emit_gemm(self, call, nest: _Nest) -> None:
        k = _key(nest.leaf)
        info = self._gemm.get(k)
        if info is None:
            a = call.args
            inp, wgt, acc = a[1].args[0], a[3].args[0], a[5].args[0]
            R, C = self.cfg.array_rows, self.cfg.array_cols
            (outer, inner), [(inp_b, inp_s), (acc_b, acc_s)] = self._loop_fields(
                nest, [(a[2], R), (a[6], C)]
            )
            info = (inp, wgt, acc, outer, inner, inp_b, inp_s, acc_b, acc_s, a[4])
            self._gemm[k] = info
        inp, wgt, acc, outer, inner, inp_b, inp_s, acc_b, acc_s, wgt_off = info
        acc_addr = self._chip_addr(acc, self.ev(acc_b))
        wgt_addr = self._chip_addr(wgt, self.ev(wgt_off))
        if self.weights is not None:
            wgt_addr = self.weights.chip_addr(wgt_addr)
            if wgt_addr is None:  # an all-zero block: no GEMM
                return
        entries = _entries(acc_addr, outer, inner, acc_s[0], acc_s[1])
        pending = self.pending_reset
        reset = entries <= pending
        if not reset and not entries.isdisjoint(pending):
            raise TirLoweringError("a GEMM resets part of its accumulator region")
        if reset:
            pending -= entries
        self.seq.append(
            Instruction(
                Opcode.GEMM,
                reset=int(reset),
                array=0,  # chosen by schedule.assign_arrays
                wgt_addr=wgt_addr,
                inp_addr=self._chip_addr(inp, self.ev(inp_b)),
                acc_addr=acc_addr,
                outer=outer,
                inner=inner,
                inp_so=inp_s[0],
                inp_si=inp_s[1],
                acc_so=acc_s[0],
                acc_si=acc_s[1],
            )
        )

    def mark_reset(self, nest: _Nest) -> None:
        """The reduction's init: its accumulator entries are reset by their first GEMM."""
        k = _key(nest.leaf)
        info = self._reset.get(k)
        if info is None:
            store = nest.leaf
            coef, base = _linear(_flat_index(store.buffer, store.indices), nest.loop_vars)
            offsets = np.array([0])
            for c, e in zip(coef, nest.extents, strict=True):
                offsets = (offsets[:, None] + c * np.arange(e)[None, :]).reshape(-1)
            info = (store.buffer, base, offsets)
            self._reset[k] = info
        buf, base, offsets = info
        C = self.cfg.array_cols
        first = self.base[_key(buf)]
        b = self.ev(base)
        self.pending_reset |= {first + int(o) for o in np.unique((offsets + b) // C)}

    def emit_init(self, nest: _Nest) -> None:
        """The reduction's init ``acc = v`` of an ALU-only layer: ``MUL 0``, then ``ADD v``."""
        k = _key(nest.leaf)
        info = self._init.get(k)
        if info is None:
            store = nest.leaf
            C = self.cfg.array_cols
            if nest.predicates:
                raise TirLoweringError(f"a predicated init of {store.buffer.name}")
            if nest.loops and nest.extents[-1] != C:
                raise TirLoweringError(
                    f"init of {store.buffer.name}: innermost loop is not the lanes"
                )
            lanes_nest = _Nest(nest.loops[:-1], [], store) if nest.loops else nest
            extents, fields = self._loop_fields(
                lanes_nest, [(_flat_index(store.buffer, store.indices), C)]
            )
            lane_key = _key(nest.loop_vars[-1]) if nest.loops else None
            info = (store.buffer, lane_key, extents, fields[0], _int(store.value))
            self._init[k] = info
        buf, lane_key, (outer, inner), (base, (so, si)), value = info
        if lane_key is not None:
            self.ev.env[lane_key] = 0
        addr = self._chip_addr(buf, self.ev(base))
        if self.alu_runs and so == inner * si and outer * inner <= MAX_LOOP:
            outer, inner, so = 1, outer * inner, 0
        self.seq.append(_alu_insn(AluOp.MUL, addr, 0, outer, inner, so, si, 0, 0, 0))
        if value:
            self.seq.append(_alu_insn(AluOp.ADD, addr, value, outer, inner, so, si, 0, 0, 0))

    def emit_alu(self, nest: _Nest) -> None:
        k = _key(nest.leaf)
        info = self._alu.get(k)
        if info is None:
            info = self._alu[k] = self._analyse_alu(nest)
        dst, operand_buf, lane_key, extents, fields, ops, highs = info
        first_insn = len(self.seq)
        C = self.cfg.array_cols
        if lane_key is not None:
            self.ev.env[lane_key] = 0
        if highs is not None:  # a partial tile
            extents = [
                e if h is None else max(0, min(e, self.ev(h)))
                for e, h in zip(extents, highs, strict=True)
            ]
            if not min(extents):
                return
        (dst_b, dst_s), (opd_b, _) = fields[0], fields[1]
        dst_b, opd_b = self.ev(dst_b), self.ev(opd_b)
        opd_addr = self._chip_addr(operand_buf, opd_b)
        # In place: the destination buffer lives where its operand does.
        self.base[_key(dst)] = opd_addr - dst_b // C
        outer, inner = extents
        src_fields = iter(fields[2:])
        first = True
        for op, src_load, imm in ops:
            if src_load is not None:
                s_b, s_s = next(src_fields)
                src, src_so, src_si = self._chip_addr(src_load.source, self.ev(s_b)), *s_s
            else:
                src, src_so, src_si = 0, 0, 0
            o, i, dso, dsi = outer, inner, dst_s[0], dst_s[1]
            if self.alu_runs and dso == i * dsi and src_so == i * src_si and o * i <= MAX_LOOP:
                o, i, dso, src_so = 1, o * i, 0, 0  # one contiguous run
            if first and self.pending_reset:
                # Every GEMM of this accumulator region was dropped (all-zero weight blocks):
                # the reset becomes a multiplication by zero.
                entries = _entries(opd_addr, outer, inner, dst_s[0], dst_s[1])
                if not entries.isdisjoint(self.pending_reset):
                    if not entries <= self.pending_reset:
                        raise TirLoweringError("an epilogue covers a partly reset region")
                    self.pending_reset -= entries
                    self.seq.append(_alu_insn(AluOp.MUL, opd_addr, 0, o, i, dso, dsi, 0, 0, 0))
            first = False
            self.seq.append(_alu_insn(op, opd_addr, imm, o, i, dso, dsi, src, src_so, src_si))
        if _key(dst) in self.gemm_acc:  # a reduction's init computed in a GEMM region
            self._prologue(first_insn)

    def _analyse_alu(self, nest: _Nest):
        store = nest.leaf
        C = self.cfg.array_cols
        amin, amax = self.cfg.act_range
        dst = store.buffer
        if _buffer_scope(dst) != SCOPE_ACC:
            raise TirLoweringError(f"unrecognised copy or computation into {dst.name}")
        ops = []  # (AluOp, operand load or None, immediate or None)
        value = store.value
        operand = None
        if _kind(value) == "Add":
            operand = value.a
            ops.append((AluOp.ADD, value.b, None))
        elif _kind(value) == "Cast":
            # Cast(int32, max(min((int64(x) * int64(m) + round) >> S, amax), amin))
            inner = value.value
            bounds = {}
            while _kind(inner) in ("Min", "Max"):
                bounds[_kind(inner)] = _int(inner.b)
                inner = inner.a
            if bounds != {"Min": amax, "Max": amin} or _kind(inner) != "RShift":
                raise TirLoweringError(f"unrecognised requantization {value}")
            shift = _int(inner.b)
            total = inner.a
            if _kind(total) != "Add" or _int(total.b) != 1 << (shift - 1):
                raise TirLoweringError(f"requantization {value} does not round half up")
            prod = total.a
            operand = _strip_cast(prod.a)
            ops.append((AluOp.REQUANT, _strip_cast(prod.b), shift))
        elif _kind(value) == "Mul":
            operand = value.a
            b = _strip_cast(value.b)
            ops.append(
                (AluOp.MUL, b, None) if _kind(b) == "TensorLoad" else (AluOp.MUL, None, _int(b))
            )
        elif _kind(value) == "RShift":
            # (x + 2**(k-1)) >> k: the ALU's rounding shift
            k = _int(value.b)
            total = value.a
            if _kind(total) != "Add" or _int(total.b) != (1 << k) >> 1:
                raise TirLoweringError(f"shift {value} does not round half up")
            operand = total.a
            ops.append((AluOp.SHR, None, k))
        elif _kind(value) == "Max" and _kind(_strip_cast(value.b)) == "TensorLoad":
            # a MAX reduction step: max(acc, src) (max pooling's window taps)
            operand = value.a
            ops.append((AluOp.MAX, _strip_cast(value.b), None))
        else:
            chain = []
            while _kind(value) in ("Min", "Max"):
                chain.append((AluOp.MIN if _kind(value) == "Min" else AluOp.MAX, _int(value.b)))
                value = value.a
            operand = value
            ops += [(op, None, imm) for op, imm in reversed(chain)]
        operand = _strip_cast(operand)
        inner_ops = []  # a chain ((x op1 a) op2 b) ...: the inner operations run first
        while _kind(operand) in ("Add", "Mul"):
            b = _strip_cast(operand.b)
            op = AluOp.ADD if _kind(operand) == "Add" else AluOp.MUL
            if _kind(b) == "TensorLoad":
                inner_ops.append((op, b, None))
            else:
                inner_ops.append((op, None, _int(b)))
            operand = _strip_cast(operand.a)
        ops = inner_ops[::-1] + ops
        if _kind(operand) != "TensorLoad" or _buffer_scope(operand.source) != SCOPE_ACC:
            raise TirLoweringError(f"ALU stage {store.value} does not read the accumulator")
        # Loops: drop the lanes (the innermost loop, contiguous over the C lanes).
        lanes_nest = _Nest(nest.loops[:-1], [], store) if nest.loops else nest
        if nest.loops and nest.extents[-1] != C:
            raise TirLoweringError(f"ALU stage {store.value}: innermost loop is not the lanes")
        dst_expr = _flat_index(dst, store.indices)
        opd_expr = _flat_index(operand.source, operand.indices)
        srcs = [(_flat_index(o.source, o.indices), C) for _, o, _ in ops if o is not None]
        # Lane offsets must vanish at lane 0: bases are evaluated with the lane loop at 0.
        lane_key = _key(nest.loop_vars[-1]) if nest.loops else None
        extents, fields = self._loop_fields(lanes_nest, [(dst_expr, C), (opd_expr, C)] + srcs)
        if fields[0][1] != fields[1][1]:
            raise TirLoweringError(f"ALU stage {store.value} is not in place")
        highs = None
        if nest.predicates:
            all_highs = _predicate_highs(nest.predicates, nest.loop_vars, nest.extents)
            if nest.loops and all_highs[-1] is not None:
                raise TirLoweringError(f"ALU stage {store.value}: a predicate bounds the lanes")
            highs = all_highs[:-1] if nest.loops else all_highs
            highs = [None] * (len(extents) - len(highs)) + highs
        return dst, operand.source, lane_key, extents, fields, ops, highs


def _entries(base: int, outer: int, inner: int, so: int, si: int) -> set[int]:
    """The accumulator entries of a GEMM / ALU loop nest."""
    if si == 1 and so == inner:
        return set(range(base, base + outer * inner))
    return {base + i * so + j * si for i in range(outer) for j in range(inner)}


def _alu_insn(op, dst, imm, outer, inner, dst_so, dst_si, src, src_so, src_si) -> Instruction:
    return Instruction(
        Opcode.ALU,
        alu_op=int(op),
        use_imm=int(imm is not None and op != AluOp.REQUANT),
        imm=int(imm or 0),
        dst_addr=dst,
        src_addr=src,
        outer=outer,
        inner=inner,
        dst_so=dst_so,
        dst_si=dst_si,
        src_so=src_so,
        src_si=src_si,
    )


def _runs(opcode, sram: int, dram: int, count: int, fields: dict) -> list[Instruction]:
    """``count`` consecutive entries as transfers of at most ``MAX_TRANSFER`` rows of at most
    ``MAX_TRANSFER`` entries (as :func:`~tvm_hapm.target.codegen._load_rows`)."""
    out = []
    while count > 0:
        c = min(count, MAX_TRANSFER)
        r = min(count // c, MAX_TRANSFER)
        out.append(
            Instruction(
                opcode, sram_addr=sram, dram_addr=dram, y_size=r, x_size=c, x_stride=c, **fields
            )
        )
        sram += r * c
        dram += r * c
        count -= r * c
    return out


class SparseWeights:
    """The compile-time sparse schedule: the walker stage that knows the constant weights.

    The TIR function is scheduled on the dense block tensor ``weight[COB, CIB, KH, KW, R, C]``.
    The weights are compile-time constants, so the walker drops what an all-zero ``R x C``
    block would cost:

    * a weight DMA loads only the non-zero blocks of the region it moves, as one contiguous
      run; the DRAM weight slot holds the non-zero blocks in *load order* (output-channel
      group, input-channel chunk, then ``(cob, cib, kh, kw)``: :attr:`order`), and on chip the
      run is packed from the DMA's first entry, so weight-buffer addresses are compacted;
    * a weight DMA whose blocks are already on chip at the same place is not repeated;
    * a GEMM whose weight block is all zero is dropped (the next GEMM of its accumulator
      region takes the reset flag; a region whose GEMMs were all dropped is zeroed by a
      ``MUL 0`` ahead of its epilogue).

    Grouped and depthwise convolutions are dense convolutions with block-diagonal weights,
    so they go through the same schedule.
    """

    def __init__(self, nonzero: np.ndarray, cob_group: int, cib_chunk: int, param=None):
        self.nonzero = np.asarray(nonzero, bool)
        cob, cib = self.nonzero.shape[:2]
        dense_ids = np.arange(self.nonzero.size).reshape(self.nonzero.shape)
        order = []
        for cg0 in range(0, cob, cob_group):
            for kc0 in range(0, cib, cib_chunk):
                blk = dense_ids[cg0 : cg0 + cob_group, kc0 : kc0 + cib_chunk]
                nz = self.nonzero[cg0 : cg0 + cob_group, kc0 : kc0 + cib_chunk]
                order += [int(i) for i in blk[nz]]
        #: Dense block ids (row-major over ``(COB, CIB, KH, KW)``) of the DRAM slot, in order.
        self.order = order
        self.pos = {d: i for i, d in enumerate(order)}
        self.param = param  # key of the weight parameter
        self.chip: dict[int, int | None] = {}  # TIR on-chip entry -> compacted entry or None
        self.loaded: dict[int, tuple] = {}  # compacted base -> (first DRAM position, count)
        #: Entries of one half of a double-buffered weight buffer (0: not double buffered):
        #: successive loads alternate between the halves; a run already in the current half is
        #: not loaded again.
        self.half = 0
        self._current: int | None = None

    def load(self, emitter, sram, dram, rows, cols, stride, fields) -> None:
        dense = (dram + np.arange(rows)[:, None] * stride + np.arange(cols)[None, :]).reshape(-1)
        flat_nz = self.nonzero.reshape(-1)
        keep = flat_nz[dense]
        positions = [self.pos[int(d)] for d in dense[keep]]
        # The compacted DRAM order is group-major; a DMA of a whole resident tensor covers the
        # blocks in dense order, which is the same *set* of positions in another order. On chip
        # the blocks land in DRAM order, so each block's entry is its position in the run.
        first = min(positions) if positions else 0
        if positions and sorted(positions) != list(range(first, first + len(positions))):
            raise TirLoweringError("the non-zero weight blocks of a DMA are not one run")
        offset = 0
        reuse = False
        if positions:
            run = (first, len(positions))
            if self.half:
                reuse = self._current is not None and self.loaded.get(self._current) == run
                if not reuse:
                    self._current = 0 if self._current is None else 1 - self._current
                    self.loaded[self._current] = run
                offset = self._current * self.half
            else:
                reuse = self.loaded.get(sram) == run
                self.loaded = {sram: run}
        for j, (d, d_keep) in enumerate(zip(dense, keep, strict=True)):
            self.chip[sram + j] = sram + offset + self.pos[int(d)] - first if d_keep else None
        if positions and not reuse:
            emitter.seq += _runs(Opcode.LOAD, sram + offset, first, len(positions), fields)

    def chip_addr(self, tir_addr: int) -> int | None:
        return self.chip[tir_addr]


def _lowered(func: tirx.PrimFunc, cfg: HardwareConfig | None) -> tirx.PrimFunc:
    if func.attrs is not None and LOWERED_ATTR in func.attrs:
        return func
    if func.attrs is None or KERNEL_ATTR not in func.attrs:
        raise TirLoweringError(
            f"the PrimFunc has no '{KERNEL_ATTR}' attribute: schedule it with schedule_conv2d"
        )
    mod = LowerToAccelerator(cfg)(tvm.IRModule({"main": func}))
    return mod["main"]


def _as_func(func_or_sch) -> tirx.PrimFunc:
    if isinstance(func_or_sch, s_tir.Schedule):
        return func_or_sch.mod["main"]
    if isinstance(func_or_sch, tvm.IRModule):
        return func_or_sch["main"]
    return func_or_sch


def emit_program(
    func, cfg: HardwareConfig | None = None, weights: SparseWeights | None = None
) -> list[Instruction]:
    """The instruction stream of a scheduled accelerator PrimFunc (or its Schedule).

    The function is lowered with :func:`LowerToAccelerator` if needed, then walked in
    execution order: loops run, DMA calls become LOAD / STORE, each tensorized product becomes
    one GEMM whose ``outer`` / ``inner`` loops and strides are the (at most two) loops around
    it (as VTA folds its micro-op loops), the reduction's init marks accumulator entries that
    the next GEMM writing them resets, and each epilogue loop nest on the accumulator becomes
    ALU instructions computed in place of their operand.  The sequential stream is then
    software-pipelined (:func:`~tvm_hapm.target.schedule.interleave_epilogues` for GEMM programs,
    :func:`~tvm_hapm.target.schedule.pipeline_operand_loads` for ALU-only ones) and the last
    step inserts the dependency tokens of the decoupled load / compute / store modules.

    ``weights`` (a :class:`SparseWeights` of the layer's constant weights) turns on the
    compile-time sparse schedule: all-zero weight blocks are neither loaded nor multiplied.

    A reduction's init computed into a GEMM accumulator region (a fused residual: the shortcut
    tile's ``LOAD`` and ``MUL`` by ``K``) is that region's prologue: with
    double buffering each prologue moves ahead of the previous region
    (:func:`~tvm_hapm.target.schedule.hoist_prologues`), and ``interleave_epilogues`` flushes
    pending instructions only up to the last one a GEMM conflicts with (``partial_flush``), as
    the direct generator does.
    """
    func = _as_func(func)
    cfg = get_config(cfg if cfg is not None else layer_of(func)["config"])
    func = _lowered(func, cfg)
    emitter = _Emitter(cfg, func, weights)
    emitter.visit(func.body)
    if emitter.pending_reset:
        raise TirLoweringError("accumulator entries were initialised but never computed")
    seq = emitter.seq
    if emitter.alu_only:
        seq = assign_arrays(pipeline_operand_loads(seq), cfg)
    else:  # (also when every GEMM was dropped: the direct generator does not move the loads)
        prologues = [tuple(r) for r in emitter.regions]  # a fused residual's computed inits
        seq = conv_stream_passes(seq, cfg, prologues, emitter.double)
    return insert_dependency_tokens(seq)


def build_program(cfg: HardwareConfig | None, func, layer_name: str = "tir") -> Program:
    """The :class:`~tvm_hapm.target.program.Program` of a scheduled accelerator PrimFunc.

    Its slots are the function's buffer parameters in order (``"raw"`` packing: the tensors
    already are in the DRAM layout); the last one is the output.
    """
    func = _as_func(func)
    layer = layer_of(func)
    cfg = get_config(cfg if cfg is not None else layer["config"])
    insns = emit_program(func, cfg)
    slots = []
    params = list(func.params)
    for i, p in enumerate(params):
        role = "output" if i == len(params) - 1 else "const"
        if i == 0 or (i == 1 and layer.get("residual")):
            role = "input"
        slots.append(Slot(str(p.name), role, str(p.ty.dtype), tuple(_buffer_shape(p))))
    plan = json.loads(str(func.attrs[SCHEDULE_ATTR])) if SCHEDULE_ATTR in func.attrs else {}
    info = {"kind": layer["kind"], "schedule": plan, "source": "tir"}
    return Program(layer_name, cfg, slots, insns, 0, info)


# =============================================================================================
# layer programs through TIR (the Relax flow's route)
def conv2d_program(
    cfg: HardwareConfig,
    layer: str,
    data_shape,
    weight: np.ndarray,
    bias: np.ndarray | None,
    mult: np.ndarray,
    shift: int,
    clip: tuple[int, int],
    strides=(1, 1),
    padding=(0, 0, 0, 0),
    dilation=(1, 1),
    groups: int = 1,
    layer_index: int = 0,
    schedule: ConvSchedule | None = None,
    divisor_tiles: bool = True,
    residual: np.ndarray | None = None,
):
    """Program of a quantized conv2d through TIR; same interface and result as
    :func:`tvm_hapm.target.codegen.conv2d_program` (slots, constants and, instruction by
    instruction, the stream).

    Steps: the weights become dense ``R x C`` blocks (block-diagonal for grouped convolutions);
    :func:`~tvm_hapm.target.schedule.plan_conv` plans the tiles from the non-zero blocks;
    :func:`conv2d_primfunc` defines the layer, :func:`schedule_conv2d` schedules and tensorizes
    it, :func:`LowerToAccelerator` runs the TIR passes (buffer compaction, :func:`InjectDMA`)
    and :func:`emit_program` walks it with the layer's :class:`SparseWeights` (the
    compile-time sparse schedule), then inserts the dependency tokens.

    The TIR schedule tiles each dimension by a divisor (:func:`tir_conv_schedule`); with
    ``divisor_tiles=False`` a plan whose output tiles do not divide the output is refused
    (:class:`TirLoweringError`) instead of being shrunk.

    ``residual`` (the shortcut's integer weight per output channel) fuses a residual add as
    the direct generator does: a second input slot ``residual``, three constant rows per
    output block, and the ``conv`` reduction starting from ``int32(shortcut) * K + bias``
    (:func:`conv2d_primfunc`); each region's prologue (the shortcut tile's ``LOAD``, ``MUL``,
    ``ADD``) is hoisted as the direct generator's (:func:`emit_program`).
    """
    from . import codegen

    R, C = cfg.array_rows, cfg.array_cols
    g = codegen.conv_geometry(
        cfg, layer, data_shape, weight, strides, padding, dilation, groups, clip
    )
    n, cin, h, w = g.data_shape
    cout, cin_g, kh, kw = weight.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = g.strides, g.dilation, g.padding
    oh, ow, blocks, nonzero = g.oh, g.ow, g.blocks, g.nonzero
    cob, cib = blocks.shape[:2]
    fused = residual is not None
    func = conv2d_primfunc(
        cfg, n, cin, h, w, cout, kh, kw, (sh, sw), (pt, pl, pb, pr), (dh, dw), shift, clip,
        residual=fused,
    )  # fmt: skip
    plan = schedule or plan_conv(
        cfg, h, w, oh, ow, kh, kw, (sh, sw), (dh, dw), cib, cob, nonzero, residual=fused
    )
    sched = tir_conv_schedule(cfg, layer_of(func), plan)
    sparse_count = int(nonzero.sum())
    sched = fit_double_buffer(
        cfg, sched, kh, kw, (sh, sw), (dh, dw), sparse_count, residual_rows(cob, fused)
    )
    if not divisor_tiles and (sched.tile_h, sched.tile_w) != (plan.tile_h, plan.tile_w):
        raise TirLoweringError(
            f"{layer}: the planned {plan.tile_h}x{plan.tile_w} tiles do not divide {oh}x{ow}"
        )
    sparse = SparseWeights(nonzero, sched.cob_group, sched.cib_chunk)
    wdtype = cfg.weight_dtype
    flat = blocks.reshape(-1, R, C)
    wblocks = (
        np.ascontiguousarray(flat[sparse.order]).astype(wdtype)
        if sparse.order
        else np.zeros((1, R, C), wdtype)
    )
    bias_mult = codegen.bias_mult_rows(cfg, layer, cout, bias, mult, residual)
    sch = schedule_conv2d(func, cfg, sched, weight_blocks=len(sparse.order))
    insns = emit_program(sch, cfg, sparse)
    slots = [
        Slot("data", "input", cfg.act_dtype, (n, cin, h, w), "act", R),
        Slot("weight_blocks", "const", wdtype, wblocks.shape),
        Slot("bias_mult", "const", "int32", bias_mult.shape),
        Slot("out", "output", cfg.act_dtype, (n, cout, oh, ow), "act", C),
    ]
    if fused:
        slots.insert(1, Slot("residual", "input", cfg.act_dtype, (n, cout, oh, ow), "act", C))
    info = {
        "kind": "conv2d_residual" if fused else "conv2d",
        "macs": int(n * oh * ow * cout * cin_g * kh * kw),
        "weight_blocks": int(cob * cib * kh * kw),
        "nonzero_blocks": len(sparse.order),
        "schedule": sched.to_dict(),
        "source": "tir",
    }
    if fused:
        info["residual"] = True
    return Program(layer, cfg, slots, insns, layer_index, info), [wblocks, bias_mult]


def dense_program(cfg, layer, data_shape, weight_kn, bias, mult, shift, clip, layer_index=0):
    """Program of a quantized ``(N, K) x (K, M)`` dense layer through TIR (the 1x1 convolution
    of a 1x1 image, whose tiles always divide), as :func:`tvm_hapm.target.codegen.dense_program`."""
    n, k = (int(v) for v in data_shape)
    m = weight_kn.shape[1]
    w_oihw = np.ascontiguousarray(weight_kn.T).reshape(m, k, 1, 1)
    prog, consts = conv2d_program(
        cfg, layer, (n, k, 1, 1), w_oihw, bias, mult, shift, clip, layer_index=layer_index
    )
    prog.slots[0] = Slot("data", "input", cfg.act_dtype, (n, k), "act", cfg.array_rows)
    prog.slots[3] = Slot("out", "output", cfg.act_dtype, (n, m), "act", cfg.array_cols)
    prog.info["kind"] = "dense"
    return prog, consts


# =============================================================================================
# ALU-only layers through TIR
def _acc_copy(src, name):
    return te.compute(src.shape, lambda *i: src[i].astype("int32"), name=name)


def _clip_stage(cfg, x, lo, hi, name="clip"):
    """``min(max(x, lo), hi)`` with the bounds inside the activation range (``MAX`` then
    ``MIN``, as :func:`~tvm_hapm.target.codegen.add_program` emits them)."""
    amin, amax = cfg.act_range
    lo, hi = max(amin, lo), min(amax, hi)
    return te.compute(x.shape, lambda *i: tirx.min(tirx.max(x[i], lo), hi), name=name)


def add_primfunc(cfg: HardwareConfig, total: int, mult_a: int, mult_b: int, shift: int, clip):
    """The residual add ``clip((a*Ma + b*Mb + 2**(S-1)) >> S)`` on ``total`` packed entries of
    ``C`` lanes (the DRAM layout ``(N, CB, H, W, C)`` flattened), as a TE PrimFunc.

    Stages (all but the output in the accumulator): ``lhs_acc`` / ``rhs_acc`` (the DMA loads),
    ``lhs_mul`` / ``rhs_mul`` (``MUL`` by an immediate), ``sum`` (``ADD``), ``shr`` (the
    rounding ``SHR``), ``clip`` (``MAX`` / ``MIN``) and ``out`` (the cast, the store).
    """
    C = cfg.array_cols
    act = cfg.act_dtype
    lhs = te.placeholder((total, C), act, name="lhs")
    rhs = te.placeholder((total, C), act, name="rhs")
    a = _acc_copy(lhs, "lhs_acc")
    b = _acc_copy(rhs, "rhs_acc")
    ma = te.compute(
        a.shape, lambda i, c: a[i, c] * tirx.const(int(mult_a), "int32"), name="lhs_mul"
    )
    mb = te.compute(
        b.shape, lambda i, c: b[i, c] * tirx.const(int(mult_b), "int32"), name="rhs_mul"
    )
    s = te.compute(a.shape, lambda i, c: ma[i, c] + mb[i, c], name="sum")
    rnd = (1 << int(shift)) >> 1
    sh = te.compute(
        a.shape,
        lambda i, c: (s[i, c] + tirx.const(rnd, "int32")) >> tirx.const(int(shift), "int32"),
        name="shr",
    )
    cl = _clip_stage(cfg, sh, *clip)
    out = te.compute(a.shape, lambda i, c: cl[i, c].astype(act), name="out")
    func = te.create_prim_func([lhs, rhs, out])
    layer = {"kind": "add", "config": cfg.name, "total": total, "shift": int(shift)}
    return func.with_attr(LAYER_ATTR, json.dumps(layer, sort_keys=True))


def _schedule_eltwise(func, stages: list[str], tile: int, kind: str, plan: dict, dma_stages=()):
    """Tile the output's entry axis by ``tile`` (as ``[tiles, 1, tile]``: the unit loop makes
    the DMAs one row of ``tile`` entries with the row pitch ``tile``) and compute every stage
    (``stages`` in program order) per tile in the accumulator."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    out = sch.get_sblock("out")
    i, _c = sch.get_loops(out)
    io, _one, _ii = sch.split(i, [None, 1, tile])
    for name in reversed(stages):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, io, preserve_unit_loops=True, index=0)
        sch.set_scope(blk, 0, SCOPE_ACC)
        if name in dma_stages:  # one row of `tile` entries, pitch `tile` (codegen._load_rows)
            sch.split(sch.get_loops(blk)[1], [1, None])
    new = sch.mod["main"].with_attrs(
        {KERNEL_ATTR: kind, SCHEDULE_ATTR: json.dumps(plan, sort_keys=True)}
    )
    return s_tir.Schedule(tvm.IRModule({"main": new}))


def add_program(cfg, layer, shape, mult_a, mult_b, shift, clip, layer_index=0):
    """Program of a residual add through TIR; same interface, slots and (instruction by
    instruction) stream as :func:`tvm_hapm.target.codegen.add_program`.

    A last tile shorter than the planned one is a predicated tile: its DMAs and ALU loops
    are shortened by the walker.  A double-buffered plan (``plan_eltwise``) makes the walker
    alternate the operand tiles between two halves (``lhs_acc`` then ``rhs_acc``, each
    allocated twice); :func:`emit_program` then moves each tile's loads into the previous
    tile's ALU passes (:func:`~tvm_hapm.target.schedule.pipeline_operand_loads`).
    """
    from . import codegen
    from .schedule import plan_eltwise

    C = cfg.array_cols
    n, c, h, w = (int(v) for v in (tuple(shape) + (1, 1))[:4])
    codegen._check_clip(cfg, *clip)
    total = n * (-(-c // C)) * h * w
    sched = plan_eltwise(cfg, total, buffers=2, double_buffer=True, alu_passes=6)
    func = add_primfunc(cfg, total, mult_a, mult_b, shift, clip)
    stages = ["lhs_acc", "rhs_acc", "lhs_mul", "rhs_mul", "sum", "shr", "clip"]
    sch = _schedule_eltwise(
        func, stages, sched.tile, "add", sched.to_dict(), dma_stages=("lhs_acc", "rhs_acc")
    )
    insns = emit_program(sch, cfg)
    slots = [
        Slot("lhs", "input", cfg.act_dtype, shape, "act", C),
        Slot("rhs", "input", cfg.act_dtype, shape, "act", C),
        Slot("out", "output", cfg.act_dtype, shape, "act", C),
    ]
    info = {"kind": "add", "schedule": sched.to_dict(), "source": "tir"}
    return Program(layer, cfg, slots, insns, layer_index, info), []


def global_avg_pool_primfunc(cfg: HardwareConfig, entries: int, pixels: int, shift: int, clip):
    """Global average pooling on ``entries`` packed channel vectors (``N * CB``) of ``pixels``
    (``H * W``) entries each, as a TE PrimFunc.

    Stages (all but the output in the accumulator): ``mult_acc`` (the multiplier row, one
    32-bit DMA), ``data_acc`` (the DMA loads), ``sum`` (the reduction over the pixels: a
    ``MUL 0`` init, then ``ADD`` with destination strides 0), ``requant`` (``REQUANT`` by the
    multiplier row), ``clip`` (``MAX`` / ``MIN`` beyond the activation range) and ``out``.
    """
    C = cfg.array_cols
    act = cfg.act_dtype
    amin, amax = cfg.act_range
    lo, hi = (int(v) for v in clip)
    if shift < 1:
        raise TirLoweringError(f"shift {shift}: REQUANT rounds half up by 2**(shift-1)")
    data = te.placeholder((entries, pixels, C), act, name="data")
    mult = te.placeholder((1, C), "int32", name="mult")
    mult_acc = te.compute(mult.shape, lambda i, c: mult[i, c], name="mult_acc")
    x = _acc_copy(data, "data_acc")
    p = te.reduce_axis((0, pixels), "p")
    s = te.compute((entries, C), lambda e, c: te.sum(x[e, p, c], axis=p), name="sum")
    i64 = "int64"
    requant = te.compute(
        s.shape,
        lambda e, c: tirx.max(
            tirx.min(
                (
                    s[e, c].astype(i64) * mult_acc[0, c].astype(i64)
                    + tirx.const(1 << (shift - 1), i64)
                )
                >> tirx.const(shift, i64),
                tirx.const(amax, i64),
            ),
            tirx.const(amin, i64),
        ).astype("int32"),
        name="requant",
    )
    last = requant
    if lo > amin or hi < amax:

        def _clip(e, c):
            v = requant[e, c]
            if lo > amin:
                v = tirx.max(v, lo)
            if hi < amax:
                v = tirx.min(v, hi)
            return v

        last = te.compute(s.shape, _clip, name="clip")
    out = te.compute(s.shape, lambda e, c: last[e, c].astype(act), name="out")
    func = te.create_prim_func([data, mult, out])
    layer = {"kind": "global_avg_pool", "config": cfg.name, "entries": entries,
             "pixels": pixels, "shift": int(shift), "clip": [lo, hi]}  # fmt: skip
    return func.with_attr(LAYER_ATTR, json.dumps(layer, sort_keys=True))


def schedule_global_avg_pool(func, tile: int, plan: dict) -> s_tir.Schedule:
    """Per channel vector (``N * CB`` of them, the output's entry axis split ``[e, 1, 1]``: the
    store is one row with pitch 1): the ``sum`` init, then per pixel tile of ``tile`` entries
    (the last one predicated) the load and the accumulating ``ADD``, then the epilogue.  The
    multiplier row is loaded once, first.  Unit loops are dropped from the ALU stages: their
    strides are 0, as :func:`~tvm_hapm.target.codegen.global_avg_pool_program` emits them."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    out = sch.get_sblock("out")
    e, _c = sch.get_loops(out)
    eo, _one_a, _one_b = sch.split(e, [None, 1, 1])
    epilogue = [s for s in ("requant", "clip") if _has_block(sch, s)]
    for name in reversed(["sum", *epilogue]):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, eo, preserve_unit_loops=False, index=0)
        sch.set_scope(blk, 0, SCOPE_ACC)
    s = sch.get_sblock("sum")
    c, p = sch.get_loops(s)[-2:]
    pt, pi = sch.split(p, [None, tile])
    sch.reorder(pt, pi, c)
    x = sch.get_sblock("data_acc")
    sch.compute_at(x, pt, preserve_unit_loops=True, index=0)
    sch.set_scope(x, 0, SCOPE_ACC)
    sch.split(sch.get_loops(x)[-2], [1, None])  # one row of `tile` entries, pitch `tile`
    m = sch.get_sblock("mult_acc")
    sch.set_scope(m, 0, SCOPE_ACC)
    sch.split(sch.get_loops(m)[0], [1, 1])  # one row of one entry, pitch 1
    sch.decompose_reduction(s, pt)
    new = sch.mod["main"].with_attrs(
        {KERNEL_ATTR: "global_avg_pool", SCHEDULE_ATTR: json.dumps(plan, sort_keys=True)}
    )
    return s_tir.Schedule(tvm.IRModule({"main": new}))


def global_avg_pool_program(cfg, layer, data_shape, mult, shift, clip, layer_index=0):
    """Program of global average pooling through TIR; same interface, slots, constants and
    (instruction by instruction) stream as
    :func:`tvm_hapm.target.codegen.global_avg_pool_program`."""
    from . import codegen
    from .schedule import plan_eltwise

    C = cfg.array_cols
    n, c, h, w = (int(v) for v in data_shape)
    cb = -(-c // C)
    codegen._check_clip(cfg, *clip)
    sched = plan_eltwise(cfg, h * w, buffers=1, reserved=2)
    func = global_avg_pool_primfunc(cfg, n * cb, h * w, int(shift), clip)
    sch = schedule_global_avg_pool(func, sched.tile, sched.to_dict())
    insns = emit_program(sch, cfg)
    mvec = np.full((1, C), int(mult), np.int32)
    slots = [
        Slot("data", "input", cfg.act_dtype, (n, c, h, w), "act", C),
        Slot("mult", "const", "int32", mvec.shape),
        Slot("out", "output", cfg.act_dtype, (n, c, 1, 1), "act", C),
    ]
    info = {"kind": "global_avg_pool", "schedule": sched.to_dict(), "source": "tir"}
    return Program(layer, cfg, slots, insns, layer_index, info), [mvec]


def max_pool2d_primfunc(cfg: HardwareConfig, entries, h, w, pool_size, strides, padding, dilation):
    """Max pooling on ``entries`` packed channel planes (``N * CB``) of ``h x w`` entries, as a
    TE PrimFunc.

    Stages: ``pad`` (the padded window rows in the accumulator: a DMA whose padding is the
    minimum of the element type, ``pad_min``), ``pool`` (the window reduction: its init
    ``MUL 0`` then ``ADD`` the activation minimum, its update one strided ``MAX`` per window
    tap) and ``out`` (the store).
    """
    C = cfg.array_cols
    act = cfg.act_dtype
    amin, _ = cfg.act_range
    kh, kw = pool_size
    sh, sw = strides
    dh, dw = dilation
    pt, pl, pb, pr = padding
    oh, ow = conv_output_size(h, pt, pb, kh, sh, dh), conv_output_size(w, pl, pr, kw, sw, dw)
    data = te.placeholder((entries, h, w, C), act, name="data")
    lowest = -(1 << (tvm.DataType(act).bits - 1))  # the DMA's pad_min value
    pad = te.compute(
        (entries, h + pt + pb, w + pl + pr, C),
        lambda e, y, x, c: tirx.if_then_else(
            tirx.all(y >= pt, y < h + pt, x >= pl, x < w + pl),
            data[e, y - pt, x - pl, c],
            tirx.const(lowest, act),
        ).astype("int32"),
        name="pad",
    )
    fmax = te.comm_reducer(lambda a, b: tirx.max(a, b), lambda t: tirx.const(amin, t), "max")  # noqa: PLW0108
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    pool = te.compute(
        (entries, oh, ow, C),
        lambda e, y, x, c: fmax(pad[e, y * sh + ry * dh, x * sw + rx * dw, c], axis=[ry, rx]),
        name="pool",
    )
    out = te.compute(pool.shape, lambda *i: pool[i].astype(act), name="out")
    func = te.create_prim_func([data, out])
    layer = {"kind": "max_pool2d", "config": cfg.name, "entries": entries, "h": h, "w": w,
             "oh": oh, "ow": ow, "alu_runs": False}  # fmt: skip
    return func.with_attr(LAYER_ATTR, json.dumps(layer, sort_keys=True))


def schedule_max_pool2d(func, tile_h: int, tile_w: int, plan: dict) -> s_tir.Schedule:
    """Per channel plane and ``tile_h x tile_w`` output tile (divisor tiles): the padded input
    window rows, the init, one ``MAX`` per window tap over the tile, the store (the loop
    order of :func:`~tvm_hapm.target.codegen.max_pool2d_program`)."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    out = sch.get_sblock("out")
    e, y, x, c = sch.get_loops(out)
    yo, yi = sch.split(y, [None, tile_h])
    xo, xi = sch.split(x, [None, tile_w])
    sch.reorder(e, yo, xo, yi, xi, c)
    pool = sch.get_sblock("pool")
    sch.compute_at(pool, xo, preserve_unit_loops=True)  # a 1-row tile keeps its strides
    sch.set_scope(pool, 0, SCOPE_ACC)
    py, px, pc, ky, kx = sch.get_loops(pool)[-5:]
    sch.reorder(ky, kx, py, px, pc)
    pad = sch.get_sblock("pad")
    sch.compute_at(pad, xo, preserve_unit_loops=True, index=0)
    sch.set_scope(pad, 0, SCOPE_ACC)
    sch.decompose_reduction(pool, ky)
    new = sch.mod["main"].with_attrs(
        {KERNEL_ATTR: "max_pool2d", SCHEDULE_ATTR: json.dumps(plan, sort_keys=True)}
    )
    return s_tir.Schedule(tvm.IRModule({"main": new}))


def max_pool2d_program(
    cfg, layer, data_shape, pool_size, strides, padding, dilation=(1, 1), layer_index=0
):
    """Program of max pooling through TIR; same interface, slots and (instruction by
    instruction) stream as :func:`tvm_hapm.target.codegen.max_pool2d_program`.

    The output tiles are those of ``plan_conv(..., pool=True)``; a plan whose tiles do not
    divide the output is refused (:class:`TirLoweringError`): the direct generator's partial
    tiles have a smaller window layout than the compacted TIR buffers.
    """
    from . import codegen

    C = cfg.array_cols
    n, c, h, w = (int(v) for v in data_shape)
    kh, kw = (int(v) for v in pool_size)
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(p) for p in padding)
    if max(pt, pl, pb, pr) > 15:
        raise codegen.CodegenError(f"{layer}: padding {padding} exceeds the DMA's pad field")
    if max(sh, sw, dh, dw) > 63:
        raise codegen.CodegenError(f"{layer}: stride {strides} exceeds the ALU stride field")
    oh = conv_output_size(h, pt, pb, kh, sh, dh)
    ow = conv_output_size(w, pl, pr, kw, sw, dw)
    cb = -(-c // C)
    sched = plan_conv(cfg, h, w, oh, ow, kh, kw, (sh, sw), (dh, dw), 1, 1, None, pool=True)
    th, tw = sched.tile_h, sched.tile_w
    if oh % th or ow % tw:
        raise TirLoweringError(f"{layer}: the planned {th}x{tw} tiles do not divide {oh}x{ow}")
    th_in, tw_in = (th - 1) * sh + (kh - 1) * dh + 1, (tw - 1) * sw + (kw - 1) * dw + 1
    for oh0 in range(0, oh, th):
        for ow0 in range(0, ow, tw):
            ih0, iw0 = oh0 * sh - pt, ow0 * sw - pl
            rows = th_in - max(0, -ih0) - max(0, ih0 + th_in - h)
            cols = tw_in - max(0, -iw0) - max(0, iw0 + tw_in - w)
            if rows < 1 or cols < 1:
                raise codegen.CodegenError(f"{layer}: a window lies entirely in the padding")
    func = max_pool2d_primfunc(cfg, n * cb, h, w, (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw))
    sch = schedule_max_pool2d(func, th, tw, sched.to_dict())
    insns = emit_program(sch, cfg)
    slots = [
        Slot("data", "input", cfg.act_dtype, (n, c, h, w), "act", C),
        Slot("out", "output", cfg.act_dtype, (n, c, oh, ow), "act", C),
    ]
    info = {"kind": "max_pool2d", "schedule": sched.to_dict(), "source": "tir"}
    return Program(layer, cfg, slots, insns, layer_index, info), []


# =============================================================================================
# build integration
def OffloadHapmKernels():  # noqa: N802 - TVM pass naming
    """Replace the body of every hapm_fpga-targeted PrimFunc carrying ``"hapm_fpga.kernel"`` by
    ``T.call_packed("hapm_fpga.run_tir", <program, base64>, *buffers)``.

    Functions without the attribute, or bound to another target, are returned unchanged.
    """

    def _offload(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
        attrs = func.attrs
        if attrs is None or KERNEL_ATTR not in attrs:
            return func
        target = attrs.get("target", None) or tvm.target.Target.current(allow_none=True)
        if target is None or not is_hapm_target(target):
            return func
        layer = layer_of(func)
        cfg = get_config(target) if target is not None else get_config(layer["config"])
        name = str(attrs.get("global_symbol", "main"))
        prog = build_program(cfg, func, layer_name=name)
        blob = base64.b64encode(prog.to_bytes()).decode()
        call = tirx.call_packed(RUN_TIR_FUNC, tvm.ir.expr.StringImm(blob), *func.params)
        return func.with_body(tirx.Evaluate(call)).without_attr(KERNEL_ATTR)

    return tvm.tirx.transform.prim_func_pass(
        _offload, opt_level=0, name="hapm_fpga.OffloadHapmKernels"
    )


#: TVM's own "s_tir" pipeline factory (unwrapped if this module is imported again).
ORIGINAL_S_TIR = getattr(
    _tir_pipeline.PIPELINE_MAP["s_tir"], "hapm_original", _tir_pipeline.PIPELINE_MAP["s_tir"]
)


def hapm_tir_pipeline(**kwargs):
    """TVM's S-TIR pipeline preceded by :func:`OffloadHapmKernels`.

    Returns ``(pass, finalize_host_passes, finalize_device_passes)`` like every TIR pipeline
    factory.  A module without hapm_fpga kernels goes through the original pipeline unchanged.
    """
    base, finalize_host, finalize_device = ORIGINAL_S_TIR(**kwargs)

    @tvm.transform.module_pass(opt_level=0, name="hapm_fpga.TIRPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        has_kernel = any(
            isinstance(f, tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs
            for _, f in mod.functions_items()
        )
        if has_kernel:
            mod = OffloadHapmKernels()(mod)
        return base(mod)

    return _pipeline, finalize_host, finalize_device


hapm_tir_pipeline.hapm_original = ORIGINAL_S_TIR
