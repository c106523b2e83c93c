"""Synthetic ONNX CNNs (ResNets, a MobileNet-like net, a tiny CNN) built with ``onnx.helper``.

All builders are deterministic given ``seed``: weights come from ``np.random.default_rng(seed)``
and are stored as initializers. Conv weights use He-normal scales; BatchNormalization nodes get
random (non-trivial) gamma/beta/mean/var so that folding them is actually exercised; the last BN
of every residual branch gets a small gamma so activations stay in a sane range even for deep
nets. Every model has one NCHW float32 input ``"input"`` and one output ``"output"`` (logits).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "OPSET",
    "GraphBuilder",
    "mobilenet_style",
    "resnet18_imagenet",
    "resnet50_imagenet",
    "resnet_cifar",
    "tiny_cnn",
]

#: ONNX opset used by every builder.
OPSET = 17


class GraphBuilder:
    """Accumulate ONNX nodes and initializers for a single-input, single-output CNN.

    Every layer method takes the name of its input value and returns the name of its output
    value. Tensor shapes are not tracked except the channel count, which callers pass in.

    Parameters
    ----------
    seed : int
        Seed of the ``numpy.random.Generator`` used for all weights.
    """

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count: dict[str, int] = {}

    def _name(self, kind: str) -> str:
        i = self._count.get(kind, 0)
        self._count[kind] = i + 1
        return f"{kind}{i}"

    def const(self, name: str, value: np.ndarray) -> str:
        """Add an initializer and return its name."""
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        """Add a node with one output and return the output name."""
        name = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    # --- layers -----------------------------------------------------------------------------
    def conv(self, x, cin, cout, k=3, stride=1, pad=None, group=1, bias=False):
        """Conv2d with He-normal weights (``pad`` defaults to ``k // 2``)."""
        pad = k // 2 if pad is None else pad
        name = self._name("conv")
        fan_in = cin // group * k * k
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k))
        ins = [x, self.const(f"{name}.weight", w.astype(np.float32))]
        if bias:
            b = self.rng.normal(0.0, 0.05, cout).astype(np.float32)
            ins.append(self.const(f"{name}.bias", b))
        self.nodes.append(
            helper.make_node(
                "Conv",
                ins,
                [name],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
                group=group,
            )
        )
        return name

    def bn(self, x, c, gamma_scale=1.0):
        """BatchNormalization (inference) with random gamma/beta/mean and positive var."""
        name = self._name("bn")
        r = self.rng
        params = {
            "scale": gamma_scale * r.uniform(0.5, 1.5, c),
            "bias": r.normal(0.0, 0.1, c),
            "mean": r.normal(0.0, 0.1, c),
            "var": r.uniform(0.5, 1.5, c),
        }
        ins = [x] + [self.const(f"{name}.{k}", v.astype(np.float32)) for k, v in params.items()]
        self.nodes.append(
            helper.make_node("BatchNormalization", ins, [name], name=name, epsilon=1e-5)
        )
        return name

    def relu(self, x):
        """ReLU."""
        return self.node("Relu", [x])

    def relu6(self, x):
        """ReLU6 as ``Clip(x, 0, 6)`` with min/max as inputs (opset >= 11)."""
        if "clip.min" not in {t.name for t in self.inits}:
            self.const("clip.min", np.array(0.0, np.float32))
            self.const("clip.max", np.array(6.0, np.float32))
        return self.node("Clip", [x, "clip.min", "clip.max"])

    def act(self, x, kind):
        """Apply ``"relu"``, ``"relu6"`` or no activation (``None``)."""
        return {"relu": self.relu, "relu6": self.relu6, None: lambda v: v}[kind](x)

    def conv_bn(self, x, cin, cout, k=3, stride=1, group=1, act="relu", gamma_scale=1.0):
        """Conv (no bias) + BatchNormalization + optional activation."""
        y = self.bn(self.conv(x, cin, cout, k, stride, group=group), cout, gamma_scale)
        return self.act(y, act)

    def add(self, a, b):
        """Elementwise Add."""
        return self.node("Add", [a, b])

    def maxpool(self, x, k=2, stride=2, pad=0):
        """MaxPool."""
        return self.node("MaxPool", [x], kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4)

    def head(self, x, c, num_classes):
        """GlobalAveragePool + Flatten + Gemm (fully connected) classifier."""
        return self.dense(
            self.node("Flatten", [self.node("GlobalAveragePool", [x])]), c, num_classes
        )

    def dense(self, x, cin, cout):
        """Gemm with ``transB=1`` (weights stored as ``(out, in)``, like PyTorch Linear)."""
        name = self._name("fc")
        w = self.rng.normal(0.0, np.sqrt(1.0 / cin), (cout, cin)).astype(np.float32)
        b = self.rng.normal(0.0, 0.01, cout).astype(np.float32)
        ins = [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)]
        self.nodes.append(helper.make_node("Gemm", ins, [name], name=name, transB=1))
        return name

    # --- blocks -----------------------------------------------------------------------------
    def basic_block(self, x, cin, cout, stride):
        """ResNet basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, shortcut, Add, ReLU."""
        y = self.conv_bn(x, cin, cout, 3, stride)
        y = self.conv_bn(y, cout, cout, 3, 1, act=None, gamma_scale=0.3)
        if stride != 1 or cin != cout:
            x = self.conv_bn(x, cin, cout, 1, stride, act=None)
        return self.relu(self.add(y, x))

    def bottleneck(self, x, cin, mid, stride, expansion=4):
        """ResNet-50 bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand, shortcut, Add, ReLU."""
        cout = mid * expansion
        y = self.conv_bn(x, cin, mid, 1, 1)
        y = self.conv_bn(y, mid, mid, 3, stride)
        y = self.conv_bn(y, mid, cout, 1, 1, act=None, gamma_scale=0.3)
        if stride != 1 or cin != cout:
            x = self.conv_bn(x, cin, cout, 1, stride, act=None)
        return self.relu(self.add(y, x))

    def inverted_residual(self, x, cin, cout, stride, expand):
        """MobileNet-v2 block: 1x1 expand-ReLU6, depthwise 3x3-ReLU6, 1x1 linear project."""
        hid = cin * expand
        y = self.conv_bn(x, cin, hid, 1, 1, act="relu6")
        y = self.conv_bn(y, hid, hid, 3, stride, group=hid, act="relu6")
        residual = stride == 1 and cin == cout
        y = self.conv_bn(y, hid, cout, 1, 1, act=None, gamma_scale=0.3 if residual else 1.0)
        return self.add(y, x) if residual else y

    def separable(self, x, cin, cout, stride, act="relu6"):
        """MobileNet-v1 block: depthwise 3x3-BN-act then pointwise 1x1-BN-act."""
        y = self.conv_bn(x, cin, cin, 3, stride, group=cin, act=act)
        return self.conv_bn(y, cin, cout, 1, 1, act=act)

    # --- finish -----------------------------------------------------------------------------
    def build(self, out, input_shape, output_shape, name):
        """Rename ``out`` to ``"output"`` and wrap everything in a checked ModelProto."""
        last = self.nodes[-1]
        if list(last.output) != [out]:
            raise ValueError(f"{out!r} must be the output of the last node")
        last.output[0] = "output"
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(output_shape))],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tvm_hapm.zoo"
        )
        model.ir_version = 8  # readable by onnxruntime / older tools as well
        onnx.checker.check_model(model)
        return model


