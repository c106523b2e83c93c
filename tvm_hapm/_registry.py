"""Every registration of tvm-hapm with TVM, in one place, done once when :mod:`tvm_hapm` is
imported (:func:`register`).

* target tags ``hapm_fpga`` and ``hapm_fpga-<preset>`` (:mod:`tvm_hapm.target.tag`);
* the Relax pipeline ``"hapm_fpga"`` (:func:`tvm_hapm.passes.pipeline.hapm_pipeline`), and TVM's
  ``"default"`` Relax pipeline wrapped so that ``tvm.compile(mod, target="hapm_fpga")`` offloads
  (:func:`~tvm_hapm.passes.pipeline.default_with_offload`);
* the TIR pipeline ``"hapm_fpga"``, and TVM's ``"s_tir"`` TIR pipeline (what ``"default"``
  resolves to) wrapped so that scheduled accelerator kernels are offloaded
  (:func:`tvm_hapm.target.tir.hapm_tir_pipeline`);
* the project's exception types, with TVM's FFI, so that an error raised inside a pass or a
  packed function reaches the caller with its type (a ``LoweringError``, not a
  ``RuntimeError``);
* the global functions compiled code calls: ``hapm_fpga.run`` (Relax executables,
  :func:`tvm_hapm.runtime.driver.run_packed`), ``hapm_fpga.run_tir`` (TIR kernels,
  :func:`tvm_hapm.runtime.driver.run_tir_packed`) and ``hapm_fpga.measure`` (RPC measurement,
  :func:`tvm_hapm.cost.measure.measure_json`);

The partition patterns are *not* put in TVM's pattern registry: their feasibility checks are
Python functions, and in TVM 0.27 a registered pattern with a Python check aborts the
interpreter at exit ("double free or corruption", even with the registry's own atexit cleanup;
seen here), while patterns without their checks would partition layers the accelerator cannot
run.  :func:`tvm_hapm.passes.partition.hapm_patterns` gives them for a config.

The wrapped pipelines keep TVM's originals as ``hapm_original``, so registering twice (e.g.
after ``importlib.reload``) wraps them once.
"""

from __future__ import annotations

import tvm_ffi
from tvm import relax
from tvm.relax import pipeline as relax_pipelines
from tvm.relax.backend.pattern_registry import get_pattern, register_patterns
from tvm.tirx import compilation_pipeline as tir_pipelines

__all__ = ["register"]


def register() -> None:
    """Register tvm-hapm with TVM (idempotent); see the module docstring."""
    from .cost import measure
    from .passes import lower, partition, pipeline, prune, quantize
    from .runtime import driver, simulator, timing
    from .target import config, isa, layout, program, schedule, tag, tir

    errors = (
        lower.LoweringError, prune.PruneError, quantize.QuantizeError, schedule.ScheduleError,
        isa.IsaError, layout.CodegenError, tir.TirLoweringError, config.HardwareConfigError,
        program.ProgramError, simulator.SimulatorError, timing.TimingError,
    )  # fmt: skip
    for err in errors:
        tvm_ffi.register_error(err)

    tag.register_tags()
    if pipeline.PIPELINE_NAME in relax_pipelines.PIPELINE_MAP:  # registered before
        relax_pipelines.PIPELINE_MAP[pipeline.PIPELINE_NAME] = pipeline.hapm_pipeline
    else:
        relax.register_pipeline(pipeline.PIPELINE_NAME)(pipeline.hapm_pipeline)
    relax_pipelines.PIPELINE_MAP["default"] = pipeline.default_with_offload
    tir_pipelines.register_tir_pipeline("hapm_fpga", tir.hapm_tir_pipeline)
    tir_pipelines.PIPELINE_MAP["s_tir"] = tir.hapm_tir_pipeline
    tvm_ffi.register_global_func(driver.RUN_FUNC, driver.run_packed, override=True)
    tvm_ffi.register_global_func(driver.BEGIN_RUN_FUNC, driver.begin_run, override=True)
    tvm_ffi.register_global_func(tir.RUN_TIR_FUNC, driver.run_tir_packed, override=True)
    tvm_ffi.register_global_func(measure.MEASURE_FUNC, measure.measure_json, override=True)
    _register_patterns(partition.hapm_patterns(config.get_config(config.DEFAULT_PRESET)))


def _register_patterns(patterns) -> None:
    """The default target's fusion patterns in TVM's pattern registry
    (``get_patterns_with_prefix("hapm_fpga")``), as TVM's own BYOC backends register theirs.
    Registered as tuples so that TVM removes them at exit; once per process."""
    if get_pattern(patterns[0].name) is not None:
        return
    # the registry ranks later entries higher; hapm_patterns lists the highest first
    register_patterns(
        [(p.name, p.pattern, dict(p.annotation_patterns), p.check) for p in reversed(patterns)]
    )
