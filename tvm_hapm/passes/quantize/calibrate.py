"""Calibration: the activation scales, from running the float function on sample inputs.

A copy of the float function that also returns every tensor whose scale is needed is compiled
once for llvm and run on each sample.  Its weights are parameters of that build, not constants:
a network quantized again with other weight values (pruned at another ratio, fine-tuned) reuses
the build (:data:`CALIBRATION_BUILDS` of them are kept), which is most of a calibration's cost.
Each scale is per-tensor symmetric,
``scale = max|x| / act_hi`` over all calibration samples (``act_hi`` is 127 for int8, 32767
for int16); with ``percentile=p`` the ``p``-th percentile of ``|x|`` over all calibration
elements replaces the maximum.  The samples are checked against the model's inputs first
(:func:`normalise_samples`).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from .graph import Graph, QuantizeError, Rebuilder, replace_function, tensor_dtype, tensor_shape

__all__ = [
    "CALIBRATION_BUILDS",
    "DEFAULT_PERCENTILE",
    "calibrate_scales",
    "clear_calibration_builds",
    "data_params",
    "normalise_samples",
]

#: Activation calibration percentile of |x| for ``quantize(percentile=...)``.  On the digits
#: ResNet-56 of ``benchmarks/hwflow.py`` the maximum gave int8 test top-1 97.8% against 99.1%
#: float, the 99.9th percentile 99.1% (and 94.7% instead of 90.0% after 80% HAPM pruning);
#: ResNet-20 is unchanged within one test image.  It is not the default: on the tiny test nets
#: it clips enough of their 8 calibration samples to raise their error (tests/test_quantize.py).
DEFAULT_PERCENTILE = 99.9


def data_params(func: relax.Function) -> list:
    """The parameters of ``func``, which must all be data inputs (weights are constants)."""
    params = list(func.params)
    num_input = func.attrs.get("num_input") if func.attrs is not None else None
    if num_input is not None and int(num_input) < len(params):
        extra = ", ".join(p.name for p in params[int(num_input) :])
        raise QuantizeError(
            f"the weights are function parameters ({extra}): quantize() needs them as "
            "constants (import with keep_params_in_input=False or bind them first, e.g. "
            "relax.transform.BindParams)"
        )
    return params


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def normalise_samples(calibration, params) -> list[list[np.ndarray]]:
    """Calibration samples as lists of arrays in parameter order, checked against the types."""
    if isinstance(calibration, (np.ndarray, dict)):
        calibration = [calibration]
    if not isinstance(calibration, (list, tuple)) or len(calibration) == 0:
        raise QuantizeError(
            "calibration must be a non-empty list of input arrays (one per sample) or of "
            "dicts mapping input names to arrays"
        )
    names = [p.name for p in params]
    samples = []
    for i, sample in enumerate(calibration):
        if isinstance(sample, dict):
            missing = [n for n in names if n not in sample]
            unknown = [k for k in sample if k not in names]
            if missing or unknown:
                raise QuantizeError(
                    f"calibration sample {i}: inputs {sorted(sample)} do not match the "
                    f"model's inputs {names}"
                )
            arrays = [sample[n] for n in names]
        elif isinstance(sample, (list, tuple)) and len(params) > 1:
            arrays = list(sample)
        else:
            arrays = [sample]
        if len(arrays) != len(params):
            raise QuantizeError(
                f"calibration sample {i}: {len(arrays)} input(s) given, the model takes "
                f"{len(params)} ({names}); use dicts name -> array for multi-input models"
            )
        checked = []
        for p, given in zip(params, arrays, strict=True):
            expected = tensor_shape(p)
            dtype = tensor_dtype(p)
            try:
                arr = np.asarray(given, dtype=dtype)
            except (TypeError, ValueError) as err:
                raise QuantizeError(
                    f"calibration sample {i}: input '{p.name}' is not a {dtype} array ({err})"
                ) from None
            if expected is not None and (
                arr.ndim != len(expected)
                or any(
                    isinstance(e, int) and e != d for e, d in zip(expected, arr.shape, strict=True)
                )
            ):
                raise QuantizeError(
                    f"calibration sample {i}: input '{p.name}' has shape "
                    f"{_fmt_shape(arr.shape)}, expected {_fmt_shape(expected)}"
                )
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = int(arr.size - np.isfinite(arr).sum())
                raise QuantizeError(
                    f"calibration sample {i}: input '{p.name}' has {bad} NaN or infinite value(s)"
                )
            checked.append(np.ascontiguousarray(arr))
        samples.append(checked)
    return samples


def calibrate_scales(
    mod, gvar, graph: Graph, calib_vars: list, *, samples, act_hi: int, percentile=None
) -> dict:
    """Scale (``max|x| / act_hi``) of every var in ``calib_vars`` over all samples; with
    ``percentile`` (e.g. 99.99) the ``percentile``-th percentile of ``|x|`` over all the
    samples' elements replaces the maximum."""
    rb = Rebuilder(graph)

    def body():
        for b in graph.bindings:
            rb.emit_binding(b)

    instrumented = rb.build(
        gvar.name_hint, body, lambda: relax.Tuple([rb.f(v) for v in calib_vars])
    )
    lifted, weights = _lift_weights(instrumented)
    try:
        vm = _calibration_vm(replace_function(mod, gvar, lifted))
    except Exception:  # an operator that needs its tensor argument constant: no reuse then
        exe = tvm.compile(replace_function(mod, gvar, instrumented), target="llvm")
        vm, weights = relax.VirtualMachine(exe, tvm.cpu()), []
    peak = np.zeros(len(calib_vars), np.float64)
    magnitudes = np.zeros((len(calib_vars), 2 * _EXP_RANGE + 1), np.int64)  # log2 histogram
    top: list = [np.zeros(0)] * len(calib_vars)  # percentile: the largest |x| seen so far
    count = [0] * len(calib_vars)
    for sample in samples:
        outs = vm[gvar.name_hint](*[tvm.runtime.tensor(a) for a in sample], *weights)
        for k in range(len(calib_vars)):
            val = outs[k].numpy()
            mag = np.abs(val)  # once per tensor and sample: the peak, the histogram, the percentile
            m = float(mag.max()) if val.size else 0.0
            if not math.isfinite(m):
                raise QuantizeError(
                    f"calibration produced non-finite values in {calib_vars[k].name}"
                )
            peak[k] = max(peak[k], m)
            nonzero = mag[mag != 0].astype(np.float64)
            exps = np.clip(np.frexp(nonzero)[1], -_EXP_RANGE, _EXP_RANGE) + _EXP_RANGE
            magnitudes[k] += np.bincount(exps, minlength=magnitudes.shape[1])
            count[k] += val.size
            if percentile is not None and val.size:
                # keep enough of the largest magnitudes to read the percentile at the end (the
                # shapes are static, so the final count is known from the first sample)
                final = val.size * len(samples)
                keep = int(math.ceil(final * (1.0 - percentile / 100.0))) + 2
                both = np.concatenate([top[k], mag.reshape(-1)])
                top[k] = np.partition(both, both.size - keep)[-keep:] if keep < both.size else both
    if percentile is not None:
        for k in range(len(calib_vars)):
            if count[k]:
                rank = (percentile / 100.0) * (count[k] - 1)  # numpy's linear percentile
                below = count[k] - top[k].size  # elements left out, all smaller
                vals = np.sort(top[k]).astype(np.float64)
                lo = int(math.floor(rank)) - below
                frac = rank - math.floor(rank)
                if lo >= 0:
                    hi = min(lo + 1, vals.size - 1)
                    peak[k] = float(vals[lo] + frac * (vals[hi] - vals[lo]))
    _warn_degenerate(calib_vars, peak, magnitudes, count, act_hi)
    # a tensor that is zero on every sample gets scale 1/act_hi (any scale represents it)
    return {v: (float(p) if p > 0 else 1.0) / act_hi for v, p in zip(calib_vars, peak, strict=True)}


