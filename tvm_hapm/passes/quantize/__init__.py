"""Post-training quantization of a float Relax CNN into the hapm_fpga integer vocabulary.

:func:`quantize` turns a float32 Relax module (typically from
``tvm.relax.frontend.onnx.from_onnx``) into a module with the same signature (float32 in,
float32 out) whose layers are written with the integer operator chains of
:mod:`tvm_hapm.passes.qops`, so that the partitioner can offload them and TVM's llvm build of
the same module is a bit-exact reference of the accelerator.

Scheme
------
* Activations: per-tensor symmetric, ``scale = max|x| / act_hi`` over all calibration samples
  (``act_hi`` is 127 for int8, 32767 for int16); with ``percentile=p`` the ``p``-th percentile
  of ``|x|`` over all calibration elements replaces the maximum.
* Weights: per-output-channel symmetric, ``scale_w[c] = max|W[c]| / weight_hi``; for wide
  configs the scale of a channel is enlarged when its worst-case int32 accumulator
  (``2**(act_bits-1) * sum|Wq[c]| + |bias_q[c]|``) could overflow (never the case for int8).
* Bias: ``round(b / (s_in * s_w[c]))`` in int32; requantization multipliers come from
  :func:`qops.choose_multiplier` applied to ``s_in * s_w / s_out``.
* Residual adds (``fuse_residual=True``, the default): when one operand of an add is a conv2d
  output read by nothing else (no activation in between), the shortcut ``s`` enters that
  conv's int32 accumulator with an integer weight per channel, ``K[c] = floor(s_s / (s_in *
  s_w[c]))``, and the weight scale is widened to ``s_s / (s_in * K[c])`` (at most
  ``1 / RESIDUAL_MIN_K`` wider) so that the shortcut is represented exactly; one requantization
  to the add's output scale follows (``qops.emit_conv2d_residual``).  On hapm_fpga this costs
  an accumulator load and one ALU pass in the conv instead of a separate element-wise program
  (eight passes per element).  Where ``K`` would be below ``RESIDUAL_MIN_K`` or the
  accumulator could overflow, the add stays separate.

Pipeline
--------
1. Normalise (:mod:`~tvm_hapm.passes.quantize.fold`): ``DecomposeOpsForInference`` (batch norm
   becomes subtract/divide/multiply/add by per-channel constants), constant folding (NumPy for
   the few ops batch norm leaves, then ``FoldConstant``), ``CanonicalizeBindings``,
   ``DeadCodeElimination``.  Batch norm and conv/Gemm bias adds are folded (in float64) into
   the weights and bias of the preceding conv2d/matmul while planning, by absorbing the chain
   of per-channel affine ops after it.
2. Plan (:mod:`~tvm_hapm.passes.quantize.plan`): every binding becomes an accelerated layer
   (conv2d, dense, average pooling as an all-ones depthwise conv, global average pooling,
   residual add, a leftover per-channel affine chain on an integer tensor as a depthwise 1x1
   conv; each with its trailing ReLU/ReLU6/Clip folded into the requantization bounds), a
   scale-preserving integer op (max pooling, reshape-like ops, an unfused clip), or a host
   float op (dequantize -> float op -> quantize where an integer consumer needs it).
3. Calibrate (:mod:`~tvm_hapm.passes.quantize.calibrate`): a copy of the float function that
   also returns every tensor whose scale is needed is compiled once for llvm and run on each
   sample.
4. Emit (:mod:`~tvm_hapm.passes.quantize.emit`) the quantized function in one dataflow block.

:mod:`~tvm_hapm.passes.quantize.graph` holds what the stages share: :class:`QuantizeError`,
the graph view of a function and the rebuilder that re-emits it.
"""

from __future__ import annotations

import warnings

import tvm
from tvm import relax

from ...target.config import HardwareConfig, get_config
from ..relax_util import module_pass, op_name
from .calibrate import DEFAULT_PERCENTILE, calibrate_scales, data_params, normalise_samples
from .emit import RESIDUAL_MIN_K, Emitter
from .fold import normalise
from .graph import (
    CONV_OP,
    MATMUL_OP,
    Graph,
    QuantizeError,
    relax_functions,
    replace_function,
    tensor_dtype,
    tensor_shape,
)
from .plan import DENSE_NEEDS_WEIGHT, LAYER_KINDS, Planner, fuse_residuals

__all__ = [
    "QuantizeError",
    "FLOAT_MODEL_MESSAGE",
    "DEFAULT_PERCENTILE",
    "normalise",
    "RESIDUAL_MIN_K",
    "quantize",
    "Quantize",
    "is_quantized",
    "integer_layers",
    "float_layer_ops",
    "has_float_compute",
]

