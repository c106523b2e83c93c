"""The quantizer's view of one Relax function, and the rebuilder that re-emits it.

Shared by every stage of :mod:`tvm_hapm.passes.quantize`: :class:`QuantizeError`, the tensor
type helpers, :class:`Graph` (the bindings of a straight-line function with their users),
:class:`Rebuilder` (re-emits those bindings into a new function, tracking a float and an integer
version of every original var) and :func:`replace_function`.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from ...target.config import HardwareConfig
from .. import qops

__all__ = [
    "CONV_OP",
    "MATMUL_OP",
    "Graph",
    "QuantizeError",
    "Rebuilder",
    "int_list",
    "is_f32",
    "relax_functions",
    "replace_function",
    "tensor_dtype",
    "tensor_shape",
]


class QuantizeError(ValueError):
    """A model or calibration set that :func:`~tvm_hapm.passes.quantize.quantize` cannot handle;
    the message says why."""


# --------------------------------------------------------------------------------------------
# small IR helpers
# --------------------------------------------------------------------------------------------
#: Operator of a conv2d layer.
CONV_OP = "relax.nn.conv2d"
#: Operator of a dense layer (a matmul by a constant weight).
MATMUL_OP = "relax.matmul"


def _tensor_ty(expr):
    ty = getattr(expr, "ty", None)
    return ty if isinstance(ty, relax.TensorType) else None


def tensor_dtype(expr) -> str | None:
    """The dtype of a tensor-typed expression (None for any other)."""
    ty = _tensor_ty(expr)
    return str(ty.dtype) if ty is not None else None


def is_f32(expr) -> bool:
    """Whether ``expr`` is a float32 tensor."""
    return tensor_dtype(expr) == "float32"


def tensor_shape(expr) -> tuple | None:
    """Shape with ints for static dims and the symbolic expression otherwise (None if unknown)."""
    ty = _tensor_ty(expr)
    if ty is None:
        return None
    values = getattr(ty.shape, "values", None)
    if values is None:
        return None
    return tuple(int(v.value) if isinstance(v, tirx.IntImm) else v for v in values)


def int_list(values) -> list[int]:
    """``values`` (e.g. an attribute's array of IntImm) as Python ints."""
    return [int(v) for v in values]


def relax_functions(mod: tvm.IRModule):
    """The Relax functions of ``mod``."""
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            yield func


# --------------------------------------------------------------------------------------------
# graph view of one function
# --------------------------------------------------------------------------------------------
def _vars_in(expr, out: list) -> None:
    """Append the Relax vars ``expr`` reads (with multiplicity) to ``out``."""
    if isinstance(expr, relax.Var):
        out.append(expr)
    elif isinstance(expr, relax.Call):
        if isinstance(expr.op, relax.Var):
            out.append(expr.op)
        for arg in expr.args:
            _vars_in(arg, out)
    elif isinstance(expr, relax.Tuple):
        for f in expr.fields:
            _vars_in(f, out)
    elif isinstance(expr, relax.TupleGetItem):
        _vars_in(expr.tuple_value, out)
    elif isinstance(expr, (relax.SeqExpr, relax.If, relax.Function)):
        raise QuantizeError(
            f"unsupported control flow or nested function ({type(expr).__name__}) in the "
            "quantized function: quantize() handles straight-line graphs"
        )


class Graph:
    """Bindings of one function in order, with use counts.

    Parameters
    ----------
    mod : tvm.IRModule
        The module holding ``func`` (its PrimFuncs are looked up through ``mod``).
    func : relax.Function
        A straight-line function: a sequence of binding blocks, no control flow.

    Attributes
    ----------
    params : list of relax.Var
        The function's parameters.
    bindings : list of relax.Binding
        Every binding of every block, in order.
    output : relax.Expr
        The returned expression.
    users : dict
        Var -> indices in ``bindings`` of the bindings reading it (once per read).
    outputs : set
        The vars the returned expression reads.
    """

    def __init__(self, mod: tvm.IRModule, func: relax.Function):
        self.mod = mod
        self.func = func
        self.params = list(func.params)
        body = func.body
        if not isinstance(body, relax.SeqExpr):
            raise QuantizeError("the function body must be a sequence of bindings")
        self.bindings = [b for block in body.blocks for b in block.bindings]
        self.output = body.body
        self.users: dict = {}
        for i, b in enumerate(self.bindings):
            used: list = []
            _vars_in(b.value, used)
            for v in used:
                self.users.setdefault(v, []).append(i)
        out_vars: list = []
        _vars_in(self.output, out_vars)
        self.outputs = set(out_vars)

    def sole_user(self, var) -> int | None:
        """Index of the only binding reading ``var`` (once), if ``var`` is not an output."""
        users = self.users.get(var, [])
        if len(users) != 1 or var in self.outputs:
            return None
        return users[0]


# --------------------------------------------------------------------------------------------
# rebuilding
# --------------------------------------------------------------------------------------------
class Rebuilder:
    """Re-emits bindings of a graph into a new function, tracking float and integer versions
    of every original var.

    Parameters
    ----------
    graph : Graph
        The function whose bindings are re-emitted.
    cfg : HardwareConfig, optional
        The accelerator config (its activation dtype); needed only by :meth:`q`.
    scales : dict, optional
        Var -> activation scale; needed only by :meth:`q`.
    """

    def __init__(self, graph: Graph, cfg: HardwareConfig | None = None, scales=None):
        self.g = graph
        self.cfg = cfg
        self.scales = scales or {}
        self.bb = relax.BlockBuilder()
        self.fmap: dict = {}  # original var -> float/other expr in the new function
        self.qmap: dict = {}  # original var -> (integer var, scale)

    # ---------------------------------------------------------------- value access
    def f(self, var):
        """The float version of ``var`` in the new function (dequantized on first use)."""
        if var in self.fmap:
            return self.fmap[var]
        if var in self.qmap:
            q, s = self.qmap[var]
            self.fmap[var] = qops.emit_dequantize(self.bb, q, s)
            return self.fmap[var]
        raise QuantizeError(f"internal error: {var.name} used before its definition")

    def q(self, var):
        """``(integer var, scale)`` of ``var`` in the new function (quantized on first use)."""
        if var not in self.qmap:
            s = self.scales[var]
            self.qmap[var] = (qops.emit_quantize(self.bb, self.f(var), s, self.cfg.act_dtype), s)
        return self.qmap[var]

    def sub(self, expr):
        """``expr`` with every var replaced by its float version in the new function."""
        if isinstance(expr, relax.Var):
            return self.f(expr)
        if isinstance(expr, relax.Call):
            args = [self.sub(a) for a in expr.args]
            if all(a.same_as(b) for a, b in zip(args, expr.args, strict=True)):
                return expr
            return relax.Call(expr.op, args, expr.attrs, expr.ty_args)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self.sub(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(self.sub(expr.tuple_value), expr.index)
        return expr

    def emit_binding(self, b) -> None:
        """Re-emit the original binding ``b`` unchanged (on the float versions of its vars)."""
        if isinstance(b, relax.MatchCast):
            self.fmap[b.var] = self.bb.match_cast(self.sub(b.value), b.var.ty)
        else:
            self.fmap[b.var] = self.bb.emit(self.sub(b.value))

    def build(self, name: str, emit_body, outputs) -> relax.Function:
        """Build a function with the original params; ``emit_body()`` emits the bindings and
        ``outputs()`` returns the expression to return."""
        func = self.g.func
        attrs = dict(func.attrs) if func.attrs is not None else {}
        private = "global_symbol" not in attrs
        attrs.pop("global_symbol", None)
        for p in self.g.params:
            self.fmap[p] = p
        with self.bb.function(name, self.g.params, attrs=attrs, private=private):
            with self.bb.dataflow():
                emit_body()
                gv = self.bb.emit_output(outputs())
            self.bb.emit_func_output(gv)
        return self.bb.get()[name]


def replace_function(mod: tvm.IRModule, gvar, func) -> tvm.IRModule:
    """``mod`` with ``gvar`` bound to ``func`` and PrimFuncs no Relax function calls dropped."""
    out = mod.clone()
    out[gvar] = func
    used = set()
    for f in relax_functions(out):
        used.update(g.name_hint for g in relax.analysis.all_global_vars(f))
    for g, f in list(out.functions.items()):
        if isinstance(f, tirx.PrimFunc) and g.name_hint not in used:
            del out[g]
    return out
