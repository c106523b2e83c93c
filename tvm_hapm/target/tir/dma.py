"""The TIR passes of the flow: :func:`InjectDMA` (copy nests into DMA intrinsics) and
:func:`LowerToAccelerator`."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from ..config import HardwareConfig, get_config
from ..intrin import SCOPE_ACC, SCOPE_INP, SCOPE_WGT
from .compute import DMA_LOAD, DMA_STORE, KERNEL_ATTR, LOWERED_ATTR, SCOPE_BUFFER, layer_of
from .walk import (
    LoopNest,
    TirLoweringError,
    affine,
    buffer_scope,
    const_int,
    flat_index,
    is_call,
    node_key,
    node_kind,
    perfect_nest,
    strip_cast,
)


# =============================================================================================
# InjectDMA
def entry_elems(cfg: HardwareConfig, scope: str) -> int:
    R, C = cfg.array_rows, cfg.array_cols
    return {SCOPE_INP: R, SCOPE_WGT: R * C, SCOPE_ACC: C}[scope]


def _copy_parts(store):
    """``(src_load, condition or None, pad_min)`` of a copy ``dst[...] = [cast](src[...])`` with
    optional ``if_then_else(cond, src[...], v)`` padding, ``v`` 0 or (``pad_min``) the minimum
    of the source's element type; ``None`` if the store is not a copy."""
    value = strip_cast(store.value)
    cond, pad_min = None, 0
    if is_call(value, "prim.if_then_else") or is_call(value, "tirx.if_then_else"):
        cond, then, other = value.args
        other = strip_cast(other)
        value = strip_cast(then)
        if node_kind(other) != "IntImm" or node_kind(value) != "TensorLoad":
            return None
        lowest = -(1 << (tvm.DataType(str(value.source.ty.dtype)).bits - 1))
        if int(other.value) == lowest:
            pad_min = 1
        elif int(other.value) != 0:
            return None
    if node_kind(value) != "TensorLoad":
        return None
    return value, cond, pad_min


def _conjuncts(cond):
    if node_kind(cond) == "And":
        return _conjuncts(cond.a) + _conjuncts(cond.b)
    return [cond]


def _bounds(cond, var, other_vars):
    """Lower (inclusive) and upper (exclusive) bounds on ``var`` implied by ``cond``."""
    lows, highs = [], []
    for term in _conjuncts(cond):
        kind = node_kind(term)
        if kind not in ("LT", "LE", "GT", "GE"):
            raise TirLoweringError(f"padding condition {term} is not a comparison")
        a, b = term.a, term.b
        # Normalise to `diff >= 0`.
        diff = {"LE": b - a, "LT": b - a - 1, "GE": a - b, "GT": a - b - 1}[kind]
        coeffs = tvm.sym.detect_linear_equation(diff, [var] + list(other_vars))
        if len(coeffs) != len(other_vars) + 2:
            raise TirLoweringError(f"padding condition {term} is not affine")
        cv = const_int(coeffs[0])
        if any(const_int(c) for c in coeffs[1:-1]):
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


def predicate_highs(predicates, loop_vars, extents) -> list:
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


def _dma_call(cfg: HardwareConfig, nest: LoopNest):
    """The ``hapm_fpga.dma_load`` / ``dma_store`` call replacing a copy nest, or ``None`` when
    the nest is not (yet) the 2-D region of one DMA."""
    store = nest.leaf
    if node_kind(store) != "BufferStore":
        return None
    parts = _copy_parts(store)
    if parts is None:
        return None
    load, cond, pad_min = parts
    dst, src = store.buffer, load.source
    dst_scope, src_scope = buffer_scope(dst), buffer_scope(src)
    if dst_scope in SCOPE_BUFFER and src_scope not in SCOPE_BUFFER:
        name, chip_scope = DMA_LOAD, dst_scope
    elif src_scope == SCOPE_ACC and dst_scope not in SCOPE_BUFFER:
        name, chip_scope = DMA_STORE, src_scope
    else:
        return None
    if nest.predicates and cond is not None:
        raise TirLoweringError("a padded copy under a predicate (partial tile) has no DMA form")
    E = entry_elems(cfg, chip_scope)
    loop_vars, extents = nest.loop_vars, nest.extents
    d_coef, d_base = affine(flat_index(dst, store.indices), loop_vars)
    s_coef, s_base = affine(flat_index(src, load.indices), loop_vars)
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
                (node_key(v) for v in loop_vars),
                predicate_highs(nest.predicates, loop_vars, extents),
                strict=True,
            )
        )
        bounded = {k for k, h in highs.items() if h is not None}
        used = {node_key(v) for v in (row_var, col_var) if v is not None}
        if bounded - used:
            raise TirLoweringError("a predicate bounds a DMA's vector lanes")
        if row_var is not None and highs[node_key(row_var)] is not None:
            row_count = tirx.max(tirx.min(row_count, highs[node_key(row_var)]), 0)
        if col_var is not None and highs[node_key(col_var)] is not None:
            col_count = tirx.max(tirx.min(col_count, highs[node_key(col_var)]), 0)
        if rows == 1:
            stride_expr = col_count  # one row: a run of entries (direct_codegen._load_rows)
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


def _operand_dma(cfg: HardwareConfig, nest: LoopNest, loop):
    """A computation into the accumulator on one DRAM operand (a fused residual's init,
    ``acc = int32(shortcut) * K + bias``) as ``SeqStmt(DMA of the operand into the
    destination entries, the computation in place)``, or ``None``."""
    store = nest.leaf
    if node_kind(store) != "BufferStore" or buffer_scope(store.buffer) != SCOPE_ACC:
        return None
    dram = []

    def on_load(load):
        if buffer_scope(load.source) not in SCOPE_BUFFER:
            dram.append(load)

    tvm_ffi.structural_walk(store.value, (tvm.ir.expr.TensorLoad, on_load))
    if len(dram) != 1 or node_kind(strip_cast(store.value)) == "TensorLoad":
        return None  # not one DRAM operand, or a copy (_dma_call refused it)
    operand = dram[0]
    dtype = str(store.buffer.ty.dtype)
    copy = tirx.BufferStore(store.buffer, tirx.Cast(dtype, operand), store.indices)
    dma = _dma_call(cfg, LoopNest(nest.loops, nest.predicates, copy))
    if dma is None:
        return None
    in_place = tirx.BufferLoad(store.buffer, list(store.indices))

    def _operand(expr):
        return in_place if strip_cast(expr).same_as(operand) else expr

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
            nest = perfect_nest(loop)
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
