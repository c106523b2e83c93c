"""The RTL's constants, generated from one :class:`~tvm_hapm.target.config.HardwareConfig` and
the ISA layout (:data:`tvm_hapm.target.isa.LAYOUTS`).

The SystemVerilog sources in ``hdl/`` write no number that the config or the ISA defines: every
array size, buffer depth, data width, DRAM beat, bypass setting, opcode, field position and
token-queue index comes from the header this module writes, ``hapm_config.svh``, as a
preprocessor macro (macros, unlike package parameters, are read the same way by Verilator and
by Yosys 0.23, port declarations included).

Example
-------
.. code-block:: python

    from tvm_hapm.rtl.params import config_header
    print(config_header(get_config("zedboard")))
"""

from __future__ import annotations

import math

from ..target import isa
from ..target.config import HardwareConfig
from ..target.isa import LAYOUTS, TOKEN_QUEUES, AluOp, Buffer, Module, Opcode

__all__ = [
    "DRAM_SLOTS",
    "INSTRUCTION_FIFO_DEPTH",
    "RtlConfigError",
    "check_config",
    "config_header",
    "harness_defines",
]

#: DRAM slots a program can address (the ``dram_slot`` field's range).
DRAM_SLOTS = isa.field_max(Opcode.LOAD, "dram_slot") + 1

#: Entries of each module's instruction queue between fetch and the module (see the README:
#: fetch runs ahead of a module by at most this many of its instructions).
INSTRUCTION_FIFO_DEPTH = 512
#: Compute-module tokens waiting for the GEMMs issued before them (docs/timing.md).
PENDING_PUSH_DEPTH = 8
#: Read requests the DMA read channel may have outstanding.
MAX_OUTSTANDING_READS = 64


class RtlConfigError(ValueError):
    """A hardware config the RTL cannot be built for; the message says which constraint."""


def check_config(cfg: HardwareConfig) -> None:
    """Refuse a config the RTL does not implement.

    The DMA moves whole beats of ``dram_bytes_per_cycle`` bytes and assembles buffer entries
    from them, so the smallest DRAM entry (``min(R, C)`` elements of one byte) must be a whole
    number of beats; the array sides (DRAM entry sizes: the DMA shifts instead of multiplying),
    the buffer depths and the number of arrays (hence of accumulator banks) must be powers of
    two for the address arithmetic and decoding.
    """
    beat = cfg.dram_bytes_per_cycle
    smallest = min(cfg.array_rows, cfg.array_cols)
    if smallest % beat:
        raise RtlConfigError(
            f"config {cfg.name!r}: the DMA needs every buffer entry to be whole DRAM beats, but "
            f"an entry of {smallest} one-byte elements is not a multiple of "
            f"dram_bytes_per_cycle = {beat}"
        )
    for name in (
        "array_rows", "array_cols", "inp_depth", "wgt_depth", "acc_depth", "num_arrays",
        "dram_bytes_per_cycle",
    ):  # fmt: skip
        value = getattr(cfg, name)
        if value & (value - 1):
            raise RtlConfigError(f"config {cfg.name!r}: {name} = {value} is not a power of two")


def _macro(name: str, value: int) -> str:
    return f"`define HAPM_{name} {int(value)}"


def _isa_macros() -> list[str]:
    lines = ["// ---- ISA (tvm_hapm.target.isa)"]
    lines.append(_macro("INSN_BITS", 8 * isa.INSTRUCTION_BYTES))
    lines.append(_macro("SLOTS", DRAM_SLOTS))
    lines += [_macro(f"OP_{op.name}", op) for op in Opcode]
    lines += [_macro(f"BUF_{b.name}", b) for b in Buffer]
    lines += [_macro(f"ALU_{a.name}", a) for a in AluOp]
    lines += [_macro(f"MOD_{m.name}", m) for m in Module]
    lines += [_macro(f"ELEM_BITS_{code}", bits) for code, bits in enumerate(isa.ELEM_BITS)]
    lines.append(_macro("REQUANT_SHIFT_MASK", isa.REQUANT_SHIFT_MASK))
    lines.append(_macro("REQUANT_RELU", isa.REQUANT_RELU))
    for index, queue in enumerate(TOKEN_QUEUES):
        lines.append(_macro(f"Q_{queue.producer.name}_{queue.consumer.name}", index))
    # Field positions: HAPM_<OPCODE>_<FIELD>_LO / _W.  LOAD and STORE share one layout (MEM_).
    for op in (Opcode.LOAD, Opcode.GEMM, Opcode.ALU, Opcode.SYNC):
        prefix = "MEM" if op == Opcode.LOAD else op.name
        pos = 0
        for name, bits in LAYOUTS[op]:
            if name not in ("opcode", "pop_prev", "pop_next", "push_prev", "push_next") or (
                op == Opcode.LOAD
            ):
                lines.append(_macro(f"{prefix}_{name.upper()}_LO", pos))
                lines.append(_macro(f"{prefix}_{name.upper()}_W", bits))
            pos += bits
    assert LAYOUTS[Opcode.LOAD] == LAYOUTS[Opcode.STORE]
    return lines


