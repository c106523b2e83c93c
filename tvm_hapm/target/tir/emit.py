"""The emitter: walks a lowered PrimFunc in execution order and produces the instruction stream
(copies -> LOAD / STORE, tensorized products -> GEMM, accumulator loops -> ALU)."""

from __future__ import annotations

import json

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, tirx

from ..config import HardwareConfig, get_config
from ..dependency import insert_dependency_tokens
from ..gc_pause import paused_gc
from ..intrin import GEMM_MARKER, SCOPE_ACC, SCOPE_INP, SCOPE_WGT
from ..isa import (
    ELEM_CODE,
    MAX_LOOP,
    MAX_TRANSFER,
    AluOp,
    Instruction,
    Opcode,
)
from ..program import Program, Slot
from ..schedule import (
    conv_stream_passes,
    pipeline_operand_loads,
)
from ..stream import GemmBlock, expand
from .compute import (
    DMA_LOAD,
    DMA_STORE,
    KERNEL_ATTR,
    LAYER_ATTR,
    LOWERED_ATTR,
    SCHEDULE_ATTR,
    SCOPE_BUFFER,
    layer_of,
    region_class,
)
from .dma import LowerToAccelerator, entry_elems, predicate_highs
from .sparse import SparseWeights, dma_runs
from .walk import (
    Evaluator,
    LoopNest,
    TirLoweringError,
    affine,
    buffer_scope,
    buffer_shape,
    buffer_span,
    const_int,
    flat_index,
    is_call,
    node_key,
    node_kind,
    perfect_nest,
    strip_cast,
)

# =============================================================================================
# codegen
#: Whether the walker emits the loops around a GEMM as one block (:meth:`_Emitter.emit_gemm_block`);
#: False walks them one iteration at a time, the reference the block is tested against.
GEMM_BLOCKS = True


