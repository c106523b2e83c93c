"""FPGA resources of the RTL (tvm_hapm.rtl.synth): the stat parser, the part budgets, the block
RAM cost model, and Yosys on small modules (the presets' full synthesis is marked slow)."""

from __future__ import annotations

import shutil

import pytest

from tvm_hapm.rtl.build import RtlToolError
from tvm_hapm.rtl.synth import (
    PART_BUDGETS,
    RTL_ACCUMULATOR,
    SynthesisError,
    block_ram_cost,
    buffer_costs,
    parse_stat,
    part_budget,
    synthesize,
    ultra_ram_cost,
    with_buffer,
    yosys_family,
)
from tvm_hapm.target.config import HardwareConfig, get_config

needs_yosys = pytest.mark.skipif(shutil.which("yosys") is None, reason="yosys is not installed")

#: The smallest accelerator the RTL builds: one 4 x 4 array, buffers of a few entries.
TINY = HardwareConfig(
    name="tiny",
    num_arrays=1,
    array_rows=4,
    array_cols=4,
    inp_buffer_bytes=4 * 16,
    wgt_buffer_bytes=16 * 4,
    acc_buffer_bytes=16 * 4,
    dram_bytes_per_cycle=4,
    part="xc7z010clg400-1",
)

# The end of Yosys 0.23's plain `stat` of hapm_gemm (zedboard): module blocks, then the design
# hierarchy's totals, whose counts are the ones that matter.
STAT_TEXT = """
=== hapm_pe ===

   Number of wires:                  9
   Number of cells:                 17
     DSP48E1                         1
     FDRE                           16

=== design hierarchy ===

   hapm_gemm                         1
     hapm_systolic                   1
       hapm_pe                      64

   Number of wires:               1182
   Number of cells:               3973
     CARRY4                         99
     DSP48E1                        64
     FDRE                         2103
     FDRE_1                          2
     INV                            24
     LUT2                          329
     LUT6                          505
     MUXF7                         147
     RAM32M                         11
     RAMB18E1                        3
     RAMB36E1                        2
     SRL16E                        213
     hapm_acc_buf                    1
     $mul                            1
"""


def test_parse_stat_text_takes_the_hierarchy_totals():
    res = parse_stat(STAT_TEXT, family="xc7", top="hapm_gemm")
    assert (res.lut, res.lutram, res.srl) == (329 + 505, 11 * 4, 213)
    assert res.lut_total == 834 + 44 + 213
    assert res.ff == 2105  # FDRE_1 (inverted clock) is a flip-flop too
    assert res.dsp == 64
    assert res.bram36 == 2 + 3 * 0.5
    assert res.uram == 0
    # a black box and logic Yosys left as a generic cell are reported, not counted
    assert res.unmapped == {"hapm_acc_buf": 1, "$mul": 1}
    assert not res.fits(part_budget("xc7z020"))


def test_parse_stat_json_and_errors():
    json_text = (
        '{"creator": "Yosys 0.23", "modules": {}, "design": {"num_cells": 3, '
        '"num_cells_by_type": {"DSP48E2": 1, "URAM288": 2, "LUT4": 7, "FDCE": 5}}}'
    )
    res = parse_stat(json_text, family="xcup")
    assert (res.dsp, res.uram, res.lut, res.ff) == (1, 2, 7, 5)
    assert res.fits(part_budget("xczu7ev-ffvc1156-2-e"))
    with pytest.raises(SynthesisError, match="no cell counts"):
        parse_stat("Yosys 0.23\nEnd of script.\n")


def test_budgets_and_usage():
    zed = part_budget("xc7z020clg484-1")
    assert (zed.lut, zed.ff, zed.dsp, zed.bram36, zed.uram) == (53_200, 106_400, 220, 140, 0)
    assert part_budget("XC7Z010") is PART_BUDGETS["xc7z010"]
    assert part_budget("xczu7ev-ffvc1156-2-e").uram == 96
    res = parse_stat(" Number of cells: 2\n  DSP48E1  221\n  RAMB36E1 10\n")
    assert res.over_budget(zed) == ["DSP"]
    assert res.usage(zed)["BRAM36"] == (10.0, 140)
    assert "DSP" in res.summary(zed)


def test_part_to_family_and_unknown_parts():
    assert yosys_family("xc7z020clg484-1") == "xc7"
    assert yosys_family("xczu7ev-ffvc1156-2-e") == "xcup"
    for part in ("xc7a35tcpg236-1", "", "10m50daf484c7g"):
        with pytest.raises(SynthesisError, match="cannot synthesise for part"):
            yosys_family(part)
    with pytest.raises(SynthesisError, match="no resource budget"):
        part_budget("xczu9eg-ffvb1156-2-e")  # a Zynq UltraScale+ without a budget here
    with pytest.raises(SynthesisError, match="cannot synthesise for part"):
        synthesize(TINY.replace(name="nopart", part=""), top="hapm_pe")


def test_missing_yosys_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # what build.require_tool asks
    with pytest.raises(RtlToolError, match="apt-get install yosys"):
        synthesize(TINY, top="hapm_pe")