#: Message of the compiler when it is given a float model.
FLOAT_MODEL_MESSAGE = (
    "hapm_fpga runs integer layers: quantize the model first with "
    "tvm_hapm.quantize(mod, calibration=[...])"
)


def _calls(func: relax.Function) -> list:
    found = []

    def visit(node):
        if isinstance(node, relax.Call) and op_name(node) in (CONV_OP, MATMUL_OP):
            found.append(node)

    relax.analysis.post_order_visit(func, visit)
    return found


def is_quantized(mod: tvm.IRModule) -> bool:
    """Whether ``mod`` has an integer conv2d or matmul accumulating in int32.

    Parameters
    ----------
    mod : tvm.IRModule
        Any Relax module.

    Returns
    -------
    bool
        True for the output of :func:`quantize` (and any model with such layers).
    """
    return bool(integer_layers(mod))


def integer_layers(mod: tvm.IRModule) -> list[tuple[str, str, tuple]]:
    """The integer conv2d and matmul calls of ``mod`` that accumulate in int32 (the layers
    :func:`quantize` makes), as ``(operator, data dtype, data shape)``.

    Parameters
    ----------
    mod : tvm.IRModule
        Any Relax module; after lowering for hapm_fpga, the layers left are the host's.

    Returns
    -------
    list of tuple
    """
    found = []
    for func in relax_functions(mod):
        for call in _calls(func):
            data = tensor_dtype(call.args[0]) or ""
            if tensor_dtype(call) == "int32" and data.startswith(("int", "uint")):
                shape = tensor_shape(call.args[0])
                found.append((op_name(call), data, tuple(shape) if shape else ()))
    return found


def float_layer_ops(mod: tvm.IRModule) -> list[str]:
    """The float conv2d calls and float matmuls with a weight operand of ``mod``: the layers
    :func:`quantize` turns into integer ones, which the accelerator cannot run as floats.

    A matmul counts when one of its operands is a constant or a function parameter (a layer
    with weights); a matmul of two computed activations is not a layer :func:`quantize` can
    turn into an integer one, so it stays on the host and does not count.

    Parameters
    ----------
    mod : tvm.IRModule
        Any Relax module.

    Returns
    -------
    list of str
        The operator name of each such call (empty for a quantized model); the compiler refuses
        a model with any, with :data:`FLOAT_MODEL_MESSAGE`.
    """
    found = []
    for func in relax_functions(mod):
        params = list(func.params)
        for call in _calls(func):
            if not (tensor_dtype(call) or "").startswith(("float", "bfloat")):
                continue
            if op_name(call) == CONV_OP or any(
                isinstance(arg, tvm.ir.Constant) or any(arg.same_as(p) for p in params)
                for arg in call.args[:2]
            ):
                found.append(op_name(call))
    return found


def has_float_compute(mod: tvm.IRModule) -> bool:
    """Whether ``mod`` has a float layer (:func:`float_layer_ops`)."""
    return bool(float_layer_ops(mod))


