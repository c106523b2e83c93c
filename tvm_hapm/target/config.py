"""The hardware environment of the hapm_fpga accelerator.

Every layer of tvm-hapm (quantizer, scheduler, codegen, simulator, cost models) reads the
accelerator's constants from one :class:`HardwareConfig` object, in the spirit of VTA's
``Environment``.  A config is a frozen dataclass with a JSON file format; presets model real
Zynq boards and respect their DSP budgets.

Machine model (see ``docs/isa.md``)
-----------------------------------
* ``num_arrays`` weight-stationary systolic arrays of ``array_rows`` x ``array_cols`` MAC cells.
  One GEMM instruction streams input vectors of ``array_rows`` activations through one array
  holding one weight block of ``array_rows`` (input channels) x ``array_cols`` (output channels).
  One *dispatch* of the parallel arrays consumes ``num_arrays`` weight blocks: the group that
  hardware-aware pruning removes as a whole.
* Three on-chip buffers: input (activation vectors), weight (weight blocks) and accumulator
  (``array_cols`` lanes of ``acc_bits``), addressed in units of vectors / blocks.
* A DRAM port moving ``dram_bytes_per_cycle`` bytes per cycle at ``clock_mhz``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .energy_tables import (
    ENERGY_KEYS,
    ENERGY_TABLES,
    HOROWITZ45,
    default_energy_table,
    part_static_power,
)

__all__ = [
    "ALU_LATENCY",
    "DMA_REQUEST_CYCLES",
    "FETCH_CYCLES",
    "LOAD_DONE_CYCLES",
    "STORE_DONE_CYCLES",
    "STORE_FIRST_BEAT_CYCLES",
    "HardwareConfig",
    "HardwareConfigError",
    "PRESETS",
    "DEFAULT_PRESET",
    "get_config",
    "add_config",
    "list_configs",
]


def _is_number(value) -> bool:
    """A finite int or float (``True`` is not a clock frequency)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- The cycle costs of the accelerator's RTL (tvm_hapm/rtl/hdl), the reference the timing
# model and the cost models follow (docs/timing.md, "Agreement with the RTL").

#: Pipeline of the vector ALU: an ALU instruction over ``n`` accumulator vectors takes
#: ``ALU_LATENCY + n`` cycles (start, one vector per cycle, read, operate and write stages, done).
ALU_LATENCY = 4
#: Instruction ``i`` of a program reaches its module's queue no earlier than cycle
#: ``i + FETCH_CYCLES`` (fetch reads one instruction per cycle from a synchronous memory).
FETCH_CYCLES = 2
#: A LOAD or STORE sends its first DRAM request the cycle after it starts.
DMA_REQUEST_CYCLES = 1
#: After a LOAD's last buffer write, done is seen one cycle later and the module is free the next.
LOAD_DONE_CYCLES = 2
#: A STORE's first beat leaves this many cycles after its request (the accumulator read-ahead).
STORE_FIRST_BEAT_CYCLES = 2
#: After a STORE's last write response, done is seen one cycle later and the module is free the
#: next.
STORE_DONE_CYCLES = 2


def gemm_fixed_cycles(rows, cols):
    """Cycles a GEMM keeps its array beyond one per input vector on an ``rows x cols``
    weight-stationary array of the RTL: 1 (issue) + 1 (weight block read and bypass check) +
    ``rows`` (weight preload, one row per cycle) + ``rows + cols`` (input read, skew, column
    sums and de-skew, accumulator write) = ``2 * rows + cols + 2``.  Works on integers and on
    NumPy arrays of them."""
    return 2 * rows + cols + 2


class HardwareConfigError(ValueError):
    """An invalid hardware configuration; the message names the offending field."""


