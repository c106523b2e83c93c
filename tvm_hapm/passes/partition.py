"""Partitioning a quantized Relax module between hapm_fpga and the host CPU.

:func:`PartitionForHapm` groups the integer operator chains of :mod:`tvm_hapm.passes.qops` into
composite functions with TVM's BYOC pattern machinery (``FuseOpsByPattern``); each pattern has a
check that keeps layers the accelerator cannot run (unsupported dtype, padding beyond the DMA's
pad field, ...) on the host.  Everything not matched stays ordinary Relax and is compiled for the
host CPU; :func:`host_operator_report` lists it.
"""

from __future__ import annotations

import collections

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard
from tvm.relax.transform import FusionPattern

from ..target.config import HardwareConfig, get_config
from ..target.isa import MAX_INNER_STRIDE, MAX_PAD
from .qops import RequantChain

__all__ = [
    "PartitionForHapm",
    "hapm_patterns",
    "read_composite",
    "host_operator_report",
    "COMPOSITE_PREFIX",
]

COMPOSITE_PREFIX = "hapm_fpga."


def _ty(expr):
    return expr.struct_info if hasattr(expr, "struct_info") else expr.ty


def _static_shape(expr):
    sinfo = _ty(expr)
    shape = getattr(sinfo, "shape", None)
    if shape is None:
        return None
    try:
        return [int(v) for v in shape.values]
    except (TypeError, AttributeError):
        return None


def _dtype(expr):
    return str(_ty(expr).dtype)


def hapm_patterns(config: HardwareConfig | None = None) -> list[FusionPattern]:
    """The accelerator's fusion patterns, highest priority first, with feasibility checks."""
    cfg = get_config(config)
    act, wdt = cfg.act_dtype, cfg.weight_dtype

    def out_ok(ctx) -> bool:
        out = ctx.matched_expr
        return _dtype(out) == act and _static_shape(out) is not None

    conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
    conv_bias = is_const()
    conv_acc = is_op("relax.add")(conv, conv_bias) | conv

    def check_conv(ctx) -> bool:
        call = ctx.annotated_expr["conv"]
        a = call.attrs
        data, weight = call.args
        return (
            out_ok(ctx)
            and _dtype(data) == act
            and _dtype(weight) == wdt
            and _static_shape(data) is not None
            and len(_static_shape(data)) == 4
            and str(a.data_layout) == "NCHW"
            and str(a.kernel_layout) == "OIHW"
            and str(a.out_dtype) == "int32"
            and max(int(p) for p in a.padding) <= MAX_PAD
            and max(int(s) for s in a.strides) <= MAX_INNER_STRIDE
            and max(int(d) for d in a.dilation) <= MAX_INNER_STRIDE
        )

    # conv2d with a fused residual add (qops.emit_conv2d_residual)
    res_conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
    res_bias, shortcut, shortcut_k = is_const(), wildcard(), is_const()
    res_term = is_op("relax.multiply")(is_op("relax.astype")(shortcut), shortcut_k)
    res_acc = is_op("relax.add")(is_op("relax.add")(res_conv, res_bias) | res_conv, res_term)

    def check_conv_residual(ctx) -> bool:
        s = ctx.annotated_expr["residual"]
        conv_ok = check_conv(ctx)
        return conv_ok and _dtype(s) == act and _static_shape(s) == _static_shape(ctx.matched_expr)

    dense = is_op("relax.matmul")(wildcard(), is_const())
    dense_bias = is_const()
    dense_acc = is_op("relax.add")(dense, dense_bias) | dense

    def check_dense(ctx) -> bool:
        call = ctx.annotated_expr["dense"]
        data, weight = call.args
        shape = _static_shape(data)
        return (
            out_ok(ctx)
            and _dtype(data) == act
            and _dtype(weight) == wdt
            and shape is not None
            and len(shape) == 2
            and len(_static_shape(weight) or ()) == 2
            and str(call.attrs.out_dtype) == "int32"
        )

    # the residual add (qops.emit_add): its own rescale, in int32
    lhs, rhs, mult_a, mult_b = wildcard(), wildcard(), is_const(), is_const()
    add_round, add_shift = is_const(), is_const()
    lhs_m = is_op("relax.multiply")(is_op("relax.astype")(lhs), mult_a)
    rhs_m = is_op("relax.multiply")(is_op("relax.astype")(rhs), mult_b)
    add = is_op("relax.add")(lhs_m, rhs_m)
    add = is_op("relax.add")(add, add_round)
    add = is_op("relax.right_shift")(add, add_shift)
    add_clip = is_op("relax.clip")(add, wildcard(), wildcard())
    add = is_op("relax.astype")(add_clip)

    def check_add(ctx) -> bool:
        a, b = ctx.annotated_expr["lhs"], ctx.annotated_expr["rhs"]
        sa, sb = _static_shape(a), _static_shape(b)
        return bool(out_ok(ctx) and _dtype(a) == act and _dtype(b) == act and sa and sa == sb)

    pool_in = wildcard()
    maxpool = is_op("relax.nn.max_pool2d")(pool_in)

    def check_maxpool(ctx) -> bool:
        call = ctx.matched_expr
        a = call.attrs
        shape = _static_shape(call.args[0])
        return (
            out_ok(ctx)
            and shape is not None
            and len(shape) == 4
            and str(a.layout) == "NCHW"
            and not bool(a.ceil_mode)
            and max(int(p) for p in a.padding) <= MAX_PAD
            and max(int(s) for s in a.strides) <= MAX_INNER_STRIDE
        )

    gap_in = wildcard()
    gap_sum = is_op("relax.sum")(is_op("relax.astype")(gap_in))

    def check_gap(ctx) -> bool:
        call = ctx.annotated_expr["sum"]
        shape = _static_shape(ctx.annotated_expr["data"])
        axes = [int(v) for v in call.attrs.axis] if call.attrs.axis is not None else []
        return (
            out_ok(ctx)
            and shape is not None
            and len(shape) == 4
            and sorted(axes) == [2, 3]
            and bool(call.attrs.keepdims)
            and _dtype(ctx.annotated_expr["data"]) == act
        )

    def requantized(name, acc, parts, check):
        chain = RequantChain(acc)
        return FusionPattern(
            COMPOSITE_PREFIX + name, chain.pattern, {**parts, **chain.annotations()}, check
        )

    # The annotation names are how LowerToHapm reads each layer's parameters (read_composite).
    return [
        requantized(
            "conv2d_residual", res_acc,
            {"conv": res_conv, "bias": res_bias, "residual": shortcut, "residual_k": shortcut_k},
            check_conv_residual,
        ),
        requantized("conv2d", conv_acc, {"conv": conv, "bias": conv_bias}, check_conv),
        requantized("dense", dense_acc, {"dense": dense, "bias": dense_bias}, check_dense),
        FusionPattern(
            COMPOSITE_PREFIX + "add", add,
            {"lhs": lhs, "rhs": rhs, "mult_a": mult_a, "mult_b": mult_b, "round": add_round,
             "shift": add_shift, "clip": add_clip},
            check_add,
        ),
        requantized("global_avg_pool", gap_sum, {"sum": gap_sum, "data": gap_in}, check_gap),
        FusionPattern(COMPOSITE_PREFIX + "max_pool2d", maxpool, {"pool": maxpool},
                      check_maxpool),
    ]  # fmt: skip


