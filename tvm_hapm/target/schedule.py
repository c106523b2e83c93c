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

**Arrays.**  Array ``k`` accumulates into bank ``k`` only: the accumulator placement
(:func:`~tvm_hapm.target.banks.place_accumulators`) gives every GEMM its bank's array.

**Element-wise layers.**  An :class:`EltwiseSchedule` tiles the entries of an ALU-only layer
(:func:`plan_eltwise`, whose docstring has the double-buffering rule); with ``double_buffer``
successive tiles alternate between two halves of the accumulator and
:func:`pipeline_operand_loads` moves the operand loads of tile ``k+1`` into the ALU passes of
tile ``k``, so the store of tile ``k`` overlaps the ALU passes of tile ``k+1``.

**Epilogue fusion.**  :func:`fuse_epilogues` turns a convolution epilogue's ``ADD`` of the bias
row, ``REQUANT`` by the multiplier row after it and ``MAX 0`` (ReLU) into one ``ADD_REQUANT``:
one pass of the compute module over the output region instead of three.

**Epilogue pipelining.**  :func:`interleave_epilogues` moves the epilogue of an output region
(its ALU instructions and stores) and the next region's bias load into the GEMM stream of the
next region, one instruction after each dispatch of the arrays, so the compute module runs the
epilogue while the arrays work (the accumulator scoreboard lets an ALU wait only for the GEMMs
into its own entries).  Both code generators apply it to their sequential stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .banks import acc_fits, place_accumulators
from .config import ALU_LATENCY, FETCH_CYCLES, HardwareConfig
from .dependency import buffer_accesses
from .isa import MAX_LOOP, MAX_OUTER_STRIDE, REQUANT_RELU, AluOp, Buffer, Instruction, Opcode
from .stream import GemmRun

__all__ = [
    "RESIDUAL_CONST_ROWS",
    "largest_divisor",
    "ConvSchedule",
    "EltwiseSchedule",
    "conv_output_size",
    "ScheduleError",
    "conv_acc_fits",
    "conv_footprint",
    "dispatch_group",
    "estimate_conv_cycles",
    "estimate_eltwise_cycles",
    "fit_double_buffer",
    "conv_stream_passes",
    "fuse_epilogues",
    "hoist_prologues",
    "interleave_epilogues",
    "pipeline_operand_loads",
    "plan_conv",
    "plan_eltwise",
    "residual_rows",
]


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
    tile: int  # accumulator entries per operand tile (the last tile may be shorter)
    double_buffer: bool = False  # successive tiles alternate between two accumulator halves

    def to_dict(self) -> dict:
        return asdict(self)


#: Constant rows per output block of a conv with a fused residual in ``bias_mult``: bias,
#: requantization multipliers and the shortcut's integer weights (a plain conv has the first two).
RESIDUAL_CONST_ROWS = 3


def residual_rows(cob: int, residual: bool) -> int:
    """Accumulator entries of a fused residual's constant rows, resident for the whole layer
    (every output block's three rows); 0 without a residual, whose rows follow the output-channel
    group (:func:`conv_footprint`)."""
    return RESIDUAL_CONST_ROWS * cob if residual else 0


def conv_output_size(size: int, pad_lo: int, pad_hi: int, kernel: int, stride: int,
                     dilation: int = 1) -> int:  # fmt: skip
    """Output extent of a convolution or pooling window along one axis (floor mode): the one
    formula every generator, planner and cost model uses."""
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def _in_extent(tile: int, stride: int, kernel: int, dilation: int) -> int:
    return (tile - 1) * stride + (kernel - 1) * dilation + 1


def conv_footprint(
    sched: ConvSchedule, kh: int, kw: int, strides, dilation, resident: bool, residual_rows=0
) -> tuple[int, int, int]:
    """``(inp, acc, wgt)`` entries a convolution schedule occupies (both halves when double
    buffered; the weight buffer is not split when the weights are ``resident``).  The constant
    rows take ``2 * cob_group`` accumulator entries, or ``residual_rows`` when given (a fused
    residual keeps three rows of every output block resident)."""
    sh, sw = strides
    dh, dw = dilation
    copies = 2 if sched.double_buffer else 1
    th_in = _in_extent(sched.tile_h, sh, kh, dh)
    tw_in = _in_extent(sched.tile_w, sw, kw, dw)
    g = sched.cob_group
    inp = copies * sched.cib_chunk * th_in * tw_in
    acc = copies * g * sched.tile_h * sched.tile_w + (residual_rows or 2 * g)
    wgt = (1 if resident else copies) * g * sched.cib_chunk * kh * kw
    return inp, acc, wgt


