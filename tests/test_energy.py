"""The energy tables (45 nm ASIC, Zynq-7000, Zynq UltraScale+), the presets' choice of them, the
static and clock terms and the resource counts behind them (docs/timing.md, section 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvm_hapm.rtl.resources import (
    ResourceCounts,
    load_resource_table,
    resources_of,
    synthesized_resources,
)
from tvm_hapm.runtime.energy import EnergyModel
from tvm_hapm.runtime.timing import TimingModel
from tvm_hapm.target.config import PRESETS, HardwareConfig, HardwareConfigError
from tvm_hapm.target.energy_tables import (
    ENERGY_KEYS,
    ENERGY_TABLES,
    PART_STATIC_POWER,
    part_static_power,
)
from tvm_hapm.target.isa import AluOp, Buffer, Instruction, Opcode

ROOT = Path(__file__).resolve().parents[1]
ZED, ZCU, ZYBO = PRESETS["zedboard"], PRESETS["zcu104"], PRESETS["zybo-z7-10"]
#: Resources of the clock and logic term in the hand computations (not the presets').
RES = ResourceCounts(lut=1000, ff=2000, dsp=10, bram36=4, uram=2, source="test")


def tiny_program():
    """16 input vectors and one weight block in, one GEMM over them, a ReLU, 16 vectors out."""
    return [
        Instruction(
            Opcode.LOAD, buffer=Buffer.INP, sram_addr=0, dram_addr=0, y_size=1, x_size=16,
            x_stride=16,
        ),
        Instruction(
            Opcode.LOAD, buffer=Buffer.WGT, sram_addr=0, dram_addr=0, y_size=1, x_size=1,
            x_stride=1,
        ),
        Instruction(
            Opcode.GEMM, array=0, wgt_addr=0, inp_addr=0, acc_addr=0, outer=1, inner=16,
            inp_so=16, inp_si=1, acc_so=16, acc_si=1, reset=1,
        ),
        Instruction(Opcode.ALU, alu_op=AluOp.RELU, dst_addr=0, outer=1, inner=16, dst_si=1),
        Instruction(
            Opcode.STORE, buffer=Buffer.ACC, sram_addr=0, dram_addr=0, y_size=1, x_size=16,
            x_stride=16,
        ),
        Instruction(Opcode.FINISH),
    ]  # fmt: skip


def run_tiny(cfg):
    return TimingModel(cfg).run(tiny_program())


# ----------------------------------------------------------------------------- table choice
def test_presets_take_the_table_of_their_family():
    assert ZYBO.resolved_energy_table == "xilinx-7series-28nm"
    assert ZED.resolved_energy_table == "xilinx-7series-28nm"
    assert ZCU.resolved_energy_table == "zynq-ultrascale-plus-16nm"
    assert HardwareConfig().resolved_energy_table == "horowitz45"  # no part: the ASIC table
    assert EnergyModel(ZED).table_name == "xilinx-7series-28nm"
    assert EnergyModel(ZED.replace(energy_table="horowitz45")).table_name == "horowitz45"
    # the table named in a config wins over the part's
    assert ZCU.replace(energy_table="xilinx-7series-28nm").resolved_energy_table == (
        "xilinx-7series-28nm"
    )


def test_every_table_has_every_key_and_a_source():
    for name, table in ENERGY_TABLES.items():
        assert tuple(table) == ENERGY_KEYS, name
        assert set(EnergyModel(HardwareConfig(energy_table=name, part="xc7z020")).sources) == set(
            ENERGY_KEYS
        )


def test_invalid_tables_are_refused():
    with pytest.raises(HardwareConfigError, match="energy_table"):
        ZED.replace(energy_table="horowitz")
    # an FPGA table takes the part's static power: a part without a figure needs one
    with pytest.raises(HardwareConfigError, match="static_mw"):
        HardwareConfig(part="xc7z045ffg900-2")
    with pytest.raises(HardwareConfigError, match="static_mw"):
        HardwareConfig(energy_table="xilinx-7series-28nm")
    cfg = HardwareConfig(part="xc7z045ffg900-2", energy={"static_mw": 300.0})
    assert EnergyModel(cfg, resources=RES).table["static_mw"] == 300.0


def test_static_power_of_the_parts_from_the_data_sheets():
    # DS187 Table 5 / DS925 Table 9: typical quiescent currents (mA) at the nominal voltages
    assert part_static_power("xc7z010clg400-1").static_mw == pytest.approx(
        1.0 * 34 + 1.8 * 18 + 1.0 * 3
    )
    assert part_static_power("xc7z020").static_mw == pytest.approx(1.0 * 78 + 1.8 * 38 + 1.0 * 6)
    assert part_static_power("xczu7ev-ffvc1156-2-e").static_mw == pytest.approx(
        0.85 * 1201 + 0.85 * 115 + 1.8 * 174 + 1.8 * 56 + 0.85 * 15
    )
    assert part_static_power("xc7a35t") is None
    for name, cfg in PRESETS.items():
        device = part_static_power(cfg.part)
        assert device is PART_STATIC_POWER[device.device]
        assert EnergyModel(cfg).table["static_mw"] == device.static_mw, name


# ----------------------------------------------------------------------------- hand computed
def test_the_45nm_table_gives_the_previous_figures_bit_for_bit():
    # EnergyReport of the tiny program before the FPGA tables (the presets then used these
    # figures): the 45 nm table must still give them exactly
    before = {
        "zedboard": {
            "mac_uj": 0.00030720000000000004, "alu_uj": 1.28e-05, "inp_uj": 0.001152,
            "wgt_uj": 0.000576, "acc_uj": 0.009216, "dram_uj": 0.08, "static_uj": 0.087552,
            "dynamic_uj": 0.091264, "total_uj": 0.178816,
        },
        "zcu104": {
            "mac_uj": 0.0012288000000000002, "alu_uj": 2.56e-05, "inp_uj": 0.005376,
            "wgt_uj": 0.005376, "acc_uj": 0.043008, "dram_uj": 0.192,
            "static_uj": 0.29224000000000006, "dynamic_uj": 0.2470144, "total_uj": 0.5392544,
        },
    }  # fmt: skip
    # (zcu104 then had 512 KB buffers: the SRAM energy depends on the buffer size)
    was = {"zcu104": {f"{b}_buffer_bytes": 512 * 1024 for b in ("inp", "wgt", "acc")}}
    for name, figures in before.items():
        cfg = PRESETS[name].replace(energy_table="horowitz45", **was.get(name, {}))
        report = EnergyModel(cfg).estimate(run_tiny(cfg)).to_dict()
        assert report.pop("clock_uj") == 0.0
        assert report == figures, name


def _hand(cfg, t, static_mw, res):
    """The energy of the tiny program on ``cfg`` by hand from the per-event figures ``t``."""
    r = run_tiny(cfg)
    C = cfg.array_cols
    # 16 vectors of R int8 in and read by the GEMM, one R x C block in and read, 16 x C lanes of
    # 32 bits written by the GEMM, read and written by the ReLU, read by the STORE
    inp, wgt, acc = 2 * 16 * cfg.array_rows, 2 * cfg.wgt_block_bytes, 4 * 16 * 4 * C
    assert (r.buffer_reads["inp"] + r.buffer_writes["inp"]) == inp
    assert (r.buffer_reads["wgt"] + r.buffer_writes["wgt"]) == wgt
    assert (r.buffer_reads["acc"] + r.buffer_writes["acc"]) == acc
    assert r.macs == 16 * cfg.array_rows * C and r.alu_add_lanes == 16 * C
    # in: the vectors and the block; out: 16 vectors of C int8 (the STORE narrows)
    assert r.dram_bytes == 16 * cfg.array_rows + cfg.wgt_block_bytes + 16 * C
    ms = r.cycles / cfg.clock_mhz / 1e3
    pj_per_cycle = (
        res.lut * t["cycle_lut"] + res.ff * t["cycle_ff"] + res.dsp * t["cycle_dsp"]
        + res.bram36 * t["cycle_bram36"] + res.uram * t["cycle_uram"]
    )  # fmt: skip
    return r, {
        "mac_uj": r.macs * (t["mult8"] + t["add32"]) * 1e-6,
        "alu_uj": 16 * C * t["add32"] * 1e-6,
        "inp_uj": inp * t["sram"] / 8 * 1e-6,
        "wgt_uj": wgt * t["sram"] / 8 * 1e-6,
        "acc_uj": acc * t["sram"] / 8 * 1e-6,
        "dram_uj": r.dram_bytes * t["dram_64b"] / 8 * 1e-6,
        "static_uj": static_mw * ms,
        "clock_uj": pj_per_cycle * cfg.clock_mhz / 1e3 * ms,
    }


def _fpga_figures(nm, vccint, dram_volts):
    """The FPGA table of a node by its derivation (docs/timing.md, section 5)."""
    arith = 14 * (nm / 45) * (vccint / 0.9) ** 2  # Kuon & Rose's 14x, scaled from 45 nm 0.9 V
    bram_bit = 21e-3 / 300e6 / 72 * 1e12 * (nm / 65) * (vccint / 1.0) ** 2  # DS512, Virtex-5
    mult8, add32 = 0.2 * arith, 0.1 * arith
    return {
        "mult8": mult8,
        "add32": add32,
        "sram": 64 * bram_bit,
        "dram_64b": 64 * 70 * (dram_volts / 1.5) ** 2,  # Malladi: DDR3 70 pJ/bit at 1.5 V
        "cycle_lut": 0.125 * add32 / 32,
        "cycle_ff": add32 / 32,
        "cycle_dsp": 0.1 * 2 * mult8,
        "cycle_bram36": 0.1 * 72 * bram_bit,
        "cycle_uram": 0.1 * 72 * bram_bit,
    }


@pytest.mark.parametrize(
    "cfg, figures, static_mw",
    [
        (ZED, _fpga_figures(28, 1.0, 1.5), 1.0 * 78 + 1.8 * 38 + 1.0 * 6),
        (ZYBO, _fpga_figures(28, 1.0, 1.5), 1.0 * 34 + 1.8 * 18 + 1.0 * 3),
        (
            ZCU,
            _fpga_figures(16, 0.85, 1.2),
            0.85 * 1201 + 0.85 * 115 + 1.8 * 174 + 1.8 * 56 + 0.85 * 15,
        ),
    ],
    ids=["zedboard", "zybo-z7-10", "zcu104"],
)
def test_fpga_tables_by_hand(cfg, figures, static_mw):
    r, expected = _hand(cfg, figures, static_mw, RES)
    got = EnergyModel(cfg, resources=RES).estimate(r).to_dict()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert got["total_uj"] == pytest.approx(sum(expected.values()), rel=1e-12)


def test_the_45nm_table_by_hand():
    cfg = ZED.replace(energy_table="horowitz45")
    # the buffers (64 KB): between the 32 KB (20 pJ) and 1 MB (100 pJ) points, 1/5 of the way
    t = {"mult8": 0.2, "add32": 0.1, "sram": 20 + 80 * (16 - 15) / 5, "dram_64b": 2000}
    zero = {k: 0.0 for k in ("cycle_lut", "cycle_ff", "cycle_dsp", "cycle_bram36", "cycle_uram")}
    r, expected = _hand(cfg, {**t, **zero}, 50 + 0.25 * cfg.macs_per_cycle, RES)
    got = EnergyModel(cfg, resources=RES).estimate(r).to_dict()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_overrides_replace_single_figures():
    cfg = ZED.replace(energy={"mult8": 1.0, "dram_64b": 800.0, "static_mw": 5.0, "cycle_ff": 0})
    m = EnergyModel(cfg, resources=RES)
    base = EnergyModel(ZED, resources=RES)
    assert m.table["mult8"] == 1.0 and m.mac_pj == pytest.approx(1.0 + base.table["add32"])
    assert m.dram_pj_per_byte == 100.0 and m.table["static_mw"] == 5.0
    assert m.clock_pj_per_cycle == pytest.approx(
        base.clock_pj_per_cycle - 2000 * base.table["cycle_ff"]
    )
    assert m.table["add32"] == base.table["add32"]
    assert m.sources["mult8"] == "HardwareConfig.energy"
    assert m.sources["add32"] == base.sources["add32"]
    with pytest.raises(HardwareConfigError, match="unknown energy key"):
        ZED.replace(energy={"cycle_lutram": 1.0})


# ----------------------------------------------------------------------------- clock term
def test_clock_term_scales_with_the_resources():
    r = run_tiny(ZED)
    one = EnergyModel(ZED, resources=RES)
    two = EnergyModel(ZED, resources=ResourceCounts(2000, 4000, 20, 8, 4, source="test"))
    none = EnergyModel(ZED, resources=ResourceCounts(0, 0, 0, 0, 0, source="test"))
    assert one.clock_mw > 0 and none.clock_mw == 0
    assert two.clock_mw == pytest.approx(2 * one.clock_mw)
    assert two.background_mw == pytest.approx(one.table["static_mw"] + 2 * one.clock_mw)
    e1, e2 = one.estimate(r), two.estimate(r)
    assert e2.clock_uj == pytest.approx(2 * e1.clock_uj) and e2.static_uj == e1.static_uj
    assert e2.total_uj - e1.total_uj == pytest.approx(e1.clock_uj)
    # each resource counts with its own figure
    for kind in ("lut", "ff", "dsp", "bram36", "uram"):
        res = ResourceCounts(**{**{k: 0 for k in ("lut", "ff", "dsp", "bram36", "uram")},
                                kind: 100}, source="test")  # fmt: skip
        key = f"cycle_{kind}"
        assert EnergyModel(ZED, resources=res).clock_pj_per_cycle == pytest.approx(
            100 * ENERGY_TABLES["xilinx-7series-28nm"][key]
        )
    # and at twice the clock, twice the power (the same energy per cycle)
    fast = EnergyModel(ZED.replace(clock_mhz=250.0), resources=RES)
    assert fast.clock_mw == pytest.approx(2 * one.clock_mw)


def test_presets_count_their_synthesised_resources():
    table = load_resource_table()
    for name, cfg in PRESETS.items():
        res = EnergyModel(cfg).resources
        assert res.source == "synthesis", name
        assert res.to_dict() == {**table["presets"][name]["total"], "source": "synthesis"}
    # a preset changed is no longer the design that was synthesised: the estimate
    bigger = ZED.replace(num_arrays=2)
    assert synthesized_resources(bigger) is None
    assert EnergyModel(bigger).resources.source == "estimate"
    assert EnergyModel(bigger).clock_mw < EnergyModel(ZED).clock_mw
    # a config under another name with the same RTL parameters is not in the table either
    assert resources_of(ZED.replace(name="zed-copy")).source == "estimate"
    # the ASIC table has no clock term and does not look the resources up
    assert EnergyModel(ZED.replace(energy_table="horowitz45")).clock_mw == 0