#: Calibration builds kept for reuse (:func:`calibrate_scales`), the most recently used.
CALIBRATION_BUILDS = 4

#: The constants made parameters of a calibration build: tensors of at least this many
#: elements (the weights and biases).  Smaller ones stay constants, in the build's key.
LIFT_MIN_ELEMENTS = 2

_BUILDS: OrderedDict[int, list[tuple[tvm.IRModule, relax.VirtualMachine]]] = OrderedDict()


def clear_calibration_builds() -> None:
    """Forget the kept calibration builds."""
    _BUILDS.clear()


@relax.expr_functor.mutator
class _WeightLifter(relax.PyExprMutator):
    """Replaces each tensor constant of at least :data:`LIFT_MIN_ELEMENTS` elements by a new
    variable, recording ``(variable, value)`` in order of appearance (the value is the
    constant's own tensor, passed to the build as it is)."""

    def __init__(self):
        super().__init__()
        self.lifted: list[tuple[relax.Var, tvm.runtime.Tensor]] = []

    def visit_generic_const_(self, op):
        value = op.value
        if math.prod(value.shape) < LIFT_MIN_ELEMENTS:
            return op
        var = relax.Var(f"w{len(self.lifted)}", op.ty)
        self.lifted.append((var, value))
        return var


def _lift_weights(func: relax.Function) -> tuple[relax.Function, list]:
    """``func`` with its weight constants as trailing parameters, and their values."""
    lifter = _WeightLifter()
    body = lifter.visit_expr(func.body)
    params = list(func.params) + [var for var, _ in lifter.lifted]
    lifted = relax.Function(params, body, None, func.is_pure, func.attrs)
    if lifted.attrs is not None and "num_input" in lifted.attrs:
        lifted = lifted.without_attr("num_input")  # every parameter is an input of the build
    return lifted, [value for _, value in lifter.lifted]


