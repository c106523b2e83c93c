"""``s_tir`` schedules of a conv2d PrimFunc onto the on-chip buffers and the tensor intrinsic.

The schedule tiles the output by the planned tile (:func:`tir_conv_schedule`).  When that tile
does not divide the output, the function is defined by output regions
(:func:`~tvm_hapm.target.tir.compute.output_regions`) and each region is scheduled with its own
exact tile: ``Schedule.tensorize`` (TVM 0.27) refuses a block under the predicate a partial
tile would need, so there is none.  :func:`merge_region_loops` then runs the regions tile after
tile in the direct generator's order, and the edge regions' buffers are aligned to the planned
tile's, so the stream is the direct generator's, instruction by instruction.
"""

from __future__ import annotations

import functools
import json

import tvm
from tvm import s_tir, tirx

from ..config import HardwareConfig, get_config
from ..intrin import SCOPE_ACC, SCOPE_INP, SCOPE_WGT, gemv_intrin
from ..schedule import (
    ConvSchedule,
    fit_double_buffer,
    largest_divisor,
    plan_conv,
    residual_rows,
)
from .compute import (
    KERNEL_ATTR,
    SCHEDULE_ATTR,
    init_reads_fixed,
    layer_of,
    merge_region_outputs,
    region_stage,
)
from .walk import TirLoweringError


# =============================================================================================
# schedule
def tir_conv_schedule(cfg: HardwareConfig, layer: dict, sched: ConvSchedule | None = None):
    """The plan the TIR schedule uses: ``sched`` (default: :func:`plan_conv`) with the output
    tiles of the layer's definition and the channel groups and chunks shrunk to divisors.

    A function defined for a tile (:func:`conv2d_primfunc` with ``tile``, a layer with
    ``"tile"``) is scheduled with that tile: its output regions make every tile exact, also
    the edge ones.  A function defined without is tiled by the largest divisor of each
    dimension not above the planned tile (a partial tile would need a predicate, which
    ``Schedule.tensorize`` refuses in TVM 0.27).  Output-channel groups and input-channel
    chunks are always divisors: the TIR route has no partial group or chunk.
    """
    L = layer
    if sched is None:
        sched = plan_conv(
            cfg, L["h"], L["w"], L["oh"], L["ow"], L["kh"], L["kw"], L["strides"],
            L["dilation"], L["cib"], L["cob"], residual=bool(L.get("residual")),
        )  # fmt: skip
    if "tile" in L:
        tile_h, tile_w = L["tile"]
        if (sched.tile_h, sched.tile_w) != (tile_h, tile_w):
            raise TirLoweringError(
                f"the function is defined for {tile_h}x{tile_w} tiles, the plan has "
                f"{sched.tile_h}x{sched.tile_w}"
            )
    else:
        tile_h, tile_w = (
            largest_divisor(L["oh"], sched.tile_h),
            largest_divisor(L["ow"], sched.tile_w),
        )
    return ConvSchedule(
        tile_h,
        tile_w,
        largest_divisor(L["cob"], sched.cob_group),
        largest_divisor(L["cib"], sched.cib_chunk),
        sched.double_buffer,
    )


def schedule_conv2d(
    func: tirx.PrimFunc,
    cfg: HardwareConfig | None = None,
    sched: ConvSchedule | None = None,
    weight_blocks: int | None = None,
) -> s_tir.Schedule:
    """Schedule a :func:`conv2d_primfunc` onto the accelerator.

    Loop order (that of :func:`~tvm_hapm.testing.direct_codegen.conv2d_program`)::

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

    Partial tiles: a function defined for a tile that does not divide the output (its
    :func:`~tvm_hapm.target.tir.compute.output_regions`) has its stages once per region.
    Each region is scheduled as above with its own tile (the planned one, or the edge left),
    so no block is under a predicate, then the regions' batch loops are merged, and the row
    loops of the regions of one band of rows: per row of tiles, the full tiles, then the
    last column's, as the direct generator runs them.  The on-chip buffers of an edge region
    are aligned (``storage_align``) to the planned tile's: an input block's stride and an
    output block's accumulator region are the full tile's, so the edge tiles sit where the
    direct generator puts them, each block inside its full-tile region (its bank).  The
    regions' outputs are then made the one ``out``.

    ``weight_blocks`` is the number of weight blocks the layer really loads (the non-zero
    ones, see :class:`SparseWeights`; default: all): they stay resident when they fit.

    Returns
    -------
    tvm.s_tir.Schedule
        Its ``mod["main"]`` carries ``"hapm_fpga.kernel"`` and the plan in
        ``"hapm_fpga.schedule"``.
    """
    return s_tir.Schedule(tvm.IRModule({"main": scheduled_conv2d(func, cfg, sched, weight_blocks)}))


