"""PyTorch twins of the ONNX builders of :mod:`tvm_hapm.models.zoo`.

``resnet_cifar`` and ``mobilenet_style`` build ``torch.nn.Module`` networks with the layer
structure of :func:`tvm_hapm.models.zoo.resnet_cifar` and
:func:`~tvm_hapm.models.zoo.mobilenet_style`: exported with :func:`tvm_hapm.torch.export_onnx`
they give the same ONNX operators in the same order (Conv without bias, BatchNormalization, Relu
or Clip, Add, GlobalAveragePool, Flatten, Gemm), so everything the project does with the zoo's
graphs applies to them.  The examples train them; the tests use them as "a user's own module"
with residuals, strided 1x1 shortcuts, depthwise convolutions and odd channel counts.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BasicBlock",
    "ConvBN",
    "InvertedResidual",
    "ResNetCifar",
    "mobilenet_style",
    "resnet_cifar",
]


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm + optional activation (``"relu"``, ``"relu6"`` or None)."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act="relu"):
        super().__init__()
        if act not in ("relu", "relu6", None):
            raise ValueError(f"act must be 'relu', 'relu6' or None, got {act!r}")
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.act == "relu":
            return F.relu(y)
        if self.act == "relu6":
            return F.relu6(y)
        return y


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, shortcut (a strided 1x1 conv-BN
    projection when the shape changes), Add, ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3, stride)
        self.conv2 = ConvBN(cout, cout, 3, 1, act=None)
        projection = stride != 1 or cin != cout
        self.shortcut = ConvBN(cin, cout, 1, stride, act=None) if projection else None

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2), ``depth = 6n + 2``: a 3x3 conv-BN-ReLU
    stem, three stages of ``n`` basic blocks (``width``, ``2 width``, ``4 width`` channels; the
    first block of stages 2 and 3 strided), global average pooling and a linear classifier."""

    def __init__(self, depth=20, num_classes=10, in_ch=1, width=16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.stem = ConvBN(in_ch, width, 3, 1)
        stages, cin = [], width
        for s, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if s > 0 and i == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # zero-init the last BN of every residual branch (Goyal et al. 2017): each block starts
        # as the identity, which trains deep ResNets faster
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.conv2.bn.weight)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_cifar(depth=20, num_classes=10, in_ch=1, width=16, seed=0) -> ResNetCifar:
    """A :class:`ResNetCifar` with weights drawn from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return ResNetCifar(depth, num_classes, in_ch, width)


class InvertedResidual(nn.Module):
    """MobileNet-v2 block: 1x1 expand-ReLU6, depthwise 3x3-ReLU6, 1x1 linear projection, and an
    Add when the shape is kept."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hid = cin * expand
        self.expand = ConvBN(cin, hid, 1, 1, act="relu6")
        self.depthwise = ConvBN(hid, hid, 3, stride, groups=hid, act="relu6")
        self.project = ConvBN(hid, cout, 1, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return y + x if self.residual else y


class _MobileNetStyle(nn.Module):
    def __init__(self, num_classes, in_ch, channels):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.features = nn.Sequential(
            ConvBN(in_ch, c0, 3, 1, act="relu6"),
            ConvBN(c0, c0, 3, 1, groups=c0, act="relu6"),
            ConvBN(c0, c1, 1, 1, act="relu6"),
            ConvBN(c1, c1, 3, 2, groups=c1, act="relu6"),
            ConvBN(c1, c2, 1, 1, act="relu6"),
            InvertedResidual(c2, c2, 1, expand=3),
            InvertedResidual(c2, c3, 2, expand=2),
        )
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def mobilenet_style(num_classes=10, in_ch=3, odd_channels=True, seed=0) -> nn.Module:
    """The layers of :func:`tvm_hapm.models.zoo.mobilenet_style`: stem, two separable blocks
    (depthwise 3x3 + pointwise 1x1, the second strided), an inverted residual with an Add, a
    strided inverted residual, pooling and a linear classifier; odd channel counts (13, 27, 37,
    53) by default."""
    torch.manual_seed(seed)
    channels = (13, 27, 37, 53) if odd_channels else (16, 32, 48, 64)
    return _MobileNetStyle(num_classes, in_ch, channels)
