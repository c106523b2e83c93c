"""Shared test helpers and oracles.

What more than one test module of ``tests/`` uses, in one place instead of tests importing from
each other: running compiled Relax modules (and TVM's own llvm build as the independent
reference), a hand-built integer network covering every accelerated layer kind, a small ONNX
graph builder with calibration samples, accelerator-program helpers (a tiny-buffer config,
random block pruning, the first differing instruction) and the NumPy oracle of a convolution
with a fused residual add.  Its submodules are the production code's independent oracles:
:mod:`~tvm_hapm.testing.direct_codegen` (the instruction streams written by hand, against which
the TIR route is compared) and :mod:`~tvm_hapm.testing.mid_reference` (the mid cost model,
scalar).

Nothing in :mod:`tvm_hapm` imports this package (``tests/test_layering.py``); it needs ``onnx``
(a dependency) but not pytest.
"""

from __future__ import annotations

import numpy as np
import onnx
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from tvm_hapm.passes import qops
from tvm_hapm.target import isa
from tvm_hapm.target.config import get_config

__all__ = [
    "ONNX_INPUT_SHAPE",
    "RESIDUAL_CASES",
    "OnnxGraph",
    "build_int_network",
    "calls",
    "fused_conv_oracle",
    "instruction_diff",
    "llvm_reference",
    "np_conv2d",
    "prune_random_blocks",
    "random_samples",
    "rel_err",
    "residual_add_model",
    "run_llvm",
    "run_vm",
    "tiny_buffers_config",
]


# ------------------------------------------------------------------------------------------
# running Relax modules
# ------------------------------------------------------------------------------------------
def run_vm(ex, *inputs):
    """Run ``main`` of a compiled executable on the CPU device.

    Parameters
    ----------
    ex : tvm.relax.VMExecutable
        The result of ``tvm.compile``.
    *inputs : numpy.ndarray
        The arguments of ``main``.

    Returns
    -------
    list of numpy.ndarray
        The outputs: one array for a tensor result, one per field for a tuple.
    """
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    return [o.numpy() for o in out]


def llvm_reference(mod, *inputs):
    """TVM's own llvm build of the same (quantized) module: the independent reference.

    Parameters
    ----------
    mod : tvm.IRModule
        The Relax module.
    *inputs : numpy.ndarray
        The arguments of ``main``.

    Returns
    -------
    list of numpy.ndarray
        As :func:`run_vm`.
    """
    return run_vm(tvm.compile(mod, target="llvm"), *inputs)


def run_llvm(mod, inputs):
    """Build a single-input, single-output module for llvm and run it on each input.

    Parameters
    ----------
    mod : tvm.IRModule
        The Relax module; ``main`` takes one tensor and returns one tensor.
    inputs : list of numpy.ndarray
        The inputs, one call of ``main`` each.

    Returns
    -------
    list of numpy.ndarray
        The output of each call.
    """
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return [vm["main"](tvm.runtime.tensor(x)).numpy() for x in inputs]


def rel_err(mod_f, mod_q, inputs):
    """The worst relative error of a (quantized) module against its float original.

    Parameters
    ----------
    mod_f, mod_q : tvm.IRModule
        The float module and the module compared with it, both run by :func:`run_llvm`.
    inputs : list of numpy.ndarray
        The inputs.

    Returns
    -------
    float
        The maximum over the inputs of ``||ref - out|| / ||ref||`` (Frobenius norms).
    """
    ref, got = run_llvm(mod_f, inputs), run_llvm(mod_q, inputs)
    return max(np.linalg.norm(r - q) / np.linalg.norm(r) for r, q in zip(ref, got, strict=True))


def calls(mod, op_name):
    """The calls of one Relax operator in ``main``.

    Parameters
    ----------
    mod : tvm.IRModule
        The Relax module.
    op_name : str
        The operator, e.g. ``"relax.nn.conv2d"``.

    Returns
    -------
    list of tvm.relax.Call
        The calls in post order.
    """
    found = []

    def visit(node):
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op):
            if node.op.name == op_name:
                found.append(node)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


