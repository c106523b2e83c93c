"""The hapm_fpga Relax compilation pipeline and its hook into ``tvm.compile``.

``tvm.compile(mod, target="hapm_fpga")`` runs Relax's ``"default"`` pipeline inside
``with target:``.  On import, this module wraps the ``"default"`` pipeline factory so that, when
the current target is a hapm_fpga target, the offload passes run first; for every other target
the wrapped pipeline is exactly the original.  The same passes are registered as the named
pipeline ``"hapm_fpga"`` for explicit use (``tvm.compile(mod, target, relax_pipeline="hapm_fpga")``
or ``relax.get_pipeline("hapm_fpga")`` in a custom flow).
"""

from __future__ import annotations

import logging
import warnings

import tvm
from tvm import relax
from tvm.relax import pipeline as _relax_pipeline

from ..runtime.driver import BEGIN_RUN_FUNC
from ..target.config import HardwareConfig, get_config, is_hapm_target
from .lower import LoweringError, LowerToHapm
from .partition import PartitionForHapm, host_operator_report
from .quantize import FLOAT_MODEL_MESSAGE, float_layer_ops, integer_layers

__all__ = [
    "offload_pass_list",
    "offload_passes",
    "hapm_pipeline",
    "last_compile_report",
    "CompileReport",
    "CheckIntegerModel",
    "WarnHostLayers",
    "InsertBeginRun",
    "RecordCompileReport",
]

logger = logging.getLogger("tvm_hapm")

PIPELINE_NAME = "hapm_fpga"


class CompileReport(dict):
    """What the last hapm_fpga compile placed where: ``accelerator`` (layer -> kind) and
    ``host`` (operator -> count)."""


_LAST_REPORT = CompileReport(accelerator={}, host={})


def last_compile_report() -> CompileReport:
    return _LAST_REPORT


def offload_pass_list(config: HardwareConfig, programs: list) -> list[tvm.transform.Pass]:
    """The offload, in order: the one place the order of hapm_fpga's passes is written.

    1. :func:`CheckIntegerModel`: refuse a float model, or one quantized for another precision;
    2. :func:`~tvm_hapm.passes.partition.PartitionForHapm`: group accelerator layers into
       ``hapm_fpga.*`` composite functions;
    3. :func:`~tvm_hapm.passes.lower.LowerToHapm`: each composite call becomes a program run
       (``hapm_fpga.run``), its :class:`~tvm_hapm.target.program.Program` appended to
       ``programs``;
    4. :func:`WarnHostLayers`: an integer conv / matmul left on the host is never silent;
    5. :func:`InsertBeginRun`: every entry function starts a fresh run (``last_run_stats``);
    6. :func:`RecordCompileReport`: what runs where (``last_compile_report``).

    TVM's default build pipeline follows (:func:`hapm_pipeline`) for what is left on the host.
    """
    first = len(programs)
    return [
        CheckIntegerModel(config),
        PartitionForHapm(config),
        LowerToHapm(config, programs),
        WarnHostLayers(config, programs, first),
        InsertBeginRun(),
        RecordCompileReport(config, programs, first),
    ]


