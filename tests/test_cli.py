"""Tests of the ``hapm`` command line (in-process through ``main``, plus one console-script run)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

import tvm_hapm
from tvm_hapm.cli import main
from tvm_hapm.data import BUNDLED_MODEL, load_digits
from tvm_hapm.target.program import Program


@pytest.fixture(scope="module")
def digits():
    return load_digits(size=16, channels=1)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, digits):
    """Calibration data (24 training images) and an input file (6 test images)."""
    x_train, _, x_test, _ = digits
    d = tmp_path_factory.mktemp("data")
    np.save(d / "calib.npy", x_train[:24])
    np.save(d / "x.npy", x_test[:6])
    return d


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, data_files):
    """``hapm compile`` of the bundled model with 4 calibration samples."""
    out = tmp_path_factory.mktemp("compiled") / "out"
    rc = main(
        [
            "compile",
            str(BUNDLED_MODEL),
            "--calibration",
            str(data_files / "calib.npy"),
            "--calibration-samples",
            "4",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    return out


def test_compile_writes_artifacts(compiled):
    assert (compiled / "model.so").is_file()
    report = json.loads((compiled / "report.json").read_text())
    assert report["config"]["name"] == "zedboard"
    assert report["input"] == {"name": "input", "shape": [1, 1, 16, 16], "dtype": "float32"}
    assert report["calibration"]["samples"] == 4
    kinds = [row["kind"] for row in report["accelerator"]]
    assert kinds.count("conv2d") == 2 and "dense" in kinds
    assert report["host"], "quantize/dequantize of the float input and output run on the host"
    for row in report["accelerator"]:
        prog = Program.from_bytes((compiled / row["program"]).read_bytes())
        assert prog.layer == row["layer"]
        assert len(prog.instructions) == row["instructions"] == sum(row["by_opcode"].values())
        listing = (compiled / "programs" / f"{row['layer']}.s").read_text()
        assert listing.startswith(f"; layer {row['layer']}")


def test_run_matches_direct_execution(compiled, data_files, tmp_path, capsys):
    y_path = tmp_path / "y.npy"
    rc = main(["run", str(compiled), "--input", str(data_files / "x.npy"), "--output", str(y_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "output shape (6, 10)" in out and "argmax" in out
    assert "000_conv2d" in out and "total" in out
    y = np.load(y_path)

    # The same library loaded and run directly, one sample at a time (the model's batch is 1).
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(compiled / "model.so")), tvm.cpu())
    x = np.load(data_files / "x.npy")
    direct = np.concatenate(
        [vm["main"](tvm.runtime.tensor(x[i : i + 1])).numpy() for i in range(6)]
    )
    np.testing.assert_array_equal(y, direct)
    macs = tvm_hapm.runtime.last_run_stats().macs  # of the last direct run: one sample
    assert macs > 0 and f"{6 * macs:,}" in out  # the table sums the 6 runs


def test_run_single_sample_without_batch_axis(compiled, digits, tmp_path, capsys):
    np.save(tmp_path / "x1.npy", digits[2][0])  # (1, 16, 16)
    assert main(["run", str(compiled), "--input", str(tmp_path / "x1.npy")]) == 0
    assert np.load(compiled / "output.npy").shape == (1, 10)
    assert "output shape (1, 10)" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_digest"])
def test_run_refuses_a_damaged_library(compiled, data_files, tmp_path, capsys, damage):
    copy = tmp_path / "out"
    shutil.copytree(compiled, copy)
    lib, report_path = copy / "model.so", copy / "report.json"
    report = json.loads(report_path.read_text())
    assert report["sha256"]["model.so"] == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert set(report["sha256"]) == {"model.so"} | {
        f"programs/{p.name}" for p in (copy / "programs").iterdir()
    }
    data = bytearray(lib.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x04
        lib.write_bytes(bytes(data))
    elif damage == "truncate":
        lib.write_bytes(bytes(data[: len(data) // 3]))
    else:
        del report["sha256"]
        report_path.write_text(json.dumps(report))
    assert main(["run", str(copy), "--input", str(data_files / "x.npy")]) == 2
    assert "SHA-256" in _error(capsys)


def test_rtlsim_cosimulates_every_layer(compiled, data_files, tmp_path, capsys):
    """``hapm rtlsim``: every accelerator layer of one run on the RTL, bit-exact, with the
    timing model's cycles next to the RTL's; the report is written where asked."""
    report = tmp_path / "rtl.json"
    rc = main(
        ["rtlsim", str(compiled), "--input", str(data_files / "x.npy"), "--report", str(report)]
    )
    assert rc == 0
    result = json.loads(report.read_text())
    programs = sorted((compiled / "programs").glob("*.hapm"))
    assert result["bit_exact"] and len(result["layers"]) == len(programs)
    assert all(layer["rtl_cycles"] > 0 for layer in result["layers"])
    assert "bit-exact" in capsys.readouterr().out


def test_disasm_file_and_directory(compiled, capsys):
    first = sorted((compiled / "programs").glob("*.hapm"))[0]
    prog = Program.from_bytes(first.read_bytes())
    assert main(["disasm", str(first)]) == 0
    out = capsys.readouterr().out
    assert f"layer {prog.layer}" in out and f"config {prog.config.name}" in out
    assert "dram0:" in out
    numbered = [ln for ln in out.splitlines() if ln.split(":")[0].strip().isdigit()]
    assert len(numbered) == len(prog.instructions)
    assert numbered[-1].split(":", 1)[1].strip().startswith("finish")
    # The .s file written by compile is the same listing with the header commented out.
    listing = first.with_suffix(".s").read_text()
    assert [ln for ln in listing.splitlines() if not ln.startswith(";")] == numbered

    assert main(["disasm", str(compiled)]) == 0
    out = capsys.readouterr().out
    assert out.count("layer ") == len(list((compiled / "programs").glob("*.hapm")))


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_malformed_onnx(tmp_path, data_files, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    out = tmp_path / "o"
    rc = main(["compile", str(bad), "--calibration", str(data_files / "calib.npy"), "-o", str(out)])
    assert rc == 2
    assert "not a valid ONNX model" in _error(capsys)
    assert not out.exists()


def test_missing_files(tmp_path, data_files, compiled, capsys):
    calib = str(data_files / "calib.npy")
    out = str(tmp_path / "o")
    assert main(["compile", str(tmp_path / "nope.onnx"), "--calibration", calib, "-o", out]) == 2
    assert "ONNX model not found" in _error(capsys)
    missing = str(tmp_path / "nope.npy")
    assert main(["compile", str(BUNDLED_MODEL), "--calibration", missing, "-o", out]) == 2
    assert "calibration file not found" in _error(capsys)
    assert main(["run", str(tmp_path / "nodir"), "--input", calib]) == 2
    assert "not found" in _error(capsys)
    assert main(["run", str(compiled), "--input", missing]) == 2
    assert "input file not found" in _error(capsys)
    assert main(["disasm", str(tmp_path / "nope.hapm")]) == 2
    assert "not found" in _error(capsys)


def test_wrong_data_shape(tmp_path, compiled, capsys):
    np.save(tmp_path / "wrong.npy", np.zeros((4, 1, 8, 8), np.float32))
    rc = main(
        [
            "compile",
            str(BUNDLED_MODEL),
            "--calibration",
            str(tmp_path / "wrong.npy"),
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "expects (1, 1, 16, 16)" in _error(capsys)
    assert main(["run", str(compiled), "--input", str(tmp_path / "wrong.npy")]) == 2
    assert "expects (1, 1, 16, 16)" in _error(capsys)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs_are_refused(tmp_path, compiled, data_files, capsys, bad):
    x = np.load(data_files / "x.npy")
    x[2, 0, 3, 4] = bad
    np.save(tmp_path / "bad.npy", x)
    assert main(["run", str(compiled), "--input", str(tmp_path / "bad.npy")]) == 2
    assert "1 NaN or infinite value(s) in the input (the first at index (2, 0, 3, 4))" in _error(
        capsys
    )
    out = tmp_path / "o"
    argv = ["compile", str(BUNDLED_MODEL), "--calibration", str(tmp_path / "bad.npy"), "-o"]
    assert main([*argv, str(out)]) == 2
    assert "NaN or infinite" in _error(capsys) and not out.exists()


@pytest.mark.parametrize(
    "arrays, problem",
    [
        (None, "not a single array"),
        ({"x_train": np.full((4, 1, 16, 16), np.nan)}, "missing y_train"),
        ({"x_train": np.full((4, 1, 16, 16), np.nan), "y_train": np.arange(4)}, "finite"),
        ({"x_train": np.zeros((4, 1, 16, 16)), "y_train": np.full(4, 0.5)}, "class indices"),
        ({"x_train": np.zeros((4, 1, 16, 16)), "y_train": np.arange(3)}, "class indices"),
    ],
)
def test_bad_training_data_is_refused(tmp_path, capsys, arrays, problem):
    if arrays is None:
        path = tmp_path / "data.npy"
        np.save(path, np.zeros(3))
    else:
        path = tmp_path / "data.npz"
        np.savez(path, **arrays)
    argv = ["prune", str(BUNDLED_MODEL), "--sparsity", "0.5", "--data", str(path)]
    assert main([*argv, "-o", str(tmp_path / "o")]) == 2
    assert problem in _error(capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["compile", "M", "--calibration", "C", "--batch", "0", "-o", "O"],
        ["compile", "M", "--calibration", "C", "--calibration-samples", "-1", "-o", "O"],
        ["compile", "M", "--calibration", "C", "--batch", "two", "-o", "O"],
        ["tune", "M", "--workers", "0", "-o", "O"],
        ["tune", "M", "--trials", "0", "-o", "O"],
        ["demo", "--images", "0"],
        ["prune", "M", "--sparsity", "0.5", "--stages", "0", "-o", "O"],
        ["optimize", "M", "--episodes", "0", "-o", "O"],
        ["profile", "M", "--seed", "-3", "-o", "O"],
    ],
)
def test_out_of_range_counts_are_usage_errors(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert "is not >= " in err or "is not an integer" in err, err


def test_unknown_target_and_bad_config(tmp_path, data_files, capsys):
    base = ["compile", str(BUNDLED_MODEL), "--calibration", str(data_files / "calib.npy")]
    base += ["-o", str(tmp_path / "o")]
    assert main([*base, "--target", "hapm_fpga-nosuchboard"]) == 2
    assert "unknown target 'hapm_fpga-nosuchboard'" in _error(capsys)
    assert main([*base, "--target", "llvm"]) == 2
    assert "unknown target" in _error(capsys)
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"name": "cli-test", "num_arrays": 0}')
    assert main([*base, "--config", str(cfg)]) == 2
    assert "num_arrays" in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_custom_config(tmp_path, data_files):
    cfg = tvm_hapm.get_config("zybo-z7-10").replace(name="cli-test-small", num_arrays=1)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    out = tmp_path / "o"
    base = ["compile", str(BUNDLED_MODEL), "--calibration", str(data_files / "calib.npy")]
    base += ["--calibration-samples", "2", "--config", str(tmp_path / "cfg.json")]
    assert main([*base, "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["name"] == "cli-test-small"
    prog = Program.from_bytes((out / report["accelerator"][0]["program"]).read_bytes())
    assert prog.config.num_arrays == 1


def test_malformed_program(tmp_path, capsys):
    bad = tmp_path / "bad.hapm"
    bad.write_bytes(b"HAPMPRG2\x05\x00")
    assert main(["disasm", str(bad)]) == 2
    assert "not a valid hapm_fpga program" in _error(capsys)


def test_usage_error_exit_code(capsys):
    assert main(["no-such-command"]) == 2
    assert main([]) == 2
    capsys.readouterr()


def test_presets_console_script():
    exe = Path(sys.executable).parent / "hapm"
    cmd = [str(exe)] if exe.exists() else [shutil.which("hapm") or "hapm"]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run(
        [*cmd, "presets"], check=False, capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    for name in tvm_hapm.target.PRESETS:
        assert name in proc.stdout
    assert "peak GOPS" in proc.stdout and "hapm_fpga-zcu104" in proc.stdout


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    args = ["demo", "--dataset", "digits", "--out", str(tmp_path / "demo"), "--pruning-steps", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "450 test images" in out and "top-1 agreement" in out
    assert "000_conv2d" in out and "host" in out
    accuracies = [
        float(ln.split("│")[-2].strip().rstrip("%"))
        for ln in out.splitlines()
        if "%" in ln and ("(llvm)" in ln or "(hapm_fpga)" in ln or "agreement" in ln)
    ]
    assert len(accuracies) == 3 and min(accuracies) > 95.0
    assert (tmp_path / "demo" / "model.so").is_file()
    # the pruning part: HAPM removes whole dispatches, unstructured pruning removes none
    speedups = {
        ln.split("│")[1].strip(): float(ln.split("│")[-2].strip().rstrip("x"))
        for ln in out.splitlines()
        if ln.startswith("│")
        and ln.split("│")[1].strip() in ("dense", "unstructured", "filter", "HAPM")
    }
    assert speedups["dense"] == 1.0 and speedups["unstructured"] < 1.1
    assert speedups["HAPM"] > 1.3  # 50% of the weights in whole dispatch groups
    assert speedups["filter"] > 1.2  # channels removed: smaller tensors
    assert (tmp_path / "demo" / "hapm_demo.png").is_file()


@pytest.mark.slow
def test_demo_on_fashion_mnist(tmp_path, capsys):
    from tvm_hapm.data import fashion_mnist

    try:
        fashion_mnist.find_fashion_mnist()
    except fashion_mnist.DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    args = ["demo", "--dataset", "fashion-mnist", "--images", "50", "--pruning-steps", "-1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ResNet-20 on Fashion-MNIST" in out and "50 / 50" in out  # simulated == reference
    top1 = {
        ln.split("│")[1].strip(): float(ln.split("│")[-2].strip().rstrip("%"))
        for ln in out.splitlines()
        if ln.startswith("│") and ln.split("│")[-2].strip().endswith("%")
    }
    assert top1["float32"] > 90 and top1["int8 (reference)"] > 90


def test_demo_part_one_int8_model_is_part_two_dense_model():
    """The Fashion-MNIST demo measures the dense int8 model once: part one quantizes the network
    through the CLI on batches of its calibration images, part two's dense row reuses those
    outputs in place of ``flow.int8_accuracy`` on the same images in one batch."""
    pytest.importorskip("torch")
    from tvm_hapm.cli.io import import_onnx, quantize_module
    from tvm_hapm.compress import flow
    from tvm_hapm.data import set_batch
    from tvm_hapm.models import zoo
    from tvm_hapm.target.config import get_config
    from tvm_hapm.torch import QuantizedRunner

    cfg, rng = get_config("hapm_fpga"), np.random.default_rng(0)
    model = zoo.resnet_cifar(8, in_ch=1, batch=1)
    x = rng.random((130, 1, 32, 32), dtype=np.float32)
    calib = [x[k : k + 25] for k in range(0, 100, 25)]
    qmod = quantize_module(import_onnx(set_batch(model, 25)), calib, cfg, percentile=99.0)
    part_one = QuantizedRunner(qmod).predict(x[100:])
    # what flow.int8_accuracy runs: the same logits, so the same correct images
    q_two = flow.quantize_onnx(model, np.concatenate(calib), cfg, 99.0)
    np.testing.assert_array_equal(part_one, QuantizedRunner(q_two).predict(x[100:]))


def test_demo_without_the_dataset_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    from tvm_hapm.data import fashion_mnist

    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    assert main(["demo", "--dataset", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err


def test_tune_then_compile_with_the_database(tmp_path, data_files, capsys):
    db = tmp_path / "db.json"
    calib = str(data_files / "calib.npy")
    assert main(["tune", str(BUNDLED_MODEL), "--calibration", calib, "--trials", "2",
                 "-o", str(db)]) == 0  # fmt: skip
    records = json.loads(db.read_text())["records"]
    assert len(records) == 3  # two convolutions and the dense layer
    assert all(r["cycles"] <= r["default_cycles"] for r in records.values())
    out = tmp_path / "out"
    assert main(["compile", str(BUNDLED_MODEL), "--calibration", calib,
                 "--tuning-db", str(db), "-o", str(out)]) == 0  # fmt: skip
    db.write_text("{not json")
    capsys.readouterr()
    assert main(["compile", str(BUNDLED_MODEL), "--calibration", calib,
                 "--tuning-db", str(db), "-o", str(out)]) == 2  # fmt: skip
    assert "not a tuning database" in capsys.readouterr().err


def test_prune_writes_onnx_and_report(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(BUNDLED_MODEL), "--method", "hapm", "--sparsity", "0.5",
                 "-o", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "prune_report.json").read_text())
    pruned_layers = [e for e in report["layers"] if e.get("sparsity", 0) > 0]
    assert len(pruned_layers) == 1  # the first and last of three layers are kept dense
    assert abs(pruned_layers[0]["sparsity"] - 0.5) < 0.1
    assert 0 < report["achieved_sparsity"] < 0.5
    assert report["ranking"] == "per_mac"  # HAPM's default allocation
    assert pruned_layers[0]["ranking"] == "global_per_mac"
    import onnx

    pruned = onnx.load(str(out / "pruned.onnx"))
    onnx.checker.check_model(pruned)
    capsys.readouterr()
    assert main(["prune", str(BUNDLED_MODEL), "--sparsity", "0.5", "--ranking", "layer",
                 "-o", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "prune_report.json").read_text())
    assert {e["ranking"] for e in report["layers"] if e.get("sparsity", 0) > 0} == {"layer"}
    capsys.readouterr()
    assert main(["prune", str(BUNDLED_MODEL), "--sparsity", "0.5", "--ranking", "best",
                 "-o", str(out)]) == 2  # fmt: skip
    assert "choose from layer, global, per_mac" in capsys.readouterr().err
    assert main(["prune", str(BUNDLED_MODEL), "--method", "unstructured", "--sparsity", "0.5",
                 "--ranking", "per_mac", "-o", str(out)]) == 2  # fmt: skip
    assert "not available for method 'unstructured'" in capsys.readouterr().err
    assert main(["prune", str(BUNDLED_MODEL), "--method", "random", "--sparsity", "0.5",
                 "-o", str(out)]) == 2  # fmt: skip
    assert "choose from hapm, unstructured, filter" in capsys.readouterr().err
    assert main(["prune", str(BUNDLED_MODEL), "--sparsity", "1.5", "-o", str(out)]) == 2


def test_prune_filter_with_data_reconstructs_and_fine_tunes(tmp_path, digits):
    x_train, y_train, _, _ = digits
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=x_train, y_train=y_train)
    out = tmp_path / "pruned"
    assert main(["prune", str(BUNDLED_MODEL), "--method", "filter", "--sparsity", "0.5",
                 "--data", str(data), "--finetune-steps", "2", "-o", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "prune_report.json").read_text())
    (only,) = report["rounds"]  # one prune + recover round (flow.recover)
    rec = only["reconstruction"]
    assert rec and all(r["rel_error_after"] <= r["rel_error_before"] + 1e-9 for r in rec)
    assert any(r["rel_error_after"] < 0.5 * r["rel_error_before"] for r in rec)
    assert only["finetune_steps"] == 2 and only["kept"] in ("reconstructed", "finetuned")
    assert only["val_finetuned"] is not None and only["finetune_images_per_s"] > 0
    import onnx
    from onnx import numpy_helper

    w = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(str(out / "pruned.onnx")).graph.initializer
    }
    dead = np.abs(w["conv3.w"]).reshape(16, -1).sum(1) == 0
    assert dead.sum() == 8  # the zeroed filters stay zero through reconstruction and training


def test_optimize_writes_model_reports_and_plot(tmp_path, digits):
    x_train, y_train, x_test, y_test = digits
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    out = tmp_path / "opt"
    assert main(["optimize", str(BUNDLED_MODEL), "--data", str(data), "--level", "mid",
                 "--method", "greedy", "--episodes", "4", "--calibration-percentile", "99.9",
                 "-o", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "optimize_report.json").read_text())
    assert report["val_drop"] <= 1.0 + 1e-9 and report["final"]["sim_latency_ms"] > 0
    for name in ("pruned.onnx", "model.so", "pareto.png", "report.json"):
        assert (out / name).is_file()
    assert main(["optimize", str(BUNDLED_MODEL), "--data", str(tmp_path / "none.npz"),
                 "-o", str(out)]) == 2  # fmt: skip


def test_prune_in_stages_reports_rounds(tmp_path, digits, capsys):
    x_train, y_train, _, _ = digits
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=x_train, y_train=y_train)
    out = tmp_path / "staged"
    assert main(["prune", str(BUNDLED_MODEL), "--method", "hapm", "--sparsity", "0.9",
                 "--ranking", "layer", "--stages", "2", "--finetune-steps", "0",
                 "--data", str(data), "-o", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "prune_report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][0]["sparsity"] < report["rounds"][1]["sparsity"]
    assert report["teacher"] == "dense"
    towards_dense = (out / "pruned.onnx").read_bytes()
    assert main(["prune", str(BUNDLED_MODEL), "--method", "hapm", "--sparsity", "0.9",
                 "--ranking", "layer", "--stages", "2", "--finetune-steps", "0",
                 "--teacher", "previous", "--data", str(data), "-o", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "prune_report.json").read_text())["teacher"] == "previous"
    # the second round reconstructed towards the first round's model: other weights
    assert (out / "pruned.onnx").read_bytes() != towards_dense
    capsys.readouterr()
    # per_mac caps every layer at 87.5 %: 90 % of the one prunable layer is out of reach
    assert main(["prune", str(BUNDLED_MODEL), "--sparsity", "0.9", "-o", str(out)]) == 2
    assert "out of reach with max_layer_sparsity 0.875" in capsys.readouterr().err
    assert main(["prune", str(BUNDLED_MODEL), "--sparsity", "0.5", "--stages", "2",
                 "-o", str(out)]) == 2  # fmt: skip
    assert "needs --data" in capsys.readouterr().err