class _Emitter:
    """Walks a lowered accelerator PrimFunc in execution order and emits instructions."""

    def __init__(self, cfg: HardwareConfig, func: tirx.PrimFunc, weights=None):
        self.cfg = cfg
        self.ev = Evaluator()
        self.slots = {node_key(p): i for i, p in enumerate(func.params)}
        self.base: dict[int, int] = {}  # on-chip buffer -> first entry
        self.top = {scope: 0 for scope in SCOPE_BUFFER}
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
                self.gemm_acc.add(node_key(ev.value.args[5].args[0]))

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
            weights.param = node_key(func.params[wparam])
        attrs = func.attrs
        plan = json.loads(str(attrs[SCHEDULE_ATTR])) if attrs and SCHEDULE_ATTR in attrs else {}
        #: Double buffering (the plan's ``double_buffer``): input tiles, weight chunks (when
        #: not resident) and output regions alternate between two halves; in an ALU-only
        #: layer, the accumulator tiles its DMAs load (the element-wise operands).
        self.double = bool(plan.get("double_buffer", False))
        #: (scope, :func:`region_class`) of a doubled buffer -> half of its next allocation
        self.parity: dict[tuple, int] = {}
        self.wgt_total = (
            int(np.prod(buffer_shape(func.params[wparam]))) // (cfg.array_rows * cfg.array_cols)
            if len(func.params) > wparam
            else 0
        )
        # per-node analyses, computed on first visit
        self._nests: dict[int, tuple] = {}
        self._seqs: dict[int, tuple] = {}  # SeqStmt -> (node, its statements)
        self._dma: dict[int, tuple] = {}
        self._gemm: dict[int, tuple] = {}
        self._gemm_blocks: dict[int, tuple | bool] = {}  # outer loop -> emit_gemm_block's plan
        self._blocks: dict[int, tuple] = {}  # SBlock -> the buffers allocate places
        self._reset: dict[int, tuple] = {}
        self._alu: dict[int, tuple] = {}
        self._init: dict[int, tuple] = {}
        self._leaf_kind: dict[int, str] = {}
        self._entry_elems: dict[int, int] = {}  # on-chip buffer -> elements per entry

    # ------------------------------------------------------------------ walk
    def visit(self, stmt) -> None:
        kind = node_kind(stmt)
        if kind == "SeqStmt":
            k = node_key(stmt)
            hit = self._seqs.get(k)
            if hit is None:  # (the children read once: a sequence in a loop is visited often)
                hit = self._seqs[k] = (stmt, tuple(stmt.seq))
            for s in hit[1]:
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
            self.visit_leaf(LoopNest([], [], stmt))
        elif kind == "BufferStore":
            self.visit_leaf(LoopNest([], [], stmt))
        elif kind == "IfThenElse":
            if self.ev(stmt.condition):
                self.visit(stmt.then_case)
            elif stmt.else_case is not None:
                self.visit(stmt.else_case)
        else:
            raise TirLoweringError(f"unexpected {kind} in an accelerator function")

    def visit_for(self, loop) -> None:
        k = node_key(loop)
        hit = self._nests.get(k)
        if hit is None:
            nest = perfect_nest(loop)
            folds = (
                nest is not None and (not nest.predicates or self._is_alu(nest)) and self.fold(nest)
            )
            block = None if folds else self._gemm_block_nest(nest)
            body = loop.body
            # what each visit needs, read off the node once: the loop variable, the body and
            # its handler, and the bounds when they are constants
            bounds = (loop.min, loop.extent)
            if all(node_kind(b) == "IntImm" for b in bounds):
                bounds = (int(bounds[0].value), int(bounds[1].value))
            walk = (node_key(loop.loop_var), body, node_kind(body) == "For", bounds)
            hit = self._nests[k] = (nest, folds, loop, block, walk)
        nest, folds, _, block, walk = hit
        if folds:
            self.visit_leaf(nest)
            return
        if self._first_loop is None:
            self._first_loop = len(self.seq)
        if block is not None and GEMM_BLOCKS and self.emit_gemm_block(*block):
            return
        var, body, body_is_for, (start, extent) = walk
        if start.__class__ is not int:
            start, extent = self.ev(start), self.ev(extent)
        visit = self.visit_for if body_is_for else self.visit
        env = self.ev.env
        for v in range(start, start + extent):
            env[var] = v
            visit(body)

    def fold(self, nest: LoopNest) -> bool:
        """Whether one instruction covers the whole nest (all its loops become fields)."""
        leaf = nest.leaf
        if node_kind(leaf) == "Evaluate":
            if is_call(leaf.value, GEMM_MARKER):
                return len(nest.loops) <= 2 and not self._vars_in(
                    leaf.value.args[4], nest.loop_vars
                )
            return False
        value = leaf.value
        if node_kind(value) == "IntImm" and not self.alu_only:
            return True  # the reduction's init: a reset region, any shape
        return len(nest.loops) <= 3  # two entry loops and the lanes

    def _gemm_block_nest(self, nest: LoopNest | None):
        """``(outer loops, folded nest)`` when ``nest`` is unpredicated loops around one GEMM whose
        innermost loops fold into it: the loops above the fold then only repeat that GEMM with
        addresses affine in their variables (:meth:`emit_gemm_block`); else None."""
        if nest is None or nest.predicates or not nest.loops:
            return None
        leaf = nest.leaf
        if node_kind(leaf) != "Evaluate" or not is_call(leaf.value, GEMM_MARKER):
            return None
        for j in range(1, len(nest.loops) + 1):
            inner = LoopNest(nest.loops[j:], [], leaf)
            if self.fold(inner):
                return nest.loops[:j], inner
        return None

    @staticmethod
    def _is_alu(nest: LoopNest) -> bool:
        leaf = nest.leaf
        return node_kind(leaf) == "BufferStore" and node_kind(leaf.value) != "IntImm"

    @staticmethod
    def _vars_in(expr, loop_vars) -> bool:
        keys = {node_key(v) for v in loop_vars}
        found = []
        tvm_ffi.structural_walk(
            expr, (tirx.Var, lambda v: found.append(node_key(v) in keys) and None)
        )
        return any(found)

    # ------------------------------------------------------------------ on-chip allocation
    def allocate(self, block) -> None:
        """Place the block's on-chip buffers, in order of first use.  Buffers written by
        epilogue stages are not placed: the ALU computes them in place of their operand."""
        if not len(block.alloc_buffers):
            return
        for buf, k, scope, entries, dma_loaded in self._block_buffers(block):
            doubled = self.double and (
                scope == SCOPE_INP
                # the GEMMs' output region (also when its init loads a shortcut tile); in an
                # ALU-only layer also the loaded operands
                or (scope == SCOPE_ACC and (not dma_loaded or k in self.gemm_acc or self.alu_only))
                or (scope == SCOPE_WGT and entries < self.wgt_total)  # weights not resident
            )
            half = 0
            if doubled and scope == SCOPE_WGT and self.weights is not None:
                self.weights.half = entries  # the sparse walker picks the half at each load
            elif doubled:
                # The copies of one buffer in the output regions of a layer alternate as one.
                cls = (scope, region_class(str(buf.name)))
                half = self.parity.get(cls, 0)
                self.parity[cls] = 1 - half
            self.base[k] = self.top[scope] + half * entries
            self.top[scope] += 2 * entries if doubled else entries
            if self.top[scope] > self.depth[scope] and not (
                scope == SCOPE_WGT and self.weights is not None  # compacted: checked by the plan
            ):
                raise TirLoweringError(
                    f"{buf.name}: {scope} overflows ({self.top[scope]} > {self.depth[scope]})"
                )

    def _block_buffers(self, block) -> list[tuple]:
        """The on-chip buffers :meth:`allocate` places for ``block``, in order of first use,
        each as ``(buffer, key, scope, entries, loaded by a DMA)`` (found once per node: a
        block inside unrolled loops is visited once per iteration)."""
        hit = self._blocks.get(node_key(block))
        if hit is not None:
            return hit[0]
        first_use: dict[int, int] = {}
        placed: set[int] = set()
        dma_loaded: set[int] = set()
        order = [0]

        def note(buf, placed_kind: bool):
            k = node_key(buf)
            if k not in first_use:
                first_use[k] = order[0]
                order[0] += 1
            if placed_kind:
                placed.add(k)

        def on_eval(ev):
            call = ev.value
            if is_call(call, DMA_LOAD):
                note(call.args[1].args[0], True)
                dma_loaded.add(node_key(call.args[1].args[0]))
            elif is_call(call, GEMM_MARKER):
                note(call.args[5].args[0], True)

        def on_store(st):
            note(st.buffer, node_kind(st.value) == "IntImm")

        tvm_ffi.structural_walk(
            block.body, [(tirx.Evaluate, on_eval), (tirx.BufferStore, on_store)], order="pre"
        )
        bufs = [b for b in block.alloc_buffers if node_key(b) in placed]
        bufs.sort(key=lambda b: first_use[node_key(b)])
        out = []
        for buf in bufs:
            scope = buffer_scope(buf)
            if scope not in SCOPE_BUFFER:
                raise TirLoweringError(f"buffer {buf.name} in scope {scope!r} is not on chip")
            entries = -(-buffer_span(buf) // entry_elems(self.cfg, scope))
            k = node_key(buf)
            out.append((buf, k, scope, entries, k in dma_loaded))
        self._blocks[node_key(block)] = (out, block)  # keep the node alive: its handle is the key
        return out

    def _chip_addr(self, buf, elem_offset):
        """The on-chip entry of element ``elem_offset`` of ``buf`` (an int), or of each offset
        of an integer array (a block of GEMMs' offsets, :meth:`emit_gemm_block`)."""
        k = node_key(buf)
        E = self._entry_elems.get(k)
        if E is None:
            E = self._entry_elems[k] = entry_elems(self.cfg, buffer_scope(buf))
        rem = elem_offset % E
        if rem if isinstance(rem, int) else rem.any():
            bad = elem_offset if isinstance(rem, int) else int(elem_offset[rem.nonzero()[0][0]])
            raise TirLoweringError(f"{buf.name}: offset {bad} is not a whole entry")
        return self.base[k] + elem_offset // E

    def _prologue(self, first: int) -> None:
        """Note ``seq[first:]`` (just emitted) as part of the current region's prologue."""
        end = len(self.seq)
        if self.regions and self.regions[-1][2] == first:
            self.regions[-1][2] = end
        else:
            start = self._last_store if self.regions else self._first_loop
            self.regions.append([first if start is None else start, first, end])

    # ------------------------------------------------------------------ leaves
    def visit_leaf(self, nest: LoopNest) -> None:
        leaf = nest.leaf
        k = node_key(leaf)
        kind = self._leaf_kind.get(k)
        if kind is None:
            kind = self._leaf_kind[k] = self._classify(leaf)
        if kind == "dma":
            self.emit_dma(leaf.value)
        elif kind == "gemm":
            self.emit_gemm(leaf.value, nest)
        elif kind == "init":
            if self.alu_only:
                self.emit_init(nest)
            else:
                self.mark_reset(nest)
        else:
            self.emit_alu(nest)

    @staticmethod
    def _classify(leaf) -> str:
        """What a leaf statement emits: ``dma``, ``gemm``, ``init`` or ``alu`` (computed once
        per node: a leaf inside unrolled loops is visited once per iteration)."""
        if node_kind(leaf) == "Evaluate":
            call = leaf.value
            if is_call(call, DMA_LOAD) or is_call(call, DMA_STORE):
                return "dma"
            if is_call(call, GEMM_MARKER):
                return "gemm"
            raise TirLoweringError(f"unexpected call {call}")
        return "init" if node_kind(leaf.value) == "IntImm" else "alu"

    def emit_dma(self, call) -> None:
        k = node_key(call)
        info = self._dma.get(k)
        if info is None:
            a = call.args
            is_load = is_call(call, DMA_LOAD)
            dst, src = a[1].args[0], a[3].args[0]
            chip, dram = (dst, src) if is_load else (src, dst)
            chip_off, dram_off = (a[2], a[4]) if is_load else (a[4], a[2])
            scope = buffer_scope(chip)
            bits = tvm.DataType(str(dram.ty.dtype)).bits
            fields = {
                "buffer": int(SCOPE_BUFFER[scope]),
                "dram_slot": self.slots[node_key(dram)],
                "elem_bits_code": ELEM_CODE[bits],
            }
            if len(a) > 12 and const_int(a[12]):
                fields["pad_min"] = 1
            # the DRAM and on-chip offsets, rows, columns, stride and pads: one function
            sizes = self.ev.compiled_tuple([dram_off, chip_off, *a[5:12]])
            info = (is_load, chip, dram, entry_elems(self.cfg, scope), fields, sizes, call)
            self._dma[k] = info
        is_load, chip, dram, E, fields, sizes, _ = info
        first = len(self.seq)
        dram_elem, chip_elem, rows, cols, stride, *pads = sizes(self.ev.env)
        if dram_elem % E:
            raise TirLoweringError(f"{dram.name}: DRAM offset {dram_elem} is not a whole entry")
        sram = self._chip_addr(chip, chip_elem)
        dram_addr = dram_elem // E
        opcode = Opcode.LOAD if is_load else Opcode.STORE
        if self.weights is not None and node_key(dram) == self.weights.param:
            self.weights.load(self, sram, dram_addr, rows, cols, stride, fields)
            return
        if rows == 1 and cols > MAX_TRANSFER:
            self.seq += dma_runs(opcode, sram, dram_addr, cols, fields)
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
        elif node_key(chip) in self.gemm_acc:  # a shortcut tile into a GEMM region
            self._prologue(first)

    def _loop_fields(self, nest: LoopNest, exprs_entries):
        """Extents ``[outer, inner]`` and, per address, ``(base expression, [so, si])`` of
        affine entry addresses over the nest's loops (at most two, padded with unit loops)."""
        loop_vars, extents = nest.loop_vars, nest.extents
        out = []
        for expr, E in exprs_entries:
            coef, base = affine(expr, loop_vars)
            if any(c % E for c in coef):
                raise TirLoweringError(f"stride of {expr} is not a whole entry")
            out.append((base, [c // E for c in coef]))
        while len(extents) < 2:
            extents = [1] + extents
            out = [(b, [0] + c) for b, c in out]
        return extents, out

    def _gemm_info(self, nest: LoopNest) -> tuple:
        """The per-node analysis of a GEMM leaf and its folded loops: buffers, ``outer`` /
        ``inner``, and the input, accumulator and weight offsets (compiled, and as expressions
        for :meth:`emit_gemm_block`) with the input / accumulator strides in entries."""
        k = node_key(nest.leaf)
        info = self._gemm.get(k)
        if info is None:
            a = nest.leaf.value.args
            inp, wgt, acc = a[1].args[0], a[3].args[0], a[5].args[0]
            R, C = self.cfg.array_rows, self.cfg.array_cols
            (outer, inner), [(inp_b, inp_s), (acc_b, acc_s)] = self._loop_fields(
                nest, [(a[2], R), (a[6], C)]
            )
            ev = self.ev.compiled
            info = (inp, wgt, acc, outer, inner, ev(inp_b), inp_s, ev(acc_b), acc_s, ev(a[4]),
                    (inp_b, acc_b, a[4]))  # fmt: skip
            self._gemm[k] = info
        return info

    def _gemm_reset(self, acc_addr: int, outer: int, inner: int, acc_s) -> bool:
        """Whether a GEMM into ``acc_addr`` takes the reset of its accumulator region (its
        entries are all pending a reset, which they then no longer are)."""
        pending = self.pending_reset
        entries = _entries(acc_addr, outer, inner, acc_s[0], acc_s[1])
        reset = entries <= pending
        if not reset and not entries.isdisjoint(pending):
            raise TirLoweringError("a GEMM resets part of its accumulator region")
        if reset:
            pending -= entries
        return reset

    def emit_gemm(self, call, nest: LoopNest) -> None:
        inp, wgt, acc, outer, inner, inp_b, inp_s, acc_b, acc_s, wgt_off, _ = self._gemm_info(nest)
        env = self.ev.env
        acc_addr = self._chip_addr(acc, int(acc_b(env)))
        wgt_addr = self._chip_addr(wgt, int(wgt_off(env)))
        if self.weights is not None:
            wgt_addr = self.weights.chip_addr(wgt_addr)
            if wgt_addr is None:  # an all-zero block: no GEMM
                return
        # (no pending reset: most GEMMs accumulate)
        reset = bool(self.pending_reset) and self._gemm_reset(acc_addr, outer, inner, acc_s)
        self.seq.append(
            Instruction(
                Opcode.GEMM,
                reset=int(reset),
                array=0,  # given by banks.place_accumulators
                wgt_addr=wgt_addr,
                inp_addr=self._chip_addr(inp, int(inp_b(env))),
                acc_addr=acc_addr,
                outer=outer,
                inner=inner,
                inp_so=inp_s[0],
                inp_si=inp_s[1],
                acc_so=acc_s[0],
                acc_si=acc_s[1],
            )
        )

    def emit_gemm_block(self, loops, nest: LoopNest) -> bool:
        """Every iteration of ``loops`` (outermost first) around the folded GEMM ``nest`` at
        once: the GEMMs :meth:`emit_gemm` would emit one walk step at a time, in the same order.

        The input, accumulator and weight offsets are affine in the loop variables, so the
        whole block is one NumPy evaluation; only the reset bookkeeping (the first GEMMs into
        each region) stays per GEMM.  Returns False, having emitted nothing, when the offsets
        are not affine in ``loops`` or an offset is not a whole entry: the caller then walks
        the loops (which reports such an offset where it occurs).
        """
        inp, wgt, acc, outer, inner, _, inp_s, _, acc_s, _, exprs = self._gemm_info(nest)
        k = node_key(loops[0])
        block = self._gemm_blocks.get(k)
        if block is None:
            try:
                extents = [const_int(f.extent) for f in loops]
                terms = [affine(e, [f.loop_var for f in loops]) for e in exprs]
            except TirLoweringError:
                terms = None
            if terms is None or min(extents) < 1:
                block = False
            else:
                grid = np.indices(extents).reshape(len(loops), -1).T  # row-major iterations
                steps = [grid @ np.asarray(coef, np.int64) for coef, _ in terms]
                bases = [self.ev.compiled(base) for _, base in terms]
                block = (steps, bases, [node_key(f.loop_var) for f in loops], extents)
            self._gemm_blocks[k] = block
        if block is False:
            return False
        steps, bases, keys, extents = block
        env = self.ev.env
        inp_off, acc_off, wgt_off = (int(b(env)) + s for b, s in zip(bases, steps, strict=True))
        try:
            acc_addr = self._chip_addr(acc, acc_off)
            wgt_addr = self._chip_addr(wgt, wgt_off)
            inp_addr = self._chip_addr(inp, inp_off)
        except TirLoweringError:
            return False
        if self.weights is not None:  # all-zero blocks: no GEMM
            chip = self.weights.chip
            mapped = [chip[a] for a in wgt_addr.tolist()]
            kept = [j for j, a in enumerate(mapped) if a is not None]
            if len(kept) < len(mapped):
                acc_addr, inp_addr = acc_addr[kept], inp_addr[kept]
                mapped = [mapped[j] for j in kept]
            wgt_addr = mapped
        reset = np.zeros(len(acc_addr), np.int64)
        if self.pending_reset:  # the first GEMMs into each region
            acc_list = acc_addr.tolist()
            j = 0
            while self.pending_reset and j < len(acc_list):
                reset[j] = self._gemm_reset(acc_list[j], outer, inner, acc_s)
                j += 1
        if len(acc_addr):
            self.seq.append(
                GemmBlock.from_columns(
                    len(acc_addr),
                    {"reset": reset, "wgt_addr": wgt_addr, "inp_addr": inp_addr,
                     "acc_addr": acc_addr},
                    {"outer": outer, "inner": inner, "inp_so": inp_s[0], "inp_si": inp_s[1],
                     "acc_so": acc_s[0], "acc_si": acc_s[1]},  # array: banks.place_accumulators
                )
            )  # fmt: skip
        for key, e in zip(keys, extents, strict=True):  # where walking the loops leaves them
            env[key] = e - 1
        return True

    def mark_reset(self, nest: LoopNest) -> None:
        """The reduction's init: its accumulator entries are reset by their first GEMM."""
        k = node_key(nest.leaf)
        info = self._reset.get(k)
        if info is None:
            store = nest.leaf
            coef, base = affine(flat_index(store.buffer, store.indices), nest.loop_vars)
            offsets = np.array([0])
            for c, e in zip(coef, nest.extents, strict=True):
                offsets = (offsets[:, None] + c * np.arange(e)[None, :]).reshape(-1)
            info = (store.buffer, base, offsets, {})
            self._reset[k] = info
        buf, base, offsets, entries = info
        C = self.cfg.array_cols
        b = self.ev(base)
        # (offsets + b) // C is (offsets + r) // C + (b - r) // C for r = b % C: the distinct
        # entries found once per remainder
        r = b % C
        rel = entries.get(r)
        if rel is None:
            rel = entries[r] = np.unique((offsets + r) // C)
        self.pending_reset.update((rel + (self.base[node_key(buf)] + (b - r) // C)).tolist())

    def emit_init(self, nest: LoopNest) -> None:
        """The reduction's init ``acc = v`` of an ALU-only layer: ``MUL 0``, then ``ADD v``."""
        k = node_key(nest.leaf)
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
            lanes_nest = LoopNest(nest.loops[:-1], [], store) if nest.loops else nest
            extents, fields = self._loop_fields(
                lanes_nest, [(flat_index(store.buffer, store.indices), C)]
            )
            lane_key = node_key(nest.loop_vars[-1]) if nest.loops else None
            info = (store.buffer, lane_key, extents, fields[0], const_int(store.value))
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

    def emit_alu(self, nest: LoopNest) -> None:
        k = node_key(nest.leaf)
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
        self.base[node_key(dst)] = opd_addr - dst_b // C
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
        if node_key(dst) in self.gemm_acc:  # a reduction's init computed in a GEMM region
            self._prologue(first_insn)

    def _analyse_alu(self, nest: LoopNest):
        store = nest.leaf
        C = self.cfg.array_cols
        amin, amax = self.cfg.act_range
        dst = store.buffer
        if buffer_scope(dst) != SCOPE_ACC:
            raise TirLoweringError(f"unrecognised copy or computation into {dst.name}")
        ops = []  # (AluOp, operand load or None, immediate or None)
        value = store.value
        operand = None
        if node_kind(value) == "Add":
            operand = value.a
            ops.append((AluOp.ADD, value.b, None))
        elif node_kind(value) == "Cast":
            # Cast(int32, max(min((int64(x) * int64(m) + round) >> S, amax), amin))
            inner = value.value
            bounds = {}
            while node_kind(inner) in ("Min", "Max"):
                bounds[node_kind(inner)] = const_int(inner.b)
                inner = inner.a
            if bounds != {"Min": amax, "Max": amin} or node_kind(inner) != "RShift":
                raise TirLoweringError(f"unrecognised requantization {value}")
            shift = const_int(inner.b)
            total = inner.a
            if node_kind(total) != "Add" or const_int(total.b) != 1 << (shift - 1):
                raise TirLoweringError(f"requantization {value} does not round half up")
            prod = total.a
            operand = strip_cast(prod.a)
            ops.append((AluOp.REQUANT, strip_cast(prod.b), shift))
        elif node_kind(value) == "Mul":
            operand = value.a
            b = strip_cast(value.b)
            ops.append(
                (AluOp.MUL, b, None)
                if node_kind(b) == "TensorLoad"
                else (AluOp.MUL, None, const_int(b))
            )
        elif node_kind(value) == "RShift":
            # (x + 2**(k-1)) >> k: the ALU's rounding shift
            k = const_int(value.b)
            total = value.a
            if node_kind(total) != "Add" or const_int(total.b) != (1 << k) >> 1:
                raise TirLoweringError(f"shift {value} does not round half up")
            operand = total.a
            ops.append((AluOp.SHR, None, k))
        elif node_kind(value) == "Max" and node_kind(strip_cast(value.b)) == "TensorLoad":
            # a MAX reduction step: max(acc, src) (max pooling's window taps)
            operand = value.a
            ops.append((AluOp.MAX, strip_cast(value.b), None))
        else:
            chain = []
            while node_kind(value) in ("Min", "Max"):
                chain.append(
                    (AluOp.MIN if node_kind(value) == "Min" else AluOp.MAX, const_int(value.b))
                )
                value = value.a
            operand = value
            ops += [(op, None, imm) for op, imm in reversed(chain)]
        operand = strip_cast(operand)
        inner_ops = []  # a chain ((x op1 a) op2 b) ...: the inner operations run first
        while node_kind(operand) in ("Add", "Mul"):
            b = strip_cast(operand.b)
            op = AluOp.ADD if node_kind(operand) == "Add" else AluOp.MUL
            if node_kind(b) == "TensorLoad":
                inner_ops.append((op, b, None))
            else:
                inner_ops.append((op, None, const_int(b)))
            operand = strip_cast(operand.a)
        ops = inner_ops[::-1] + ops
        if node_kind(operand) != "TensorLoad" or buffer_scope(operand.source) != SCOPE_ACC:
            raise TirLoweringError(f"ALU stage {store.value} does not read the accumulator")
        # Loops: drop the lanes (the innermost loop, contiguous over the C lanes).
        lanes_nest = LoopNest(nest.loops[:-1], [], store) if nest.loops else nest
        if nest.loops and nest.extents[-1] != C:
            raise TirLoweringError(f"ALU stage {store.value}: innermost loop is not the lanes")
        dst_expr = flat_index(dst, store.indices)
        opd_expr = flat_index(operand.source, operand.indices)
        srcs = [(flat_index(o.source, o.indices), C) for _, o, _ in ops if o is not None]
        # Lane offsets must vanish at lane 0: bases are evaluated with the lane loop at 0.
        lane_key = node_key(nest.loop_vars[-1]) if nest.loops else None
        extents, fields = self._loop_fields(lanes_nest, [(dst_expr, C), (opd_expr, C)] + srcs)
        if fields[0][1] != fields[1][1]:
            raise TirLoweringError(f"ALU stage {store.value} is not in place")
        highs = None
        if nest.predicates:
            all_highs = predicate_highs(nest.predicates, nest.loop_vars, nest.extents)
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
    """The instructions of a scheduled accelerator PrimFunc (or its Schedule): the stream of
    :func:`emit_stream` with its GEMM blocks expanded."""
    return expand(emit_stream(func, cfg, weights))


@paused_gc()  # a loop's worth of instructions at a time: see target.gc_pause
def emit_stream(
    func, cfg: HardwareConfig | None = None, weights: SparseWeights | None = None
) -> list:
    """The instruction stream of a scheduled accelerator PrimFunc (or its Schedule), its GEMMs
    emitted a loop at a time as GEMM blocks (:mod:`~tvm_hapm.target.stream`).

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
    if emitter.alu_only:  # no GEMM: the accumulator stays as allocated, one flat space
        seq = pipeline_operand_loads(seq)
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
    insns = emit_stream(func, cfg)
    slots = []
    params = list(func.params)
    for i, p in enumerate(params):
        role = "output" if i == len(params) - 1 else "const"
        if i == 0 or (i == 1 and layer.get("residual")):
            role = "input"
        slots.append(Slot(str(p.name), role, str(p.ty.dtype), tuple(buffer_shape(p))))
    plan = json.loads(str(func.attrs[SCHEDULE_ATTR])) if SCHEDULE_ATTR in func.attrs else {}
    info = {"kind": layer["kind"], "schedule": plan, "source": "tir"}
    return Program(layer_name, cfg, slots, insns, 0, info)