# ------------------------------------------------------------------------------------------
# a hand-built integer network
# ------------------------------------------------------------------------------------------
def build_int_network(cfg, batch=1, cin=5, h=11, w=9, seed=0, cmid=13, classes=10):
    """An integer network covering every accelerated layer kind.

    Conv (padded, ReLU), depthwise strided conv, 1x1 conv, residual add, max pool with padding,
    global average pool, dense; built with :mod:`tvm_hapm.passes.qops` and random weights.

    Parameters
    ----------
    cfg : HardwareConfig
        Gives the activation and weight dtypes and ranges.
    batch, cin, h, w : int, optional
        The NCHW shape of the input ``x``.
    seed : int, optional
        The seed of the weights, biases and requantization scales.
    cmid : int, optional
        The channels of the convolutions.
    classes : int, optional
        The outputs of the dense layer.

    Returns
    -------
    tvm.IRModule
        ``main(x)`` returning the tuple of the first conv, the depthwise conv, the residual add,
        the max pool and the dense layer.
    """
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


# ------------------------------------------------------------------------------------------
# small ONNX graphs
# ------------------------------------------------------------------------------------------
class OnnxGraph:
    """Tiny ONNX graph builder: each method adds one node and returns its output name.

    Weights are random (He-initialised convolutions, random batch-norm statistics) and become
    float32 initializers named ``c0``, ``c1``, ... in the order they are added; node outputs are
    named ``t1``, ``t2``, ...

    Parameters
    ----------
    seed : int, optional
        The seed of the weights.
    """

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def _out(self):
        self.n += 1
        return f"t{self.n}"

    def const(self, value):
        """Add a float32 initializer.

        Parameters
        ----------
        value : array_like
            Its value.

        Returns
        -------
        str
            Its name.
        """
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op, inputs, **attrs):
        """Add a node with one output.

        Parameters
        ----------
        op : str
            The ONNX operator, e.g. ``"Relu"``.
        inputs : list of str
            The names of its inputs.
        **attrs
            Its attributes.

        Returns
        -------
        str
            The name of its output.
        """
        out = self._out()
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv(self, x, cin, cout, *, k=3, stride=1, pad=1, group=1, bias=True):
        """Add a square ``Conv`` with random weights (and bias).

        Parameters
        ----------
        x : str
            The input.
        cin, cout : int
            Input and output channels.
        k, stride, pad, group : int, optional
            Kernel size, stride, padding on every side and groups.
        bias : bool, optional
            Whether the convolution has a bias.

        Returns
        -------
        str
            The output.
        """
        fan_in = cin // group * k * k
        w = self.rng.normal(0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k))
        ins = [x, self.const(w)]
        if bias:
            ins.append(self.const(self.rng.normal(0, 0.1, cout)))
        return self.node(
            "Conv", ins, kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4, group=group
        )

    def bn(self, x, c):
        """Add a ``BatchNormalization`` with random scale, bias, mean and variance.

        Parameters
        ----------
        x : str
            The input.
        c : int
            Its channels.

        Returns
        -------
        str
            The output.
        """
        r = self.rng
        params = (r.uniform(0.5, 1.5, c), r.normal(0, 0.1, c), r.normal(0, 0.1, c))
        var = r.uniform(0.5, 1.5, c)
        ins = [x, *(self.const(p) for p in params), self.const(var)]
        return self.node("BatchNormalization", ins, epsilon=1e-5)

    def gemm(self, x, cin, cout, bias=True):
        """Add a ``Gemm`` (``transB=1``) with random weights (and bias).

        Parameters
        ----------
        x : str
            The input, ``(batch, cin)``.
        cin, cout : int
            Input and output features.
        bias : bool, optional
            Whether the layer has a bias.

        Returns
        -------
        str
            The output.
        """
        w = self.rng.normal(0, np.sqrt(1.0 / cin), (cout, cin))
        ins = [x, self.const(w)] + ([self.const(self.rng.normal(0, 0.1, cout))] if bias else [])
        return self.node("Gemm", ins, transB=1)

    def clip(self, x, lo, hi):
        """Add a ``Clip`` with constant bounds.

        Parameters
        ----------
        x : str
            The input.
        lo, hi : float
            The bounds.

        Returns
        -------
        str
            The output.
        """
        return self.node("Clip", [x, self.const(lo), self.const(hi)])

    def model(self, inputs, out, out_shape):
        """The checked model (opset 17, IR version 8); the last node's output becomes ``out``.

        Parameters
        ----------
        inputs : dict of str to tuple of int
            The float inputs and their shapes.
        out : str
            The output (the last node's: it is renamed).
        out_shape : list of int
            Its shape.

        Returns
        -------
        onnx.ModelProto
        """
        self.nodes[-1].output[0] = "out"
        graph = helper.make_graph(
            self.nodes,
            "net",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
            initializer=self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


#: The NCHW shape of the input ``x`` of the small ONNX models.
ONNX_INPUT_SHAPE = (1, 3, 8, 8)


def residual_add_model():
    """A small ONNX model with a residual block.

    conv-BN-ReLU = a, then conv-BN-ReLU, conv-BN and ``Relu(that + a)``; 8 channels throughout.

    Returns
    -------
    onnx.ModelProto
        Input ``x`` of :data:`ONNX_INPUT_SHAPE`, output ``(1, 8, 8, 8)``.
    """
    g = OnnxGraph(5)
    x = g.node("Relu", [g.bn(g.conv("x", 3, 8, bias=False), 8)])
    y = g.node("Relu", [g.bn(g.conv(x, 8, 8, bias=False), 8)])
    y = g.bn(g.conv(y, 8, 8, bias=False), 8)
    y = g.node("Relu", [g.node("Add", [y, x])])
    return g.model({"x": ONNX_INPUT_SHAPE}, y, [1, 8, 8, 8])


def random_samples(n, seed, shape=ONNX_INPUT_SHAPE):
    """Standard normal float32 inputs (calibration or test data).

    Parameters
    ----------
    n : int
        How many.
    seed : int
        The seed.
    shape : tuple of int, optional
        The shape of each.

    Returns
    -------
    list of numpy.ndarray
    """
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, shape).astype(np.float32) for _ in range(n)]