def offload_passes(config: HardwareConfig | None = None, programs: list | None = None):
    """The offload passes of :func:`offload_pass_list` as one pass (``config``: default, the
    current target's)."""

    @tvm.transform.module_pass(opt_level=0, name="HapmOffload")
    def _offload(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        progs: list = [] if programs is None else programs
        seq = offload_pass_list(get_config(config), progs)
        try:
            return tvm.transform.Sequential(seq, name="HapmOffloadPasses")(mod)
        finally:
            if programs is None:
                # TVM keeps the passes' Python closures alive after the compile (the FFI
                # holds them): without this, every compile kept its programs (ResNet-18:
                # 25,000 instructions and 2,200 GEMM blocks, ~60 MB)
                progs.clear()

    return _offload


def CheckIntegerModel(config: HardwareConfig) -> tvm.transform.Pass:  # noqa: N802
    """Refuse a model whose conv2d / matmul layers are float (not quantized), or quantized for
    another precision than ``config`` computes (:class:`~tvm_hapm.passes.lower.LoweringError`
    with the advice)."""

    @tvm.transform.module_pass(opt_level=0, name="CheckIntegerModel")
    def _check(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        floats = float_layer_ops(mod)
        if floats:
            raise LoweringError(
                f"the model has {len(floats)} float conv2d/matmul layers; {FLOAT_MODEL_MESSAGE}"
            )
        precisions = sorted({dtype for _, dtype, _ in integer_layers(mod)})
        if precisions and precisions != [config.act_dtype]:
            raise LoweringError(
                f"the model was quantized for {' and '.join(precisions)} data, but hapm_fpga "
                f"config {config.name!r} computes {config.act_dtype} "
                f"(act_bits={config.act_bits}); quantize it for this config"
            )
        return mod

    return _check


def WarnHostLayers(config: HardwareConfig, programs: list, first: int) -> tvm.transform.Pass:  # noqa: N802
    """Warn about every integer conv2d / matmul that stays on the host after lowering (legal,
    never silent), with the shapes, and a hint when a symbolic batch is the reason;
    ``programs[first:]`` are the layers that do run on the accelerator."""

    @tvm.transform.module_pass(opt_level=0, name="WarnHostLayers")
    def _warn(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        on_host = integer_layers(mod)
        if on_host:
            listing = "; ".join(f"{op.removeprefix('relax.')} on {dt}{list(shape)}"
                                for op, dt, shape in on_host)  # fmt: skip
            symbolic = any(not isinstance(d, int) for _, _, shape in on_host for d in shape)
            hint = (
                "; the accelerator needs static shapes: bind the batch first (e.g. "
                "relax.transform.BindSymbolicVars({'N': 1}))"
                if symbolic
                else ""
            )
            warnings.warn(
                f"hapm_fpga: {len(on_host)} integer conv2d/matmul layer(s) run on the host, "
                f"not on the accelerator ({len(programs) - first} layer(s) do; no pattern of "
                f"config {config.name!r} matches these): {listing}{hint}",
                stacklevel=2,
            )
        return mod

    return _warn


def InsertBeginRun() -> tvm.transform.Pass:  # noqa: N802
    """Make every entry function call ``hapm_fpga.begin_run`` first (an impure call, so the
    function is marked impure): the run statistics then start afresh at every run, accelerator
    layers or not."""

    @tvm.transform.module_pass(opt_level=0, name="InsertBeginRun")
    def _insert(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or func.attrs is None:
                continue
            if "global_symbol" not in func.attrs:
                continue
            call = relax.Call(relax.ExternFunc(BEGIN_RUN_FUNC), [], None, [relax.ObjectType()])
            var = relax.Var("_hapm_begin_run", relax.ObjectType())
            blocks = [relax.BindingBlock([relax.VarBinding(var, call)]), *func.body.blocks]
            body = relax.SeqExpr(blocks, func.body.body)
            new = relax.Function(func.params, body, func.ret_ty, is_pure=False, attrs=func.attrs)
            if out is mod:
                out = mod.clone()
            out[gv] = new
        # the new call gets its type as any bound expression does
        return out if out is mod else relax.transform.Normalize()(out)

    return _insert


def RecordCompileReport(config: HardwareConfig, programs: list, first: int):  # noqa: N802
    """Record what runs where (:func:`last_compile_report`): the accelerator layers
    ``programs[first:]`` and the operators left on the host."""

    @tvm.transform.module_pass(opt_level=0, name="RecordCompileReport")
    def _record(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        global _LAST_REPORT
        progs = programs[first:]
        host = {}
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                for op, count in host_operator_report(mod, gv.name_hint).items():
                    host[op] = host.get(op, 0) + count
        _LAST_REPORT = CompileReport(
            config=config.name,
            accelerator={p.layer: p.info.get("kind", "") for p in progs},
            host=host,
        )
        if host:
            logger.info(
                "hapm_fpga: %d layers on the accelerator; on the host: %s",
                len(progs),
                ", ".join(f"{k.removeprefix('relax.')} x{v}" for k, v in host.items()),
            )
        return mod

    return _record


def hapm_pipeline(config: HardwareConfig | None = None, programs: list | None = None):
    """The named pipeline: offload, then TVM's default build pipeline for the host."""
    return tvm.transform.Sequential(
        [offload_passes(config, programs), ORIGINAL_DEFAULT()], name="hapm_fpga_pipeline"
    )


#: TVM's own "default" Relax pipeline factory (unwrapped if this module is imported again).
ORIGINAL_DEFAULT = getattr(
    _relax_pipeline.PIPELINE_MAP["default"],
    "hapm_original",
    _relax_pipeline.PIPELINE_MAP["default"],
)


def default_with_offload(*args, **kwargs):
    """TVM's "default" Relax pipeline, preceded by :func:`offload_passes` when the current
    target is a hapm_fpga target (what makes ``tvm.compile(mod, target="hapm_fpga")`` offload;
    installed in place of "default" by :mod:`tvm_hapm._registry`)."""
    base = ORIGINAL_DEFAULT(*args, **kwargs)

    @tvm.transform.module_pass(opt_level=0, name="DefaultPipelineWithHapmOffload")
    def _pipeline(mod: tvm.IRModule, ctx) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=True)
        if target is not None and is_hapm_target(target):
            mod = offload_passes(get_config(target))(mod)
        return base(mod)

    return _pipeline


default_with_offload.hapm_original = ORIGINAL_DEFAULT
