"""Normalisation: the form of a float function the quantizer (and filter pruning) analyse.

``DecomposeOpsForInference`` (batch norm becomes subtract/divide/multiply/add by per-channel
constants), constant folding (NumPy for the few ops batch norm leaves, then ``FoldConstant``),
``CanonicalizeBindings``, ``DeadCodeElimination``.  The per-channel affine ops left after a
conv2d/matmul are folded into its weights by the planner
(:mod:`tvm_hapm.passes.quantize.plan`).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from ..relax_util import const_array, op_name, static_shape
from .graph import Graph, QuantizeError, Rebuilder, replace_function, tensor_dtype

__all__ = ["normalise"]

_NUMPY_FOLD = {
    "relax.add": np.add,
    "relax.subtract": np.subtract,
    "relax.multiply": np.multiply,
    "relax.divide": np.divide,
    "relax.power": np.power,
    "relax.maximum": np.maximum,
    "relax.minimum": np.minimum,
    "relax.where": np.where,
    "relax.sqrt": np.sqrt,
    "relax.rsqrt": lambda a: (1 / np.sqrt(a)).astype(a.dtype),
    "relax.negative": np.negative,
    "relax.isnan": np.isnan,
}


def _eval_const(call, var) -> np.ndarray | None:
    """Evaluate a call on constants with NumPy when it is one of the few ops batch norm
    decomposition and the ONNX importer leave behind (None otherwise)."""
    op = op_name(call)
    shape, dtype = static_shape(var), tensor_dtype(var)
    if op is None or shape is None or dtype is None:
        return None
    args = [const_array(a) for a in call.args]
    if not args or args[0] is None:
        return None
    with np.errstate(all="ignore"):
        if op in _NUMPY_FOLD and all(a is not None for a in args):
            out = np.asarray(_NUMPY_FOLD[op](*args))
        elif op == "relax.expand_dims":
            ndim = args[0].ndim + len(call.attrs.axis)
            out = np.expand_dims(args[0], tuple(int(a) % ndim for a in call.attrs.axis))
        elif op == "relax.permute_dims":
            axes = call.attrs.axes
            out = np.transpose(args[0], None if axes is None else [int(a) for a in axes])
        elif op in ("relax.reshape", "relax.flatten") and args[0].size == math.prod(shape):
            out = args[0].reshape(shape)
        else:
            return None
    if out.shape != shape or str(out.dtype) != dtype:
        return None
    return out.copy(order="C")  # (ascontiguousarray would make a 0-d array 1-d)


def _fold_numpy(mod: tvm.IRModule, gvar) -> tvm.IRModule:
    """Fold constant subexpressions with NumPy and drop inference-time dropouts.

    ``FoldConstant`` compiles one kernel per folded op (about 40 ms each), which made the
    normalisation of a batch-norm network slower than compiling it; the ops batch norm leaves
    behind are evaluated here instead and ``FoldConstant`` only sees what is left.
    ``dropout(x)[0]`` (ONNX Dropout) is ``x`` at inference; the dropout itself becomes dead.
    """
    func = mod[gvar]
    try:
        graph = Graph(mod, func)
    except QuantizeError:
        return mod
    if not any(
        isinstance(b, relax.VarBinding) and op_name(b.value) is not None for b in graph.bindings
    ):
        return mod
    rb = Rebuilder(graph)

    dropouts = {
        b.var: b.value.args[0]
        for b in graph.bindings
        if isinstance(b, relax.VarBinding) and op_name(b.value) == "relax.nn.dropout"
    }

    def body():
        for b in graph.bindings:
            value = b.value
            if (
                isinstance(value, relax.TupleGetItem)
                and value.index == 0
                and value.tuple_value in dropouts
            ):
                rb.fmap[b.var] = rb.sub(dropouts[value.tuple_value])
                continue
            if isinstance(b, relax.VarBinding):
                value = rb.sub(b.value)
                folded = _eval_const(value, b.var) if isinstance(value, relax.Call) else None
                if folded is not None:
                    rb.fmap[b.var] = relax.const(folded, tensor_dtype(b.var))
                    continue
            rb.emit_binding(b)

    return replace_function(mod, gvar, rb.build(gvar.name_hint, body, lambda: rb.sub(graph.output)))


def normalise(mod: tvm.IRModule, gvar) -> tvm.IRModule:
    """The form of ``mod[gvar]`` the quantizer (and filter pruning) analyse: batch norm
    decomposed for inference, constant subexpressions folded (in NumPy, then ``FoldConstant``),
    bindings canonicalised and dead code removed."""
    mod = relax.transform.DecomposeOpsForInference()(mod)
    mod = _fold_numpy(mod, gvar)
    return tvm.transform.Sequential(
        [
            relax.transform.FoldConstant(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.DeadCodeElimination(),
        ]
    )(mod)
