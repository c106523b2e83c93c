"""The code of the documentation runs: the PyTorch example of docs/pytorch.md."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import tvm_hapm.data

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_pytorch_example_runs(tmp_path, monkeypatch, capsys):
    (code,) = _python_blocks(ROOT / "docs" / "pytorch.md")
    # a small stand-in for the dataset and 3 of the 200 fine-tuning steps keep the test short
    rng = np.random.default_rng(0)

    def split(n):
        return rng.random((n, 1, 32, 32), dtype=np.float32), rng.integers(0, 10, n)

    fake = tvm_hapm.data.FashionMNIST(*split(256), *split(64), *split(64))
    monkeypatch.setattr(tvm_hapm.data, "load_fashion_mnist", lambda *a, **k: fake)
    monkeypatch.chdir(tmp_path)
    assert "range(200)" in code
    exec(compile(code.replace("range(200)", "range(3)"), "docs/pytorch.md", "exec"), {})
    out = capsys.readouterr().out
    assert "groups removed" in out and "validation top-1" in out and "GEMMs" in out
    assert (tmp_path / "resnet20_hapm.onnx").is_file()
