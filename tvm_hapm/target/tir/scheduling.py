"""``s_tir`` schedules of a conv2d PrimFunc onto the on-chip buffers and the tensor intrinsic."""

from __future__ import annotations

import json

import tvm
from tvm import s_tir, tirx

from ..config import HardwareConfig, get_config
from ..intrin import SCOPE_ACC, SCOPE_INP, SCOPE_WGT, gemv_intrin
from ..schedule import (
    ConvSchedule,
    fit_double_buffer,
    plan_conv,
    residual_rows,
)
from .compute import KERNEL_ATTR, SCHEDULE_ATTR, init_reads_fixed, layer_of


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
    stages = [s for s in epilogue if has_block(sch, s)]
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
        sch = s_tir.Schedule(tvm.IRModule({"main": init_reads_fixed(sch.mod["main"], "conv")}))
        sch.compute_inline(sch.get_sblock("shortcut"))
        c = sch.get_loops(sch.get_sblock("conv_update"))[-2]
    sch.tensorize(c, gemv_intrin(cfg))
    new = sch.mod["main"].with_attrs(
        {KERNEL_ATTR: L["kind"], SCHEDULE_ATTR: json.dumps(plan.to_dict(), sort_keys=True)}
    )
    sch = s_tir.Schedule(tvm.IRModule({"main": new}))
    return sch


def has_block(sch, name) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:
        return False
    return True
