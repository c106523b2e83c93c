"""Energy model of the hapm_fpga accelerator, from the event counts of the timing model.

Energy is the sum of per-event energies times event counts, plus static power times latency:

* a MAC is one multiply (scaled with the operand widths) and one 32-bit add;
* an ALU lane operation is a 32-bit add, or a 32-bit multiply for ``MUL`` and ``REQUANT``
  (``ADD_REQUANT``: one of each);
* every byte read from or written to an on-chip buffer costs the energy of a 64-bit SRAM access
  of a memory that size, divided by 8 (interpolated on the logarithm of the buffer size);
* every DRAM byte costs a 64-bit DRAM access divided by 8;
* the static power (``static_mw``) burns for the whole latency.

The default energies are the 45 nm figures of Horowitz, "Computing's energy problem (and what we
can do about it)", ISSCC 2014; every one can be overridden through ``HardwareConfig.energy``
(picojoules, ``static_mw`` in milliwatts).  ``docs/timing.md`` has the table and its sources.

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

from ..target.config import DEFAULT_ENERGY_PJ, ENERGY_SOURCES, HardwareConfig
from .timing import TimingResult

__all__ = ["DEFAULT_ENERGY_PJ", "ENERGY_SOURCES", "EnergyModel", "EnergyReport", "estimate_energy"]


# SRAM sizes (log2 bytes) of the three reference points.
_SRAM_POINTS = ((13, "sram_8kb"), (15, "sram_32kb"), (20, "sram_1mb"))


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
    """

    mac_uj: float = 0.0
    alu_uj: float = 0.0
    inp_uj: float = 0.0
    wgt_uj: float = 0.0
    acc_uj: float = 0.0
    dram_uj: float = 0.0
    static_uj: float = 0.0

    @property
    def dynamic_uj(self) -> float:
        """Everything but static energy."""
        return self.mac_uj + self.alu_uj + self.inp_uj + self.wgt_uj + self.acc_uj + self.dram_uj

    @property
    def total_uj(self) -> float:
        """Dynamic plus static energy."""
        return self.dynamic_uj + self.static_uj

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
            "dynamic_uj": self.dynamic_uj,
            "total_uj": self.total_uj,
        }


class EnergyModel:
    """Per-event energies of one accelerator instance.

    Parameters
    ----------
    config : HardwareConfig
        Data widths, buffer sizes and ``energy`` overrides (keys of :data:`DEFAULT_ENERGY_PJ`,
        checked when the config is built).

    Attributes
    ----------
    table : dict of str to float
        The energies in use: defaults updated with ``config.energy``.
    """

    def __init__(self, config: HardwareConfig):
        if not isinstance(config, HardwareConfig):
            raise TypeError(f"EnergyModel needs a HardwareConfig, got {type(config).__name__}")
        self.config = config
        table = dict(DEFAULT_ENERGY_PJ)
        table["static_mw"] = self.default_static_mw(config)
        table.update({k: float(v) for k, v in config.energy.items()})
        self.table = table

    @staticmethod
    def default_static_mw(config: HardwareConfig) -> float:
        """Default static power: ``50 + 0.25 * macs_per_cycle`` milliwatts (an assumption)."""
        return 50.0 + 0.25 * config.macs_per_cycle

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
        )


def estimate_energy(config: HardwareConfig, result: TimingResult) -> EnergyReport:
    """Shorthand for ``EnergyModel(config).estimate(result)``."""
    return EnergyModel(config).estimate(result)