# Cycles of the per-instruction and per-transfer costs used by the timing model.  They are part of
# the config (not constants in the simulator) so that a user can model a different memory system.
@dataclass(frozen=True)
class HardwareConfig:
    """Constants of one hapm_fpga accelerator instance.

    Parameters
    ----------
    name : str
        Identifier; the target tag of a registered config is ``hapm_fpga-<name>``.
    num_arrays : int
        Number of parallel systolic arrays.
    array_rows, array_cols : int
        Rows (input channels per weight block) and columns (output channels per weight block)
        of each systolic array.
    weight_bits, act_bits : int
        Width of weights and activations, 8 or 16.
    acc_bits : int
        Width of the accumulator, 32.
    inp_buffer_bytes, wgt_buffer_bytes, acc_buffer_bytes : int
        Capacities of the on-chip input, weight and accumulator buffers.
    dram_bytes_per_cycle : int
        Sustained DRAM bandwidth of the accelerator's memory port.
    clock_mhz : float
        Accelerator clock.
    board, part : str
        The board and FPGA part the preset models (informational).
    dsp_count : int
        DSP slices of the part; the MAC array must fit ``dsp_count * macs_per_dsp``.
    dram_latency_cycles : int
        Fixed cost of one DMA transfer (request to first beat).
    dsb_enabled : bool
        Dynamic Sparsity Bypass: the hardware skips a GEMM whose weight block is all zero.
    dsb_check_cycles : int
        Cycles the bypass logic spends checking one weight block.
    energy_table : str
        The table of per-event energies (``tvm_hapm.target.energy_tables.ENERGY_TABLES``):
        ``horowitz45`` (45 nm ASIC), ``xilinx-7series-28nm``, ``zynq-ultrascale-plus-16nm``;
        empty: the table of the part's family (``horowitz45`` without a part).  See
        ``docs/timing.md``, section 5.
    energy : dict
        Overrides of single keys of the table (picojoules; ``static_mw`` in milliwatts).
    """

    name: str = "custom"
    num_arrays: int = 4
    array_rows: int = 8
    array_cols: int = 8
    weight_bits: int = 8
    act_bits: int = 8
    acc_bits: int = 32
    inp_buffer_bytes: int = 128 * 1024
    wgt_buffer_bytes: int = 128 * 1024
    acc_buffer_bytes: int = 128 * 1024
    dram_bytes_per_cycle: int = 8
    clock_mhz: float = 125.0
    board: str = ""
    part: str = ""
    dsp_count: int = 0
    dram_latency_cycles: int = 32
    dsb_enabled: bool = True
    dsb_check_cycles: int = 1
    energy_table: str = ""
    energy: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`HardwareConfigError` naming the first invalid field."""

        def need(ok: bool, fld: str, why: str) -> None:
            if not ok:
                raise HardwareConfigError(
                    f"invalid hardware config {self.name!r}: field '{fld}' = "
                    f"{getattr(self, fld)!r}: {why}"
                )

        need(isinstance(self.name, str) and self.name != "", "name", "must be a non-empty string")
        need(
            all(c.isalnum() or c in "-_." for c in self.name),
            "name",
            "use letters, digits, '-', '_' or '.' only",
        )
        for fld, lo, hi in (
            ("num_arrays", 1, 16),
            ("array_rows", 1, 256),
            ("array_cols", 1, 256),
            ("dram_bytes_per_cycle", 1, 1024),
            ("dram_latency_cycles", 0, 100000),
            ("dsb_check_cycles", 0, 1000),
            ("dsp_count", 0, 100000),
        ):
            v = getattr(self, fld)
            need(isinstance(v, int) and not isinstance(v, bool), fld, "must be an integer")
            need(lo <= v <= hi, fld, f"must be in [{lo}, {hi}]")
        for fld in ("weight_bits", "act_bits"):
            need(getattr(self, fld) in (8, 16), fld, "must be 8 or 16")
        need(self.acc_bits == 32, "acc_bits", "must be 32")
        need(isinstance(self.dsb_enabled, bool), "dsb_enabled", "must be true or false")
        need(
            _is_number(self.clock_mhz) and 0 < self.clock_mhz <= 2000,
            "clock_mhz",
            "must be a number in (0, 2000]",
        )
        for fld, unit in (
            ("inp_buffer_bytes", self.inp_vector_bytes),
            ("wgt_buffer_bytes", self.wgt_block_bytes),
            ("acc_buffer_bytes", self.acc_vector_bytes),
        ):
            v = getattr(self, fld)
            need(isinstance(v, int) and not isinstance(v, bool), fld, "must be an integer")
            need(v % unit == 0, fld, f"must be a multiple of one entry ({unit} bytes)")
            # The ISA addresses buffers with 18-bit (inp/acc) and 16-bit (wgt) fields.
            depth_limit = (1 << 16) if fld == "wgt_buffer_bytes" else (1 << 18)
            need(
                2 <= v // unit <= depth_limit,
                fld,
                f"must hold between 2 and {depth_limit} entries of {unit} bytes",
            )
        need(
            self.acc_buffer_bytes // self.acc_vector_bytes >= 2 * self.num_arrays,
            "acc_buffer_bytes",
            f"must hold at least two entries per accumulator bank ({self.num_arrays} banks, "
            "one per array)",
        )
        if self.dsp_count:
            need(
                self.macs_per_cycle <= self.dsp_count * self.macs_per_dsp,
                "dsp_count",
                f"{self.num_arrays} arrays of {self.array_rows}x{self.array_cols} need "
                f"{self.macs_per_cycle} MACs/cycle, more than {self.dsp_count} DSPs x "
                f"{self.macs_per_dsp} MACs each",
            )
        need(isinstance(self.part, str), "part", "must be a string (a Xilinx part name)")
        need(
            isinstance(self.energy_table, str)
            and (self.energy_table == "" or self.energy_table in ENERGY_TABLES),
            "energy_table",
            f"must be empty (the part's family) or one of {sorted(ENERGY_TABLES)}",
        )
        need(isinstance(self.energy, dict), "energy", "must be a mapping of event -> pJ")
        for key, val in self.energy.items():
            need(
                key in ENERGY_KEYS,
                "energy",
                f"unknown energy key {key!r}; known keys: {sorted(ENERGY_KEYS)}",
            )
            need(
                _is_number(val) and val >= 0,
                "energy",
                f"energy[{key!r}] must be a finite non-negative number",
            )
        need(
            self.resolved_energy_table == HOROWITZ45
            or "static_mw" in self.energy
            or part_static_power(self.part) is not None,
            "energy_table",
            f"table {self.resolved_energy_table!r} takes the static power of the part, and "
            f"part {self.part!r} has none in tvm_hapm.target.energy_tables.PART_STATIC_POWER: "
            "set energy={'static_mw': ...}",
        )

    # ------------------------------------------------------------------ derived constants
    @property
    def resolved_energy_table(self) -> str:
        """``energy_table``, or when empty the table of the part's family."""
        return self.energy_table or default_energy_table(self.part)

    @property
    def weight_bytes(self) -> int:
        return self.weight_bits // 8

    @property
    def act_bytes(self) -> int:
        return self.act_bits // 8

    @property
    def acc_bytes(self) -> int:
        return self.acc_bits // 8

    @property
    def act_dtype(self) -> str:
        return f"int{self.act_bits}"

    @property
    def weight_dtype(self) -> str:
        return f"int{self.weight_bits}"

    @property
    def act_range(self) -> tuple[int, int]:
        """Inclusive range of an activation value."""
        return -(1 << (self.act_bits - 1)), (1 << (self.act_bits - 1)) - 1

    @property
    def weight_range(self) -> tuple[int, int]:
        """Inclusive range of a (symmetric) weight value."""
        hi = (1 << (self.weight_bits - 1)) - 1
        return -hi, hi

    @property
    def macs_per_dsp(self) -> int:
        """MACs one DSP slice performs per cycle (two int8 MACs share a DSP48)."""
        return 2 if max(self.weight_bits, self.act_bits) == 8 else 1

    @property
    def gemm_fixed_cycles(self) -> int:
        """:func:`gemm_fixed_cycles` of this config's arrays."""
        return gemm_fixed_cycles(self.array_rows, self.array_cols)

    @property
    def load_fixed_cycles(self) -> int:
        """Cycles of a LOAD beyond one per DRAM beat, without padding or DRAM-port contention:
        the request cycle, the DRAM latency and the done cycles of the RTL's DMA."""
        return DMA_REQUEST_CYCLES + self.dram_latency_cycles + LOAD_DONE_CYCLES

    @property
    def store_fixed_cycles(self) -> int:
        """Cycles of a STORE beyond one per DRAM beat: the request cycle, the accumulator
        read-ahead, the write response's latency and the done cycles of the RTL's DMA."""
        return (
            DMA_REQUEST_CYCLES + STORE_FIRST_BEAT_CYCLES - 1 + self.dram_latency_cycles
            + STORE_DONE_CYCLES
        )  # fmt: skip

    @property
    def macs_per_cycle(self) -> int:
        return self.num_arrays * self.array_rows * self.array_cols

    @property
    def inp_vector_bytes(self) -> int:
        """Bytes of one input-buffer entry: ``array_rows`` activations."""
        return self.array_rows * self.act_bytes

    @property
    def wgt_block_bytes(self) -> int:
        """Bytes of one weight-buffer entry: an ``array_rows`` x ``array_cols`` block."""
        return self.array_rows * self.array_cols * self.weight_bytes

    @property
    def acc_vector_bytes(self) -> int:
        """Bytes of one accumulator entry: ``array_cols`` lanes of ``acc_bits``."""
        return self.array_cols * self.acc_bytes

    @property
    def inp_depth(self) -> int:
        return self.inp_buffer_bytes // self.inp_vector_bytes

    @property
    def wgt_depth(self) -> int:
        return self.wgt_buffer_bytes // self.wgt_block_bytes

    @property
    def acc_depth(self) -> int:
        return self.acc_buffer_bytes // self.acc_vector_bytes

    @property
    def acc_bank_depth(self) -> int:
        """Entries of one accumulator bank: the accumulator is ``num_arrays`` banks, array
        ``k`` accumulates into bank ``k`` (:mod:`tvm_hapm.target.banks`); the last bank also
        takes the remainder of the division."""
        return self.acc_depth // self.num_arrays

    @property
    def peak_gops(self) -> float:
        """Peak throughput, 2 ops per MAC."""
        return 2 * self.macs_per_cycle * self.clock_mhz / 1e3

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareConfig:
        if not isinstance(data, dict):
            raise HardwareConfigError("a hardware config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HardwareConfigError(
                f"invalid hardware config: unknown field(s) {unknown}; "
                f"known fields: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> HardwareConfig:
        """Load a config from a JSON file path or a JSON string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise HardwareConfigError(f"hardware config file not found: {path}")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise HardwareConfigError(f"hardware config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def replace(self, **changes) -> HardwareConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


# Presets modelled on real Zynq boards, each sized so that the RTL fits the part (Yosys
# synth_xilinx of tvm_hapm/rtl, docs/resources.md: zybo-z7-10 and zedboard take 70-96% of the
# block RAM, zcu104 78% of the block RAM and 67% of the UltraRAM; every LUT and DSP count below
# 90%).  Two int8 MACs per DSP48 slice.  DRAM bandwidth is one AXI HP port (64 bit on
# Zynq-7000, 128 bit on Zynq UltraScale+) at the accelerator clock, 32 bit on the Zybo, whose
# 4 x 4 arrays move 4-byte entries.
PRESETS: dict[str, HardwareConfig] = {
    cfg.name: cfg
    for cfg in (
        HardwareConfig(
            name="zybo-z7-10",
            board="Digilent Zybo Z7-10",
            part="xc7z010clg400-1",
            dsp_count=80,
            num_arrays=2,
            array_rows=4,
            array_cols=4,
            inp_buffer_bytes=32 * 1024,
            wgt_buffer_bytes=32 * 1024,
            acc_buffer_bytes=16 * 1024,
            dram_bytes_per_cycle=4,
            clock_mhz=100.0,
        ),
        HardwareConfig(
            name="zedboard",
            board="Avnet ZedBoard",
            part="xc7z020clg484-1",
            dsp_count=220,
            num_arrays=4,
            array_rows=8,
            array_cols=8,
            inp_buffer_bytes=64 * 1024,
            wgt_buffer_bytes=64 * 1024,
            acc_buffer_bytes=64 * 1024,
            dram_bytes_per_cycle=8,
            clock_mhz=125.0,
        ),
        HardwareConfig(
            name="zcu104",
            board="Xilinx ZCU104",
            part="xczu7ev-ffvc1156-2-e",
            dsp_count=1728,
            num_arrays=8,
            array_rows=16,
            array_cols=16,
            inp_buffer_bytes=256 * 1024,
            wgt_buffer_bytes=256 * 1024,
            acc_buffer_bytes=256 * 1024,
            dram_bytes_per_cycle=16,
            clock_mhz=200.0,
        ),
    )
}

DEFAULT_PRESET = "zedboard"

_REGISTRY: dict[str, HardwareConfig] = dict(PRESETS)


def add_config(config: HardwareConfig) -> None:
    """Make :func:`get_config` find ``config`` by its name (what
    :func:`tvm_hapm.target.tag.register_config` does before registering its target tag).

    Re-adding an identical config is a no-op; a different config under an existing name is
    refused (a name must mean one machine).
    """
    config.validate()
    old = _REGISTRY.get(config.name)
    if old is not None and old != config:
        raise HardwareConfigError(
            f"a different hardware config named {config.name!r} is already registered"
        )
    _REGISTRY[config.name] = config


def list_configs() -> list[str]:
    return sorted(_REGISTRY)


def get_config(spec: HardwareConfig | str | Path | None = None) -> HardwareConfig:
    """Resolve a config from a config object, a preset/registered name, a tag, a target,
    a JSON file path or ``None`` (the current target's config, else the default preset)."""
    import tvm

    if isinstance(spec, HardwareConfig):
        return spec
    if spec is None:
        cur = tvm.target.Target.current(allow_none=True)
        spec = cur if cur is not None and is_hapm_target(cur) else DEFAULT_PRESET
    if isinstance(spec, tvm.target.Target):
        if not is_hapm_target(spec):
            raise HardwareConfigError(f"target {spec} is not a hapm_fpga target")
        spec = str(spec.attrs.get("model", DEFAULT_PRESET))
    spec = str(spec)
    name = spec[len("hapm_fpga-") :] if spec.startswith("hapm_fpga-") else spec
    if name == "hapm_fpga":
        name = DEFAULT_PRESET
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.endswith(".json") or Path(name).is_file():
        return HardwareConfig.from_json(name)
    raise HardwareConfigError(
        f"unknown hardware config {spec!r}; known: {list_configs()} (or a JSON file path)"
    )


def is_hapm_target(target) -> bool:
    """Whether a TVM target (or tag string) selects the hapm_fpga accelerator."""
    import tvm

    if target is None:
        return False
    if isinstance(target, str):
        try:
            target = tvm.target.Target(target)
        except Exception:
            return False
    return "hapm_fpga" in [str(k) for k in target.keys]
