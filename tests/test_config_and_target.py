"""Hardware configs, presets and target tags."""

from __future__ import annotations

import json

import pytest
import tvm

import tvm_hapm
from tvm_hapm.target.config import (
    PRESETS,
    HardwareConfig,
    HardwareConfigError,
    get_config,
    is_hapm_target,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_fit_their_dsp_budget_and_tags_resolve(name):
    cfg = PRESETS[name]
    assert cfg.macs_per_cycle <= cfg.dsp_count * cfg.macs_per_dsp
    target = tvm.target.Target(f"hapm_fpga-{name}")
    assert is_hapm_target(target)
    assert get_config(target) is cfg


def test_default_tag_is_zedboard_and_llvm_is_not_hapm():
    assert get_config(tvm.target.Target("hapm_fpga")).name == "zedboard"
    assert not is_hapm_target(tvm.target.Target("llvm"))
    assert not is_hapm_target("no-such-target")


def test_json_round_trip(tmp_path):
    cfg = PRESETS["zcu104"].replace(name="mine", clock_mhz=150.0)
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    assert HardwareConfig.from_json(str(path)) == cfg
    assert get_config(str(path)) == cfg


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_arrays", 0),
        ("array_rows", 1000),
        ("act_bits", 4),
        ("acc_bits", 16),
        ("inp_buffer_bytes", 100),  # not a multiple of one input vector
        ("clock_mhz", -5),
        ("clock_mhz", True),  # a JSON true is not a frequency
        ("clock_mhz", float("inf")),
        ("energy", {"dram": 1.0}),  # an unknown key
        ("energy", {"dram_64b": float("inf")}),
        ("energy", {"mult8": True}),
        ("energy", {"mult8": -1.0}),
        ("dsb_enabled", "yes"),
        ("name", "bad name!"),
    ],
)
def test_invalid_field_is_named(field, value):
    with pytest.raises(HardwareConfigError, match=field):
        HardwareConfig(**{field: value})


def test_dsp_budget_is_enforced():
    with pytest.raises(HardwareConfigError, match="dsp_count"):
        PRESETS["zybo-z7-10"].replace(num_arrays=16)  # 256 MACs, 80 DSP x 2


def test_bad_json_and_unknown_fields_are_refused(tmp_path):
    with pytest.raises(HardwareConfigError, match="not valid JSON"):
        HardwareConfig.from_json("{nope")
    with pytest.raises(HardwareConfigError, match="unknown field"):
        HardwareConfig.from_json(json.dumps({"num_arrays": 2, "bogus": 1}))
    with pytest.raises(HardwareConfigError, match="not found"):
        HardwareConfig.from_json(str(tmp_path / "missing.json"))
    with pytest.raises(HardwareConfigError, match="unknown hardware config"):
        get_config("no-such-board")


def test_custom_config_registers_a_tag():
    cfg = HardwareConfig(name="custom-2x16", num_arrays=2, array_rows=16, array_cols=16)
    target = tvm_hapm.target.hapm_target(cfg)
    assert get_config(target) == cfg
    with pytest.raises(HardwareConfigError, match="already registered"):
        tvm_hapm.register_config(cfg.replace(num_arrays=3))