def quantize(
    mod: tvm.IRModule,
    calibration,
    config: HardwareConfig | str | None = None,
    *,
    func_name: str = "main",
    report: list | None = None,
    fuse_residual: bool = True,
    percentile: float | None = None,
) -> tvm.IRModule:
    """Post-training quantization of a float32 Relax model for hapm_fpga.

    Parameters
    ----------
    mod : tvm.IRModule
        Float model, e.g. from ``tvm.relax.frontend.onnx.from_onnx`` with weights as constants.
    calibration : list of numpy.ndarray or list of dict
        Representative inputs, one entry per sample, with the batch dimension the model
        expects; a list of dicts ``input name -> array`` for multi-input models.
    config : HardwareConfig or str, optional
        Accelerator config (``act_bits``/``weight_bits`` choose int8 or int16); resolved with
        :func:`tvm_hapm.target.config.get_config`.
    func_name : str
        The function to quantize.
    report : list, optional
        Receives one line per op: ``"... : quantized (...)"`` or ``"...: host float (reason)"``.
    fuse_residual : bool
        Fuse residual adds into the conv2d producing one operand (see the module docstring);
        False keeps every add a separate layer.
    percentile : float or None
        Calibrate each activation scale on this percentile of ``|x|`` over all calibration
        elements instead of the maximum: rare outliers then saturate rather than coarsen every
        other value.  None (the default) uses the maximum; :data:`DEFAULT_PERCENTILE` is the
        value the HW-Flow benchmark uses.

    Returns
    -------
    tvm.IRModule
        A module with the same signature whose layers are :mod:`qops` integer chains and whose
        other ops run in float on the host between dequantize/quantize pairs.  A model with no
        conv2d/matmul/pooling layer to quantize is returned unchanged (with a warning).

    Raises
    ------
    QuantizeError
        If the model is already quantized, the calibration data does not fit the model's
        inputs, or the model has a structure quantize() cannot handle.
    """
    if not isinstance(mod, tvm.IRModule):
        raise QuantizeError(f"quantize() takes a tvm.IRModule, got {type(mod).__name__}")
    cfg = get_config(config)
    if func_name not in mod or not isinstance(mod[func_name], relax.Function):
        raise QuantizeError(f"the module has no Relax function {func_name!r}")
    if percentile is not None and not 0.0 < float(percentile) <= 100.0:
        raise QuantizeError(f"percentile must be in (0, 100], got {percentile}")
    if is_quantized(mod):
        raise QuantizeError(
            "the model is already quantized (it has an integer conv2d/matmul accumulating in "
            "int32); quantize() takes a float32 model"
        )
    norm = normalise(mod, mod.get_global_var(func_name))
    gvar = norm.get_global_var(func_name)
    func = norm[gvar]
    params = data_params(func)
    graph = Graph(norm, func)
    planner = Planner(graph)
    steps = planner.run()
    if fuse_residual:
        fuse_residuals(steps, graph)
    samples = normalise_samples(calibration, params)

    _warn_float_layers(steps, report)
    accel = [s for s in steps if s.kind in (*LAYER_KINDS, "fused")]
    if not accel:
        msg = (
            f"quantize(): nothing to quantize in {func_name!r} (no float32 conv2d, matmul with "
            "constant weights or pooling layer); the model is returned unchanged"
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
        if report is not None:
            report.append(f"warning: {msg}")
        return mod.clone()

    # every scale a step reads: accelerated outputs and the float tensors they quantize
    needed = set()
    for s in accel:
        needed.add(s.out)
        needed.update(v for v in s.src if planner.rep.get(v) != "Q")
    order = {v: k for k, v in enumerate(graph.params)}
    order.update({b.var: len(graph.params) + k for k, b in enumerate(graph.bindings)})
    calib_vars = sorted(needed, key=lambda v: order[v])
    scales = calibrate_scales(
        norm, gvar, graph, calib_vars, samples=samples, act_hi=cfg.act_range[1],
        percentile=percentile,
    )  # fmt: skip

    em = Emitter(graph, cfg, scales, steps, report)
    new_func = em.build(gvar.name_hint, em.emit_steps, lambda: em.sub(graph.output))
    return replace_function(norm, gvar, new_func)


def _warn_float_layers(steps, report) -> None:
    """Warn about conv2d layers (and matmuls with constant weights) left as float host ops:
    the accelerator will not run them, and the compiler will refuse the model."""
    left = [
        f"{s.ops[0]} -> '{s.out.name}' ({s.reason})"
        for s in steps
        if s.kind == "host"
        and s.ops
        and (s.ops[0] == "nn.conv2d" or (s.ops[0] == "matmul" and s.reason != DENSE_NEEDS_WEIGHT))
    ]
    if left:
        msg = f"quantize(): {len(left)} layer(s) stay float: " + "; ".join(left)
        warnings.warn(msg, UserWarning, stacklevel=3)
        if report is not None:
            report.append(f"warning: {msg}")


def Quantize(  # noqa: N802 (TVM pass factories are CamelCase)
    calibration,
    config: HardwareConfig | str | None = None,
    *,
    func_name: str = "main",
    report=None,
    fuse_residual: bool = True,
    percentile: float | None = None,
) -> tvm.transform.Pass:
    """A module pass running :func:`quantize` with the given calibration data.

    Parameters
    ----------
    calibration : list of numpy.ndarray or list of dict
        See :func:`quantize`.
    config : HardwareConfig or str, optional
        See :func:`quantize`.
    func_name : str
        The function to quantize.
    report : list, optional
        See :func:`quantize`.
    fuse_residual, percentile
        See :func:`quantize`.

    Returns
    -------
    tvm.transform.Pass
        The pass ``hapm.Quantize``.
    """

    def run(mod):
        return quantize(
            mod, calibration, config, func_name=func_name, report=report,
            fuse_residual=fuse_residual, percentile=percentile,
        )  # fmt: skip

    return module_pass(run, "hapm.Quantize")
