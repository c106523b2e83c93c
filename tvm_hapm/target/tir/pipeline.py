"""The hook into TVM's TIR pipeline: a PrimFunc carrying ``hapm_fpga.kernel`` compiles to an
accelerator program and a call of ``hapm_fpga.run_tir``."""

from __future__ import annotations

import base64

import tvm
from tvm import tirx
from tvm.tirx import compilation_pipeline as _tir_pipeline

from ..config import get_config, is_hapm_target
from .compute import KERNEL_ATTR, RUN_TIR_FUNC, layer_of
from .emit import build_program


# =============================================================================================
# build integration
def OffloadHapmKernels():  # noqa: N802 - TVM pass naming
    """Replace the body of every hapm_fpga-targeted PrimFunc carrying ``"hapm_fpga.kernel"`` by
    ``T.call_packed("hapm_fpga.run_tir", <program, base64>, *buffers)``.

    Functions without the attribute, or bound to another target, are returned unchanged.
    """

    def _offload(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
        attrs = func.attrs
        if attrs is None or KERNEL_ATTR not in attrs:
            return func
        target = attrs.get("target", None) or tvm.target.Target.current(allow_none=True)
        if target is None or not is_hapm_target(target):
            return func
        layer = layer_of(func)
        cfg = get_config(target) if target is not None else get_config(layer["config"])
        name = str(attrs.get("global_symbol", "main"))
        prog = build_program(cfg, func, layer_name=name)
        blob = base64.b64encode(prog.to_bytes()).decode()
        call = tirx.call_packed(RUN_TIR_FUNC, tvm.ir.expr.StringImm(blob), *func.params)
        return func.with_body(tirx.Evaluate(call)).without_attr(KERNEL_ATTR)

    return tvm.tirx.transform.prim_func_pass(
        _offload, opt_level=0, name="hapm_fpga.OffloadHapmKernels"
    )


#: TVM's own "s_tir" pipeline factory (unwrapped if this module is imported again).
ORIGINAL_S_TIR = getattr(
    _tir_pipeline.PIPELINE_MAP["s_tir"], "hapm_original", _tir_pipeline.PIPELINE_MAP["s_tir"]
)


def hapm_tir_pipeline(**kwargs):
    """TVM's S-TIR pipeline preceded by :func:`OffloadHapmKernels`.

    Returns ``(pass, finalize_host_passes, finalize_device_passes)`` like every TIR pipeline
    factory.  A module without hapm_fpga kernels goes through the original pipeline unchanged.
    """
    base, finalize_host, finalize_device = ORIGINAL_S_TIR(**kwargs)

    @tvm.transform.module_pass(opt_level=0, name="hapm_fpga.TIRPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        has_kernel = any(
            isinstance(f, tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs
            for _, f in mod.functions_items()
        )
        if has_kernel:
            mod = OffloadHapmKernels()(mod)
        return base(mod)

    return _pipeline, finalize_host, finalize_device


hapm_tir_pipeline.hapm_original = ORIGINAL_S_TIR