# ------------------------------------------------------------------------------------------
# accelerator programs
# ------------------------------------------------------------------------------------------
def tiny_buffers_config():
    """The zedboard with tiny buffers: channel chunking, small tiles and non-resident weights.

    Returns
    -------
    HardwareConfig
        Named ``tiny-lowering``.
    """
    return get_config("zedboard").replace(
        name="tiny-lowering", inp_buffer_bytes=256 * 8, wgt_buffer_bytes=16 * 64,
        acc_buffer_bytes=256 * 32,
    )  # fmt: skip


def instruction_diff(a, b):
    """Where two instruction streams differ, for an assertion message.

    Parameters
    ----------
    a, b : list of isa.Instruction
        The streams.

    Returns
    -------
    str
        The first differing instruction of both, disassembled, else their lengths.
    """
    for k, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"instruction {k}: {isa.disassemble(x)}  !=  {isa.disassemble(y)}"
    return f"lengths {len(a)} != {len(b)}"


def prune_random_blocks(cfg, weight, groups, rate, rng):
    """Zero random R x C blocks of an OIHW weight (per output-block, input-block, tap).

    Parameters
    ----------
    cfg : HardwareConfig
        Gives the block shape: ``array_rows`` input by ``array_cols`` output channels.
    weight : numpy.ndarray
        The OIHW weight; changed in place.
    groups : int
        The convolution's groups (not used: the blocks are taken over ``weight``'s own
        ``(cout, cin / groups)``).
    rate : float
        The probability that a block is zeroed.
    rng : numpy.random.Generator
        The random source.

    Returns
    -------
    numpy.ndarray
        ``weight``.
    """
    R, C = cfg.array_rows, cfg.array_cols
    cout, cin_g, kh, kw = weight.shape
    for co in range(0, cout, C):
        for ci in range(0, cin_g, R):
            for y in range(kh):
                for x in range(kw):
                    if rng.random() < rate:
                        weight[co : co + C, ci : ci + R, y, x] = 0
    return weight


