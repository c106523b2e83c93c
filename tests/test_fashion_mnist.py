"""The Fashion-MNIST loader: the IDX format, its failure modes and the fixed validation split."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from tvm_hapm.data import (
    FASHION_DEPTHS,
    fashion_resnet_info,
    load_fashion_mnist,
    load_fashion_resnet,
)
from tvm_hapm.data import fashion_mnist as fm


def _idx(data: np.ndarray, magic: int) -> bytes:
    return (
        struct.pack(">I", magic)
        + b"".join(struct.pack(">I", d) for d in data.shape)
        + (data.astype(np.uint8).tobytes())
    )


def _write_dataset(folder, n_train=60000, n_test=10000, compress=True, seed=0):
    """The four files with random pixels; labels ``i % 10``.  Returns the arrays written."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, (images, labels, _) in fm.FILES.items():
        n = n_train if split == "train" else n_test
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for stem, arr, magic in ((images, x, 0x803), (labels, y, 0x801)):
            raw = _idx(arr, magic)
            if compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(raw, mtime=0))
            else:
                (folder / stem).write_bytes(raw)
        out[split] = (x, y)
    return out


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    return folder, _write_dataset(folder)


def test_reads_the_idx_files_into_three_splits(dataset_dir):
    folder, raw = dataset_dir
    d = load_fashion_mnist(folder, size=28)
    assert [len(a) for a in d] == [55000, 55000, 5000, 5000, 10000, 10000]
    assert d.x_train.shape[1:] == (1, 28, 28) and d.x_train.dtype == np.float32
    np.testing.assert_array_equal(d.x_test[:, 0], raw["test"][0] / np.float32(255))
    np.testing.assert_array_equal(d.y_test, raw["test"][1])
    # the validation split and the rest partition the training images, in file order
    x_tr, y_tr = raw["train"]
    seen = np.concatenate([d.x_train[:, 0], d.x_val[:, 0]]) * 255
    assert sorted(map(bytes, seen.round().astype(np.uint8))) == sorted(map(bytes, x_tr))
    assert d.y_train.dtype == np.int64


def test_padding_to_32_keeps_the_image_centred(dataset_dir):
    folder, raw = dataset_dir
    d = load_fashion_mnist(folder)
    assert d.x_test.shape[1:] == (1, 32, 32)
    np.testing.assert_array_equal(d.x_test[:, 0, 2:30, 2:30] * 255, raw["test"][0])
    assert not d.x_test[:, :, :2].any() and not d.x_test[:, :, :, 30:].any()


def test_validation_split_is_fixed_and_seeded(dataset_dir):
    folder, _ = dataset_dir
    a, b = load_fashion_mnist(folder, size=28), load_fashion_mnist(folder, size=28)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    c = load_fashion_mnist(folder, size=28, seed=1)
    assert not np.array_equal(a.x_val, c.x_val)
    d = load_fashion_mnist(folder, size=28, val_size=100)
    assert len(d.x_val) == 100 and len(d.x_train) == 59900


def test_uncompressed_files_and_the_environment_variable(tmp_path, monkeypatch):
    _write_dataset(tmp_path, n_train=60000, n_test=10000, compress=False, seed=1)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    d = load_fashion_mnist(size=28)
    assert len(d.x_test) == 10000


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    with pytest.raises(fm.DatasetNotFoundError) as err:
        load_fashion_mnist(tmp_path)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte" in msg and fm.ENV_VAR in msg
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=fm.ENV_VAR):
        load_fashion_mnist()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda raw: raw[:-5], "truncated"),
        (lambda raw: raw + b"\0", "trailing bytes"),
        (lambda raw: b"\0\0\x08\x01" + raw[4:], "bad magic"),
        (lambda raw: raw[:4] + struct.pack(">I", 9999) + raw[8:], "shape"),
        (lambda raw: raw[:6], "truncated header"),
    ],
    ids=["short-read", "trailing", "magic", "count", "header"],
)
def test_malformed_files_name_the_file(tmp_path, corrupt, message):
    _write_dataset(tmp_path, compress=False)
    target = tmp_path / "t10k-images-idx3-ubyte"
    target.write_bytes(corrupt(target.read_bytes()))
    with pytest.raises(fm.DatasetFormatError, match=message) as err:
        load_fashion_mnist(tmp_path)
    assert str(target) in str(err.value)


def test_broken_gzip_names_the_file(tmp_path):
    _write_dataset(tmp_path)
    target = tmp_path / "train-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:40])
    with pytest.raises(fm.DatasetFormatError, match="train-labels-idx1-ubyte.gz"):
        load_fashion_mnist(tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        load_fashion_mnist(size=30)
    with pytest.raises(ValueError, match="val_size"):
        load_fashion_mnist(val_size=60000)


@pytest.mark.slow
def test_real_dataset():
    """The Debian package's files (``apt-get install dataset-fashion-mnist``)."""
    if os.environ.get(fm.ENV_VAR) is None and not fm.DEFAULT_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed in {fm.DEFAULT_DIR}")
    d = load_fashion_mnist()
    assert [len(a) for a in d] == [55000, 55000, 5000, 5000, 10000, 10000]
    # the official test set is balanced: 1,000 images per class
    np.testing.assert_array_equal(np.bincount(d.y_test), [1000] * 10)
    # the mean pixel of the real images (0.286), not of random data (0.5)
    assert 0.28 < load_fashion_mnist(size=28).x_test.mean() < 0.29


# ------------------------------------------------------------------------------- trained models
@pytest.mark.parametrize("depth", FASHION_DEPTHS)
def test_trained_model_records_meet_the_targets(depth):
    """The shipped ResNets (examples/train_fashion_mnist.py): >= 93% float top-1 on the 10,000
    test images, int8 within 0.5 point of float, the calibration chosen on validation."""
    info = fashion_resnet_info(depth)
    model = load_fashion_resnet(depth, batch=2)
    assert info["architecture"]["depth"] == depth and info["test_images"] == 10000
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert params >= info["architecture"]["parameters"]  # BN statistics add to the count
    assert info["test_accuracy"] >= 0.93
    assert abs(info["int8_test_accuracy"] - info["test_accuracy"]) <= 0.005
    assert info["int8_calibration"]["chosen_on"] == "validation"
    assert info["int8_checked_against_llvm"]["bit_exact"]


@pytest.mark.slow
@pytest.mark.parametrize("depth", FASHION_DEPTHS)
def test_trained_model_reproduces_its_record(depth):
    """The shipped ONNX gives the recorded float accuracy on the real test set."""
    if os.environ.get(fm.ENV_VAR) is None and not fm.DEFAULT_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed in {fm.DEFAULT_DIR}")
    from tvm_hapm.flow import float_accuracy

    d = load_fashion_mnist()
    got = float_accuracy(load_fashion_resnet(depth, batch=1), d.x_test, d.y_test)
    assert got == pytest.approx(fashion_resnet_info(depth)["test_accuracy"], abs=1e-4)