def harness_defines(cfg: HardwareConfig) -> list[str]:
    """The preprocessor definitions (``NAME=value``) the C++ test bench is compiled with."""
    return [
        f"HAPM_BEAT_BYTES={cfg.dram_bytes_per_cycle}",
        f"HAPM_NUM_ARRAYS={cfg.num_arrays}",
        f"HAPM_SLOTS={DRAM_SLOTS}",
        f"HAPM_INSN_BYTES={isa.INSTRUCTION_BYTES}",
    ]


def config_header(cfg: HardwareConfig) -> str:
    """The text of ``hapm_config.svh`` for ``cfg`` (deterministic: same config, same bytes)."""
    check_config(cfg)
    act_lo, act_hi = cfg.act_range
    inp_bits = cfg.array_rows * cfg.act_bits
    wgt_bits = cfg.array_rows * cfg.array_cols * cfg.weight_bits
    acc_bits = cfg.array_cols * cfg.acc_bits
    # The largest DRAM entry a LOAD assembles: an inp vector, a weight block, or an acc vector
    # of 32-bit elements.
    entry_bytes = max(inp_bits, wgt_bits, acc_bits) // 8
    lines = [
        f"// hapm_config.svh: generated by tvm_hapm.rtl.params from HardwareConfig {cfg.name!r}.",
        "// Do not edit: every constant of the RTL comes from the config and the ISA layout.",
        "`ifndef HAPM_CONFIG_SVH",
        "`define HAPM_CONFIG_SVH",
        "// ---- HardwareConfig",
        _macro("R", cfg.array_rows),
        _macro("C", cfg.array_cols),
        _macro("A", cfg.num_arrays),
        _macro("ARRAY_IDX_W", max(1, math.ceil(math.log2(cfg.num_arrays)))),
        _macro("ACT_BITS", cfg.act_bits),
        _macro("WGT_BITS", cfg.weight_bits),
        _macro("ACT_MIN", act_lo),
        _macro("ACT_MAX", act_hi),
        _macro("INP_BITS", inp_bits),
        _macro("WGT_BLOCK_BITS", wgt_bits),
        _macro("ACC_BITS", acc_bits),
        _macro("INP_DEPTH", cfg.inp_depth),
        _macro("WGT_DEPTH", cfg.wgt_depth),
        _macro("ACC_DEPTH", cfg.acc_depth),
        _macro("INP_AW", int(math.log2(cfg.inp_depth))),
        _macro("WGT_AW", int(math.log2(cfg.wgt_depth))),
        _macro("ACC_AW", int(math.log2(cfg.acc_depth))),
        _macro("ACC_BANK_DEPTH", cfg.acc_bank_depth),
        _macro("ACC_BANK_AW", int(math.log2(cfg.acc_bank_depth))),
        _macro("R_SHIFT", int(math.log2(cfg.array_rows))),
        _macro("C_SHIFT", int(math.log2(cfg.array_cols))),
        _macro("BEAT_BYTES", cfg.dram_bytes_per_cycle),
        _macro("BEAT_SHIFT", int(math.log2(cfg.dram_bytes_per_cycle))),
        _macro("BEAT_BITS", 8 * cfg.dram_bytes_per_cycle),
        _macro("MAX_ENTRY_BYTES", entry_bytes),
        _macro("MAX_ENTRY_BEATS", entry_bytes // cfg.dram_bytes_per_cycle),
        _macro("DSB_ENABLED", int(cfg.dsb_enabled)),
        _macro("DSB_CHECK_CYCLES", cfg.dsb_check_cycles),
        "// ---- implementation choices of the RTL (tvm_hapm.rtl.params)",
        _macro("FIFO_DEPTH", INSTRUCTION_FIFO_DEPTH),
        _macro("FIFO_AW", int(math.log2(INSTRUCTION_FIFO_DEPTH))),
        _macro("PEND_DEPTH", PENDING_PUSH_DEPTH),
        _macro("MAX_READS", MAX_OUTSTANDING_READS),
        *_isa_macros(),
        "`endif",
        "",
    ]
    return "\n".join(lines)
