"""The direct instruction-stream generator: the tests' independent oracle of the TIR route.

The compiler emits every accelerated layer through TIR (:mod:`tvm_hapm.target.tir`: TE
definition, schedule and tensorization, TIR passes, a walk of the lowered function).  This module
writes the same streams by hand, loop by loop, from the same plan
(:mod:`tvm_hapm.target.schedule`) and operand layout (:mod:`tvm_hapm.target.layout`); the tests
compare the two instruction by instruction and both against TVM's llvm build, bit for bit.  No
production module imports it (``tests/test_layering.py``).

Each ``*_program`` function takes one quantized layer (integer weights, requantization constants)
and returns a :class:`~tvm_hapm.target.program.Program`; the instruction list is written
sequentially and :func:`~tvm_hapm.target.dependency.insert_dependency_tokens` then makes it
correct on the decoupled load / compute / store modules.

Convolution dataflow (weight stationary, ``docs/isa.md``): an output tile of ``th x tw`` pixels
of a group of output-channel blocks lives in the accumulator; the padded input tile of a chunk of
input-channel blocks lives in the input buffer; every non-zero ``R x C`` weight block
``(cob, cib, kh, kw)`` becomes one GEMM that streams the tile's input vectors (shifted by
``kh, kw``) through one array.  All-zero weight blocks are dropped at compile time: no load, no
GEMM (grouped and depthwise convolutions are dense convolutions with block-diagonal weights).
"""

from __future__ import annotations

import numpy as np

from ..target.config import HardwareConfig
from ..target.dependency import insert_dependency_tokens
from ..target.gc_pause import paused_gc
from ..target.isa import (
    ELEM_CODE,
    MAX_INNER_STRIDE,
    MAX_LOOP,
    MAX_PAD,
    MAX_TRANSFER,
    AluOp,
    Buffer,
    Instruction,
    Opcode,
)
from ..target.layout import (
    CodegenError,
    bias_mult_rows,
    check_clip,
    conv_geometry,
    conv_info,
    conv_slots,
)
from ..target.program import Program, Slot
from ..target.schedule import (
    RESIDUAL_CONST_ROWS,
    ConvSchedule,
    conv_output_size,
    conv_stream_passes,
    fit_double_buffer,
    pipeline_operand_loads,
    plan_conv,
    plan_eltwise,
    residual_rows,
)

__all__ = [
    "add_program",
    "conv2d_program",
    "dense_program",
    "global_avg_pool_program",
    "max_pool2d_program",
]


# ---------------------------------------------------------------------------------------------
# instruction helpers
def _load(buf, slot, elem_bits, sram, dram, rows, cols, stride, pads=(0, 0, 0, 0), pad_min=0):
    return Instruction(
        Opcode.LOAD,
        buffer=buf,
        dram_slot=slot,
        elem_bits_code=ELEM_CODE[elem_bits],
        pad_min=pad_min,
        sram_addr=sram,
        dram_addr=dram,
        y_size=rows,
        x_size=cols,
        x_stride=stride,
        y_pad_top=pads[0],
        y_pad_bottom=pads[1],
        x_pad_left=pads[2],
        x_pad_right=pads[3],
    )


def _store(slot, elem_bits, sram, dram, rows, cols, stride):
    return Instruction(
        Opcode.STORE,
        buffer=Buffer.ACC,
        dram_slot=slot,
        elem_bits_code=ELEM_CODE[elem_bits],
        sram_addr=sram,
        dram_addr=dram,
        y_size=rows,
        x_size=cols,
        x_stride=stride,
    )


def _alu(op, dst, outer, inner, dst_so, dst_si, *, imm=None, src=0, src_so=0, src_si=0):
    return Instruction(
        Opcode.ALU,
        alu_op=op,
        use_imm=int(imm is not None and op != AluOp.REQUANT),
        imm=0 if imm is None else int(imm),
        dst_addr=dst,
        src_addr=src,
        outer=outer,
        inner=inner,
        dst_so=dst_so,
        dst_si=dst_si,
        src_so=src_so,
        src_si=src_si,
    )