def resnet_cifar(depth=20, num_classes=10, in_ch=3, width=16, input_hw=(32, 32), batch=1, seed=0):
    """CIFAR-style ResNet (He et al. 2016, section 4.2) with ``depth = 6n + 2``.

    Parameters
    ----------
    depth : int
        Total number of weighted layers; must be ``6n + 2`` (20, 32, 44, 56, 110, ...).
    num_classes : int
        Number of logits.
    in_ch : int
        Input channels.
    width : int
        Channels of the first stage; the stages have ``width, 2*width, 4*width`` channels.
    input_hw : tuple of int
        Input height and width.
    batch : int
        Fixed batch size.
    seed : int
        Weight seed.

    Returns
    -------
    onnx.ModelProto
        Model with input ``"input"`` ``(batch, in_ch, H, W)`` and output ``"output"``
        ``(batch, num_classes)``. Stage starts use a strided 3x3 conv and a strided 1x1
        conv + BN projection shortcut.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    g = GraphBuilder(seed)
    x = g.conv_bn("input", in_ch, width, 3, 1)
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            x = g.basic_block(x, cin, cout, 2 if stage > 0 and i == 0 else 1)
            cin = cout
    out = g.head(x, cin, num_classes)
    return g.build(out, (batch, in_ch, *input_hw), (batch, num_classes), f"resnet{depth}_cifar")


def _imagenet_stem(g, in_ch):
    x = g.conv_bn("input", in_ch, 64, 7, 2)
    return g.maxpool(x, 3, 2, 1)


def resnet18_imagenet(num_classes=1000, input_hw=(224, 224), batch=1, seed=0, in_ch=3):
    """Standard ResNet-18: 7x7/2 conv-BN-ReLU, 3x3/2 max pool, 4x2 basic blocks, GAP, FC.

    Parameters
    ----------
    num_classes : int
        Number of logits.
    input_hw : tuple of int
        Input height and width (any size >= 32 works).
    batch : int
        Fixed batch size.
    seed : int
        Weight seed.
    in_ch : int
        Input channels.

    Returns
    -------
    onnx.ModelProto
        Model with input ``"input"`` and output ``"output"`` ``(batch, num_classes)``.
    """
    g = GraphBuilder(seed)
    x, cin = _imagenet_stem(g, in_ch), 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for i in range(2):
            x = g.basic_block(x, cin, cout, 2 if stage > 0 and i == 0 else 1)
            cin = cout
    out = g.head(x, cin, num_classes)
    return g.build(out, (batch, in_ch, *input_hw), (batch, num_classes), "resnet18")


def resnet50_imagenet(num_classes=1000, input_hw=(224, 224), batch=1, seed=0, in_ch=3):
    """Standard ResNet-50 (v1.5: stride on the 3x3 conv) with 3-4-6-3 bottleneck blocks.

    Parameters
    ----------
    num_classes : int
        Number of logits.
    input_hw : tuple of int
        Input height and width (any size >= 32 works).
    batch : int
        Fixed batch size.
    seed : int
        Weight seed.
    in_ch : int
        Input channels.

    Returns
    -------
    onnx.ModelProto
        Model with input ``"input"`` and output ``"output"`` ``(batch, num_classes)``.
    """
    g = GraphBuilder(seed)
    x, cin = _imagenet_stem(g, in_ch), 64
    for stage, (mid, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for i in range(blocks):
            x = g.bottleneck(x, cin, mid, 2 if stage > 0 and i == 0 else 1)
            cin = mid * 4
    out = g.head(x, cin, num_classes)
    return g.build(out, (batch, in_ch, *input_hw), (batch, num_classes), "resnet50")


def mobilenet_style(num_classes=10, in_ch=3, input_hw=(32, 40), batch=1, seed=0, odd_channels=True):
    """Small MobileNet-v1/v2 hybrid with depthwise convs, ReLU6 and an inverted residual.

    Layout: 3x3 conv-BN-ReLU6 stem; separable blocks (depthwise 3x3 stride 1, then stride 2,
    each followed by a pointwise 1x1); an inverted-residual block with an Add; a strided
    inverted-residual block; GlobalAveragePool, Flatten, Gemm.

    Parameters
    ----------
    num_classes : int
        Number of logits.
    in_ch : int
        Input channels.
    input_hw : tuple of int
        Input height and width (non-square by default to catch H/W mix-ups).
    batch : int
        Fixed batch size.
    seed : int
        Weight seed.
    odd_channels : bool
        Use odd channel counts (13, 27, 37, 53) that do not tile evenly on hardware arrays,
        instead of (16, 32, 48, 64).

    Returns
    -------
    onnx.ModelProto
        Model with input ``"input"`` and output ``"output"`` ``(batch, num_classes)``.
    """
    c0, c1, c2, c3 = (13, 27, 37, 53) if odd_channels else (16, 32, 48, 64)
    g = GraphBuilder(seed)
    x = g.conv_bn("input", in_ch, c0, 3, 1, act="relu6")
    x = g.separable(x, c0, c1, 1)
    x = g.separable(x, c1, c2, 2)
    x = g.inverted_residual(x, c2, c2, 1, expand=3)
    x = g.inverted_residual(x, c2, c3, 2, expand=2)
    out = g.head(x, c3, num_classes)
    return g.build(out, (batch, in_ch, *input_hw), (batch, num_classes), "mobilenet_style")


def tiny_cnn(num_classes=10, in_ch=3, input_hw=(16, 16), batch=1, seed=0, width=8):
    """Tiny conv net for fast tests.

    Layout: 3x3 conv (pad 1, bias) + ReLU, 2x2 MaxPool, 3x3 conv stride 2 (pad 1, bias) + ReLU,
    1x1 conv (pad 0, bias) + ReLU, Flatten, Gemm.

    Parameters
    ----------
    num_classes : int
        Number of logits.
    in_ch : int
        Input channels.
    input_hw : tuple of int
        Input height and width; both must be multiples of 4.
    batch : int
        Fixed batch size.
    seed : int
        Weight seed.
    width : int
        Channels of the first conv (the second and third have ``2 * width``).

    Returns
    -------
    onnx.ModelProto
        Model with input ``"input"`` and output ``"output"`` ``(batch, num_classes)``.
    """
    h, w = input_hw
    if h % 4 or w % 4:
        raise ValueError(f"input_hw must be multiples of 4, got {input_hw}")
    g = GraphBuilder(seed)
    x = g.relu(g.conv("input", in_ch, width, 3, 1, 1, bias=True))
    x = g.maxpool(x, 2, 2)
    x = g.relu(g.conv(x, width, 2 * width, 3, 2, 1, bias=True))
    x = g.relu(g.conv(x, 2 * width, 2 * width, 1, 1, 0, bias=True))
    flat = 2 * width * (h // 4) * (w // 4)
    out = g.dense(g.node("Flatten", [x]), flat, num_classes)
    return g.build(out, (batch, in_ch, h, w), (batch, num_classes), "tiny_cnn")
