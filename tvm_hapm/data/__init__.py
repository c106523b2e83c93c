"""Bundled data: scikit-learn's digits (offline) and a small CNN trained on them.

``load_digits`` gives a fixed, deterministic train/test split as NCHW float32 arrays.
``load_bundled_model`` returns ``digits_cnn.onnx`` (trained by ``examples/train_digits_cnn.py``)
with its batch dimension fixed to the requested size; ``bundled_model_info`` returns the
metadata recorded next to it (test accuracy, seed, architecture, training command).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from .fashion_mnist import (
    DatasetFormatError,
    DatasetNotFoundError,
    FashionMNIST,
    load_fashion_mnist,
)

__all__ = [
    "BUNDLED_INFO",
    "BUNDLED_MODEL",
    "DATA_DIR",
    "FASHION_DEPTHS",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "FashionMNIST",
    "RESNET20_INFO",
    "RESNET20_MODEL",
    "bundled_model_info",
    "fashion_resnet_info",
    "load_bundled_model",
    "load_bundled_resnet20",
    "load_digits",
    "load_fashion_mnist",
    "load_fashion_resnet",
    "resnet20_info",
    "set_batch",
]

DATA_DIR = Path(__file__).resolve().parent
#: The trained digits CNN (batch 1, input ``(1, 1, 16, 16)``, output ``(1, 10)``).
BUNDLED_MODEL = DATA_DIR / "digits_cnn.onnx"
#: JSON metadata of the bundled model.
BUNDLED_INFO = DATA_DIR / "digits_cnn.json"
#: CIFAR-style ResNet-20 trained on 32x32 RGB-shaped digits (``examples/train_resnet20_digits.py``).
RESNET20_MODEL = DATA_DIR / "resnet20_digits.onnx"
#: JSON metadata of the bundled ResNet-20.
RESNET20_INFO = DATA_DIR / "resnet20_digits.json"
#: CIFAR-style ResNets trained on Fashion-MNIST (``examples/train_fashion_mnist.py``), by depth.
FASHION_DEPTHS = (20, 56)


def load_digits(size=16, channels=1, test_size=0.25, random_state=0):
    """Load scikit-learn's 8x8 digits as images with a fixed train/test split.

    Pixel values (0..16) are scaled to [0, 1] and bilinearly upsampled with
    ``scipy.ndimage.zoom(order=1, mode="nearest")``, which is deterministic.

    Parameters
    ----------
    size : {8, 16, 32}
        Output height and width.
    channels : {1, 3}
        1 for grayscale, 3 to replicate the gray channel (RGB-shaped inputs).
    test_size : float
        Fraction of the 1797 samples in the test split (stratified by label).
    random_state : int
        Seed of the split. The defaults give the split the bundled model was evaluated on.

    Returns
    -------
    x_train, y_train, x_test, y_test : numpy.ndarray
        Images ``(N, channels, size, size)`` float32 in [0, 1] and labels ``(N,)`` int64.
        With the defaults: 1347 training and 450 test samples.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if size not in (8, 16, 32):
        raise ValueError(f"size must be 8, 16 or 32, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    digits = _sk_load_digits()
    x = digits.images.astype(np.float64) / 16.0  # (N, 8, 8)
    if size != 8:
        from scipy.ndimage import zoom

        f = size / 8
        x = zoom(x, (1, f, f), order=1, mode="nearest", grid_mode=True)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)[:, None]
    if channels == 3:
        x = np.repeat(x, 3, axis=1)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=random_state, stratify=y
    )
    c = np.ascontiguousarray
    return c(x_tr), c(y_tr), c(x_te), c(y_te)


