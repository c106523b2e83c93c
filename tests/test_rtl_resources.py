"""The presets' resource table (the record of their synthesis) and the estimate of a config's
resources from its parameters (tvm_hapm.rtl.resources)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tvm_hapm.rtl.resources import (
    RESOURCE_TABLE,
    config_fingerprint,
    estimate_resources,
    resources_of,
    synthesized_resources,
    table_from_rtl_record,
)
from tvm_hapm.target.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
ZED = PRESETS["zedboard"]


def test_presets_are_found_by_name_and_rtl_parameters():
    for name, cfg in PRESETS.items():
        assert synthesized_resources(cfg).source == "synthesis", name
        assert resources_of(cfg) == synthesized_resources(cfg)
    # other RTL parameters, or another name: not the design that was synthesised
    assert synthesized_resources(ZED.replace(num_arrays=2)) is None
    assert synthesized_resources(ZED.replace(name="zed-copy")) is None
    assert resources_of(ZED.replace(name="zed-copy")).source == "estimate"
    # what does not enter the RTL leaves the fingerprint alone
    assert config_fingerprint(ZED.replace(clock_mhz=200.0)) == config_fingerprint(ZED)
    assert synthesized_resources(ZED.replace(energy_table="horowitz45")) is not None
    assert config_fingerprint(ZED.replace(part="xc7a35t")) is None  # no Zynq part


def test_the_table_is_the_record_of_the_synthesis():
    record = json.loads((ROOT / "benchmarks" / "results" / "rtl.json").read_text())
    assert table_from_rtl_record(record, PRESETS) == json.loads(RESOURCE_TABLE.read_text())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_estimate_within_tolerance_of_the_synthesis(name):
    """The estimate against each preset's Yosys counts: DSP slices exact, block RAM within 5%
    (on Zynq UltraScale+ block RAM and UltraRAM together, an UltraRAM as eight BRAM36: Yosys
    splits the buffers between them, the estimate puts them all in block RAM), LUTs and
    flip-flops within 10% (an interpolation through the presets in MACs and ALU lanes: a
    consistency check of the fit, not a validation)."""
    cfg = PRESETS[name]
    est, syn = estimate_resources(cfg), synthesized_resources(cfg)
    assert est.source == "estimate" and syn.source == "synthesis"
    assert est.dsp == syn.dsp
    assert est.bram36 + 8 * est.uram == pytest.approx(syn.bram36 + 8 * syn.uram, rel=0.05)
    assert est.lut == pytest.approx(syn.lut, rel=0.10)
    assert est.ff == pytest.approx(syn.ff, rel=0.10)


def test_estimate_follows_the_config():
    base = estimate_resources(ZED)
    two = estimate_resources(ZED.replace(num_arrays=2))
    assert two.dsp == base.dsp - 2 * 32  # two arrays of 8 x 8 MACs at two per slice
    assert two.lut < base.lut and two.ff < base.ff and two.bram36 < base.bram36
    wide = estimate_resources(ZED.replace(array_cols=16, acc_buffer_bytes=128 * 1024, dsp_count=0))
    assert wide.dsp == base.dsp + 4 * 32 + 4 * 8  # the arrays double, 8 more ALU lanes
    # 16-bit operands: one MAC per slice, the arrays' slices double
    wide16 = estimate_resources(ZED.replace(act_bits=16, weight_bits=16, dsp_count=0))
    assert wide16.dsp == base.dsp + 4 * 32
