"""Tuning tasks of a quantized Relax module: the accelerator's convolution and dense layers, named
as the compiler names their programs, for :mod:`tvm_hapm.cost.tune`."""

from __future__ import annotations

import numpy as np
from tvm import relax

from ..cost.tune import ConvTask
from ..target.config import HardwareConfig
from .lower import conv_kwargs_of
from .partition import COMPOSITE_PREFIX, PartitionForHapm

__all__ = ["extract_tasks"]


def extract_tasks(qmod, config: HardwareConfig, func_name: str = "main") -> list[ConvTask]:
    """The convolution and dense layers the accelerator runs, in execution order, named as the
    compiler names their programs (``<index>_<kind>``)."""
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
            if kind not in ("conv2d", "dense"):
                continue
            call = func.body.blocks[0].bindings[0].value
            data, weight = call.args
            shape = [int(v) for v in data.ty.shape.values]
            w = weight.value.numpy()
            if kind == "dense":
                oihw = np.ascontiguousarray(w.T).reshape(w.shape[1], w.shape[0], 1, 1)
                tasks.append(ConvTask(name, config, (shape[0], shape[1], 1, 1), oihw))
            else:
                tasks.append(ConvTask(name, config, shape, w, **conv_kwargs_of(call.attrs)))
    return tasks