def test_block_ram_cost_matches_yosys():
    # what Yosys 0.23 maps the zedboard buffers' single copies to
    assert block_ram_cost(64, 8192) == 16  # inp: 16 x RAMB36E1 (8K x 4)
    assert block_ram_cost(512, 1024) == 14.5  # wgt: 29 x RAMB18E1 (1K x 18)
    assert block_ram_cost(256, 2048) == 14.5  # acc: 29 x RAMB18E1 (2K x 9)
    assert block_ram_cost(8, 16) == 0.5  # anything small: one 18 Kb RAM
    assert ultra_ram_cost(128, 32768) == 16  # zcu104 inp: 8 deep x 2 wide
    assert ultra_ram_cost(72, 4096) == 1


def test_buffer_costs_of_zedboard():
    costs = {(c.buffer, c.scheme): c for c in buffer_costs(get_config("zedboard"))}
    assert costs["inp", "copy per read port"].bram36 == 4 * 16
    assert costs["wgt", "one copy"].bram36 == 14.5
    lvt = costs["acc", "live-value table"]
    assert lvt.exact and lvt.copies == 5 * 8 and lvt.bram36 == 40 * 14.5
    assert lvt.ff == 2048 * 3
    assert costs["acc", "flip-flops"].ff == 2048 * 256
    assert costs["acc", "flip-flops"].lut > 1_000_000  # eight 2048-to-1 read multiplexers
    serial = costs["acc", RTL_ACCUMULATOR]  # the RTL's, which fits zedboard's block RAM
    assert not serial.exact and serial.copies == 3 * 4 and serial.bram36 == 48
    assert not costs["acc", "copy per read port"].exact  # one writer only: a lower bound
    uram = {(c.buffer, c.scheme): c.uram for c in buffer_costs(get_config("zcu104"))}
    assert uram["inp", "copy per read port"] == 8 * 8  # 256 KB: 4096 x 128 bits, 2 x 4 URAM


def test_with_buffer_replaces_the_black_box():
    rest = parse_stat(STAT_TEXT, family="xc7", top="hapm_top")
    lvt = next(c for c in buffer_costs(get_config("zedboard")) if c.scheme == "live-value table")
    total = with_buffer(rest, lvt)
    assert total.unmapped == {"$mul": 1}
    assert total.bram36 == rest.bram36 + 580 and total.ff == rest.ff + 6144
    assert "BRAM36" in total.over_budget(part_budget("xc7z020"))
    zcu = next(c for c in buffer_costs(get_config("zcu104")) if c.scheme == "live-value table")
    on_uram = with_buffer(parse_stat(STAT_TEXT, family="xcup"), zcu, uram=True)
    assert on_uram.uram == zcu.uram == 9 * 12 * 8 and on_uram.bram36 == rest.bram36
    # the RTL's banks (512 x 512 bits) waste seven eighths of an UltraRAM: block RAM instead
    rtl = next(c for c in buffer_costs(get_config("zcu104")) if c.scheme == RTL_ACCUMULATOR)
    on_bram = with_buffer(parse_stat(STAT_TEXT, family="xcup"), rtl)
    assert on_bram.uram == 0 and on_bram.bram36 == rest.bram36 + rtl.bram36 == rest.bram36 + 180


@needs_yosys
def test_one_pe_is_one_dsp_slice():
    res = synthesize(TINY, top="hapm_pe", timeout=120)
    assert res.dsp == 1  # the 8 x 8 product and the 32-bit partial sum in one DSP48E1
    assert res.lut_total < 40 and res.bram36 == 0 and not res.unmapped
    assert res.family == "xc7" and res.seconds > 0


@needs_yosys
def test_two_int8_macs_per_dsp_slice():
    res = synthesize(TINY, top="hapm_pe2", timeout=120)
    assert res.dsp == 1 and not res.unmapped  # both products in one multiplier
    res = synthesize(TINY, top="hapm_systolic", timeout=120)
    assert res.dsp == TINY.macs_per_cycle // 2 == 8
    assert res.ff > 0 and not res.unmapped


@needs_yosys
def test_timeout_kills_yosys():
    with pytest.raises(SynthesisError, match="did not finish"):
        synthesize(TINY, top="hapm_systolic", timeout=0.5)


@needs_yosys
def test_the_banked_accumulator_maps_to_block_ram():
    """hapm_acc_buf of two 4 x 4 arrays with 512-entry banks: two banks of three two-port
    copies, each a 512 x 128-bit block RAM (two BRAM36 in 512 x 72), no entry in flip-flops."""
    cfg = TINY.replace(name="tiny-acc", num_arrays=2, acc_buffer_bytes=1024 * 16)
    res = synthesize(cfg, top="hapm_acc_buf", timeout=600)
    assert not res.unmapped
    assert res.bram36 == 2 * 3 * 2
    assert res.ff < 64  # the registered bank selects, not the 16 Kb of entries


@pytest.mark.slow
@needs_yosys
@pytest.mark.parametrize("preset", ["zybo-z7-10", "zedboard", "zcu104"])
def test_preset_fits_its_part(preset):
    """The whole accelerator, accumulator included, maps to Xilinx primitives and fits the
    preset's part (Yosys's counts: LUT, FF, DSP, BRAM36, URAM)."""
    cfg = get_config(preset)
    res = synthesize(cfg, timeout=3600)
    assert not res.unmapped
    assert res.dsp >= cfg.macs_per_cycle // 2  # two MACs per DSP slice, and the ALU's
    assert res.fits(part_budget(cfg.part)), res.summary(part_budget(cfg.part))
