"""Atomic outputs: a file or folder is complete and new, or the old one is left as it was."""

from __future__ import annotations

import json

import pytest

from tvm_hapm import atomic
from tvm_hapm.cli import io as cli_io
from tvm_hapm.cli import main
from tvm_hapm.data import BUNDLED_MODEL


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_write_bytes_replaces_or_leaves_the_file(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    atomic.write_bytes(target, b"old")
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and _siblings(target) == ["model.onnx"]

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_bytes(target, b"half")
    assert target.read_bytes() == b"new" and _siblings(target) == ["model.onnx"]


def test_write_figure_renders_in_memory_then_writes_atomically(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png, svg = tmp_path / "plot.png", tmp_path / "plot.svg"
    atomic.write_figure(png, fig)
    atomic.write_figure(svg, fig)
    assert png.read_bytes().startswith(b"\x89PNG") and b"<svg" in svg.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", interrupted)
    before = png.read_bytes()
    ax.plot([0, 1], [0, 1])
    with pytest.raises(KeyboardInterrupt):
        atomic.write_figure(png, fig)
    plt.close(fig)
    assert png.read_bytes() == before and _siblings(png) == ["plot.png", "plot.svg"]


def test_replaced_dir_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    (out / "stale.hapm").write_text("from a bigger model")
    with atomic.replaced_dir(out, "report.json") as staged:
        assert staged.parent == tmp_path and staged != out
        (staged / "report.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert (out / "report.json").read_text() == "new" and _siblings(out) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replaced_dir_interrupted_leaves_the_old_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with atomic.replaced_dir(out, "report.json") as staged:
        (staged / "report.json").write_text("first")
    with pytest.raises(KeyboardInterrupt), atomic.replaced_dir(out, "report.json") as staged:
        (staged / "report.json").write_text("second")
        raise KeyboardInterrupt
    assert (out / "report.json").read_text() == "first" and _siblings(out) == ["out"]
    with atomic.replaced_dir(out, "report.json") as staged:
        (staged / "report.json").write_text("third")
    assert (out / "report.json").read_text() == "third" and _siblings(out) == ["out"]


def test_replaced_dir_refuses_what_is_not_an_output(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError), atomic.replaced_dir(mine, "report.json"):
        pass
    assert (mine / "thesis.tex").read_text() == "precious"
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError), atomic.replaced_dir(afile):
        pass


def _compile(out, calib):
    return main(["compile", str(BUNDLED_MODEL), "--calibration", str(calib),
                 "--calibration-samples", "2", "-o", str(out)])  # fmt: skip


def test_compile_output_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    import numpy as np

    from tvm_hapm.data import load_digits

    calib = tmp_path / "calib.npy"
    np.save(calib, load_digits(size=16, channels=1)[0][:4])
    out = tmp_path / "out"
    assert _compile(out, calib) == 0
    first = (out / "report.json").read_text()
    (out / "programs" / "999_stale.hapm").write_bytes(b"left by an older, bigger model")
    # interrupted while writing the programs: the previous output stays, nothing is left over
    calls = []

    def interrupted(programs, folder):
        calls.append(folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_io, "write_programs", interrupted)
    assert _compile(out, calib) == 130
    assert calls and calls[0].parent.parent == tmp_path  # it was writing a staging folder
    assert (out / "report.json").read_text() == first
    assert (out / "programs" / "999_stale.hapm").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "out"]
    monkeypatch.undo()
    # a complete recompile leaves no stale program
    assert _compile(out, calib) == 0
    assert not (out / "programs" / "999_stale.hapm").exists()
    report = json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in (out / "programs").iterdir() if p.suffix == ".hapm") == sorted(
        row["program"].split("/")[-1] for row in report["accelerator"]
    )
    # a folder that is not a previous output, and a file, are refused with exit 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert _compile(mine, calib) == 2 and (mine / "notes.txt").read_text() == "keep"
    assert _compile(calib, calib) == 2 and np.load(calib).shape == (4, 1, 16, 16)
    assert "-o" in capsys.readouterr().err


def test_outputs_get_ordinary_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    f = atomic.write_bytes(tmp_path / "a.bin", b"x")
    assert f.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    os.chmod(f, 0o640)
    atomic.write_bytes(f, b"y")
    assert f.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
    with atomic.replaced_dir(tmp_path / "d") as staged:
        (staged / "f").write_text("z")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask
