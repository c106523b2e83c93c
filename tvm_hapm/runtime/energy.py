"""Energy model of the hapm_fpga accelerator, from the event counts of the timing model.

Energy is the sum of per-event energies times event counts, plus two powers times the latency:

* a MAC is one multiply (scaled with the operand widths) and one 32-bit add;
* an ALU lane operation is a 32-bit add, or a 32-bit multiply for ``MUL`` and ``REQUANT``
  (``ADD_REQUANT``: one of each);
* every byte read from or written to an on-chip buffer costs the energy of a 64-bit access of a
  memory that size, divided by 8 (interpolated on the logarithm of the buffer size; the FPGA
  tables give one figure for every size);
* every DRAM byte costs a 64-bit DRAM access divided by 8;
* the static power (``static_mw``) burns for the whole latency;
* the clock and logic power (FPGA tables) too: per used resource (LUT, flip-flop, DSP slice,
  block RAM, UltraRAM) an energy per cycle (``cycle_*``), times the clock.  The resource counts
  come from :func:`tvm_hapm.rtl.resources.resources_of`: the synthesis of a preset, or an
  estimate from the config.

The per-event energies come from the config's table (``HardwareConfig.energy_table``, by
default the one of its part's family; :mod:`tvm_hapm.target.energy_tables`) and every key can be
overridden through ``HardwareConfig.energy``.  ``docs/timing.md`` (section 5) has the tables and
their sources.

Example
-------
.. code-block:: python

    result = TimingModel(cfg).run(program.instructions)
    report = EnergyModel(cfg).estimate(result)
    print(report.total_uj, report.to_dict())
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..target.config import HardwareConfig
from ..target.energy_tables import (
    ENERGY_SOURCES,
    ENERGY_TABLES,
    FPGA_CYCLE_KEYS,
    HOROWITZ45,
    part_static_power,
)
from .timing import TimingResult

__all__ = ["EnergyModel", "EnergyReport", "estimate_energy"]


# SRAM sizes (log2 bytes) of the three reference points.
_SRAM_POINTS = ((13, "sram_8kb"), (15, "sram_32kb"), (20, "sram_1mb"))
#: The resource counted by each ``cycle_*`` key (a field of ResourceCounts).
_CYCLE_RESOURCES = dict(zip(FPGA_CYCLE_KEYS, ("lut", "ff", "dsp", "bram36", "uram"), strict=True))


@dataclass
class EnergyReport:
    """Energy of one run, in microjoules, by component.

    Attributes
    ----------
    mac_uj : float
        Multiply-accumulates of the systolic arrays.
    alu_uj : float
        Vector ALU lane operations.
    inp_uj, wgt_uj, acc_uj : float
        Reads and writes of the input, weight and accumulator buffers.
    dram_uj : float
        DRAM traffic of LOAD and STORE.
    static_uj : float
        Static power times latency.
    clock_uj : float
        Clock and logic power of the used resources times latency (0 with the ASIC table).
    """

    mac_uj: float = 0.0
    alu_uj: float = 0.0
    inp_uj: float = 0.0
    wgt_uj: float = 0.0
    acc_uj: float = 0.0
    dram_uj: float = 0.0
    static_uj: float = 0.0
    clock_uj: float = 0.0

    @property
    def dynamic_uj(self) -> float:
        """The per-event energies: everything but static, clock and logic energy."""
        return self.mac_uj + self.alu_uj + self.inp_uj + self.wgt_uj + self.acc_uj + self.dram_uj

    @property
    def total_uj(self) -> float:
        """Per-event, static, clock and logic energy."""
        return self.dynamic_uj + self.static_uj + self.clock_uj

    def to_dict(self) -> dict:
        """All components, ``dynamic_uj`` and ``total_uj``."""
        return {
            "mac_uj": self.mac_uj,
            "alu_uj": self.alu_uj,
            "inp_uj": self.inp_uj,
            "wgt_uj": self.wgt_uj,
            "acc_uj": self.acc_uj,
            "dram_uj": self.dram_uj,
            "static_uj": self.static_uj,
            "clock_uj": self.clock_uj,
            "dynamic_uj": self.dynamic_uj,
            "total_uj": self.total_uj,
        }


class EnergyModel:
    """Per-event energies and powers of one accelerator instance.

    Parameters
    ----------
    config : HardwareConfig
        Data widths, buffer sizes, part, clock, ``energy_table`` and ``energy`` overrides
        (checked when the config is built).
    resources : ResourceCounts, optional
        The resources of the clock and logic term (default:
        :func:`tvm_hapm.rtl.resources.resources_of`, read only for a table with such a term).

    Attributes
    ----------
    table_name : str
        The table in use (``config.resolved_energy_table``).
    table : dict of str to float
        The energies in use: the table, its ``static_mw`` resolved, updated with
        ``config.energy``.
    sources : dict of str to str
        Where each figure comes from (``"HardwareConfig.energy"`` for an override).
    """

    def __init__(self, config: HardwareConfig, resources=None):
        if not isinstance(config, HardwareConfig):
            raise TypeError(f"EnergyModel needs a HardwareConfig, got {type(config).__name__}")
        self.config = config
        self.table_name = config.resolved_energy_table
        table = dict(ENERGY_TABLES[self.table_name])
        table["static_mw"] = self.default_static_mw(config)
        table.update({k: float(v) for k, v in config.energy.items()})
        self.table = table
        self.sources = {
            **ENERGY_SOURCES[self.table_name],
            **dict.fromkeys(config.energy, "HardwareConfig.energy"),
        }
        self._resources = resources

    @staticmethod
    def default_static_mw(config: HardwareConfig) -> float:
        """The static power of the config's table: with ``horowitz45``
        :meth:`horowitz_static_mw`, with an FPGA table the part's
        (:data:`tvm_hapm.target.energy_tables.PART_STATIC_POWER`); ``0`` for a part without a
        figure (the config then sets ``energy['static_mw']``)."""
        if config.resolved_energy_table == HOROWITZ45:
            return EnergyModel.horowitz_static_mw(config)
        power = part_static_power(config.part)
        return power.static_mw if power is not None else 0.0

    @staticmethod
    def horowitz_static_mw(config: HardwareConfig) -> float:
        """``50 + 0.25 * macs_per_cycle`` milliwatts: the ASIC table's static power (an
        assumption)."""
        return 50.0 + 0.25 * config.macs_per_cycle

    # ------------------------------------------------------------------ powers
    @property
    def resources(self):
        """The :class:`~tvm_hapm.rtl.resources.ResourceCounts` of the clock and logic term."""
        if self._resources is None:
            # lazily: the RTL package (and its data table) only for a table that needs it
            from ..rtl.resources import resources_of

            self._resources = resources_of(self.config)
        return self._resources

    @property
    def clock_pj_per_cycle(self) -> float:
        """Clock and logic energy of one cycle: ``sum(count * cycle_<resource>)``."""
        coefficients = {k: self.table[k] for k in FPGA_CYCLE_KEYS if self.table[k]}
        if not coefficients:
            return 0.0
        res = self.resources
        return sum(c * getattr(res, _CYCLE_RESOURCES[k]) for k, c in coefficients.items())

    @property
    def clock_mw(self) -> float:
        """Clock and logic power: ``clock_pj_per_cycle * clock_mhz / 1000`` (pJ x MHz = uW)."""
        return self.clock_pj_per_cycle * self.config.clock_mhz / 1e3

    @property
    def background_mw(self) -> float:
        """``static_mw + clock_mw``: the power that burns for the whole latency."""
        return self.table["static_mw"] + self.clock_mw

    # ------------------------------------------------------------------ per-event energies
    @property
    def mac_pj(self) -> float:
        """Energy of one MAC: ``mult8 * act_bits * weight_bits / 64 + add32``."""
        cfg = self.config
        return self.table["mult8"] * cfg.act_bits * cfg.weight_bits / 64 + self.table["add32"]

    def sram_pj_per_64bit(self, size_bytes: int) -> float:
        """Energy of a 64-bit access of an SRAM of ``size_bytes``.

        Piecewise linear in ``log2(size_bytes)`` through the 8 KB, 32 KB and 1 MB points,
        constant below 8 KB and extrapolated with the last slope above 1 MB.
        """
        x = math.log2(max(size_bytes, 1))
        pts = [(lx, self.table[key]) for lx, key in _SRAM_POINTS]
        if x <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            if x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        return y1 + (y1 - y0) * (x - x1) / (x1 - x0)

    def sram_pj_per_byte(self, size_bytes: int) -> float:
        """``sram_pj_per_64bit(size_bytes) / 8``."""
        return self.sram_pj_per_64bit(size_bytes) / 8

    @property
    def dram_pj_per_byte(self) -> float:
        """``dram_64b / 8``."""
        return self.table["dram_64b"] / 8

    # ------------------------------------------------------------------ estimate
    def estimate(self, result: TimingResult) -> EnergyReport:
        """Energy of a run from its timing result.

        Parameters
        ----------
        result : TimingResult
            Event counts and latency from :meth:`TimingModel.run`.

        Returns
        -------
        EnergyReport
            Energy by component, in microjoules.
        """
        cfg, t = self.config, self.table
        uj = 1e-6  # pJ -> uJ

        def buf(name: str, size: int) -> float:
            moved = result.buffer_reads.get(name, 0) + result.buffer_writes.get(name, 0)
            return moved * self.sram_pj_per_byte(size) * uj

        return EnergyReport(
            mac_uj=result.macs * self.mac_pj * uj,
            alu_uj=(result.alu_add_lanes * t["add32"] + result.alu_mul_lanes * t["mult32"]) * uj,
            inp_uj=buf("inp", cfg.inp_buffer_bytes),
            wgt_uj=buf("wgt", cfg.wgt_buffer_bytes),
            acc_uj=buf("acc", cfg.acc_buffer_bytes),
            dram_uj=result.dram_bytes * self.dram_pj_per_byte * uj,
            # mW x ms = uJ
            static_uj=t["static_mw"] * result.latency_ms,
            clock_uj=self.clock_mw * result.latency_ms,
        )


def estimate_energy(config: HardwareConfig, result: TimingResult) -> EnergyReport:
    """Shorthand for ``EnergyModel(config).estimate(result)``."""
    return EnergyModel(config).estimate(result)
