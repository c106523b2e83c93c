"""Shared fixtures: hand-built quantized Relax modules and an llvm reference runner."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import tvm_hapm  # noqa: F401  (registers the target)
from tvm_hapm.passes import qops


def run_vm(ex, *inputs):
    """Run ``main`` of a compiled executable; returns a list of numpy outputs."""
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    return [o.numpy() for o in out]


def llvm_reference(mod, *inputs):
    """TVM's own llvm build of the same (quantized) module: the independent reference."""
    return run_vm(tvm.compile(mod, target="llvm"), *inputs)


def build_int_network(cfg, batch=1, cin=5, h=11, w=9, seed=0, cmid=13, classes=10):
    """An integer network covering every accelerated layer kind: conv (padded, ReLU), depthwise
    strided conv, 1x1 conv, residual add, max pool with padding, global average pool, dense."""
    rng = np.random.default_rng(seed)
    act = cfg.act_dtype
    wdt = cfg.weight_dtype
    lo, hi = cfg.act_range
    whi = cfg.weight_range[1]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, cin, h, w), act))

    def weights(shape):
        return rng.integers(-whi, whi + 1, shape).astype(wdt)

    # scales chosen so that outputs use the activation range without saturating everywhere
    gain = 2.0 ** (8 - cfg.act_bits) * 2.0 ** (8 - cfg.weight_bits)
    with bb.function("main", [x]):
        with bb.dataflow():
            m, s = qops.choose_multiplier(rng.uniform(0.001, 0.004, cmid) * gain)
            bias = rng.integers(-3000, 3000, cmid).astype("int32")
            y1 = qops.emit_conv2d(
                bb, x, weights((cmid, cin, 3, 3)), bias, (1, 1), (1, 1, 1, 1), (1, 1), 1, m, s,
                0, hi, act,
            )  # fmt: skip
            m, s = qops.choose_multiplier(rng.uniform(0.003, 0.01, cmid) * gain)
            y2 = qops.emit_conv2d(
                bb, y1, weights((cmid, 1, 3, 3)), None, (2, 2), (1, 1, 1, 1), (1, 1), cmid, m, s,
                lo, hi, act,
            )  # fmt: skip
            m, s = qops.choose_multiplier(rng.uniform(0.003, 0.01, cmid) * gain)
            y3 = qops.emit_conv2d(
                bb, y2, weights((cmid, cmid, 1, 1)), None, (1, 1), (0, 0, 0, 0), (1, 1), 1, m, s,
                lo, hi, act,
            )  # fmt: skip
            ma, sa = qops.choose_multiplier([0.7, 0.45], qops.add_mult_bits(cfg.act_bits))
            y4 = qops.emit_add(bb, y2, y3, int(ma[0]), int(ma[1]), sa, 0, hi, act)
            y5 = bb.emit(relax.op.nn.max_pool2d(y4, (3, 3), (2, 2), (1, 1, 1, 1)))
            oh5 = bb.normalize(y5).ty.shape.values
            pix = int(oh5[2]) * int(oh5[3])
            mg, sg = qops.choose_multiplier([1.3 / pix])
            y6 = qops.emit_global_avg_pool(bb, y5, int(mg[0]), sg, lo, hi, act)
            y7 = bb.emit(relax.op.reshape(y6, (batch, cmid)))
            mf, sf = qops.choose_multiplier(rng.uniform(0.003, 0.01, classes) * gain)
            bias_f = rng.integers(-300, 300, classes).astype("int32")
            y8 = qops.emit_dense(bb, y7, weights((cmid, classes)), bias_f, mf, sf, lo, hi, act)
            out = bb.emit_output(relax.Tuple([y1, y2, y4, y5, y8]))
        bb.emit_func_output(out)
    return bb.get()


@pytest.fixture
def int_network():
    return build_int_network
