"""The quantized Relax module run with PyTorch operators, bit for bit as TVM's llvm build of it.

Measuring the int8 accuracy of a model on 10,000 test images through TVM's llvm build takes
minutes per model (ResNet-20: ~50 images/s, its integer convolutions are unscheduled loop nests);
a benchmark deploys dozens of models.  :class:`QuantizedRunner` walks the ``main`` function of a
module from :func:`tvm_hapm.quantize` binding by binding and runs each operator in PyTorch with
the integer semantics of TVM's build:

* integer ``conv2d`` / ``matmul`` run as float convolutions of the integer values, which is exact
  whenever every partial sum is an integer of magnitude below the float's 2^24 (float32) or 2^53
  (float64): the runner checks that bound per layer from the weights and the input dtype and
  picks float32 or float64 accordingly; the result is cast back to the output integer type;
* ``add``, ``multiply``, ``right_shift``, ``clip``, ``sum`` and ``astype`` act on tensors of the
  module's integer dtypes, with the same wrap-around and arithmetic shift;
* ``round`` rounds half to even, as LLVM's ``nearbyint`` does.

The batch is free: the runner accepts any batch size (reshapes take it from their input).  The
tests compare it with TVM's llvm build (which the accelerator equals bit for bit) on real images.
An operator outside this set raises :class:`UnsupportedOperatorError` when the runner is built, so a
caller can fall back to TVM.
"""

from __future__ import annotations

import numpy as np
import torch
import tvm
from torch.nn import functional as F
from tvm import relax, tirx

__all__ = ["QuantizedRunner", "UnsupportedOperatorError"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# largest magnitude of an integer input of each dtype (bounds the products of a reduction)
_INT_MAX = {torch.int8: 128, torch.int16: 32768, torch.int32: 2**31, torch.uint8: 255}
_EXACT_F32 = 2**24
_EXACT_F64 = 2**53


class UnsupportedOperatorError(NotImplementedError):
    """The module holds an operator (or a form of one) the runner does not implement."""


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _dtype_of(expr) -> torch.dtype:
    dtype = str(expr.ty.dtype)
    if dtype not in _DTYPES:
        raise UnsupportedOperatorError(f"dtype {dtype}")
    return _DTYPES[dtype]


def _const(expr) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(expr.value.numpy()))


def _prim(expr) -> float | int:
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    if isinstance(expr, tirx.FloatImm):
        return float(expr.value)
    if isinstance(expr, relax.PrimValue):
        return _prim(expr.value)
    raise UnsupportedOperatorError(f"operand {type(expr).__name__}")


def _same_shape(a, b) -> bool:
    sa, sb = getattr(a.ty, "shape", None), getattr(b.ty, "shape", None)
    if sa is None or sb is None or not hasattr(sa, "values") or not hasattr(sb, "values"):
        return False
    return [str(v) for v in sa.values] == [str(v) for v in sb.values]


def _exact_float(x_dtype: torch.dtype, weight: torch.Tensor, reduction: int) -> torch.dtype:
    """float32 when every partial sum of ``reduction`` products is exactly representable in it,
    else float64 (or an error when not even float64 is exact)."""
    if x_dtype not in _INT_MAX:
        raise UnsupportedOperatorError(f"integer reduction over {x_dtype} inputs")
    bound = _INT_MAX[x_dtype] * int(weight.abs().max()) * reduction
    if bound < _EXACT_F32:
        return torch.float32
    if bound < _EXACT_F64:
        return torch.float64
    raise UnsupportedOperatorError(f"a reduction whose partial sums reach {bound} (> 2^53)")


