"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 70,000 real 28x28 grayscale images, 10 classes.

The four files are the standard IDX format (``train-images-idx3-ubyte.gz`` and friends, gzip
compressed or not). They are looked for in, in this order: the ``path`` argument, the folder named
by the environment variable :data:`ENV_VAR`, and :data:`DEFAULT_DIR`, where Debian's package
``dataset-fashion-mnist`` installs them.

The 60,000 training images are split once, with a fixed seed, into :data:`VALIDATION_SIZE`
validation images and the rest for training. Every selection the project makes (hyper-parameters,
search winners, the recovered model kept) is made on the validation split; the 10,000 official
test images are only ever reported.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "CLASSES",
    "DEFAULT_DIR",
    "ENV_VAR",
    "FILES",
    "VALIDATION_SEED",
    "VALIDATION_SIZE",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "FashionMNIST",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

#: Environment variable naming a folder that holds the four IDX files.
ENV_VAR = "HAPM_FASHION_MNIST"
#: Where ``apt-get install dataset-fashion-mnist`` puts them.
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
#: split -> (images file, labels file, number of images)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
#: Training images held out as the validation split, and the seed of that split.
VALIDATION_SIZE = 5000
VALIDATION_SEED = 0
#: Class names by label.
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# IDX magic numbers (big-endian): 0x0000 0803 = unsigned bytes, 3 dimensions; 0801 = 1 dimension
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801
_HOW_TO_GET = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu: the files go to "
    f"{DEFAULT_DIR}), or download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
    "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a folder and pass it "
    f"as path= or in the environment variable {ENV_VAR}."
)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are in none of the folders looked in; the message says how to get
    them."""


class DatasetFormatError(ValueError):
    """A dataset file is truncated or is not the IDX file it should be; the message names it."""


class FashionMNIST(NamedTuple):
    """The three splits as NCHW float32 images in [0, 1] and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def read_idx(path, magic: int, count: int, dims: tuple = ()) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzip compressed or not).

    Parameters
    ----------
    path : str or Path
        The file.
    magic : int
        Expected magic number (``0x803`` for images, ``0x801`` for labels).
    count : int
        Expected number of items (first dimension).
    dims : tuple of int
        Expected remaining dimensions (``(28, 28)`` for images).

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(count, *dims)``.

    Raises
    ------
    DatasetFormatError
        Bad gzip stream, wrong magic number, dimensions or count, or fewer or more bytes than the
        header announces; the message names the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetFormatError(f"{path}: cannot read it as a gzip'ed IDX file ({err})") from err
    ndim = 1 + len(dims)
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DatasetFormatError(f"{path}: truncated header ({len(raw)} bytes)")
    got_magic = int.from_bytes(raw[:4], "big")
    if got_magic != magic:
        raise DatasetFormatError(
            f"{path}: bad magic number 0x{got_magic:08x} (expected 0x{magic:08x}); "
            "not an IDX file of this kind"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if shape != (count, *dims):
        raise DatasetFormatError(f"{path}: shape {shape}, expected {(count, *dims)}")
    size = int(np.prod(shape))
    if len(raw) - head != size:
        raise DatasetFormatError(
            f"{path}: {len(raw) - head} data bytes, the header announces {size} "
            f"({'truncated' if len(raw) - head < size else 'trailing bytes'})"
        )
    return np.frombuffer(raw, np.uint8, size, head).reshape(shape)


def find_fashion_mnist(path=None) -> Path:
    """The folder holding the dataset: ``path``, else ``$HAPM_FASHION_MNIST``, else
    :data:`DEFAULT_DIR`; the first that is given is the only one looked in.

    Raises
    ------
    DatasetNotFoundError
        A file is missing; the message lists the folder and says how to get the dataset.
    """
    given = path if path is not None else os.environ.get(ENV_VAR) or None
    folder = Path(given) if given is not None else DEFAULT_DIR
    for images, labels, _ in FILES.values():
        for stem in (images, labels):
            if not (folder / f"{stem}.gz").is_file() and not (folder / stem).is_file():
                where = "path=" if path is not None else ENV_VAR if given else "the default folder"
                raise DatasetNotFoundError(
                    f"Fashion-MNIST not found: {folder / stem}.gz is missing ({where}). "
                    + _HOW_TO_GET
                )
    return folder


def _file(folder: Path, stem: str) -> Path:
    gz = folder / f"{stem}.gz"
    return gz if gz.is_file() else folder / stem


def _images(raw: np.ndarray, size: int) -> np.ndarray:
    x = raw.astype(np.float32) / 255.0
    pad = (size - 28) // 2
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    return np.ascontiguousarray(x[:, None])


def load_fashion_mnist(
    path=None, size: int = 32, val_size: int = VALIDATION_SIZE, seed: int = VALIDATION_SEED
) -> FashionMNIST:
    """Load Fashion-MNIST as training, validation and test splits.

    Parameters
    ----------
    path : str or Path, optional
        Folder with the four IDX files (see the module docstring for where else it looks).
    size : {28, 32}
        Image height and width: 28 as stored, or 32 with two zero pixels on every side (the
        input of the CIFAR-style ResNets).
    val_size : int
        Training images held out, by a permutation seeded with ``seed``, as the validation split.
    seed : int
        Seed of that permutation; the defaults give the split every benchmark of the project uses.

    Returns
    -------
    FashionMNIST
        ``x_*`` are ``(N, 1, size, size)`` float32 in [0, 1] (pixel / 255), ``y_*`` int64 labels;
        ``60000 - val_size`` training, ``val_size`` validation and 10,000 test images.

    Raises
    ------
    DatasetNotFoundError, DatasetFormatError
    """
    if size not in (28, 32):
        raise ValueError(f"size must be 28 or 32, got {size}")
    if not 0 <= val_size < FILES["train"][2]:
        raise ValueError(f"val_size must be in [0, {FILES['train'][2]}), got {val_size}")
    folder = find_fashion_mnist(path)
    arrays = {}
    for split, (images, labels, count) in FILES.items():
        x = read_idx(_file(folder, images), _IMAGES_MAGIC, count, (28, 28))
        y = read_idx(_file(folder, labels), _LABELS_MAGIC, count)
        if y.max() >= len(CLASSES):
            raise DatasetFormatError(f"{_file(folder, labels)}: label {y.max()} out of range")
        arrays[split] = (_images(x, size), y.astype(np.int64))
    x_train, y_train = arrays["train"]
    order = np.random.default_rng(seed).permutation(len(x_train))
    val, fit = np.sort(order[:val_size]), np.sort(order[val_size:])
    return FashionMNIST(x_train[fit], y_train[fit], x_train[val], y_train[val], *arrays["test"])