# ------------------------------------------------------------------------------------------
# the NumPy oracle of a convolution with a fused residual add
# ------------------------------------------------------------------------------------------
def np_conv2d(x, w, stride, pad):
    """int64 NCHW / OIHW convolution, groups = 1, dilation 1.

    Parameters
    ----------
    x : numpy.ndarray
        The NCHW input.
    w : numpy.ndarray
        The OIHW weight.
    stride, pad : int
        The stride and the zero padding on every side.

    Returns
    -------
    numpy.ndarray
        The int64 NCHW output.
    """
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, cout, oh, ow), np.int64)
    for y in range(kh):
        for z in range(kw):
            win = xp[
                :, :, y : y + stride * (oh - 1) + 1 : stride, z : z + stride * (ow - 1) + 1 : stride
            ]
            out += np.einsum("nchw,oc->nohw", win, w[:, :, y, z].astype(np.int64))
    return out


def fused_conv_oracle(x, w, bias, shortcut, k, mult, shift, clip, stride, pad):
    """The int8 result of a convolution with a fused residual add, as the accelerator computes it.

    ``acc = conv(x, w) + bias + int32(shortcut) * k`` wrapped to int32, requantized with
    ``(acc * mult + 2^(shift-1)) >> shift``, clipped to int8 and then to ``clip``.

    Parameters
    ----------
    x : numpy.ndarray
        The int8 NCHW input.
    w : numpy.ndarray
        The int8 OIHW weight (groups = 1).
    bias, k, mult : numpy.ndarray
        Per output channel: the bias, the shortcut's multiplier and the requantization
        multiplier.
    shortcut : numpy.ndarray
        The int8 NCHW shortcut, the shape of the output.
    shift : int
        The requantization shift.
    clip : tuple of int
        The activation bounds ``(lo, hi)``.
    stride, pad : int
        The stride and the zero padding on every side.

    Returns
    -------
    numpy.ndarray
        The int8 NCHW output.
    """
    acc = np_conv2d(x, w, stride, pad) + bias.reshape(1, -1, 1, 1)
    acc = acc + shortcut.astype(np.int64) * k.reshape(1, -1, 1, 1)
    acc = ((acc + 2**31) % 2**32) - 2**31  # int32 wrap-around, as the accumulator
    y = (acc * mult.reshape(1, -1, 1, 1) + (1 << (shift - 1))) >> shift
    return np.clip(np.clip(y, -128, 127), *clip).astype(np.int8)


#: Fused residual convolutions ``(n, cin, hw, cout, k, stride, pad, prune)`` checked against
#: :func:`fused_conv_oracle` (``prune``: the rate of :func:`prune_random_blocks`).
RESIDUAL_CASES = [
    (1, 16, 8, 32, 3, 1, 1, 0.0),
    (2, 13, 9, 21, 3, 2, 1, 0.0),  # odd channels, two images
    (1, 32, 8, 32, 3, 1, 1, 0.5),  # pruned blocks
    (1, 16, 8, 16, 3, 1, 1, 1.0),  # every block pruned: the shortcut and bias alone
    (1, 16, 32, 16, 3, 1, 1, 0.0),  # several double-buffered regions (hoisted prologues)
]
