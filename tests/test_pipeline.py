"""The offload pipeline: its pass order (written once, ``offload_pass_list``) and its small
passes."""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_hapm.passes.pipeline import InsertBeginRun, offload_pass_list
from tvm_hapm.runtime.driver import BEGIN_RUN_FUNC
from tvm_hapm.target.config import get_config


def test_offload_pass_order():
    names = [p.info.name for p in offload_pass_list(get_config("zedboard"), [])]
    assert names == [
        "CheckIntegerModel",
        "PartitionForHapm",
        "LowerToHapm",
        "WarnHostLayers",
        "InsertBeginRun",
        "RecordCompileReport",
    ]


def _entry(with_begin_run: bool) -> tvm.IRModule:
    x = relax.Var("x", relax.TensorType((2, 3), "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x], pure=not with_begin_run):
        if with_begin_run:
            call = relax.Call(relax.ExternFunc(BEGIN_RUN_FUNC), [], None, [relax.ObjectType()])
            bb.emit(call, name_hint="_hapm_begin_run")
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.add(x, x)))
        bb.emit_func_output(y)
    return bb.get()


def test_insert_begin_run_starts_every_entry_function_with_a_fresh_run():
    after = InsertBeginRun()(_entry(False))
    tvm.ir.assert_structural_equal(after, _entry(True))
    tvm.ir.assert_structural_equal(InsertBeginRun()(_entry(False)), after)  # deterministic


def test_a_compile_keeps_no_program_alive():
    """``tvm.compile`` keeps only the programs' bytes: once the executable is gone, none of
    its :class:`Program` objects (with their instruction streams) is left.  TVM holds the
    offload passes' Python closures after the compile, and they used to hold every program
    (ResNet-18: ~60 MB a compile)."""
    import gc

    import numpy as np
    from tvm.relax.frontend.onnx import from_onnx

    import tvm_hapm
    from tvm_hapm.models.zoo import tiny_cnn
    from tvm_hapm.target.program import Program

    mod = from_onnx(tiny_cnn())
    qmod = tvm_hapm.quantize(mod, [np.random.default_rng(0).standard_normal((1, 3, 16, 16))
                                   .astype(np.float32)])  # fmt: skip

    def alive() -> int:
        gc.collect()
        return sum(isinstance(o, Program) for o in gc.get_objects())

    tvm.compile(qmod, "hapm_fpga")  # a first compile: imports, registrations
    before = alive()
    for _ in range(2):
        tvm.compile(qmod, "hapm_fpga")
    assert alive() == before