def read_composite(func: relax.Function, config: HardwareConfig | None = None) -> dict:
    """The named parts of a ``hapm_fpga.*`` composite function: its pattern (from
    :func:`hapm_patterns`) matched again on the function's body, as ``{annotation name:
    expression}``; a part an alternative did not take (a conv without bias) is absent.
    ``ValueError`` if the body does not match its own pattern."""
    name = str(func.attrs["Composite"])
    patterns = {p.name: p for p in hapm_patterns(config)}
    if name not in patterns:
        raise ValueError(f"unknown composite {name!r}")
    pattern = patterns[name]
    matched = pattern.pattern.extract_matched_expr(func.body.body, relax.analysis.get_var2val(func))
    if matched is None:
        raise ValueError(f"the body of composite {name} does not match its pattern")
    return {k: matched[p] for k, p in pattern.annotation_patterns.items() if p in matched}


def PartitionForHapm(config: HardwareConfig | None = None) -> tvm.transform.Pass:  # noqa: N802
    """Group the accelerator's operator chains into ``hapm_fpga.*`` composite functions.

    Parameters
    ----------
    config : HardwareConfig, optional
        The accelerator; defaults to the current target's config.

    Returns
    -------
    pass : tvm.transform.Pass
    """

    @tvm.transform.module_pass(opt_level=0, name="PartitionForHapm")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        cfg = get_config(config)
        seq = tvm.transform.Sequential(
            [
                relax.transform.ConvertToDataflow(),
                relax.transform.CanonicalizeBindings(),
                relax.transform.FuseOpsByPattern(
                    hapm_patterns(cfg), bind_constants=True, annotate_codegen=False
                ),
            ]
        )
        return seq(mod)

    return _pass


def host_operator_report(mod: tvm.IRModule, func_name: str = "main") -> dict[str, int]:
    """Operators of ``func_name`` that run on the host, with their counts (after partitioning
    and lowering: accelerator layers appear as calls to ``hapm_fpga.run`` and are not listed)."""
    counts: collections.Counter = collections.Counter()
    func = mod[func_name]

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            name = expr.op.name
            if name == "relax.call_dps_packed" and "hapm_fpga" in str(expr.args[0]):
                return
            counts[name] += 1

    relax.analysis.post_order_visit(func.body, visit)
    return dict(sorted(counts.items()))
