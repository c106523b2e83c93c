"""``hapm profile``, the profile report and the Chrome trace of the timing model."""

from __future__ import annotations

import io
import json
from collections import defaultdict

import numpy as np
import onnx
import pytest
import tvm
from rich.console import Console

import tvm_hapm
from tvm_hapm.cli import main
from tvm_hapm.models import tiny_cnn
from tvm_hapm.runtime.report import (
    STALL_GROUPS,
    TRACE_ARRAY_TID,
    build_profile,
    chrome_trace,
    profile_table,
)
from tvm_hapm.runtime.timing import STALL_CAUSES


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """``hapm profile`` of a tiny CNN with random calibration and input."""
    d = tmp_path_factory.mktemp("profile")
    onnx.save(tiny_cnn(), d / "tiny.onnx")
    out = d / "out"
    assert main(["profile", str(d / "tiny.onnx"), "-o", str(out)]) == 0
    profile = json.loads((out / "profile.json").read_text())
    trace = json.loads((out / "trace.json").read_text())
    return profile, trace


def test_profile_json_has_every_figure(profiled):
    profile, _ = profiled
    assert profile["layers"] and profile["clock_mhz"] > 0
    for row in [*profile["layers"], profile["total"]]:
        for key in ("cycles", "latency_ms", "utilisation", "roofline_fraction", "roofline_cycles",
                    "compute_bound_cycles", "memory_bound_cycles", "stalls", "stalls_by_wait",
                    "dram_bytes", "energy_uj", "energy"):  # fmt: skip
            assert key in row, key
        assert set(row["stalls"]) == set(STALL_CAUSES)
        assert set(row["stalls_by_wait"]) == set(STALL_GROUPS)
        assert 0 < row["roofline_fraction"] <= 1
        assert row["roofline_cycles"] == pytest.approx(
            max(row["compute_bound_cycles"], row["memory_bound_cycles"])
        )
        assert row["energy"]["total_uj"] == pytest.approx(row["energy_uj"])
    for row in profile["layers"]:
        assert row["bound"] in ("compute", "memory")


def test_layer_cycles_sum_to_the_total(profiled):
    profile, _ = profiled
    layers, total = profile["layers"], profile["total"]
    assert sum(r["cycles"] for r in layers) == total["cycles"]
    assert sum(r["dram_bytes"] for r in layers) == total["dram_bytes"]
    assert sum(r["energy_uj"] for r in layers) == pytest.approx(total["energy_uj"])
    assert sum(r["roofline_cycles"] for r in layers) == pytest.approx(total["roofline_cycles"])
    assert total["roofline_fraction"] == pytest.approx(total["roofline_cycles"] / total["cycles"])
    assert total["latency_ms"] == pytest.approx(total["cycles"] / profile["clock_mhz"] / 1e3)


def test_trace_events_are_well_formed(profiled):
    profile, trace = profiled
    events = trace["traceEvents"]
    mhz = profile["clock_mhz"]
    complete = [e for e in events if e["ph"] == "X"]
    assert complete and all(e["ph"] in ("X", "M") for e in events)
    for e in complete:
        for key in ("name", "ts", "dur", "pid", "tid", "args"):
            assert key in e, key
        assert e["ts"] >= 0 and e["dur"] > 0
        assert e["dur"] == pytest.approx(e["args"]["cycles"] / mhz)
        if e["tid"] == 0:  # layer spans start at the layer's first cycle
            assert e["ts"] == pytest.approx(e["args"]["start_cycle"] / mhz)
    named = {e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {0, 1, 2, 3, TRACE_ARRAY_TID} <= named
    # One instruction at a time per module and per array: no overlap on any track.
    tracks = defaultdict(list)
    for e in complete:
        if e["tid"] != 0:
            tracks[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["args"]["cycles"]))
    assert {1, 2, 3, TRACE_ARRAY_TID} <= set(tracks)
    for spans in tracks.values():
        spans.sort()
        for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
            assert start >= end - 1e-9
    # The layers run back to back and the last event ends at the total cycle count.
    layer_spans = sorted((e["ts"], e["dur"]) for e in complete if e["tid"] == 0)
    assert len(layer_spans) == len(profile["layers"])
    last_end = max(e["ts"] + e["dur"] for e in complete)
    assert last_end == pytest.approx(profile["total"]["cycles"] / mhz)
    assert trace["otherData"]["cycles"] == profile["total"]["cycles"]
    # The disassembly of every instruction is in its event.
    assert all("disasm" in e["args"] for e in complete if e["tid"] != 0)


def test_trace_limit_keeps_layer_spans(profiled):
    stats = _profiled_run()
    full = chrome_trace(stats.traces)
    cut = chrome_trace(stats.traces, max_events=1)
    assert cut["otherData"]["truncated"] and not full["otherData"]["truncated"]
    spans = [e for e in cut["traceEvents"] if e["ph"] == "X"]
    assert spans and all(e["tid"] == 0 for e in spans)


def _profiled_run():
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(tiny_cnn())
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype("float32")
    ex = tvm.compile(tvm_hapm.quantize(mod, calibration=[x]), target="hapm_fpga")
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    vm["main"](tvm.runtime.tensor(x))
    assert tvm_hapm.runtime.last_run_stats().traces == []  # only kept under profile()
    with tvm_hapm.runtime.profile():
        vm["main"](tvm.runtime.tensor(x))
    stats = tvm_hapm.runtime.last_run_stats()
    assert len(stats.traces) == len(stats.layers)
    return stats


def test_table_renders_and_matches_the_profile():
    stats = _profiled_run()
    profile = build_profile(stats)
    buf = io.StringIO()
    Console(file=buf, width=160).print(profile_table(profile))
    text = buf.getvalue()
    for row in profile["layers"]:
        assert row["layer"] in text
    assert f"{profile['total']['cycles']:,}" in text
    assert profile["total"]["cycles"] == stats.cycles