def _contiguous_rows(count: int):
    """Split ``count`` consecutive entries into ``(offset, rows, cols)`` transfers whose sizes
    fit the LOAD/STORE y_size and x_size fields."""
    offset = 0
    while count > 0:
        cols = min(count, MAX_TRANSFER)
        rows = min(count // cols, MAX_TRANSFER)
        yield offset, rows, cols
        offset += rows * cols
        count -= rows * cols


def _load_rows(buf, slot, elem_bits, sram, dram, count):
    """Load ``count`` consecutive DRAM entries to consecutive buffer entries."""
    return [
        _load(buf, slot, elem_bits, sram + off, dram + off, rows, cols, cols)
        for off, rows, cols in _contiguous_rows(count)
    ]


def _store_rows(slot, elem_bits, sram, dram, count):
    """Store ``count`` consecutive accumulator entries to consecutive DRAM entries."""
    return [
        _store(slot, elem_bits, sram + off, dram + off, rows, cols, cols)
        for off, rows, cols in _contiguous_rows(count)
    ]


def _clip_ops(cfg: HardwareConfig, dst, outer, inner, so, si, lo, hi):
    """MAX / MIN instructions that clip beyond the saturation REQUANT already applies."""
    amin, amax = cfg.act_range
    ops = []
    if lo > amin:
        ops.append(_alu(AluOp.MAX, dst, outer, inner, so, si, imm=lo))
    if hi < amax:
        ops.append(_alu(AluOp.MIN, dst, outer, inner, so, si, imm=hi))
    return ops


# ---------------------------------------------------------------------------------------------
# convolution
def _weight_chunks(nonzero: np.ndarray, sched: ConvSchedule):
    """The non-zero weight blocks in load order: ``(order, chunks, chunk_base, dispatch)``.

    ``chunks[(cg0, kc0)]`` lists the ``(cob, cib, kh, kw)`` blocks of one (output-channel group,
    input-channel chunk) step, ``order`` all of them chunk after chunk (the DRAM slot's order),
    ``chunk_base`` each chunk's first index in ``order`` and ``dispatch`` each chunk's GEMM order:
    ``(cib, kh, kw)`` outer, output-channel block inner, so one dispatch of the arrays is the
    HAPM group of the blocks at one ``(cib, kh, kw)``.
    """
    cob, cib, kh, kw = nonzero.shape
    order, chunks, chunk_base = [], {}, {}
    for cg0 in range(0, cob, sched.cob_group):
        for kc0 in range(0, cib, sched.cib_chunk):
            key = (cg0, kc0)
            chunk_base[key] = len(order)
            chunks[key] = [
                (co, ci, y, x)
                for co in range(cg0, min(cg0 + sched.cob_group, cob))
                for ci in range(kc0, min(kc0 + sched.cib_chunk, cib))
                for y in range(kh)
                for x in range(kw)
                if nonzero[co, ci, y, x]
            ]
            order.extend(chunks[key])
    dispatch = {
        key: sorted(range(len(blks)), key=lambda j, b=blks: (b[j][1], b[j][2], b[j][3], b[j][0]))
        for key, blks in chunks.items()
    }
    return order, chunks, chunk_base, dispatch


def _input_window(layer: str, g, kh: int, kw: int, oh0: int, ow0: int, th: int, tw: int):
    """The input window of the output tile at ``(oh0, ow0)`` of ``th x tw`` pixels (``g`` the
    layer's :class:`ConvGeometry`): ``(ih0, iw0, tw_in, pads, rows, cols)``, its first padded
    input row and column, its padded width, the padding ``(top, bottom, left, right)`` the DMA
    adds and the in-bounds rows and columns it loads."""
    (sh, sw), (dh, dw), (pt, pl, _, _) = g.strides, g.dilation, g.padding
    _, _, h, w = g.data_shape
    ih0, iw0 = oh0 * sh - pt, ow0 * sw - pl
    th_in = (th - 1) * sh + (kh - 1) * dh + 1
    tw_in = (tw - 1) * sw + (kw - 1) * dw + 1
    pads = (max(0, -ih0), max(0, ih0 + th_in - h), max(0, -iw0), max(0, iw0 + tw_in - w))
    rows, cols = th_in - pads[0] - pads[1], tw_in - pads[2] - pads[3]
    if rows < 1 or cols < 1:
        raise CodegenError(f"{layer}: a tile lies entirely in the padding")
    return ih0, iw0, tw_in, pads, rows, cols


def _shortcut_prologue(
    act_bits, slot, acc_out, dram0, tile, out_hw, loop, row, started, block_stride
):
    """A fused residual's region prologue: per output block of the group, the shortcut tile
    ``LOAD`` into the block's accumulator region and its ``MUL`` by the block's K row
    (``row(k) + 2``); every block counts as started (its GEMMs accumulate, no reset)."""
    (th, tw), (oh, ow) = tile, out_hw
    out = []
    for k in range(len(started)):
        dst = acc_out + k * block_stride
        out.append(_load(Buffer.ACC, slot, act_bits, dst, dram0 + k * oh * ow, th, tw, ow))
        out.append(_alu(AluOp.MUL, dst, *loop, src=row(k) + 2))
        started[k] = True
    return out


def _conv_epilogue(
    cfg, slot, acc_out, dram0, tile, out_hw, loop, row, started, shift, clip, block_stride
):
    """A group's epilogue, per output block: ``MUL 0`` if every weight of the block was pruned
    (no GEMM reset it), ``ADD`` bias, ``REQUANT`` and clip
    (:func:`~tvm_hapm.target.schedule.fuse_epilogues` makes them one ``ADD_REQUANT``), store."""
    (th, tw), (oh, ow) = tile, out_hw
    out = []
    for k, done in enumerate(started):
        dst = acc_out + k * block_stride
        if not done:
            out.append(_alu(AluOp.MUL, dst, *loop, imm=0))
        out.append(_alu(AluOp.ADD, dst, *loop, src=row(k)))
        out.append(_alu(AluOp.REQUANT, dst, *loop, imm=shift, src=row(k) + 1))
        out += _clip_ops(cfg, dst, *loop, *clip)
        out.append(_store(slot, cfg.act_bits, dst, dram0 + k * oh * ow, th, tw, ow))
    return out


def _weight_blocks(cfg, blocks: np.ndarray, order: list) -> np.ndarray:
    """The DRAM contents of the weight slot: the non-zero ``R x C`` blocks in load order (one
    zero block when none is left: a DRAM slot is never empty)."""
    if not order:
        return np.zeros((1, cfg.array_rows, cfg.array_cols), cfg.weight_dtype)
    return np.stack([blocks[b] for b in order]).astype(cfg.weight_dtype)


def _gemms(
    blocks, wgt_addrs, started, step, inp_base, chunk_entries, acc_out, tile, tw_in, g, block_stride
):
    """The GEMMs of one (group, chunk) step of a tile, in dispatch order: ``blocks`` their
    ``(cob, cib, kh, kw)``, ``wgt_addrs`` their weight entries, ``started`` which output blocks
    of the group have a GEMM already (the first one resets; updated), ``step`` the group's first
    output block and the chunk's first input block, ``tile`` ``(th, tw)``, ``block_stride`` the
    distance of two output blocks' accumulator regions (the planned tile's pixels, also in an
    edge tile: each block's region then lies inside its region in a full tile, so it stays in
    the same accumulator bank, :mod:`~tvm_hapm.target.banks`)."""
    (cg0, kc0), (th, tw) = step, tile
    (sh, sw), (dh, dw) = g.strides, g.dilation
    out = []
    for (co, ci, y, x), wgt_addr in zip(blocks, wgt_addrs, strict=True):
        k = co - cg0  # the output block of the group
        out.append(
            Instruction(
                Opcode.GEMM, reset=int(not started[k]),
                array=0,  # given by banks.place_accumulators
                wgt_addr=wgt_addr,
                inp_addr=inp_base + (ci - kc0) * chunk_entries + y * dh * tw_in + x * dw,
                acc_addr=acc_out + k * block_stride, outer=th, inner=tw,
                inp_so=sh * tw_in, inp_si=sw, acc_so=tw, acc_si=1,
            )
        )  # fmt: skip
        started[k] = True
    return out


@paused_gc()  # its instructions: see target.gc_pause
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
    residual: np.ndarray | None = None,
):
    """Program of a quantized conv2d (NCHW / OIHW) with bias and requantization.

    With ``residual`` (the integer shortcut weight of each output channel,
    :func:`~tvm_hapm.passes.qops.emit_conv2d_residual`) the program takes a second input, the
    shortcut (the output's shape), and computes ``requant(conv + bias + shortcut * residual)``:
    before an output region's GEMMs the shortcut tile is loaded into the region and multiplied
    by the weights (``LOAD``, ``MUL``), and every GEMM accumulates onto it; the epilogue is then
    the same as without it.

    The epilogue of an output block is ``ADD`` bias, ``REQUANT``, clip and store;
    :func:`~tvm_hapm.target.schedule.fuse_epilogues` makes the first three one ``ADD_REQUANT``
    when the clip is a ReLU (or none).

    Returns ``(program, constants)``: the constants (packed weight blocks, bias and multipliers)
    are the DRAM contents of the program's ``const`` slots, in slot order.
    """
    g = conv_geometry(cfg, layer, data_shape, weight, strides, padding, dilation, groups, clip)
    n, cin, h, w = g.data_shape
    cout, _, kh, kw = weight.shape
    (sh, sw), (dh, dw) = g.strides, g.dilation
    oh, ow, blocks, nonzero = g.oh, g.ow, g.blocks, g.nonzero
    cob, cib = blocks.shape[:2]
    fused = residual is not None
    nrows = RESIDUAL_CONST_ROWS if fused else 2  # per output block: bias, multiplier(, K)
    sched = schedule or plan_conv(
        cfg, h, w, oh, ow, kh, kw, (sh, sw), (dh, dw), cib, cob, nonzero, residual=fused
    )
    # constants: weight blocks in load order, bias and multiplier vectors
    order, chunks, chunk_base, dispatch = _weight_chunks(nonzero, sched)
    wblocks = _weight_blocks(cfg, blocks, order)
    bias_mult = bias_mult_rows(cfg, layer, cout, bias, mult, residual)
    act = cfg.act_bits
    slots = conv_slots(cfg, g, cout, wblocks, bias_mult, fused)
    # the slots' indices (conv_slots): data, [residual], weight blocks, bias_mult, out
    S_DATA, S_RES, S_WGT, S_BM, S_OUT = range(5) if fused else (0, None, 1, 2, 3)

    seq: list[Instruction] = []
    resident = len(order) <= cfg.wgt_depth  # all weights fit: load them once
    rows_area = residual_rows(cob, fused)  # fused: every block's rows stay resident
    sched = fit_double_buffer(cfg, sched, kh, kw, (sh, sw), (dh, dw), len(order), rows_area)
    double = sched.double_buffer
    if resident:
        seq += _load_rows(Buffer.WGT, S_WGT, cfg.weight_bits, 0, 0, len(order))
    if fused:
        seq.append(_load(Buffer.ACC, S_BM, 32, 0, 0, 1, rows_area, 0))
    regions = []  # fused: (start, prologue start, prologue end) of each region in seq
    cur_inp = cur_wgt = None
    inp_chunk_entries = ((sched.tile_h - 1) * sh + (kh - 1) * dh + 1) * (
        (sched.tile_w - 1) * sw + (kw - 1) * dw + 1
    )  # the largest padded input tile
    # Double buffering: input tiles, weight chunks (when not resident) and output regions
    # alternate between two halves; the counters count the tiles / chunks / regions so far.
    inp_half = sched.cib_chunk * inp_chunk_entries
    wgt_half = sched.cob_group * sched.cib_chunk * kh * kw
    block_px = sched.tile_h * sched.tile_w  # an output block's accumulator region
    acc_half = sched.cob_group * block_px
    n_inp = n_wgt = n_out = 0
    inp_base = wbase = 0
    for b in range(n):
        for oh0 in range(0, oh, sched.tile_h):
            th = min(sched.tile_h, oh - oh0)
            for ow0 in range(0, ow, sched.tile_w):
                tw = min(sched.tile_w, ow - ow0)
                t = th * tw
                ih0, iw0, tw_in, pads, rows, cols = _input_window(
                    layer, g, kh, kw, oh0, ow0, th, tw
                )
                y_top, _, x_lft, _ = pads
                for cg0 in range(0, cob, sched.cob_group):
                    gsize = min(sched.cob_group, cob - cg0)
                    # after the bias/multiplier vectors; alternating regions when double buffered
                    rows0 = rows_area or 2 * sched.cob_group
                    acc_out = rows0 + (n_out % 2 if double else 0) * acc_half
                    n_out += 1
                    start = len(seq)
                    # constant rows of block k: bias row(k), multiplier row(k) + 1, residual + 2
                    row = (lambda k, c=cg0: nrows * (c + k)) if fused else (lambda k: 2 * k)
                    started = [False] * gsize
                    multi_chunk = sched.cib_chunk < cib
                    # one loop over the tile if the inner extent field holds it, else rows x cols
                    loop = (1, t, 0, 1) if t <= MAX_LOOP else (th, tw, tw, 1)
                    dram0 = ((b * cob + cg0) * oh + oh0) * ow + ow0  # the group's first block
                    if fused:  # each region starts as shortcut * K; the GEMMs accumulate onto it
                        prologue = _shortcut_prologue(
                            act, S_RES, acc_out, dram0, (th, tw), (oh, ow), loop, row, started,
                            block_px,
                        )  # fmt: skip
                    else:  # the group's bias and multiplier rows
                        prologue = [_load(Buffer.ACC, S_BM, 32, 0, 2 * cg0, 1, 2 * gsize, 0)]
                    if multi_chunk:  # ahead of the group's chunk loop
                        p0 = len(seq)
                        seq += prologue
                    for kc0 in range(0, cib, sched.cib_chunk):
                        ksize = min(sched.cib_chunk, cib - kc0)
                        if cur_inp != (b, oh0, ow0, kc0):
                            inp_base = (n_inp % 2 if double else 0) * inp_half
                            n_inp += 1
                            # the chunk's input blocks, one DMA each
                            in_dram = ((b * cib + kc0) * h + ih0 + y_top) * w + iw0 + x_lft
                            seq += [
                                _load(Buffer.INP, S_DATA, act, inp_base + k * inp_chunk_entries,
                                      in_dram + k * h * w, rows, cols, w, pads)
                                for k in range(ksize)
                            ]  # fmt: skip
                            cur_inp = (b, oh0, ow0, kc0)
                        key = (cg0, kc0)
                        if resident:
                            wbase = chunk_base[key]
                        elif cur_wgt != key and chunks[key]:
                            wbase = (n_wgt % 2 if double else 0) * wgt_half
                            n_wgt += 1
                            seq += _load_rows(
                                Buffer.WGT, S_WGT, cfg.weight_bits, wbase, chunk_base[key],
                                len(chunks[key]),
                            )  # fmt: skip
                            cur_wgt = key
                        if not multi_chunk:
                            p0 = len(seq)
                            seq += prologue
                        seq += _gemms(
                            [chunks[key][j] for j in dispatch[key]],
                            [wbase + j for j in dispatch[key]], started, (cg0, kc0),
                            inp_base, inp_chunk_entries, acc_out, (th, tw), tw_in, g, block_px,
                        )  # fmt: skip
                    seq += _conv_epilogue(
                        cfg, S_OUT, acc_out, dram0, (th, tw), (oh, ow), loop, row, started,
                        shift, clip, block_px,
                    )  # fmt: skip
                    regions.append((start, p0, p0 + len(prologue)))
    info = conv_info(g, weight.shape, len(order), sched, fused)
    seq = conv_stream_passes(seq, cfg, regions if fused else None, double)
    prog = Program(layer, cfg, slots, insert_dependency_tokens(seq), layer_index, info)
    return prog, [wblocks, bias_mult]