def scheduled_conv2d(
    func: tirx.PrimFunc,
    cfg: HardwareConfig | None = None,
    sched: ConvSchedule | None = None,
    weight_blocks: int | None = None,
) -> tirx.PrimFunc:
    """The scheduled PrimFunc of :func:`schedule_conv2d` (its ``mod["main"]``), without the
    new :class:`~tvm.s_tir.Schedule` that wraps it there (about 2 ms a layer): what the code
    generator walks."""
    layer = layer_of(func)
    cfg = get_config(cfg if cfg is not None else layer["config"])
    L = layer
    n_blocks = L["cob"] * L["cib"] * L["kh"] * L["kw"] if weight_blocks is None else weight_blocks
    fused = bool(L.get("residual"))
    plan = fit_double_buffer(
        cfg, tir_conv_schedule(cfg, layer, sched), L["kh"], L["kw"], L["strides"],
        L["dilation"], n_blocks, residual_rows(L["cob"], fused),
    )  # fmt: skip
    regions = L.get("regions") or [
        {"y0": 0, "rows": L["oh"], "tile_h": plan.tile_h,
         "x0": 0, "cols": L["ow"], "tile_w": plan.tile_w}
    ]  # fmt: skip
    sch = UncheckedSchedule(s_tir.Schedule(tvm.IRModule({"main": func})))
    resident = n_blocks <= cfg.wgt_depth
    stages = [s for s in ("bias", "requant", "clip") if has_block(sch, s)]
    for r, region in enumerate(regions):
        _tile_region(sch, plan, r, region, stages)
    # The constant rows (fused: every block's, loaded once, first) and the resident weights:
    # one copy for all regions.
    if fused:
        sch.cache_read(sch.get_sblock(stages[0]), 1, SCOPE_ACC)
    if resident:
        sch.cache_read(sch.get_sblock("conv"), 1, SCOPE_WGT)
    for r, region in enumerate(regions):
        _place_region_inputs(sch, cfg, L, plan, r, region, stages, resident)
    for r in range(len(regions)):
        conv = sch.get_sblock(region_stage("conv", r))
        sch.decompose_reduction(conv, sch.get_loops(conv)[4])  # at the chunk loop
    if fused:
        # The init reads the shortcut stage: declare it there (not on the update), then
        # inline the stage, so the init loads the shortcut tile and scales it.
        new = sch.mod["main"]
        for r in range(len(regions)):
            new = init_reads_fixed(new, region_stage("conv", r))
        sch = UncheckedSchedule(s_tir.Schedule(tvm.IRModule({"main": new})))
        for r in range(len(regions)):
            sch.compute_inline(sch.get_sblock(region_stage("shortcut", r)))
    for r in range(len(regions)):
        update = sch.get_sblock(region_stage("conv", r) + "_update")
        sch.tensorize(sch.get_loops(update)[-2], gemv_intrin(cfg))
    if len(regions) > 1:
        inits = [region_stage("conv", r) + "_init" for r in range(len(regions))]
        merge_region_loops(sch, regions, inits)
        new = merge_region_outputs(sch.mod["main"])
    else:
        new = sch.mod["main"]
    return new.with_attrs(
        {KERNEL_ATTR: L["kind"], SCHEDULE_ATTR: json.dumps(plan.to_dict(), sort_keys=True)}
    )


def _tile_region(sch, plan, r, region, stages) -> None:
    """Tile output region ``r`` and put its epilogue after each group's reduction."""
    stage = functools.partial(region_stage, region=r)
    conv = sch.get_sblock(stage("conv"))
    b, co, y, x, c, k, ky, kx, rr = sch.get_loops(conv)
    y_o, y_i = sch.split(y, [None, region["tile_h"]])
    x_o, x_i = sch.split(x, [None, region["tile_w"]])
    cg, g = sch.split(co, [None, plan.cob_group])
    kc, ki = sch.split(k, [None, plan.cib_chunk])
    sch.reorder(b, y_o, x_o, cg, kc, ki, ky, kx, g, y_i, x_i, c, rr)
    sch.set_scope(conv, 0, SCOPE_ACC)
    # Epilogue per output block of the group, after the group's reduction.
    first = sch.get_sblock(stage(stages[0]))
    sch.reverse_compute_at(first, cg, preserve_unit_loops=True)
    block_loop = sch.get_loops(first)[5]  # b, oh_o, ow_o, cob_group, n, [cob_in_group]
    for name in stages[1:] + ["out"]:
        sch.reverse_compute_at(sch.get_sblock(stage(name)), block_loop, preserve_unit_loops=True)
    for name in stages:
        sch.set_scope(sch.get_sblock(stage(name)), 0, SCOPE_ACC)


