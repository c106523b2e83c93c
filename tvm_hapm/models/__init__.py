"""ONNX model builders used by the tests, the demo and the benchmarks."""

from .zoo import (
    OPSET,
    GraphBuilder,
    mobilenet_style,
    resnet18_imagenet,
    resnet50_imagenet,
    resnet_cifar,
    tiny_cnn,
)

__all__ = [
    "OPSET",
    "GraphBuilder",
    "mobilenet_style",
    "resnet18_imagenet",
    "resnet50_imagenet",
    "resnet_cifar",
    "tiny_cnn",
]