def dense_program(cfg, layer, data_shape, weight_kn, bias, mult, shift, clip, layer_index=0):
    """Program of a quantized dense layer ``(N, K) x (K, M)``: a 1x1 convolution of a 1x1 image."""
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


# ---------------------------------------------------------------------------------------------
# element-wise and pooling layers on the ALU
def add_program(cfg, layer, shape, mult_a, mult_b, shift, clip, layer_index=0):
    """Residual add ``clip((a*Ma + b*Mb + 2**(S-1)) >> S)`` of two NCHW activations.

    Per tile (``plan_eltwise``: balanced tiles, double buffered when both halves fit): load
    ``a`` and ``b`` into the accumulator, ``MUL`` each by its multiplier, ``ADD``, the rounding
    ``SHR``, ``MAX`` / ``MIN``, store.  Double buffered, tile ``k`` uses the entries
    ``[k%2 * tile, +tile)`` for ``a`` and ``[(2 + k%2) * tile, +tile)`` for ``b`` (the layout of
    the TIR route's allocation), and :func:`~tvm_hapm.target.schedule.pipeline_operand_loads`
    moves the loads of tile ``k+1`` after the ``ADD`` of tile ``k``.
    """
    C = cfg.array_cols
    n, c, h, w = (int(v) for v in (tuple(shape) + (1, 1))[:4])
    cb = -(-c // C)
    check_clip(cfg, *clip)
    act = cfg.act_bits
    total = n * cb * h * w  # entries, contiguous in DRAM for both inputs and the output
    sched = plan_eltwise(cfg, total, buffers=2, double_buffer=True, alu_passes=6)
    slots = [
        Slot("lhs", "input", cfg.act_dtype, shape, "act", C),
        Slot("rhs", "input", cfg.act_dtype, shape, "act", C),
        Slot("out", "output", cfg.act_dtype, shape, "act", C),
    ]
    seq = []
    amin, amax = cfg.act_range
    for k, e0 in enumerate(range(0, total, sched.tile)):
        t = min(sched.tile, total - e0)
        half = k % 2 if sched.double_buffer else 0
        a = half * sched.tile
        b_ = (2 if sched.double_buffer else 1) * sched.tile + a
        seq += _acc_load(0, act, a, e0, t)
        seq += _acc_load(1, act, b_, e0, t)
        seq.append(_alu(AluOp.MUL, a, 1, t, 0, 1, imm=mult_a))
        seq.append(_alu(AluOp.MUL, b_, 1, t, 0, 1, imm=mult_b))
        seq.append(_alu(AluOp.ADD, a, 1, t, 0, 1, src=b_, src_si=1))
        seq.append(_alu(AluOp.SHR, a, 1, t, 0, 1, imm=shift))
        seq.append(_alu(AluOp.MAX, a, 1, t, 0, 1, imm=max(amin, clip[0])))
        seq.append(_alu(AluOp.MIN, a, 1, t, 0, 1, imm=min(amax, clip[1])))
        seq += _store_rows(2, act, a, e0, t)
    info = {"kind": "add", "schedule": sched.to_dict()}
    seq = pipeline_operand_loads(seq)
    return Program(layer, cfg, slots, insert_dependency_tokens(seq), layer_index, info), []


def _acc_load(slot, bits, sram, dram, count):
    return _load_rows(Buffer.ACC, slot, bits, sram, dram, count)


def max_pool2d_program(
    cfg, layer, data_shape, pool_size, strides, padding, dilation=(1, 1), layer_index=0
):
    """Max pooling on the ALU: the padded window rows are loaded (padding = minimum value) into
    the accumulator and reduced with MAX."""
    C = cfg.array_cols
    n, c, h, w = (int(v) for v in data_shape)
    kh, kw = (int(v) for v in pool_size)
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(p) for p in padding)
    if max(pt, pl, pb, pr) > MAX_PAD:
        raise CodegenError(f"{layer}: padding {padding} exceeds the DMA's pad field ({MAX_PAD})")
    if max(sh, sw, dh, dw) > MAX_INNER_STRIDE:
        raise CodegenError(f"{layer}: stride {strides} exceeds the ALU stride field")
    oh, ow = conv_output_size(h, pt, pb, kh, sh, dh), conv_output_size(w, pl, pr, kw, sw, dw)
    cb = -(-c // C)
    act = cfg.act_bits
    amin, _ = cfg.act_range
    sched = plan_conv(cfg, h, w, oh, ow, kh, kw, (sh, sw), (dh, dw), 1, 1, None, pool=True)
    slots = [
        Slot("data", "input", cfg.act_dtype, (n, c, h, w), "act", C),
        Slot("out", "output", cfg.act_dtype, (n, c, oh, ow), "act", C),
    ]
    seq = []
    for b in range(n):
        for ch in range(cb):
            for oh0 in range(0, oh, sched.tile_h):
                th = min(sched.tile_h, oh - oh0)
                for ow0 in range(0, ow, sched.tile_w):
                    tw = min(sched.tile_w, ow - ow0)
                    ih0, iw0 = oh0 * sh - pt, ow0 * sw - pl
                    th_in = (th - 1) * sh + (kh - 1) * dh + 1
                    tw_in = (tw - 1) * sw + (kw - 1) * dw + 1
                    y_top, x_lft = max(0, -ih0), max(0, -iw0)
                    y_bot, x_rgt = max(0, ih0 + th_in - h), max(0, iw0 + tw_in - w)
                    rows, cols = th_in - y_top - y_bot, tw_in - x_lft - x_rgt
                    if rows < 1 or cols < 1:
                        raise CodegenError(f"{layer}: a window lies entirely in the padding")
                    out_base = th_in * tw_in
                    dram = ((b * cb + ch) * h + ih0 + y_top) * w + iw0 + x_lft
                    seq.append(
                        _load(
                            Buffer.ACC, 0, act, 0, dram, rows, cols, w,
                            (y_top, y_bot, x_lft, x_rgt), pad_min=1,
                        )
                    )  # fmt: skip
                    seq.append(_alu(AluOp.MUL, out_base, th, tw, tw, 1, imm=0))
                    seq.append(_alu(AluOp.ADD, out_base, th, tw, tw, 1, imm=amin))
                    for y in range(kh):
                        for x in range(kw):
                            seq.append(
                                _alu(
                                    AluOp.MAX, out_base, th, tw, tw, 1,
                                    src=y * dh * tw_in + x * dw, src_so=sh * tw_in, src_si=sw,
                                )
                            )  # fmt: skip
                    dram_o = ((b * cb + ch) * oh + oh0) * ow + ow0
                    seq.append(_store(1, act, out_base, dram_o, th, tw, ow))
    info = {"kind": "max_pool2d", "schedule": sched.to_dict()}
    seq = pipeline_operand_loads(seq)  # as the TIR route (a no-op: the MAXes read entry 0 on)
    return Program(layer, cfg, slots, insert_dependency_tokens(seq), layer_index, info), []


def global_avg_pool_program(cfg, layer, data_shape, mult, shift, clip, layer_index=0):
    """Global average pooling: ADD-reduce every pixel's vector, then REQUANT by
    ``mult / 2**shift`` (which includes the 1 / (H*W))."""
    C = cfg.array_cols
    n, c, h, w = (int(v) for v in data_shape)
    cb = -(-c // C)
    act = cfg.act_bits
    check_clip(cfg, *clip)
    sched = plan_eltwise(cfg, h * w, buffers=1, reserved=2)
    mvec = np.full((1, C), int(mult), np.int32)
    slots = [
        Slot("data", "input", cfg.act_dtype, (n, c, h, w), "act", C),
        Slot("mult", "const", "int32", mvec.shape),
        Slot("out", "output", cfg.act_dtype, (n, c, 1, 1), "act", C),
    ]
    seq = [_load(Buffer.ACC, 1, 32, 0, 0, 1, 1, 1)]  # entry 0: multipliers, entry 1: the sum
    for b in range(n):
        for ch in range(cb):
            seq.append(_alu(AluOp.MUL, 1, 1, 1, 0, 0, imm=0))
            for p0 in range(0, h * w, sched.tile):
                t = min(sched.tile, h * w - p0)
                seq += _acc_load(0, act, 2, (b * cb + ch) * h * w + p0, t)
                # all iterations accumulate into entry 1 (dst strides 0)
                seq.append(_alu(AluOp.ADD, 1, 1, t, 0, 0, src=2, src_si=1))
            seq.append(_alu(AluOp.REQUANT, 1, 1, 1, 0, 0, imm=shift, src=0))
            seq += _clip_ops(cfg, 1, 1, 1, 0, 0, *clip)
            seq.append(_store(2, act, 1, b * cb + ch, 1, 1, 1))
    info = {"kind": "global_avg_pool", "schedule": sched.to_dict()}
    seq = pipeline_operand_loads(seq)  # as the TIR route: next block's loads move up
    return Program(layer, cfg, slots, insert_dependency_tokens(seq), layer_index, info), [mvec]