def _place_region_inputs(sch, cfg, L, plan, r, region, stages, resident) -> None:
    """The on-chip copies of output region ``r``'s inputs: its groups' constant rows, its
    weight chunks (unless resident) and its padded input tiles."""
    stage = functools.partial(region_stage, region=r)
    conv = sch.get_sblock(stage("conv"))
    _b, _y_o, x_o, cg, kc = sch.get_loops(conv)[:5]
    one_chunk = plan.cib_chunk == L["cib"]
    # Bias and multiplier rows of the group: first thing of the group, as in the codegen
    # (with a fused residual every block's rows stay on chip: cached once for all regions).
    if not L.get("residual"):
        readers = [sch.get_sblock(stage(name)) for name in stages[:2]]  # bias, multiplier
        rows = sch.cache_read(readers[0], 1, SCOPE_ACC, consumer_blocks=readers)
        sch.compute_at(rows, cg, preserve_unit_loops=True, index=-2)

    # Weight blocks, unless resident: one chunk at a time.
    if not resident:
        weights = sch.cache_read(conv, 1, SCOPE_WGT, consumer_blocks=[conv])
        if one_chunk:
            sch.compute_at(weights, cg, preserve_unit_loops=True, index=-2)
        else:
            sch.compute_at(weights, kc, preserve_unit_loops=True)

    # Padded input tile: shared by all groups when one chunk holds every input channel.
    pad = sch.get_sblock(stage("pad"))
    sch.set_scope(pad, 0, SCOPE_INP)
    if one_chunk:
        sch.compute_at(pad, x_o, preserve_unit_loops=True)
    else:  # the chunk's input tile first, then its weights (the load module's order)
        sch.compute_at(pad, kc, preserve_unit_loops=True, index=0)
    if (region["tile_h"], region["tile_w"]) != (plan.tile_h, plan.tile_w):
        # Edge tiles take the planned tile's room: an input block's stride and an output
        # block's region are the full tile's (the direct generator's layout).
        sh, sw = L["strides"]
        dh, dw = L["dilation"]
        th_in = (plan.tile_h - 1) * sh + (L["kh"] - 1) * dh + 1
        tw_in = (plan.tile_w - 1) * sw + (L["kw"] - 1) * dw + 1
        sch.storage_align(pad, 0, 1, th_in * tw_in * cfg.array_rows, 0)
        # An output block's region is the full tile's too, so each block's region lies in
        # its region of a full tile: the same accumulator bank (target.banks).
        sch.storage_align(conv, 0, 1, plan.tile_h * plan.tile_w * cfg.array_cols, 0)


def merge_region_loops(sch: s_tir.Schedule, regions: list[dict], anchors: list[str]) -> None:
    """Run the output regions of a layer tile after tile: one outer (batch or channel-plane)
    loop for all regions, then one loop over the rows of tiles per band of rows (the full
    tiles, then the last column's).  ``anchors`` names a block of each region whose first two
    loops are those."""

    def outer(r, depth):
        return sch.get_loops(sch.get_sblock(anchors[r]))[depth]

    sch.merge(*(outer(r, 0) for r in range(len(regions))))
    bands: dict[int, list[int]] = {}
    for r, region in enumerate(regions):
        bands.setdefault(region["y0"], []).append(r)
    for members in bands.values():
        if len(members) > 1:
            sch.merge(*(outer(r, 1) for r in members))


class UncheckedSchedule:
    """A :class:`~tvm.s_tir.Schedule` whose primitives skip TVM's Python type checking.

    Each primitive is wrapped by ``type_checked``, which binds and checks every argument in
    Python on every call: ~0.25 ms, a fifth of the scheduling of a small layer (the cost model's
    samples, HW-Flow's ``sim`` level).  The arguments the schedules here pass are the schedule's
    own block and loop references and constants, so the checked wrapper's ``__wrapped__``
    (``functools.wraps``) is called directly; a primitive without one, and every attribute that
    is not a method (``mod``), is the schedule's own.
    """

    __slots__ = ("schedule",)

    def __init__(self, schedule: s_tir.Schedule):
        self.schedule = schedule

    def __getattr__(self, name):
        method = getattr(type(self.schedule), name, None)
        raw = getattr(method, "__wrapped__", None)
        if raw is None:
            return getattr(self.schedule, name)
        return functools.partial(raw, self.schedule)


def has_block(sch, name) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:
        return False
    return True
