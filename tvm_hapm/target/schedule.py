"""Schedules of the accelerator's layers: tile sizes that always fit the on-chip buffers.

A :class:`ConvSchedule` fixes the output tile (``tile_h x tile_w`` pixels), the number of
output-channel blocks computed together (``cob_group``) and the number of input-channel blocks
resident at once (``cib_chunk``).  :func:`plan_conv` starts from the largest tile (whole rows,
all channels) and shrinks the dimension whose buffer overflows until everything fits, so any
layer size has a schedule (the smallest, one output pixel of one block with one input-channel
block, needs ``KH*KW`` weight blocks and ``KH*KW`` input vectors).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import HardwareConfig

__all__ = ["ConvSchedule", "EltwiseSchedule", "ScheduleError", "plan_conv", "plan_eltwise"]

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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EltwiseSchedule:
    tile: int  # accumulator entries per operand tile

    def to_dict(self) -> dict:
        return asdict(self)


def _in_extent(tile: int, stride: int, kernel: int, dilation: int) -> int:
    return (tile - 1) * stride + (kernel - 1) * dilation + 1


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
) -> ConvSchedule:
    """Largest tiles that fit the buffers and the instruction fields.

    ``pool=True`` plans a pooling window on the accumulator alone (input tile and output tile
    both live there).
    """
    sh, sw = strides
    dh, dw = dilation
    tile_h, tile_w = min(oh, _MAX_LOOP), min(ow, _MAX_LOOP)
    group = 1 if pool else min(cob, cfg.num_arrays)
    chunk = cib
    blocks_per = kh * kw

    def sizes():
        th_in = _in_extent(tile_h, sh, kh, dh)
        tw_in = _in_extent(tile_w, sw, kw, dw)
        if pool:
            return 0, th_in * tw_in + tile_h * tile_w, 0, tw_in
        inp = chunk * th_in * tw_in
        acc = group * tile_h * tile_w + 2 * group
        wgt = group * chunk * blocks_per
        return inp, acc, wgt, tw_in

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
            return ConvSchedule(tile_h, tile_w, group, chunk)
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
