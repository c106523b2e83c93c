"""Partitioning and the requantization chain: written by the quantizer, matched by the
partitioner and read back by the lowering by name (``qops.RequantChain``,
``partition.read_composite``)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_hapm.passes import hapm_pipeline, qops
from tvm_hapm.passes.lower import LoweringError
from tvm_hapm.passes.partition import PartitionForHapm, read_composite
from tvm_hapm.target.config import get_config
from tvm_hapm.testing import build_int_network

CFG = get_config("zedboard")


def _composites(mod):
    return [
        (str(f.attrs["Composite"]), f)
        for _, f in mod.functions_items()
        if isinstance(f, relax.Function) and f.attrs is not None and "Composite" in f.attrs
    ]


def test_every_composite_is_read_back_by_name():
    """The named parts of every composite of a network with every layer kind: the
    requantization parameters are the ones the quantizer wrote, the optional bias is there
    exactly when the layer has one."""
    mod = PartitionForHapm(CFG)(build_int_network(CFG))
    kinds = set()
    for name, func in _composites(mod):
        kind = name.removeprefix("hapm_fpga.")
        kinds.add(kind)
        part = read_composite(func, CFG)
        if kind in ("conv2d", "dense", "global_avg_pool"):
            mult, shift, (lo, hi) = qops.RequantChain.read(part)
            assert mult.dtype == np.int64 and mult.size >= 1 and shift >= 1
            assert lo in (0, CFG.act_range[0]) and hi == CFG.act_range[1]  # ReLU: lo = 0
        if kind in ("conv2d", "dense"):
            weight = part[kind if kind == "dense" else "conv"].args[1]
            assert isinstance(weight, tvm.ir.GenericConst)
            assert ("bias" in part) == any(
                isinstance(b.value, relax.Call) and b.value.op.name == "relax.add"
                and isinstance(b.value.args[1], tvm.ir.GenericConst)
                and str(b.value.args[1].ty.dtype) == "int32"
                for blk in func.body.blocks for b in blk.bindings
            )  # fmt: skip
        if kind == "add":
            assert {"lhs", "rhs", "mult_a", "mult_b", "shift", "clip"} <= set(part)
    assert kinds == {"conv2d", "dense", "add", "global_avg_pool", "max_pool2d"}


def _requantized_conv(rounding_offset: int):
    """x -> int conv -> requantization whose rounding term is ``2**(shift-1) + offset``."""
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = rng.integers(-127, 128, (4, 4, 3, 3)).astype(np.int8)
            acc = bb.emit(
                relax.op.nn.conv2d(x, relax.const(w, "int8"), padding=1, out_dtype="int32")
            )
            shift = 12
            y = bb.emit(relax.op.astype(acc, "int64"))
            y = bb.emit(
                relax.op.multiply(y, relax.const(np.full((1, 4, 1, 1), 77, np.int64), "int64"))
            )
            y = bb.emit(relax.op.add(y, relax.const((1 << (shift - 1)) + rounding_offset, "int64")))
            y = bb.emit(relax.op.right_shift(y, relax.const(shift, "int64")))
            y = bb.emit(relax.op.clip(y, -128, 127))
            out = bb.emit_output(bb.emit(relax.op.astype(y, "int8")))
        bb.emit_func_output(out)
    return bb.get()


def test_requantization_that_does_not_round_half_up_is_refused():
    """The lowering used to read the chain by position and ignore its rounding term: a chain
    rounding any other way compiled to the hardware's half-up rounding, silently different
    from the model.  Now it is refused, naming the layer."""
    target = tvm.target.Target("hapm_fpga")
    programs = []
    tvm.compile(_requantized_conv(0), target=target, relax_pipeline=hapm_pipeline(CFG, programs))
    assert [p.info["kind"] for p in programs] == ["conv2d"]
    with pytest.raises(LoweringError, match="000_conv2d: .* not half up"):
        tvm.compile(_requantized_conv(1), target=target, relax_pipeline=hapm_pipeline(CFG))