class QuantizedRunner:
    """Run ``mod[func_name]`` (a quantized Relax function with one input and one output) with
    PyTorch; see the module docstring.

    Parameters
    ----------
    mod : tvm.IRModule
        Output of :func:`tvm_hapm.quantize` (before ``tvm.compile``).
    func_name : str
        The function to run.

    Raises
    ------
    UnsupportedOperatorError
        An operator or operand form the runner does not implement.
    """

    def __init__(self, mod: tvm.IRModule, func_name: str = "main"):
        func = mod[func_name]
        if len(func.params) != 1:
            raise UnsupportedOperatorError(f"{len(func.params)} inputs (one is supported)")
        self.input = func.params[0]
        bindings = []
        for block in func.body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    raise UnsupportedOperatorError(f"binding {type(b).__name__}")
                bindings.append(b)
        self.output = func.body.body
        if not isinstance(self.output, relax.Var):
            kind = type(self.output).__name__
            raise UnsupportedOperatorError(f"output {kind} (one tensor is supported)")
        # the last binding reading each variable: there its buffer may be reused in place
        last_use = {}
        for k, b in enumerate(bindings):
            for arg in getattr(b.value, "args", [b.value]):
                if isinstance(arg, relax.Var):
                    last_use[arg] = k
        self.steps = []  # (var, callable(env) -> tensor)
        for k, b in enumerate(bindings):
            self._dying = {v for v, at in last_use.items() if at == k and v != self.output}
            self.steps.append((b.var, self._compile(b.var, b.value)))

    # -- building ---------------------------------------------------------------------------
    def _operand(self, expr):
        """A function of the environment giving the value of ``expr``."""
        if isinstance(expr, relax.Var):
            return lambda env: env[expr]
        if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
            value = _const(expr)
            return lambda env: value
        scalar = _prim(expr)
        return lambda env: scalar

    def _compile(self, var, value):
        if isinstance(value, relax.Var):
            return lambda env: env[value]
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            raise UnsupportedOperatorError(f"expression {type(value).__name__}")
        op = str(value.op.name)
        args = [self._operand(a) for a in value.args if not isinstance(a, relax.ShapeExpr)]
        attrs = value.attrs
        elementwise = {
            "relax.add": torch.add,
            "relax.subtract": torch.sub,
            "relax.multiply": torch.mul,
            "relax.maximum": torch.maximum,
            "relax.minimum": torch.minimum,
            "relax.right_shift": torch.bitwise_right_shift,
            "relax.left_shift": torch.bitwise_left_shift,
        }
        out_dtype = _dtype_of(var)
        if op in elementwise:
            fn = elementwise[op]
            a, b = args
            # in place into the first operand's buffer when this is its last use and it already
            # has the result's type and shape (the requantization chain: 4 fewer allocations)
            x0 = value.args[0]
            in_place = (
                x0 in self._dying and x0 != self.input and _dtype_of(x0) == out_dtype
                and _same_shape(x0, var)
            )  # fmt: skip
            if not isinstance(value.args[1], relax.Var | tvm.ir.GenericConst):
                scalar = torch.tensor(_prim(value.args[1]), dtype=out_dtype)

                def b(env):
                    return scalar

            def binary(env):
                x, y = a(env), b(env)
                if in_place:
                    return fn(x, y, out=x)
                return fn(x, y).to(out_dtype)

            return binary
        if op == "relax.divide":
            a, b = args
            if out_dtype not in (torch.float32, torch.float64):
                raise UnsupportedOperatorError("integer divide")
            return lambda env: torch.div(a(env), b(env))
        if op == "relax.round":
            (a,) = args
            return lambda env: torch.round(a(env))  # half to even, as LLVM's nearbyint
        if op == "relax.nn.relu":
            (a,) = args
            return lambda env: torch.relu(a(env))
        if op == "relax.clip":
            a = args[0]
            lo, hi = _prim(value.args[1]), _prim(value.args[2])
            if value.args[0] in self._dying and value.args[0] != self.input:
                return lambda env: torch.clamp_(a(env), lo, hi)
            return lambda env: torch.clamp(a(env), lo, hi)
        if op == "relax.astype":
            (a,) = args
            return lambda env: a(env).to(out_dtype)
        if op == "relax.reshape":
            (a,) = args
            shape = _ints(value.args[1].values)

            def reshape(env):
                x = a(env)
                return x.reshape(x.shape[0], *shape[1:])  # the batch is the input's

            return reshape
        if op == "relax.permute_dims":
            (a,) = args
            axes = _ints(attrs.axes) if attrs.axes is not None else None
            return lambda env: a(env).permute(*axes) if axes else a(env).T
        if op in ("relax.sum", "relax.mean"):
            return self._reduce(op, args[0], attrs, out_dtype)
        if op == "relax.nn.conv2d":
            return self._conv2d(value, args[0], out_dtype)
        if op == "relax.matmul":
            return self._matmul(value, args[0], out_dtype)
        if op in ("relax.nn.max_pool2d", "relax.nn.avg_pool2d"):
            return self._pool(op, args[0], attrs, out_dtype)
        raise UnsupportedOperatorError(f"operator {op}")

    @staticmethod
    def _reduce(op, a, attrs, out_dtype):
        axes = _ints(attrs.axis) if attrs.axis is not None else None
        keep = bool(attrs.keepdims)
        if op == "relax.sum":

            def total(env):
                x = a(env)
                # integers summed in int64 (exact), then wrapped to the output type as TVM's
                # int32 sum wraps
                x = x if x.is_floating_point() else x.to(torch.int64)
                return torch.sum(x, dim=axes, keepdim=keep).to(out_dtype)

            return total
        if not out_dtype.is_floating_point:
            raise UnsupportedOperatorError("integer mean")
        return lambda env: torch.mean(a(env), dim=axes, keepdim=keep)

    @staticmethod
    def _conv2d(call, a, out_dtype):
        attrs = call.attrs
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
        if layouts != ("NCHW", "OIHW", "NCHW"):
            raise UnsupportedOperatorError(f"conv2d layouts {layouts}")
        if not isinstance(call.args[1], tvm.ir.GenericConst):
            raise UnsupportedOperatorError("conv2d with a computed weight")
        w = _const(call.args[1])
        pad = _ints(attrs.padding)
        top, left, bottom, right = pad if len(pad) == 4 else (pad[0], pad[1], pad[0], pad[1])
        stride, dil, groups = _ints(attrs.strides), _ints(attrs.dilation), int(attrs.groups)
        x_dtype = _dtype_of(call.args[0])
        if x_dtype.is_floating_point:
            wf = w.to(x_dtype)
            return lambda env: F.conv2d(F.pad(a(env), (left, right, top, bottom)), wf, None,
                                        stride, 0, dil, groups).to(out_dtype)  # fmt: skip
        ft = _exact_float(x_dtype, w, int(w.shape[1] * w.shape[2] * w.shape[3]))
        wf = w.to(ft)
        symmetric = top == bottom and left == right

        def conv(env):
            x = a(env).to(ft)
            if symmetric:
                return F.conv2d(x, wf, None, stride, (top, left), dil, groups).to(out_dtype)
            x = F.pad(x, (left, right, top, bottom))
            return F.conv2d(x, wf, None, stride, 0, dil, groups).to(out_dtype)

        return conv

    @staticmethod
    def _matmul(call, a, out_dtype):
        if not isinstance(call.args[1], tvm.ir.GenericConst):
            raise UnsupportedOperatorError("matmul with a computed operand")
        w = _const(call.args[1])
        x_dtype = _dtype_of(call.args[0])
        if x_dtype.is_floating_point:
            wf = w.to(x_dtype)
            return lambda env: torch.matmul(a(env), wf).to(out_dtype)
        ft = _exact_float(x_dtype, w, int(w.shape[0]))
        wf = w.to(ft)
        return lambda env: torch.matmul(a(env).to(ft), wf).to(out_dtype)

    @staticmethod
    def _pool(op, a, attrs, out_dtype):
        if str(attrs.layout) != "NCHW" or bool(attrs.ceil_mode):
            raise UnsupportedOperatorError(f"{op} with layout {attrs.layout} / ceil_mode")
        k, s, d = _ints(attrs.pool_size), _ints(attrs.strides), _ints(attrs.dilation)
        top, left, bottom, right = _ints(attrs.padding)
        if op == "relax.nn.avg_pool2d":
            raise UnsupportedOperatorError(op)

        def pool(env):
            x = a(env)
            # int8 / int16 / int32 values are exact in float64; padding never wins a max
            xf = F.pad(x.to(torch.float64), (left, right, top, bottom), value=float("-inf"))
            return F.max_pool2d(xf, k, s, 0, d).to(out_dtype)

        return pool

    # -- running ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x) -> torch.Tensor:
        """Output for input ``x`` (a NumPy array or tensor of the input's dtype, any batch)."""
        if isinstance(x, np.ndarray):
            x = np.ascontiguousarray(x)
        env = {self.input: torch.as_tensor(x)}
        for var, fn in self.steps:
            env[var] = fn(env)
        return env[self.output]

    def predict(self, x, batch_size: int = 32) -> np.ndarray:
        """Outputs for the NumPy inputs ``x``, computed in batches (small ones keep the int64
        requantization tensors in cache: 32 runs ResNet-20 ~5x faster than 500)."""
        outs = [self(x[s : s + batch_size]).numpy() for s in range(0, len(x), batch_size)]
        return np.concatenate(outs)