def conv_acc_fits(cfg: HardwareConfig, sched: ConvSchedule, residual_rows: int = 0) -> bool:
    """Whether a convolution schedule's accumulator data fits the banks
    (:func:`~tvm_hapm.target.banks.acc_fits`): ``cob_group`` output regions of one tile (twice
    when double buffered) and the constant rows (``2 * cob_group``, or ``residual_rows``)."""
    copies = 2 if sched.double_buffer else 1
    return bool(
        acc_fits(
            cfg,
            copies * sched.cob_group,
            sched.tile_h * sched.tile_w,
            residual_rows or 2 * sched.cob_group,
        )
    )


def fit_double_buffer(
    cfg: HardwareConfig,
    sched: ConvSchedule,
    kh: int,
    kw: int,
    strides,
    dilation,
    weight_blocks,
    residual_rows: int = 0,
) -> ConvSchedule:
    """``sched``, with ``double_buffer`` turned off when its tiles do not fit twice.

    ``weight_blocks`` is the number of weight blocks the layer loads (the non-zero ones): they
    stay resident (loaded once, buffer not split) when they fit the weight buffer.
    """
    if not sched.double_buffer:
        return sched
    resident = weight_blocks <= cfg.wgt_depth
    inp, _, wgt = conv_footprint(sched, kh, kw, strides, dilation, resident, residual_rows)
    if inp <= cfg.inp_depth and wgt <= cfg.wgt_depth and conv_acc_fits(cfg, sched, residual_rows):
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
    residual: bool = False,
) -> ConvSchedule:
    """Tiles that fit the buffers and the instruction fields, chosen for speed.

    ``residual`` plans a conv with a fused residual add (one more constant row per output
    block in the accumulator, and the shortcut's load and multiply per region).

    ``pool=True`` plans a pooling window on the accumulator alone (input tile and output tile
    both live there; never double buffered).  With ``double_buffer`` the tiles are planned for
    half buffers (weights resident when the ``nonzero`` blocks, default all, fit the weight
    buffer: then it is not split); if even the smallest tile does not fit twice, the plan is
    single buffered.

    The base plan starts from the largest tile (whole rows, all input channels) and halves
    whichever dimension overflows (the output rows first).  When the input tile is the
    limit, a smaller input-channel chunk can keep a larger output tile (fewer GEMMs, each
    streaming more vectors, so less of the fixed ``2R + C + 2`` per GEMM) at the price of
    reloading the input for every output-channel group.  So the plans that start from
    ``cib, cib/2, cib/4, ..., 1`` channel blocks per chunk (each rounded down to a divisor of
    ``cib``: :func:`largest_divisor`) are compared with
    :func:`estimate_conv_cycles`, and one replaces the base plan only when it is estimated at
    least 5% faster.
    """
    if double_buffer and not pool:
        n_blocks = cob * cib * kh * kw if nonzero is None else int(nonzero.sum())
        plans = []
        chunk0 = cib
        while True:
            try:
                plan = _plan_conv(
                    cfg, oh, ow, kh, kw, strides, dilation, cib, cob, nonzero, False, True,
                    chunk0, residual_rows(cob, residual),
                )  # fmt: skip
            except ScheduleError:
                plan = None
            if plan is not None and plan not in plans:
                plans.append(plan)
            if chunk0 == 1:
                break
            chunk0 = largest_divisor(cib, -(-chunk0 // 2))
        if plans:
            est = [
                estimate_conv_cycles(
                    cfg, p, oh, ow, kh, kw, strides, dilation, cib, cob, n_blocks, residual
                )
                for p in plans
            ]
            best = min(range(len(plans)), key=lambda k: (est[k], k))
            return plans[best] if est[best] < 0.95 * est[0] else plans[0]
    return _plan_conv(
        cfg, oh, ow, kh, kw, strides, dilation, cib, cob, nonzero, pool, False, None,
        residual_rows(cob, residual),
    )  # fmt: skip


def estimate_conv_cycles(
    cfg: HardwareConfig,
    sched: ConvSchedule,
    oh: int,
    ow: int,
    kh: int,
    kw: int,
    strides,
    dilation,
    cib: int,
    cob: int,
    weight_blocks: int | None = None,
    residual: bool = False,
) -> float:
    """A quick estimate of a convolution schedule's cycles, to compare schedules.

    ``max(array cycles, compute-module cycles, DRAM cycles)`` with perfect overlap (the
    double-buffered steady state): array cycles are the GEMMs of the busiest array, each
    ``2R + C + 2 + T`` for a tile of ``T`` pixels; compute-module cycles are the epilogue (one
    ``ADD_REQUANT`` pass over each output block, :func:`fuse_epilogues`) and one issue cycle per
    GEMM; DRAM cycles are the bytes
    the schedule moves (input tiles with their halo, once per output-channel group when the
    input channels take several chunks; weights once when resident, else per tile; outputs;
    bias rows per region) over the bandwidth.  ``weight_blocks`` (default all) scales the GEMM
    count for compile-time sparsity.  A fused ``residual`` adds the shortcut's load and
    multiply (two more passes) and its bytes, its constant rows loaded once.  Not a substitute
    for the timing model.
    """
    R, C, P = cfg.array_rows, cfg.array_cols, cfg.num_arrays
    sh, sw = strides
    dh, dw = dilation
    dense = cob * cib * kh * kw
    blocks = dense if weight_blocks is None else weight_blocks
    density = blocks / dense if dense else 0.0
    g, chunk = sched.cob_group, sched.cib_chunk
    groups, chunks = -(-cob // g), -(-cib // chunk)
    resident = blocks <= cfg.wgt_depth
    fixed = cfg.gemm_fixed_cycles
    passes = 3 if residual else 1  # shortcut LOAD, MUL; ADD_REQUANT
    per_region = -(-min(g, cob) // P) * cib * kh * kw * density  # GEMMs of the busiest array
    array = alu = inp = 0.0
    tiles = 0
    for th, nh in _tile_sizes(oh, sched.tile_h):
        for tw, nw in _tile_sizes(ow, sched.tile_w):
            count = nh * nw
            t = th * tw
            tiles += count
            array += count * groups * per_region * (fixed + t)
            alu += count * (cob * passes * (ALU_LATENCY + t) + groups * g * cib * kh * kw * density)
            th_in = _in_extent(th, sh, kh, dh)
            tw_in = _in_extent(tw, sw, kw, dw)
            inp += count * cib * th_in * tw_in * (groups if chunks > 1 else 1)
    if resident or groups * chunks == 1:
        wgt = blocks
    else:
        wgt = blocks * tiles
    dram = (
        inp * R * cfg.act_bytes
        + wgt * R * C * cfg.weight_bytes
        + (2 if residual else 1) * cob * C * oh * ow * cfg.act_bytes
        + (residual_rows(cob, residual) or tiles * groups * 2 * g) * C * cfg.acc_bytes
    ) / cfg.dram_bytes_per_cycle
    return max(array, alu, dram)


def _tile_sizes(extent: int, tile: int) -> list[tuple[int, int]]:
    """``(size, count)`` of the tiles of a dimension: full tiles and the edge tile."""
    full, edge = divmod(extent, tile)
    out = [(tile, full)] if full else []
    if edge:
        out.append((edge, 1))
    return out


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit`` (at least 1).

    The output-channel groups and input-channel chunks the planner gives are divisors of the
    block counts: the TIR route has no partial group or chunk, and a schedule is only worth
    planning, tuning or measuring if the production path emits it as planned."""
    limit = max(1, min(n, limit))
    return next(d for d in range(limit, 0, -1) if n % d == 0)


def dispatch_group(cob: int, num_arrays: int) -> int:
    """Output-channel blocks dispatched together: the divisor ``d`` of ``cob`` that keeps the
    arrays busiest, ``d / (num_arrays * ceil(d / num_arrays))``, the smallest on ties.

    A divisor, because the TIR route tiles by divisors (tensorize refuses partial tiles) and
    both generators must emit the same stream.  Not simply ``min(cob, num_arrays)``: for
    ``cob = 7`` on 4 arrays its largest divisor up to 4 is 1, which puts every GEMM of an output
    block on one array in a chain (each waits for the previous one's accumulators); ``7`` keeps
    7 of 8 array slots busy.  When ``num_arrays`` divides ``cob`` this is ``num_arrays``.
    """
    best, best_util = 1, 0.0
    for d in range(1, cob + 1):
        if cob % d:
            continue
        util = d / (num_arrays * -(-d // num_arrays))
        if util > best_util + 1e-12:
            best, best_util = d, util
    return best


def _plan_conv(
    cfg,
    oh,
    ow,
    kh,
    kw,
    strides,
    dilation,
    cib,
    cob,
    nonzero,
    pool,
    double,
    chunk0=None,
    residual_rows=0,
):
    sh, sw = strides
    dh, dw = dilation
    tile_h, tile_w = min(oh, MAX_LOOP), min(ow, MAX_LOOP)
    group = 1 if pool else dispatch_group(cob, cfg.num_arrays)
    chunk = cib if chunk0 is None else chunk0
    blocks_per = kh * kw
    n_blocks = cob * cib * blocks_per if nonzero is None else int(nonzero.sum())
    resident = n_blocks <= cfg.wgt_depth

    def sizes():
        th_in = _in_extent(tile_h, sh, kh, dh)
        tw_in = _in_extent(tile_w, sw, kw, dw)
        if pool:
            return 0, th_in * tw_in + tile_h * tile_w, 0, tw_in
        s = ConvSchedule(tile_h, tile_w, group, chunk, double)
        return (*conv_footprint(s, kh, kw, strides, dilation, resident, residual_rows), tw_in)

    while True:
        inp, acc, wgt, tw_in = sizes()
        if pool:  # no GEMM: the accumulator is one flat space
            ok_inp, ok_wgt, ok_acc = True, True, acc <= cfg.acc_depth
        else:
            ok_inp, ok_wgt = inp <= cfg.inp_depth, wgt <= cfg.wgt_depth
            s = ConvSchedule(tile_h, tile_w, group, chunk, double)
            ok_acc = conv_acc_fits(cfg, s, residual_rows)
        ok_fields = sh * tw_in <= MAX_OUTER_STRIDE and tile_w <= MAX_OUTER_STRIDE
        if ok_inp and ok_acc and ok_wgt and ok_fields:
            return ConvSchedule(tile_h, tile_w, group, chunk, double)
        if not ok_wgt:
            if chunk > 1:
                chunk = largest_divisor(cib, -(-chunk // 2))
            elif group > 1:
                group = largest_divisor(cob, group - 1)
            else:
                raise ScheduleError(f"a {kh}x{kw} kernel needs more weight blocks than the buffer")
        elif not ok_acc or not ok_inp or not ok_fields:
            if tile_h > 1:
                tile_h = -(-tile_h // 2)
            elif not ok_inp and chunk > 1:
                chunk = largest_divisor(cib, -(-chunk // 2))
            elif tile_w > 1:
                tile_w = -(-tile_w // 2)
            elif group > 1:
                group = largest_divisor(cob, group - 1)
            else:
                raise ScheduleError(f"a {kh}x{kw} window does not fit the on-chip buffers")


def estimate_eltwise_cycles(
    cfg: HardwareConfig,
    pixels: int,
    tile: int,
    buffers: int = 1,
    alu_passes: int = 1,
    double_buffer: bool = False,
) -> int:
    """Cycles of an element-wise ALU program of ``pixels`` accumulator entries: per tile of
    ``t`` entries, ``buffers`` operand loads and ``alu_passes`` ALU instructions over the tile,
    then one store of ``t`` entries (activations).

    The accumulator loads run on the compute module, like the ALU instructions, so the compute
    module is busy ``buffers * (Lld + xfer(t)) + alu_passes * (4 + t)`` per tile (``Lld`` the
    fixed cycles of a LOAD, :attr:`HardwareConfig.load_fixed_cycles`, ``xfer(t) =
    ceil(t * C * act_bytes / B)`` the port cycles of ``t`` entries; a store costs
    ``store_fixed_cycles + xfer(t)``).  Single
    buffered, every store is serial with the compute work (the next tile's loads overwrite the
    stored entries); double buffered, only the last tile's store is (the others overlap the
    next tile's ALU passes, see :func:`pipeline_operand_loads`); the first instruction starts
    ``FETCH_CYCLES`` after the program.  Exact for the programs of
    :func:`~tvm_hapm.testing.direct_codegen.add_program` but for the final FINISH cycle (and a few
    cycles of DRAM-port contention when a tile's store outlasts the ALU passes it overlaps).
    """
    per_entry = cfg.array_cols * cfg.act_bytes

    def xfer(t):
        return -(-(t * per_entry) // cfg.dram_bytes_per_cycle)

    total = 0
    last = 0
    for t, count in _tile_sizes(pixels, tile):
        compute = buffers * (cfg.load_fixed_cycles + xfer(t)) + alu_passes * (ALU_LATENCY + t)
        store = cfg.store_fixed_cycles + xfer(t)
        total += count * (compute if double_buffer else compute + store)
        last = store
    # the first instruction starts once fetched
    return FETCH_CYCLES + (total + last if double_buffer else total)


def plan_eltwise(
    cfg: HardwareConfig,
    pixels: int,
    buffers: int = 1,
    reserved: int = 0,
    double_buffer: bool = False,
    alu_passes: int = 1,
) -> EltwiseSchedule:
    """Tiles of an element-wise ALU layer of ``pixels`` accumulator entries: ``buffers`` operand
    tiles (plus ``reserved`` entries) must fit the accumulator, and a tile the ALU's loop field.

    The tiles are balanced: ``count`` tiles of ``ceil(pixels / count)`` entries, the last one
    shorter by less than ``count`` entries (2048 entries in tiles of at most 1023: 683, 683,
    682, not 1023, 1023, 2).

    **Double buffering** (``double_buffer=True``): the accumulator must hold both halves,
    ``2 * buffers * tile + reserved`` entries.  The tile count is the one, from the fewest tiles
    that fit half the accumulator up to twice as many, that :func:`estimate_eltwise_cycles`
    finds fastest (every extra tile costs ``buffers`` DRAM latencies and ``alu_passes`` ALU
    latencies; smaller tiles shorten the store that nothing overlaps, the last one).  The plan
    falls back to single buffering (``double_buffer=False``, the fewest tiles of the whole
    accumulator) when not even one entry per operand fits twice, when that choice is one tile
    (nothing to overlap), or when it is not estimated faster than the single-buffered plan (on
    a small accumulator the halves' tiles are so short that the per-tile latencies outweigh the
    hidden stores).
    """
    if pixels < 1:
        raise ScheduleError("an element-wise layer without entries")
    room = cfg.acc_depth - reserved
    single = min(pixels, MAX_LOOP, room // buffers)
    if single < 1:
        raise ScheduleError("the accumulator cannot hold one operand vector")
    plan = EltwiseSchedule(-(-pixels // -(-pixels // single)))
    half = min(pixels, MAX_LOOP, room // (2 * buffers))
    if not double_buffer or half < 1:
        return plan
    first = -(-pixels // half)
    best = None
    for count in range(first, min(pixels, 2 * first) + 1):
        tile = -(-pixels // count)
        est = estimate_eltwise_cycles(cfg, pixels, tile, buffers, alu_passes, True)
        if best is None or est < best[0]:
            best = (est, tile, count)
    est, tile, count = best
    if count > 1 and est < estimate_eltwise_cycles(cfg, pixels, plan.tile, buffers, alu_passes):
        return EltwiseSchedule(tile, True)
    return plan


def pipeline_operand_loads(instructions: list[Instruction]) -> list[Instruction]:
    """Software-pipeline the operand loads of a sequential ALU-only program.

    A double-buffered element-wise program is written tile after tile: the operand loads of a
    tile (accumulator LOADs, executed by the compute module), its ALU instructions, its stores.
    This pass moves every run of accumulator LOADs up into the ALU instructions of the previous
    tile: after the first ``ceil(m / 2)`` of the ``m`` ALU instructions between the previous run
    of loads and this one (past the rest and past the stores).  So the store of tile ``k``
    (store module) overlaps the first ALU passes of tile ``k+1`` instead of competing with the
    next loads for the DRAM port, and the loads of tile ``k+1`` run before tile ``k``'s last
    ALU passes.  A load never moves past an instruction that touches an entry it writes: with
    a single-buffered schedule (or any other reuse of the entries) the loads stay where they
    are, so the program computes the same results.  A program with GEMMs is returned
    unchanged (:func:`interleave_epilogues` pipelines those).
    """
    if any(insn.opcode == Opcode.GEMM for insn in instructions):
        return list(instructions)

    def is_acc_load(insn):
        return insn.opcode == Opcode.LOAD and insn.buffer == Buffer.ACC

    out: list[Instruction] = []
    alus: list[int] = []  # positions in `out` of the ALU instructions since the last loads
    n = len(instructions)
    i = 0
    while i < n:
        if not is_acc_load(instructions[i]):
            insn = instructions[i]
            out.append(insn)
            if insn.opcode == Opcode.ALU:
                alus.append(len(out) - 1)
            elif insn.opcode in (Opcode.FINISH, Opcode.SYNC):
                alus = []  # nothing moves across these
            i += 1
            continue
        j = i
        while j < n and is_acc_load(instructions[j]):
            j += 1
        run = instructions[i:j]
        ranges = [r for insn in run for r in _acc_ranges(insn)]
        target = alus[(len(alus) + 1) // 2 - 1] + 1 if alus else len(out)
        for k in range(len(out) - 1, target - 1, -1):
            if _conflict(ranges, _acc_ranges(out[k])):
                target = k + 1
                break
        out[target:target] = run
        alus = []
        i = j
    return out


def conv_stream_passes(
    seq: list, cfg: HardwareConfig, prologues: list | None = None, double=False
) -> list:
    """The passes both code generators apply, in this order, to a convolution's sequential
    stream: :func:`hoist_prologues` (when there are ``prologues``, a fused residual's, and the
    regions are ``double`` buffered), :func:`fuse_epilogues`, :func:`interleave_epilogues`
    (flushing partially when there are prologues) and
    :func:`~tvm_hapm.target.banks.place_accumulators` (which also gives every GEMM its bank's
    array).  Dependency tokens are inserted after them.

    The stream may hold GEMM blocks (:mod:`~tvm_hapm.target.stream`, the TIR walker's); every
    pass gives, for a block, what it gives for the instructions the block stands for, and keeps
    instructions as instructions.  ``prologues`` index the stream's items."""
    if prologues and double:
        seq = hoist_prologues(seq, prologues)
    seq = interleave_epilogues(fuse_epilogues(seq), cfg, partial_flush=bool(prologues))
    return place_accumulators(seq, cfg)


def hoist_prologues(seq: list, regions: list) -> list:
    """Move each output region's prologue (a fused residual's shortcut load and multiply)
    ahead of the previous region, right after the epilogue of the region before that, which
    used the same accumulator half.  :func:`interleave_epilogues` then spreads it, with that
    epilogue, among the previous region's GEMMs instead of running it while the arrays wait.
    ``regions`` holds ``(start, prologue start, prologue end)`` per region, in order, covering
    ``seq`` from the first region's start to the end."""
    ends = [r[0] for r in regions[1:]] + [len(seq)]
    _, p0, p1 = regions[0]
    out = seq[: regions[0][0]] + seq[p0:p1]  # the first region's prologue stays first
    for k, ((start, p0, p1), end) in enumerate(zip(regions, ends, strict=True)):
        if k + 1 < len(regions):
            _, q0, q1 = regions[k + 1]
            out += seq[q0:q1]
        out += seq[start:p0] + seq[p1:end]
    return out


def _alu_nest(insn: Instruction) -> tuple:
    return (insn.dst_addr, insn.outer, insn.inner, insn.dst_so, insn.dst_si)


def _distinct_nest(base: int, outer: int, inner: int, so: int, si: int) -> bool:
    """Whether a two-level loop's addresses never repeat (strides are non-negative)."""
    if outer * inner == 1:
        return True
    if outer == 1:
        return si > 0
    if inner == 1:
        return so > 0
    return si > 0 and so >= inner * si


def fuse_epilogues(instructions: list) -> list:
    """Fuse each ``ADD acc[b]; REQUANT acc[b+1] >> k[; MAX #0]`` into one ``ADD_REQUANT``.

    The three ALU instructions must be adjacent, have the same destination loop nest, carry no
    dependency tokens, and the ``ADD`` and ``REQUANT`` must read the bias and multiplier rows
    with the same source strides, the multiplier one entry after the bias.  The destination
    entries must be distinct and apart from the rows they read: then computing each entry's
    bias, requantization and ReLU before the next entry's gives what the three passes give.
    ``MAX`` with an immediate of 0 becomes the ReLU flag; any other clip stays an instruction.
    GEMM blocks (:mod:`~tvm_hapm.target.stream`) pass through.
    """
    out: list = []
    seq = list(instructions)
    i = 0
    alu = Opcode.ALU
    while i < len(seq):
        add = seq[i]
        if add.opcode != alu:  # (the GEMMs: most of a convolution)
            out.append(add)
            i += 1
            continue
        req = seq[i + 1] if i + 1 < len(seq) else None
        if req is None or not _fusable(add, req):
            out.append(add)
            i += 1
            continue
        imm, used = req.imm, 2
        relu = seq[i + 2] if i + 2 < len(seq) else None
        if (
            relu is not None
            and relu.opcode == Opcode.ALU
            and relu.alu_op == AluOp.MAX
            and relu.use_imm
            and relu.imm == 0
            and _alu_nest(relu) == _alu_nest(add)
            and not _has_tokens(relu)
        ):
            imm, used = imm | REQUANT_RELU, 3
        out.append(add.replace(alu_op=int(AluOp.ADD_REQUANT), imm=imm))
        i += used
    return out


def _has_tokens(insn: Instruction) -> bool:
    return bool(insn.pop_prev or insn.pop_next or insn.push_prev or insn.push_next)


def _fusable(add: Instruction, req: Instruction) -> bool:
    if not (
        add.opcode == Opcode.ALU == req.opcode
        and add.alu_op == AluOp.ADD
        and req.alu_op == AluOp.REQUANT
        and not add.use_imm
        and not req.use_imm
        and _alu_nest(add) == _alu_nest(req)
        and req.src_addr == add.src_addr + 1
        and (req.src_so, req.src_si) == (add.src_so, add.src_si)
        and not _has_tokens(add)
        and not _has_tokens(req)
    ):
        return False
    dst, outer, inner, so, si = _alu_nest(add)
    d_hi = dst + (outer - 1) * so + (inner - 1) * si
    s_lo = add.src_addr
    s_hi = s_lo + (outer - 1) * add.src_so + (inner - 1) * add.src_si + 1
    return _distinct_nest(dst, outer, inner, so, si) and (d_hi < s_lo or s_hi < dst)


def _acc_ranges(insn: Instruction) -> list[tuple[int, int, bool]]:
    """``(first, last, is_write)`` accumulator ranges of an instruction."""
    return [(lo, hi, w) for buf, lo, hi, w in buffer_accesses(insn) if buf == Buffer.ACC]


def _conflict(a: list, b: list) -> bool:
    """Whether two instructions' accumulator ranges conflict (overlap, one of them a write)."""
    return any(
        (wa or wb) and lo_a <= hi_b and lo_b <= hi_a for lo_a, hi_a, wa in a for lo_b, hi_b, wb in b
    )


def interleave_epilogues(
    instructions: list, cfg: HardwareConfig, partial_flush: bool = False
) -> list:
    """Software-pipeline the epilogues of a sequential program into the following GEMMs.

    A sequential convolution ends every output region with its epilogue (ALU instructions, the
    stores of the region) and starts the next region with its input / weight loads and bias
    load before its GEMMs.  Run in that order, the compute module executes the epilogue while
    the arrays sit idle.  This pass moves every non-GEMM compute instruction (ALU, accumulator
    LOAD) and every STORE that precedes a run of GEMMs into that run: the loads of the load
    module go first (they only touch the input and weight buffers), then the GEMMs, with the
    moved instructions in their original order, ``ceil(moved / dispatches)`` of them (and the
    stores that followed them) after each dispatch of ``num_arrays`` GEMMs.  An instruction is
    never moved past one it conflicts with (overlapping accumulator entries, one of them
    written), nor a load-module instruction past it: when a GEMM or a load conflicts with a
    pending instruction, everything pending is emitted before it.  So the program computes the
    same results; only the order of independent instructions changes.  A program without GEMMs
    is returned unchanged.  GEMM blocks (:mod:`~tvm_hapm.target.stream`) are read GEMM by GEMM
    only while instructions are pending (:class:`~tvm_hapm.target.stream.GemmRun`) and cut where
    pending instructions go between their GEMMs.

    With ``partial_flush`` a GEMM that conflicts with a pending instruction emits the pending
    instructions only up to the last one it conflicts with; the later ones stay pending and are
    spread over the run (a fused residual's prologue for the region after next, queued behind
    the prologue of the GEMM's own region).
    """
    if not any(insn.opcode == Opcode.GEMM for insn in instructions):
        return list(instructions)
    per_dispatch = max(1, cfg.num_arrays)
    n = len(instructions)
    # the item after the GEMM run starting at each index
    run_end = list(range(n + 1))
    for i in range(n - 1, -1, -1):
        if instructions[i].opcode == Opcode.GEMM:
            run_end[i] = run_end[i + 1]
    out: list = []
    pending: list[tuple[Instruction, list]] = []  # moved instructions, in program order
    empty = (1 << 62, -1)
    lo_hi = list(empty)  # bounding range of the pending accumulator accesses

    def bound(ranges: list) -> None:
        for lo, hi, _ in ranges:
            lo_hi[0] = min(lo_hi[0], lo)
            lo_hi[1] = max(lo_hi[1], hi)

    def take(k: int) -> None:
        """Emit the first ``k`` pending instructions."""
        out.extend(p[0] for p in pending[:k])
        del pending[:k]
        lo_hi[:] = empty
        for _, r in pending:
            bound(r)

    def flush(count: int | None = None) -> None:
        """Emit the first ``count`` pending compute instructions (all: None) and the stores
        that follow them."""
        k = 0
        emitted = 0
        while k < len(pending):
            insn = pending[k][0]
            if insn.opcode != Opcode.STORE:
                if count is not None and emitted == count:
                    break
                emitted += 1
            k += 1
        take(k)

    def blocks(ranges: list) -> bool:
        if not pending or not ranges:
            return False
        if all(hi < lo_hi[0] or lo > lo_hi[1] for lo, hi, _ in ranges):
            return False
        return any(_conflict(ranges, r) for _, r in pending)

    i = 0
    while i < n:
        insn = instructions[i]
        op = insn.opcode
        if op == Opcode.GEMM:  # a run of GEMMs, instructions and blocks (GemmRun)
            run = GemmRun(instructions[i : run_end[i]])
            length = len(run)
            dispatches = -(-length // per_dispatch)
            moved = sum(1 for p, _ in pending if p.opcode != Opcode.STORE)
            per_slot = -(-moved // dispatches) if moved else 0
            done = 0  # the GEMMs of the run already in `out`
            for j in range(length):
                if not pending:  # the rest of the run: nothing to check, nothing to spread
                    break
                lo, hi, reset = run.acc_access(j)
                # (a GEMM writes its entries: it conflicts with every range that overlaps them)
                if (
                    lo <= lo_hi[1]
                    and hi >= lo_hi[0]
                    and any(a <= hi and lo <= b for _, r in pending for a, b, _ in r)
                ):
                    out.extend(run.items_between(done, j))
                    done = j
                    if partial_flush:  # through the last pending instruction it conflicts with
                        ranges = [(lo, hi, True)] + ([] if reset else [(lo, hi, False)])
                        take(1 + max(k for k, (_, r) in enumerate(pending) if _conflict(ranges, r)))
                    else:
                        flush()
                if per_slot and ((j + 1) % per_dispatch == 0 or j + 1 == length):
                    out.extend(run.items_between(done, j + 1))
                    done = j + 1
                    flush(per_slot)
            out.extend(run.items_between(done, length))
            i = run_end[i]
            continue
        if op in (Opcode.FINISH, Opcode.SYNC):
            flush()
            out.append(insn)
        elif op in (Opcode.STORE, Opcode.ALU) or (op == Opcode.LOAD and insn.buffer == Buffer.ACC):
            ranges = _acc_ranges(insn)
            pending.append((insn, ranges))
            bound(ranges)
        else:  # a load-module LOAD: goes ahead of the pending instructions unless it conflicts
            if blocks(_acc_ranges(insn)):
                flush()
            out.append(insn)
        i += 1
    flush()
    return out
