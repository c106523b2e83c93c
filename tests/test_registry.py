"""Registration with TVM happens in one place, on import, and is idempotent."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm.relax import pipeline as relax_pipelines
from tvm.tirx import compilation_pipeline as tir_pipelines

import tvm_hapm
from tvm_hapm.passes import pipeline
from tvm_hapm.target import tir


def test_import_registers_tags_pipelines_and_functions():
    assert relax_pipelines.PIPELINE_MAP["default"] is pipeline.default_with_offload
    assert relax_pipelines.PIPELINE_MAP["hapm_fpga"] is pipeline.hapm_pipeline
    assert tir_pipelines.PIPELINE_MAP["s_tir"] is tir.hapm_tir_pipeline
    for name in ("hapm_fpga.run", "hapm_fpga.begin_run", "hapm_fpga.run_tir", "hapm_fpga.measure"):
        assert tvm_ffi.get_global_func(name) is not None, name
    for tag in ["hapm_fpga", *(f"hapm_fpga-{p}" for p in tvm_hapm.target.PRESETS)]:
        assert "hapm_fpga" in [str(k) for k in tvm.target.Target(tag).keys], tag


def test_partition_patterns_are_in_tvms_pattern_registry():
    from tvm.relax.backend.pattern_registry import get_patterns_with_prefix

    from tvm_hapm.passes.partition import hapm_patterns

    expected = [p.name for p in hapm_patterns()]  # highest priority first
    assert [p.name for p in get_patterns_with_prefix("hapm_fpga")] == expected
    tvm_hapm.register()  # not twice
    assert [p.name for p in get_patterns_with_prefix("hapm_fpga")] == expected


def test_registering_again_wraps_tvm_pipelines_once():
    tvm_hapm.register()
    tvm_hapm.register()
    wrapped = relax_pipelines.PIPELINE_MAP["default"]
    assert wrapped is pipeline.default_with_offload
    original = wrapped.hapm_original
    assert not hasattr(original, "hapm_original")  # TVM's own factory, not a wrapper
    assert not hasattr(tir.hapm_tir_pipeline.hapm_original, "hapm_original")


def test_errors_keep_their_type_through_tvm_passes():
    import numpy as np
    import pytest
    from tvm.relax.frontend.onnx import from_onnx

    from tvm_hapm.data import load_bundled_model
    from tvm_hapm.passes import HardwareAwarePrune, PruneError
    from tvm_hapm.passes.lower import LoweringError
    from tvm_hapm.passes.quantize import QuantizeError

    mod = from_onnx(load_bundled_model(1))
    with pytest.raises(LoweringError, match="quantize"):  # raised inside the offload pass
        tvm.compile(mod, target="hapm_fpga")
    with pytest.raises(QuantizeError, match="calibration"):  # inside the hapm.Quantize pass
        tvm_hapm.Quantize([np.zeros((2, 2), "float32")])(mod)
    with pytest.raises(PruneError, match="skip"):  # inside hapm.HardwareAwarePrune
        HardwareAwarePrune(0.5, skip=["no_such_layer"])(mod)
