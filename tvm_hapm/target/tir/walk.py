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


# =============================================================================================
# evaluating index expressions
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


class Evaluator:
    """Integer expressions of loop variables, compiled once to Python and cached per node."""

    def __init__(self):
        self.env: dict[int, int] = {}
        self._cache: dict[int, object] = {}

    def _source(self, expr) -> str:
        kind = node_kind(expr)
        if kind == "IntImm":
            return str(int(expr.value))
        if kind == "Var":
            return f"env[{node_key(expr)}]"
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
        return int(self.compiled(expr)(self.env))

    def compiled_tuple(self, exprs):
        """``exprs`` as one Python function of the loop-variable environment that returns
        their values as a tuple (a DMA's nine operands: one call instead of nine)."""
        return eval(f"lambda env: ({', '.join(self._source(e) for e in exprs)},)")

    def compiled(self, expr):
        """``expr`` as a Python function of the loop-variable environment (for the hot paths
        that keep it: one call per evaluation instead of a lookup and a call)."""
        k = node_key(expr)
        hit = self._cache.get(k)
        if hit is None:
            fn = eval(f"lambda env: {self._source(expr)}")
            hit = self._cache[k] = (fn, expr)  # keep the node alive: its handle is the key
        return hit[0]
