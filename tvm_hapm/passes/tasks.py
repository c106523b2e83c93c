"""Tuning tasks of a quantized Relax module: the accelerator's convolution and dense layers, named
as the compiler names their programs, for :mod:`tvm_hapm.cost.tune`."""

from __future__ import annotations

from tvm import relax

from ..cost.tune import ConvTask
from ..target.config import HardwareConfig
from ..target.tir import dense_as_conv
from .lower import conv_kwargs_of
from .partition import COMPOSITE_PREFIX, PartitionForHapm

__all__ = ["extract_tasks"]


def extract_tasks(qmod, config: HardwareConfig, func_name: str = "main") -> list[ConvTask]:
    """The convolution (also with a fused residual add) and dense layers the accelerator runs,
    in execution order, named as the compiler names their programs (``<index>_<kind>``)."""
    mod = PartitionForHapm(config)(qmod)
    tasks = []
    index = 0
    for block in mod[func_name].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not (isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar)):
                continue
            func = mod[value.op]
            if func.attrs is None or "Composite" not in func.attrs:
                continue
            kind = str(func.attrs["Composite"])[len(COMPOSITE_PREFIX) :]
            name = f"{index:03d}_{kind}"
            index += 1
            if kind not in ("conv2d", "conv2d_residual", "dense"):
                continue
            call = func.body.blocks[0].bindings[0].value  # the conv2d / matmul comes first
            data, weight = call.args
            shape = [int(v) for v in data.ty.shape.values]
            w = weight.value.numpy()
            if kind == "dense":
                tasks.append(ConvTask(name, config, *dense_as_conv(shape, w)))
            else:
                tasks.append(ConvTask(name, config, shape, w, **conv_kwargs_of(call.attrs),
                                      residual=kind == "conv2d_residual"))  # fmt: skip
    return tasks
