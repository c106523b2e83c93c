"""Schedules of the accelerator's layers: tile sizes that always fit the on-chip buffers.

A :class:`ConvSchedule` fixes the output tile (``tile_h x tile_w`` pixels), the number of
output-channel blocks computed together (``cob_group``), the number of input-channel blocks
resident at once (``cib_chunk``) and whether the buffers are double buffered
(``double_buffer``).  :func:`plan_conv` starts from the largest tile (whole rows, all channels)
and shrinks the dimension whose buffer overflows until everything fits, so any layer size has a
schedule (the smallest, one output pixel of one block with one input-channel block, needs
``KH*KW`` weight blocks and ``KH*KW`` input vectors).

**Double buffering.**  With ``double_buffer`` the input buffer holds two input tiles, the
accumulator two output regions (after the ``2 * cob_group`` bias / multiplier rows) and, when the
weights are not resident, the weight buffer two weight chunks.  Successive input tiles, weight
chunks and output regions alternate between the two halves, so the load module fetches tile
``k+1`` while compute works on tile ``k`` and the store module drains tile ``k-1``
(:func:`~tvm_hapm.target.dependency.insert_dependency_tokens` only orders overlapping ranges).
:func:`plan_conv` plans for half buffers and falls back to single buffering when even the
smallest tile does not fit twice; :func:`fit_double_buffer` turns it off for a given schedule
that does not fit twice.

**Arrays.**  :func:`assign_arrays` chooses the array of every GEMM (see its docstring).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .config import HardwareConfig
from .isa import Buffer, Instruction, Opcode

__all__ = [
    "ConvSchedule",
    "EltwiseSchedule",
    "ScheduleError",
    "assign_arrays",
    "conv_footprint",
    "fit_double_buffer",
    "plan_conv",
    "plan_eltwise",
]

_MAX_LOOP = (1 << 10) - 1  # GEMM / ALU outer and inner extents
_MAX_OUTER_STRIDE = (1 << 14) - 1  # GEMM / ALU outer strides


class ScheduleError(ValueError):
    """No schedule fits the hardware (the layer then runs on the host)."""


@dataclass(frozen=True)
class ConvSchedule:
    tile_h: int
    tile_w: int
    cob_group: int
    cib_chunk: int
    double_buffer: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EltwiseSchedule:
    tile: int  # accumulator entries per operand tile

    def to_dict(self) -> dict:
        return asdict(self)


def _in_extent(tile: int, stride: int, kernel: int, dilation: int) -> int:
    return (tile - 1) * stride + (kernel - 1) * dilation + 1


def conv_footprint(
    sched: ConvSchedule, kh: int, kw: int, strides, dilation, resident: bool
) -> tuple[int, int, int]:
    """``(inp, acc, wgt)`` entries a convolution schedule occupies (both halves when double
    buffered; the weight buffer is not split when the weights are ``resident``)."""
    sh, sw = strides
    dh, dw = dilation
    copies = 2 if sched.double_buffer else 1
    th_in = _in_extent(sched.tile_h, sh, kh, dh)
    tw_in = _in_extent(sched.tile_w, sw, kw, dw)
    g = sched.cob_group
    inp = copies * sched.cib_chunk * th_in * tw_in
    acc = copies * g * sched.tile_h * sched.tile_w + 2 * g
    wgt = (1 if resident else copies) * g * sched.cib_chunk * kh * kw
    return inp, acc, wgt


def fit_double_buffer(
    cfg: HardwareConfig, sched: ConvSchedule, kh: int, kw: int, strides, dilation, weight_blocks
) -> ConvSchedule:
    """``sched``, with ``double_buffer`` turned off when its tiles do not fit twice.

    ``weight_blocks`` is the number of weight blocks the layer loads (the non-zero ones): they
    stay resident (loaded once, buffer not split) when they fit the weight buffer.
    """
    if not sched.double_buffer:
        return sched
    resident = weight_blocks <= cfg.wgt_depth
    inp, acc, wgt = conv_footprint(sched, kh, kw, strides, dilation, resident)
    if inp <= cfg.inp_depth and acc <= cfg.acc_depth and wgt <= cfg.wgt_depth:
        return sched
    return replace(sched, double_buffer=False)


def plan_conv(
    cfg: HardwareConfig,
    h: int,
    w: int,
    oh: int,
    ow: int,
    kh: int,
    kw: int,
    strides,
    dilation,
    cib: int,
    cob: int,
    nonzero=None,
    pool: bool = False,
    double_buffer: bool = True,
) -> ConvSchedule:
    """Largest tiles that fit the buffers and the instruction fields.

    ``pool=True`` plans a pooling window on the accumulator alone (input tile and output tile
    both live there; never double buffered).  With ``double_buffer`` the tiles are planned for
    half buffers (weights resident when the ``nonzero`` blocks, default all, fit the weight
    buffer: then it is not split); if even the smallest tile does not fit twice, the plan is
    single buffered.
    """
    if double_buffer and not pool:
        try:
            return _plan_conv(
                cfg, oh, ow, kh, kw, strides, dilation, cib, cob, nonzero, False, True
            )
        except ScheduleError:
            pass
    return _plan_conv(cfg, oh, ow, kh, kw, strides, dilation, cib, cob, nonzero, pool, False)


def _plan_conv(cfg, oh, ow, kh, kw, strides, dilation, cib, cob, nonzero, pool, double):  # noqa: PLR0917
    sh, sw = strides
    dh, dw = dilation
    tile_h, tile_w = min(oh, _MAX_LOOP), min(ow, _MAX_LOOP)
    group = 1 if pool else min(cob, cfg.num_arrays)
    chunk = cib
    blocks_per = kh * kw
    n_blocks = cob * cib * blocks_per if nonzero is None else int(nonzero.sum())
    resident = n_blocks <= cfg.wgt_depth

    def sizes():
        th_in = _in_extent(tile_h, sh, kh, dh)
        tw_in = _in_extent(tile_w, sw, kw, dw)
        if pool:
            return 0, th_in * tw_in + tile_h * tile_w, 0, tw_in
        s = ConvSchedule(tile_h, tile_w, group, chunk, double)
        return (*conv_footprint(s, kh, kw, strides, dilation, resident), tw_in)

    while True:
        inp, acc, wgt, tw_in = sizes()
        acc_cap = cfg.acc_depth
        if pool:
            ok_inp, ok_wgt = True, True
        else:
            ok_inp, ok_wgt = inp <= cfg.inp_depth, wgt <= cfg.wgt_depth
        ok_acc = acc <= acc_cap
        ok_fields = sh * tw_in <= _MAX_OUTER_STRIDE and tile_w <= _MAX_OUTER_STRIDE
        if ok_inp and ok_acc and ok_wgt and ok_fields:
            return ConvSchedule(tile_h, tile_w, group, chunk, double)
        if not ok_wgt:
            if chunk > 1:
                chunk = -(-chunk // 2)
            elif group > 1:
                group -= 1
            else:
                raise ScheduleError(f"a {kh}x{kw} kernel needs more weight blocks than the buffer")
        elif not ok_acc or not ok_inp or not ok_fields:
            if tile_h > 1:
                tile_h = -(-tile_h // 2)
            elif not ok_inp and chunk > 1:
                chunk = -(-chunk // 2)
            elif tile_w > 1:
                tile_w = -(-tile_w // 2)
            elif group > 1:
                group -= 1
            else:
                raise ScheduleError(f"a {kh}x{kw} window does not fit the on-chip buffers")


def plan_eltwise(
    cfg: HardwareConfig, pixels: int, buffers: int = 1, reserved: int = 0
) -> EltwiseSchedule:
    """Tile of an element-wise ALU layer: ``buffers`` operand tiles (plus ``reserved`` entries)
    must fit the accumulator."""
    tile = min(pixels, _MAX_LOOP, (cfg.acc_depth - reserved) // buffers)
    if tile < 1:
        raise ScheduleError("the accumulator cannot hold one operand vector")
    return EltwiseSchedule(tile)


def assign_arrays(instructions: list[Instruction], cfg: HardwareConfig) -> list[Instruction]:
    """Choose the systolic array of every GEMM of a sequential program (before tokens).

    The rule (greedy list scheduling on a model of the compute module): GEMMs are taken in
    program order, each issued one cycle after the previous one, and each goes to the array on
    which it can start first, where it can start no earlier than its array is free **and** no
    earlier than the previous GEMM into the same accumulator region (same ``acc_addr``) has
    finished: an accumulator region is written by one array at a time.  Ties go to the array
    that last wrote the region, then to the lowest index.  A GEMM occupies its array for
    ``2R + C - 2 + outer * inner`` cycles; an ALU, accumulator LOAD or FINISH waits for all
    arrays (as in the timing model).  Loads, stores and tokens are not modelled.

    For a dense convolution dispatched as ``(cib, kh, kw)`` outer, output-channel block inner,
    this gives ``array = (cob - first cob of the group) % num_arrays`` whenever ``cob_group``
    is at most ``num_arrays`` or a multiple of it: one dispatch of the arrays is the HAPM
    pruning group and each accumulator region stays on one array.  When all-zero blocks are
    dropped, the remaining GEMMs spread evenly over the arrays (a region may move to another
    array, once its previous GEMM is done).
    """
    cfg_arrays = cfg.num_arrays
    fixed = 2 * cfg.array_rows + cfg.array_cols - 2
    free = [0] * cfg_arrays
    region_free: dict[int, int] = {}
    region_array: dict[int, int] = {}
    t = 0
    out = []
    for insn in instructions:
        op = insn.opcode
        if op == Opcode.GEMM:
            key = insn.acc_addr
            ready = max(t, region_free.get(key, 0))
            own = region_array.get(key, -1)
            best, best_key = 0, None
            for a in range(cfg_arrays):
                k = (max(ready, free[a]), a != own, a)
                if best_key is None or k < best_key:
                    best, best_key = a, k
            start = best_key[0]
            end = start + fixed + insn.outer * insn.inner
            free[best] = end
            region_free[key] = end
            region_array[key] = best
            t = start + 1
            if insn.array != best:
                insn = insn.replace(array=best)
        elif op in (Opcode.ALU, Opcode.FINISH) or (op == Opcode.LOAD and insn.buffer == Buffer.ACC):
            t = max(t, *free) + (4 + insn.outer * insn.inner if op == Opcode.ALU else 1)
        out.append(insn)
    return out
