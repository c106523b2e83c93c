"""What the passes read off Relax expressions: operator names, constants, static shapes, the TIR
of ``from_onnx``'s clip bounds; and the module-pass wrapper they share."""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx

__all__ = ["const_array", "minmax_prim", "module_pass", "op_name", "static_shape"]


def op_name(expr) -> str | None:
    """``"relax.nn.conv2d"`` for a call of a Relax operator, else None."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def const_array(expr) -> np.ndarray | None:
    """The value of a Relax constant as a NumPy array, else None."""
    if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
        return expr.value.numpy()
    return None


def static_shape(expr) -> tuple[int, ...] | None:
    """The shape of a tensor-typed expression when every dimension is a constant, else None."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType):
        return None
    values = getattr(ty.shape, "values", None)
    if values is None or not all(isinstance(v, tirx.IntImm) for v in values):
        return None
    return tuple(int(v.value) for v in values)


def minmax_prim(prim) -> tuple[str, float | None] | None:
    """Recognise the TIR of ``topi.maximum/minimum(x, scalar)`` that from_onnx emits for Clip.

    Returns ``("max" | "min", embedded constant or None)``; None for any other PrimFunc.
    """
    if not isinstance(prim, tirx.PrimFunc):
        return None
    stores: list = []
    tvm_ffi.structural_walk(prim.body, (tirx.BufferStore, stores.append))
    if len(stores) != 1:
        return None
    value = stores[0].value
    kind = "max" if isinstance(value, tirx.Max) else "min" if isinstance(value, tirx.Min) else None
    if kind is None:
        return None
    loads = [v for v in (value.a, value.b) if isinstance(v, tvm.ir.expr.TensorLoad)]
    imms = [v for v in (value.a, value.b) if isinstance(v, (tirx.IntImm, tirx.FloatImm))]
    # the bound is read at constant indices (B[()] or B[0]), the tensor at the loop indices
    fixed = [all(isinstance(i, tirx.IntImm) for i in v.indices) for v in loads]
    if len(loads) == 2 and sorted(fixed) == [False, True]:
        return kind, None
    if len(loads) == 1 and len(imms) == 1 and not fixed[0]:
        return kind, float(imms[0].value)
    return None


def module_pass(fn, name: str) -> tvm.transform.Pass:
    """A module pass (opt level 0) named ``name`` that returns ``fn(mod)``."""
    return tvm.transform.module_pass(lambda mod, _ctx: fn(mod), opt_level=0, name=name)