def _calibration_vm(mod: tvm.IRModule) -> relax.VirtualMachine:
    """The llvm build of ``mod``, reused when a structurally equal module was built (the
    weights are parameters, so only the network's structure and small constants count)."""
    key = tvm_ffi.structural_hash(mod)
    for built, vm in _BUILDS.get(key, ()):
        if tvm_ffi.structural_equal(built, mod):
            _BUILDS.move_to_end(key)
            return vm
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    _BUILDS.setdefault(key, []).append((mod, vm))
    _BUILDS.move_to_end(key)
    while len(_BUILDS) > CALIBRATION_BUILDS:
        _BUILDS.popitem(last=False)
    return vm


#: Exponents of the |x| histogram that :func:`calibrate_scales` keeps per tensor.
_EXP_RANGE = 256

#: Fraction of a tensor's nonzero calibration values that its int8 scale rounds to zero above
#: which the calibration is reported as degenerate (an outlier sets the scale).  Trained CNNs
#: measure a few percent.
ZEROED_FRACTION = 0.9


def _warn_degenerate(calib_vars, peak, magnitudes, count, act_hi) -> None:
    """Warn about tensors whose calibration gives a useless int8 scale: zero on every sample,
    or a scale so large (an outlier) that most nonzero values quantize to zero."""
    for k, var in enumerate(calib_vars):
        if not count[k]:
            continue
        if peak[k] == 0:
            warnings.warn(
                f"calibration: tensor '{var.name}' is zero on every sample; its int8 scale is "
                f"arbitrary (is the calibration data all zeros?)",
                stacklevel=3,
            )
            continue
        # |x| < 2**(e) for a value in bin e; those with 2**e <= step / 2 round to zero.
        half_step = peak[k] / act_hi / 2
        exps = np.arange(magnitudes.shape[1]) - _EXP_RANGE
        zeroed = int(magnitudes[k][np.exp2(exps.astype(np.float64)) <= half_step].sum())
        nonzero = int(magnitudes[k].sum())
        if nonzero and zeroed > ZEROED_FRACTION * nonzero:
            warnings.warn(
                f"calibration: tensor '{var.name}' ranges up to |x| = {peak[k]:.3g}, so its int8 "
                f"scale rounds {zeroed / nonzero:.0%} of its nonzero values to zero (an "
                f"outlier in the calibration data?); check the data or calibrate on a "
                f"percentile",
                stacklevel=3,
            )