def set_batch(model, batch):
    """Return a copy of ``model`` whose graph inputs and outputs have batch dimension ``batch``.

    Parameters
    ----------
    model : onnx.ModelProto
        Model whose inputs/outputs have the batch as their first dimension.
    batch : int or str
        Fixed batch size, or a symbolic dimension name (e.g. ``"N"``).

    Returns
    -------
    onnx.ModelProto
        The modified copy (value_info shapes of intermediate values are dropped).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in list(m.graph.input) + list(m.graph.output):
        dim = vi.type.tensor_type.shape.dim[0]
        if isinstance(batch, str):
            dim.dim_param = batch
        else:
            dim.dim_value = int(batch)
    return m


def load_bundled_model(batch=1):
    """Load the bundled digits CNN with a fixed batch size.

    Parameters
    ----------
    batch : int or str
        Batch size written into the input ``"input"`` ``(batch, 1, 16, 16)`` and output
        ``"output"`` ``(batch, 10)``; a string makes it symbolic.

    Returns
    -------
    onnx.ModelProto
        The checked model. Its graph reshapes with ``Flatten`` so any batch is valid.
    """
    m = set_batch(onnx.load(str(BUNDLED_MODEL)), batch)
    onnx.checker.check_model(m)
    return m


def bundled_model_info():
    """Return the metadata of the bundled model (``digits_cnn.json``) as a dict.

    Returns
    -------
    dict
        Keys include ``test_accuracy``, ``seed``, ``architecture``, ``command``, ``data``.
    """
    return json.loads(BUNDLED_INFO.read_text())


def load_bundled_resnet20(batch=1):
    """Load the bundled ResNet-20 (``resnet20_digits.onnx``) with a fixed batch size.

    The graph is exactly ``tvm_hapm.models.zoo.resnet_cifar(depth=20, in_ch=3, width=16)``
    (Conv, BatchNormalization with running statistics, Relu, Add, GlobalAveragePool, Flatten,
    Gemm) with trained weights; evaluate it on ``load_digits(size=32, channels=3)``.

    Parameters
    ----------
    batch : int or str
        Batch size of input ``"input"`` ``(batch, 3, 32, 32)`` and output ``"output"``
        ``(batch, 10)``; a string makes it symbolic.

    Returns
    -------
    onnx.ModelProto
    """
    m = set_batch(onnx.load(str(RESNET20_MODEL)), batch)
    onnx.checker.check_model(m)
    return m


def _fashion_path(depth: int, suffix: str) -> Path:
    if depth not in FASHION_DEPTHS:
        raise ValueError(f"depth must be one of {FASHION_DEPTHS}, got {depth}")
    return DATA_DIR / f"resnet{depth}_fashion{suffix}"


def load_fashion_resnet(depth: int = 20, batch=1):
    """Load the bundled ResNet-``depth`` trained on Fashion-MNIST with a fixed batch size.

    The graph is the ONNX export of ``tvm_hapm.torch.resnet_cifar(depth, in_ch=1)``, with the
    layers of ``tvm_hapm.models.zoo.resnet_cifar(depth, in_ch=1)`` (initializers named by the
    PyTorch parameters); evaluate it on :func:`load_fashion_mnist` (32x32).  Its record
    (:func:`fashion_resnet_info`) has the training run and the float and int8 accuracies.

    Parameters
    ----------
    depth : {20, 56}
        The network.
    batch : int or str
        Batch size of input ``"input"`` ``(batch, 1, 32, 32)`` and output ``"output"``
        ``(batch, 10)``; a string makes it symbolic.

    Returns
    -------
    onnx.ModelProto
    """
    m = set_batch(onnx.load(str(_fashion_path(depth, ".onnx"))), batch)
    onnx.checker.check_model(m)
    return m


def fashion_resnet_info(depth: int = 20) -> dict:
    """The record of the bundled Fashion-MNIST ResNet-``depth`` (``resnet<depth>_fashion.json``)."""
    return json.loads(_fashion_path(depth, ".json").read_text())


def resnet20_info():
    """Return the metadata of the bundled ResNet-20 (``resnet20_digits.json``) as a dict."""
    return json.loads(RESNET20_INFO.read_text())
