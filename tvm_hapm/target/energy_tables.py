"""Per-event energies of the hapm_fpga accelerator by technology, and the static power of the parts.

:data:`ENERGY_TABLES` holds one table per technology, each giving every key of
:data:`ENERGY_KEYS`:

* ``horowitz45``: the 45 nm ASIC figures of Horowitz (ISSCC 2014) and an assumed static power.
  These were the model's only figures before the FPGA tables; they are kept as they were, so a
  config with ``energy_table="horowitz45"`` gives the same energies as before, to the bit.
* ``xilinx-7series-28nm``: Zynq-7000 (28 nm, VCCINT 1.0 V) and a DDR3 memory.
* ``zynq-ultrascale-plus-16nm``: Zynq UltraScale+ (16 nm FinFET, VCCINT 0.85 V) and DDR4.

A config chooses its table with ``HardwareConfig.energy_table``; empty means the table of its
part's family (:func:`default_energy_table`), and ``horowitz45`` for a config without a part.
``HardwareConfig.energy`` overrides single keys.  ``docs/timing.md`` (section 5) has the tables,
their sources and how every FPGA figure is derived; :data:`ENERGY_SOURCES` says it per key.

The FPGA figures are estimates: the data sheets give the static power, and no citable
per-operation figure for these parts was found.
The arithmetic is Horowitz's 45 nm figure times the FPGA/ASIC dynamic-power ratio Kuon and Rose
measured, scaled to the node; the block RAM access comes from Xilinx's own XPE-based figure for
Virtex-5, scaled to the node; the DRAM from a DDR3 measurement; the clock and logic terms are
assumptions.  Each is one constant below, so a better figure (e.g. from XPE or a board
measurement) replaces it in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ENERGY_KEYS",
    "ENERGY_SOURCES",
    "ENERGY_TABLES",
    "FPGA_CYCLE_KEYS",
    "HOROWITZ45",
    "PART_STATIC_POWER",
    "PartStaticPower",
    "XILINX_7SERIES",
    "ZYNQ_ULTRASCALE_PLUS",
    "default_energy_table",
    "part_static_power",
]

#: Name of the 45 nm ASIC table (Horowitz), the default of a config without a part.
HOROWITZ45 = "horowitz45"
#: Name of the Zynq-7000 table (28 nm), the default of ``xc7z*`` parts.
XILINX_7SERIES = "xilinx-7series-28nm"
#: Name of the Zynq UltraScale+ table (16 nm), the default of ``xczu*`` parts.
ZYNQ_ULTRASCALE_PLUS = "zynq-ultrascale-plus-16nm"

#: Energy per clock cycle of one used resource (pJ): the clock and logic term, counted for every
#: cycle of the run (see :class:`tvm_hapm.runtime.energy.EnergyModel`).
FPGA_CYCLE_KEYS = ("cycle_lut", "cycle_ff", "cycle_dsp", "cycle_bram36", "cycle_uram")

#: Every key of a table: picojoules per event, ``static_mw`` in milliwatts (``None`` in a table:
#: derived, see :data:`ENERGY_SOURCES`), the ``cycle_*`` keys in picojoules per resource per cycle.
ENERGY_KEYS = (
    "mult8",  # one 8 x 8-bit multiply
    "add32",  # one 32-bit add
    "mult32",  # one 32 x 32-bit multiply
    "sram_8kb",  # one 64-bit access of an 8 KB on-chip memory
    "sram_32kb",  # ... of a 32 KB one
    "sram_1mb",  # ... of a 1 MB one
    "dram_64b",  # 64 bits to or from DRAM
    "static_mw",  # static power, mW
    *FPGA_CYCLE_KEYS,
)

# ----------------------------------------------------------------------------- 45 nm ASIC
_HOROWITZ = "Horowitz, 'Computing's energy problem', ISSCC 2014, 45 nm, 0.9 V"
#: Horowitz's node and supply voltage, the reference of the scaling below.
_HOROWITZ_NM, _HOROWITZ_V = 45.0, 0.9
_HOROWITZ_TABLE = {
    "mult8": 0.2,
    "add32": 0.1,
    "mult32": 3.1,
    "sram_8kb": 10.0,
    "sram_32kb": 20.0,
    "sram_1mb": 100.0,
    "dram_64b": 2000.0,  # 1.3-2.6 nJ
    "static_mw": None,  # 50 + 0.25 mW per MAC cell (EnergyModel.horowitz_static_mw)
    **dict.fromkeys(FPGA_CYCLE_KEYS, 0.0),  # an ASIC table: no FPGA fabric
}
_HOROWITZ_SOURCES = {
    "mult8": f"{_HOROWITZ}: 8-bit int multiply 0.2 pJ",
    "add32": f"{_HOROWITZ}: 32-bit int add 0.1 pJ",
    "mult32": f"{_HOROWITZ}: 32-bit int multiply 3.1 pJ",
    "sram_8kb": f"{_HOROWITZ}: 64-bit read, 8 KB SRAM 10 pJ",
    "sram_32kb": f"{_HOROWITZ}: 64-bit read, 32 KB SRAM 20 pJ",
    "sram_1mb": f"{_HOROWITZ}: 64-bit read, 1 MB SRAM 100 pJ",
    "dram_64b": f"{_HOROWITZ}: DRAM 1.3-2.6 nJ per 64-bit access (midpoint ~2 nJ)",
    "static_mw": "assumption (not from Horowitz): 50 mW + 0.25 mW per MAC cell",
    **dict.fromkeys(FPGA_CYCLE_KEYS, "0: an ASIC table has no FPGA clock or logic term"),
}

# ----------------------------------------------------------------------------- FPGA derivation
#: Dynamic power of an FPGA over a standard-cell ASIC of the same node for the same circuit:
#: "approximately 14 times" for LUT and flip-flop logic (Kuon and Rose, "Measuring the gap
#: between FPGAs and ASICs", IEEE TCAD 26(2), 2007, abstract; 90 nm both).  With hard blocks
#: the paper finds the gap "generally becomes smaller", so for the DSP multipliers it is high.
_FPGA_ASIC_DYNAMIC_RATIO = 14.0
_KUON_ROSE = "Kuon & Rose, IEEE TCAD 26(2) 2007: FPGA/ASIC dynamic power ~14x"

#: A 72-bit access of block RAM: 8K x 72 single-port memory in Low Power mode (only the addressed
#: block RAMs enabled), write-first: 21 mW at 300 MHz, 50% toggle and 50% write rate, on
#: Virtex-5 (65 nm, VCCINT 1.0 V) from XPE 11.1 (Xilinx DS512, Block Memory Generator v6.1,
#: March 2011, Table 41).  21 mW / 300 MHz = 70 pJ per 72-bit access.
_BRAM_PJ_PER_BIT_V5 = 21e-3 / 300e6 / 72 * 1e12
_V5_NM, _V5_V = 65.0, 1.0
_DS512 = "Xilinx DS512 v6.1 Table 41 (Virtex-5, XPE 11.1): 8Kx72 SP low power 21 mW @300 MHz"

#: DDR3 (1.5 V, 800 MHz) at full bus utilisation: 70 pJ/bit, 40% of it background power, up to
#: 260 pJ/bit at low data rates (Malladi et al., "Towards energy-proportional datacenter memory
#: with mobile DRAM", ISCA 2012: its DDR3 characterisation, "DDR3 energy characteristics").
_DDR3_PJ_PER_BIT = 70.0
_MALLADI = "Malladi et al., ISCA 2012: DDR3 70 pJ/bit at 100% bus utilisation"
#: DDR3 and DDR4 supply voltages (JEDEC JESD79-3, JESD79-4).
_DDR3_V, _DDR4_V = 1.5, 1.2

#: Toggle rate of logic: XPE's default, "based on an average extracted from a suite of customer
#: designs" (Xilinx UG440, Logic sheet).
_LOGIC_TOGGLE_RATE = 0.125
#: Energy per cycle of an idle hard block (DSP slice, block RAM, UltraRAM: clock pin, input
#: registers) as a fraction of the energy of one operation of it.  An assumption.
_HARD_BLOCK_IDLE_FRACTION = 0.1


def _node_scale(nm: float, volts: float, ref_nm: float, ref_volts: float) -> float:
    """First-order energy scaling from one node to another: switched capacitance proportional to
    the feature size, energy to ``C V^2``."""
    return (nm / ref_nm) * (volts / ref_volts) ** 2


def _fpga_table(name: str, nm: float, vccint: float, node_source: str, dram: str, dram_v: float):
    """The table and sources of one FPGA family of node ``nm`` and core supply ``vccint``."""
    from_asic45 = _node_scale(nm, vccint, _HOROWITZ_NM, _HOROWITZ_V) * _FPGA_ASIC_DYNAMIC_RATIO
    mult8, add32, mult32 = (_HOROWITZ_TABLE[k] * from_asic45 for k in ("mult8", "add32", "mult32"))
    bram_bit = _BRAM_PJ_PER_BIT_V5 * _node_scale(nm, vccint, _V5_NM, _V5_V)
    dram_bit = _DDR3_PJ_PER_BIT * (dram_v / _DDR3_V) ** 2
    logic_bit = add32 / 32  # one bit of fabric logic switching, routing included
    table = {
        "mult8": mult8,
        "add32": add32,
        "mult32": mult32,
        # block RAM is built of fixed blocks: a wider or deeper buffer enables more of them in
        # parallel, or others instead, and a bit costs the same whatever the buffer's size
        **dict.fromkeys(("sram_8kb", "sram_32kb", "sram_1mb"), 64 * bram_bit),
        "dram_64b": 64 * dram_bit,
        "static_mw": None,  # the part's (PART_STATIC_POWER)
        "cycle_lut": _LOGIC_TOGGLE_RATE * logic_bit,
        "cycle_ff": logic_bit,
        "cycle_dsp": _HARD_BLOCK_IDLE_FRACTION * 2 * mult8,  # a DSP slice does two int8 MACs
        "cycle_bram36": _HARD_BLOCK_IDLE_FRACTION * 72 * bram_bit,
        "cycle_uram": _HARD_BLOCK_IDLE_FRACTION * 72 * bram_bit,
    }
    scale = f"x (({nm:g} nm / 45) x ({vccint} V / 0.9 V)^2, {node_source})"
    arith = f"derived: Horowitz 45 nm {{}} pJ x {_FPGA_ASIC_DYNAMIC_RATIO:g} ({_KUON_ROSE}) {scale}"
    bram = (
        f"derived: {_DS512} = 70 pJ / 72 bits, x ({nm:g}/65 nm) x ({vccint} V/1.0 V)^2, "
        f"x 64 bits: {64 * bram_bit:.3g} pJ, the same for every buffer size"
    )
    sources = {
        "mult8": arith.format(0.2) + " (a DSP48 slice; high: hard blocks are below 14x)",
        "add32": arith.format(0.1),
        "mult32": arith.format(3.1) + " (four DSP slices in the RTL)",
        "sram_8kb": bram,
        "sram_32kb": bram,
        "sram_1mb": bram,
        "dram_64b": (
            f"derived: {_MALLADI}"
            + (f", x ({dram_v} V / {_DDR3_V} V)^2 for {dram}" if dram_v != _DDR3_V else "")
            + f", x 64 bits: {64 * dram_bit:.4g} pJ ({dram}; the DRAM's background power"
            " at full utilisation included)"
        ),
        "static_mw": "the part's PL quiescent power (PART_STATIC_POWER)",
        "cycle_lut": f"assumption: {_LOGIC_TOGGLE_RATE:g} toggles per cycle (Xilinx UG440 XPE "
        "default toggle rate) x one bit of fabric logic (add32 / 32)",
        "cycle_ff": "assumption: the clock of one flip-flop costs one bit of fabric logic "
        "(add32 / 32) per cycle",
        "cycle_dsp": f"assumption: an idle DSP slice costs {_HARD_BLOCK_IDLE_FRACTION:g} of an "
        "operation (2 x mult8) per cycle",
        "cycle_bram36": f"assumption: an idle BRAM36 costs {_HARD_BLOCK_IDLE_FRACTION:g} of a "
        "72-bit access per cycle",
        "cycle_uram": "assumption: an idle UltraRAM costs what an idle BRAM36 does",
    }
    return name, table, sources


_DS187_NODE = "VCCINT: Xilinx DS187 v1.21 Table 2"
_DS925_NODE = "VCCINT: Xilinx DS925 v1.15 Table 2"
_FPGA_TABLES = (
    _fpga_table(XILINX_7SERIES, 28.0, 1.0, _DS187_NODE, "DDR3", _DDR3_V),
    _fpga_table(ZYNQ_ULTRASCALE_PLUS, 16.0, 0.85, _DS925_NODE, "DDR4", _DDR4_V),
)

#: Every table by name: key -> value (see :data:`ENERGY_KEYS`).
ENERGY_TABLES: dict[str, dict] = {
    HOROWITZ45: _HOROWITZ_TABLE,
    **{name: table for name, table, _ in _FPGA_TABLES},
}
#: Where each figure of each table comes from, or how it is derived: table -> key -> text.
ENERGY_SOURCES: dict[str, dict[str, str]] = {
    HOROWITZ45: _HOROWITZ_SOURCES,
    **{name: sources for name, _, sources in _FPGA_TABLES},
}

#: The table of a part family, by the prefix of its part names.
_FAMILY_TABLES = (("xc7z", XILINX_7SERIES), ("xczu", ZYNQ_ULTRASCALE_PLUS))


# ----------------------------------------------------------------------------- static power
@dataclass(frozen=True)
class PartStaticPower:
    """The static power of one device's programmable logic.

    Attributes
    ----------
    device : str
        Device name without package and speed grade (``xc7z020``).
    rails : tuple of (str, float, float)
        ``(supply, volts, milliamperes)``: the typical quiescent current of each PL supply at its
        nominal voltage.
    source : str
        The data sheet tables.
    """

    device: str
    rails: tuple
    source: str

    @property
    def static_mw(self) -> float:
        """``sum(volts * milliamperes)`` over the rails."""
        return sum(volts * ma for _, volts, ma in self.rails)


_DS187 = (
    "Xilinx DS187 v1.21 (2020): Table 5 typical quiescent supply current (nominal voltage, "
    "85 C junction, speed grades -1/-2/-3), Table 2 nominal voltages"
)
_DS925 = (
    "Xilinx DS925 v1.15 (2019): Table 9 typical quiescent supply current (nominal voltage, "
    "85 C junction, -2/-1 at VCCINT 0.85 V), Table 2 nominal voltages"
)
#: The programmable logic's static power of the presets' devices: the quiescent currents of
#: its core supplies (VCCO of the I/O banks left out: the accelerator drives no PL pins; the
#: processing system left out: it is the host, and DS925 gives its currents only through XPE).
PART_STATIC_POWER: dict[str, PartStaticPower] = {
    p.device: p
    for p in (
        PartStaticPower(
            "xc7z010", (("VCCINT", 1.0, 34), ("VCCAUX", 1.8, 18), ("VCCBRAM", 1.0, 3)), _DS187
        ),
        PartStaticPower(
            "xc7z020", (("VCCINT", 1.0, 78), ("VCCAUX", 1.8, 38), ("VCCBRAM", 1.0, 6)), _DS187
        ),
        PartStaticPower(
            "xczu7ev",
            (
                ("VCCINT", 0.85, 1201),
                ("VCCINT_IO", 0.85, 115),
                ("VCCAUX", 1.8, 174),
                ("VCCAUX_IO", 1.8, 56),
                ("VCCBRAM", 0.85, 15),
            ),
            _DS925,
        ),
    )
}


def part_static_power(part: str) -> PartStaticPower | None:
    """The static power of ``part`` (``xc7z020clg484-1`` or ``xc7z020``), ``None`` if unknown."""
    name = part.lower().strip()
    for device, power in PART_STATIC_POWER.items():
        if name.startswith(device):
            return power
    return None


def default_energy_table(part: str) -> str:
    """The table of ``part``'s family: :data:`XILINX_7SERIES` for Zynq-7000 (``xc7z*``),
    :data:`ZYNQ_ULTRASCALE_PLUS` for Zynq UltraScale+ (``xczu*``), else :data:`HOROWITZ45`."""
    name = part.lower().strip()
    for prefix, table in _FAMILY_TABLES:
        if name.startswith(prefix):
            return table
    return HOROWITZ45
