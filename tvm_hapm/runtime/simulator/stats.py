"""Event counts of simulated runs: :class:`ExecutionStats`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...target.isa import Opcode

__all__ = ["ExecutionStats"]


@dataclass
class ExecutionStats:
    """Event counts of one simulated run (or, merged, of several).

    Attributes
    ----------
    layer : str
        Name of the layer the program implements.
    instructions : int
        Instructions executed, ``FINISH`` and ``SYNC`` included.
    by_opcode : dict of str to int
        Instructions per opcode name, e.g. ``{"LOAD": 3, "GEMM": 10, "FINISH": 1}``.
    macs : int
        Multiply-accumulates: ``array_rows * array_cols`` for every input vector streamed
        through an array, i.e. ``R * C * outer * inner`` per ``GEMM``.
    alu_ops : int
        ALU lane operations: ``array_cols * outer * inner`` per ``ALU`` instruction.
    dram_bytes_read, dram_bytes_written : int
        Bytes moved by ``LOAD`` and ``STORE`` (padding is generated on chip and not counted).
    cycles : int
        Accelerator cycles of the run (0 unless run with ``timing=True``; summed over layers).
    latency_ms : float
        ``cycles / clock_mhz / 1e3``; the layers of a network run one after the other, so their
        latencies add up.
    energy_uj : float
        Energy in microjoules (:class:`~tvm_hapm.runtime.energy.EnergyModel`).
    stall_cycles : int
        Cycles modules waited (tokens, busy arrays, GEMM drain, DRAM port); by cause in
        ``stalls``.
    stalls : dict of str to int
        Stall cycles by cause (:data:`tvm_hapm.runtime.timing.STALL_CAUSES`).
    utilisation : float
        Fraction of the arrays' MAC-cycles used; in a total, the cycle-weighted mean.
    roofline_fraction : float
        Roofline bound / cycles; in a total, ``sum(bound) / sum(cycles)``.
    """

    layer: str = ""
    instructions: int = 0
    by_opcode: dict = field(default_factory=dict)
    macs: int = 0
    alu_ops: int = 0
    dram_bytes_read: int = 0
    dram_bytes_written: int = 0
    cycles: int = 0
    latency_ms: float = 0.0
    energy_uj: float = 0.0
    stall_cycles: int = 0
    stalls: dict = field(default_factory=dict)
    utilisation: float = 0.0
    roofline_fraction: float = 0.0

    @property
    def dram_bytes(self) -> int:
        """Total DRAM traffic in bytes."""
        return self.dram_bytes_read + self.dram_bytes_written

    @classmethod
    def total(cls, stats, layer: str = "total") -> ExecutionStats:
        """Sum several stats (e.g. the layers of a network) into a new object.

        Parameters
        ----------
        stats : iterable of ExecutionStats
            The stats to add up.
        layer : str
            Name of the result.
        """
        out = cls(layer=layer)
        used = bound = 0.0  # cycle-weighted sums of utilisation and roofline fraction
        for s in stats:
            out.instructions += s.instructions
            out.macs += s.macs
            out.alu_ops += s.alu_ops
            out.dram_bytes_read += s.dram_bytes_read
            out.dram_bytes_written += s.dram_bytes_written
            for name, count in s.by_opcode.items():
                out.by_opcode[name] = out.by_opcode.get(name, 0) + count
            # Layers run one after the other: cycles, latency and energy add up.
            out.cycles += s.cycles
            out.latency_ms += s.latency_ms
            out.energy_uj += s.energy_uj
            out.stall_cycles += s.stall_cycles
            for cause, count in s.stalls.items():
                out.stalls[cause] = out.stalls.get(cause, 0) + count
            used += s.utilisation * s.cycles
            bound += s.roofline_fraction * s.cycles
        if out.cycles:
            out.utilisation = used / out.cycles
            out.roofline_fraction = bound / out.cycles
        # Present the opcodes in ISA order whatever order the inputs came in.
        order = {op.name: int(op) for op in Opcode}
        out.by_opcode = dict(sorted(out.by_opcode.items(), key=lambda kv: order.get(kv[0], 99)))
        return out

    def merge(self, other: ExecutionStats) -> ExecutionStats:
        """A new object holding the sum of ``self`` and ``other``.

        The layer name is kept when both agree (or one is empty), else it is ``"a+b"``.
        """
        if other.layer in ("", self.layer):
            layer = self.layer
        elif self.layer == "":
            layer = other.layer
        else:
            layer = f"{self.layer}+{other.layer}"
        return ExecutionStats.total([self, other], layer=layer)

    def __add__(self, other: ExecutionStats) -> ExecutionStats:
        if not isinstance(other, ExecutionStats):
            return NotImplemented
        return self.merge(other)

    def __radd__(self, other):
        # Lets the builtin ``sum(list_of_stats)`` work: it starts from the integer 0.
        if isinstance(other, int) and other == 0:
            return self.merge(ExecutionStats())
        return NotImplemented

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of all counters, ``dram_bytes`` included."""
        return {
            "layer": self.layer,
            "instructions": self.instructions,
            "by_opcode": dict(self.by_opcode),
            "macs": self.macs,
            "alu_ops": self.alu_ops,
            "dram_bytes_read": self.dram_bytes_read,
            "dram_bytes_written": self.dram_bytes_written,
            "dram_bytes": self.dram_bytes,
            "cycles": self.cycles,
            "latency_ms": self.latency_ms,
            "energy_uj": self.energy_uj,
            "stall_cycles": self.stall_cycles,
            "stalls": dict(self.stalls),
            "utilisation": self.utilisation,
            "roofline_fraction": self.roofline_fraction,
        }
