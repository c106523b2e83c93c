"""Helpers that read TIR: constants, buffer shapes and scopes, affine indices, loop nests."""

from __future__ import annotations

import tvm
from tvm import tirx


# =============================================================================================
# expression helpers
class TirLoweringError(ValueError):
    """A TIR function the accelerator lowering does not understand."""


def node_key(obj) -> int:
    """Identity of a TVM object (Python wrappers of one node are different objects)."""
    return obj.__chandle__()


def node_kind(node) -> str:
    return type(node).__name__


def const_int(expr) -> int:
    if isinstance(expr, int):
        return expr
    if node_kind(expr) != "IntImm":
        expr = tvm.sym.Analyzer().simplify(expr)
        if node_kind(expr) != "IntImm":
            raise TirLoweringError(f"expected a constant, got {expr}")
    return int(expr.value)


def buffer_shape(buf) -> list[int]:
    return [const_int(s) for s in buf.ty.shape]


def buffer_scope(buf) -> str:
    return str(buf.ty.storage_scope)


def buffer_strides(buf) -> list[int]:
    """The element strides of ``buf``: its explicit ones (a buffer compacted under a
    ``storage_align``), else the row-major ones of its shape."""
    strides = [const_int(s) for s in buf.ty.strides]
    if strides:
        return strides
    out = [1]
    for size in reversed(buffer_shape(buf)[1:]):
        out.insert(0, out[0] * size)
    return out


def buffer_span(buf) -> int:
    """Elements ``buf`` takes in memory: its shape's, or more with padded strides."""
    shape = buffer_shape(buf)
    return max((s * e for s, e in zip(buffer_strides(buf), shape, strict=True)), default=1)


def flat_index(buf, indices):
    """Element offset of ``buf[indices]`` as one expression (row-major, or by the buffer's
    explicit strides)."""
    if len(buf.ty.strides):
        offset = tirx.const(0, "int32")
        for stride, idx in zip(buffer_strides(buf), indices, strict=True):
            offset = offset + idx * stride if stride != 1 else offset + idx
        return offset
    shape = buffer_shape(buf)
    offset = tirx.const(0, "int32")
    for size, idx in zip(shape, indices, strict=True):
        offset = offset * size + idx
    return offset


def affine(expr, loop_vars):
    """``(coefficients, base)`` of ``expr`` affine in ``loop_vars``; coefficients are ints."""
    if not loop_vars:
        return [], tvm.sym.Analyzer().simplify(expr)
    coeffs = tvm.sym.detect_linear_equation(expr, list(loop_vars))
    if len(coeffs) != len(loop_vars) + 1:
        raise TirLoweringError(f"index {expr} is not affine in {list(loop_vars)}")
    return [const_int(c) for c in coeffs[:-1]], tvm.sym.Analyzer().simplify(coeffs[-1])


def is_call(node, name: str | None = None) -> bool:
    if node_kind(node) != "Call":
        return False
    if name is None:
        return True
    op = str(node.op.name) if hasattr(node.op, "name") else ""
    if op == "tirx.call_extern":
        return str(node.args[0].value) == name
    return op == name


def strip_cast(expr):
    while node_kind(expr) == "Cast":
        expr = expr.value
    return expr


# =============================================================================================
# loop nests
class LoopNest:
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
        return [const_int(f.extent) for f in self.loops]


def perfect_nest(stmt) -> LoopNest | None:
    loops, predicates = [], []
    while True:
        kind = node_kind(stmt)
        if kind == "For":
            if const_int(stmt.min) != 0:
                return None
            loops.append(stmt)
            stmt = stmt.body
        elif kind == "SBlockRealize":
            pred = stmt.predicate
            if not (node_kind(pred) == "IntImm" and int(pred.value) == 1):
                predicates.append(pred)
            stmt = stmt.block
        elif kind == "SBlock":
            if len(stmt.alloc_buffers):
                return None
            stmt = stmt.body
        elif kind in ("BufferStore", "Evaluate"):
            return LoopNest(loops, predicates, stmt)
        else:
            return None
