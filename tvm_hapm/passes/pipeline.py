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

__all__ = ["offload_passes", "hapm_pipeline", "last_compile_report", "CompileReport"]

logger = logging.getLogger("tvm_hapm")

PIPELINE_NAME = "hapm_fpga"


class CompileReport(dict):
    """What the last hapm_fpga compile placed where: ``accelerator`` (layer -> kind) and
    ``host`` (operator -> count)."""


_LAST_REPORT = CompileReport(accelerator={}, host={})


def last_compile_report() -> CompileReport:
    return _LAST_REPORT


def offload_passes(config: HardwareConfig | None = None, programs: list | None = None):
    """Refuse float models, partition, and lower accelerator layers to programs."""

    @tvm.transform.module_pass(opt_level=0, name="HapmOffload")
    def _offload(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        global _LAST_REPORT
        cfg = get_config(config)
        floats = float_layer_ops(mod)
        if floats:
            raise LoweringError(
                f"the model has {len(floats)} float conv2d/matmul layers; {FLOAT_MODEL_MESSAGE}"
            )
        layers = integer_layers(mod)
        precisions = sorted({dtype for _, dtype, _ in layers})
        if layers and precisions != [cfg.act_dtype]:
            raise LoweringError(
                f"the model was quantized for {' and '.join(precisions)} data, but hapm_fpga "
                f"config {cfg.name!r} computes {cfg.act_dtype} (act_bits={cfg.act_bits}); "
                f"quantize it for this config"
            )
        progs: list = [] if programs is None else programs
        first = len(progs)
        mod = PartitionForHapm(cfg)(mod)
        mod = LowerToHapm(cfg, progs)(mod)
        on_host = integer_layers(mod)
        if on_host:
            # A layer the accelerator cannot run is legal, but never silent.
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
                f"not on the accelerator ({len(progs) - first} layer(s) do; no pattern of config "
                f"{cfg.name!r} matches these): {listing}{hint}",
                stacklevel=2,
            )
        host = {}
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                for op, count in host_operator_report(mod, gv.name_hint).items():
                    host[op] = host.get(op, 0) + count
        mod = _begin_runs(mod)
        _LAST_REPORT = CompileReport(
            config=cfg.name,
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

    return _offload


def _begin_runs(mod: tvm.IRModule) -> tvm.IRModule:
    """Make every entry function call ``hapm_fpga.begin_run`` first (an impure call, so the
    function is marked impure): the run statistics then start afresh at every run, accelerator
    layers or not."""
    out = mod
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or func.attrs is None:
            continue
        if "global_symbol" not in func.attrs:
            continue
        call = relax.Call(relax.ExternFunc(BEGIN_RUN_FUNC), [], None, [relax.ObjectType()])
        binding = relax.VarBinding(relax.Var("_hapm_begin_run", relax.ObjectType()), call)
        body = relax.SeqExpr([relax.BindingBlock([binding]), *func.body.blocks], func.body.body)
        new = relax.Function(func.params, body, func.ret_ty, is_pure=False, attrs=func.attrs)
        if out is mod:
            out = mod.clone()
        out[gv] = new
    return out


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
