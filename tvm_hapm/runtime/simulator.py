"""Bit-exact functional simulator of the hapm_fpga instruction set.

The simulator is the executable definition of the ISA described in ``docs/isa.md``: the codegen,
the runtime driver and the tests treat its results as the ground truth of what the accelerator
computes.  It models the architectural state (three on-chip buffers and four dependency-token
queues) and the DRAM slots of one program, not time.  ``run(..., timing=True)`` additionally
replays the program on the cycle-level :class:`~tvm_hapm.runtime.timing.TimingModel` and the
:class:`~tvm_hapm.runtime.energy.EnergyModel` (``docs/timing.md``) and fills the timing fields of
the returned :class:`ExecutionStats`.

A run has two phases:

1. **Validation.**  Every instruction is checked statically (field widths, buffer and DRAM
   ranges of the whole loop nest, flags legal for the executing module, ...) and the token
   protocol is played out on counters to find the execution order of the three modules.  Any
   problem, including a deadlock, raises :class:`SimulatorError` before a single DRAM byte is
   written.
2. **Execution.**  The instructions run in that order on numpy arrays.  The only refusal left
   for this phase is data dependent: a ``SHR`` whose shift amounts come from the accumulator
   and fall outside ``[0, 31]``.

Example
-------
.. code-block:: python

    sim = Simulator(get_config("zedboard"))
    stats = sim.run(program.instructions, dram_arrays, layer=program.layer)
    print(stats.macs, stats.dram_bytes)
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..target import isa
from ..target.config import HardwareConfig
from ..target.isa import (
    REQUANT_RELU,
    REQUANT_SHIFT_MASK,
    AluOp,
    Buffer,
    Instruction,
    Module,
    Opcode,
)
from .energy import EnergyModel
from .timing import TimingModel

__all__ = ["ExecutionStats", "Simulator", "SimulatorError"]


class SimulatorError(RuntimeError):
    """A program the simulator refuses to run.

    The message names the offending instruction (index and disassembly) and what is wrong.
    """


# ---------------------------------------------------------------------------------- statistics
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


# ---------------------------------------------------------------------------------- token queues
# The four dependency-token queues between the modules load -> compute -> store.
_LD2CMP, _CMP2LD, _CMP2ST, _ST2CMP = range(4)
_QUEUE_NAMES = ("load->compute", "compute->load", "compute->store", "store->compute")

# (module, flag) -> queue.  A flag missing here is illegal for that module: the load module has no
# previous module and the store module no next one.
_POPS = {
    (Module.LOAD, "pop_next"): _CMP2LD,
    (Module.COMPUTE, "pop_prev"): _LD2CMP,
    (Module.COMPUTE, "pop_next"): _ST2CMP,
    (Module.STORE, "pop_prev"): _CMP2ST,
}
_PUSHES = {
    (Module.LOAD, "push_next"): _LD2CMP,
    (Module.COMPUTE, "push_prev"): _CMP2LD,
    (Module.COMPUTE, "push_next"): _CMP2ST,
    (Module.STORE, "push_prev"): _ST2CMP,
}
_FLAGS = ("pop_prev", "pop_next", "push_prev", "push_next")

# Field ranges of every opcode, derived from the encoding: an instruction the encoder would reject
# is not a program the hardware could receive, so the simulator refuses it too.
_FIELD_RANGES = {
    op: tuple(
        (name, -(1 << (bits - 1)), (1 << (bits - 1)) - 1, bits, "signed")
        if name in isa._SIGNED
        else (name, 0, (1 << bits) - 1, bits, "unsigned")
        for name, bits in layout
        if name != "opcode"
    )
    for op, layout in isa.LAYOUTS.items()
}

_BUFFER_NAMES = {
    Buffer.INP: "input buffer",
    Buffer.WGT: "weight buffer",
    Buffer.ACC: "accumulator buffer",
}
_DRAM_DTYPES = {8: np.dtype(np.int8), 16: np.dtype(np.int16), 32: np.dtype(np.int32)}
_MASK32 = 0xFFFFFFFF


def _wrap32(x: np.ndarray) -> np.ndarray:
    """Two's-complement wrap of int64 values to int32.

    Done with a mask and a reinterpretation rather than ``astype(np.int32)``: the latter relies
    on C's implementation-defined narrowing of out-of-range signed integers.
    """
    return (x & _MASK32).astype(np.uint32).view(np.int32)


def _loop_index(base: int, so: int, si: int, outer: int, inner: int):
    """Buffer entries addressed by a two-level loop, in iteration order (``o`` major).

    Returns
    -------
    index : slice or numpy.ndarray
        A slice when the addresses form an increasing arithmetic progression (the common case:
        indexing with it is a view, no gather), else a flat int64 array.
    distinct : bool
        Whether no address repeats.
    """
    # The nest is one arithmetic progression when one of the loops is trivial or when the inner
    # loop exactly tiles the outer stride.
    if inner == 1:
        step, count = so, outer
    elif outer == 1:
        step, count = si, inner
    elif so == si * inner:
        step, count = si, outer * inner
    else:
        step = count = None
    if step is not None:
        if count == 1:
            return slice(base, base + 1), True
        if step > 0:
            return slice(base, base + (count - 1) * step + 1, step), True
        return np.full(count, base, dtype=np.int64), False
    index = (
        base
        + so * np.arange(outer, dtype=np.int64)[:, None]
        + si * np.arange(inner, dtype=np.int64)[None, :]
    ).ravel()
    # Rows of the nest that do not interleave cannot collide; otherwise count unique addresses.
    if (si > 0 and so >= si * inner) or (so > 0 and si >= so * outer):
        distinct = True
    else:
        distinct = len(np.unique(index)) == index.size
    return index, distinct


def _as_array(index) -> np.ndarray:
    if isinstance(index, slice):
        return np.arange(index.start, index.stop, index.step or 1, dtype=np.int64)
    return index


def _read_before_written(dst: np.ndarray, src: np.ndarray) -> bool:
    """Whether every iteration ``j`` reads ``src[j]`` before any iteration writes it.

    True when no ``dst[k]`` with ``k < j`` equals ``src[j]``; then gathering all operands first
    and computing the whole nest at once gives the sequential result.
    """
    order = np.argsort(dst, kind="stable")
    sorted_dst = dst[order]
    pos = np.minimum(np.searchsorted(sorted_dst, src), dst.size - 1)
    # With a stable sort and the leftmost insertion point, order[pos] is the *first* iteration
    # that writes the address src[j].
    hit = sorted_dst[pos] == src
    first_writer = order[pos]
    return not np.any(hit & (first_writer < np.arange(src.size)))


_BLAS = []


def _one_blas_thread():
    """A context in which BLAS uses one thread.

    The simulator's matrix products are small (``k*R`` by ``C``); a multi-threaded BLAS
    spends more on waking and joining its threads than on the product, and on a loaded
    machine one descheduled thread stalls every call (measured: 20 ms instead of 0.6 ms for
    a 784 x 576 by 576 x 8 product on 2 busy cores).
    """
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS.append(ThreadpoolController())
        except Exception:
            _BLAS.append(None)
    ctl = _BLAS[0]
    if ctl is None:
        return contextlib.nullcontext()
    return ctl.limit(limits=1, user_api="blas")


# ---------------------------------------------------------------------------------- plans
@dataclass
class _Plan:
    """What the simulator keeps of a validated program between runs (see ``_get_plan``)."""

    key: tuple | None
    stats: ExecutionStats
    slot_needs: dict  # slot -> (elements needed, ((elem_bits, writes), ...))
    steps: list  # instruction indices and _GemmRun objects, in execution order
    timing: tuple | None = None  # (zero-flag key, TimingResult, EnergyReport) of the last run


_LOOP_CACHE: dict = {}


def _loop_vectors(outer: int, inner: int) -> tuple[np.ndarray, np.ndarray]:
    """The outer and inner loop counters of every iteration of an ``outer x inner`` nest."""
    hit = _LOOP_CACHE.get((outer, inner))
    if hit is None:
        o = np.repeat(np.arange(outer, dtype=np.int64), inner)
        i = np.tile(np.arange(inner, dtype=np.int64), outer)
        hit = _LOOP_CACHE[(outer, inner)] = (o, i)
    return hit


class _Group:
    """GEMMs of one flush that write the same accumulator entries (see ``_plan_steps``)."""

    __slots__ = ("acc", "base", "pattern", "reset", "si", "so", "wgt")

    @classmethod
    def build(cls, key, members) -> _Group:
        acc_addr, acc_so, acc_si, outer, inner = key
        start = 0
        for j, (_, g) in enumerate(members):
            if g.reset:
                start = j  # earlier products are overwritten by this reset
        used = [g for _, g in members[start:]]
        self = cls()
        self.reset = bool(used[0].reset)
        self.acc = _loop_index(acc_addr, acc_so, acc_si, outer, inner)[0]
        self.wgt = np.fromiter((g.wgt_addr for g in used), np.int64, len(used))
        self.base = np.fromiter((g.inp_addr for g in used), np.int64, len(used))
        o, i = _loop_vectors(outer, inner)
        strides = {(g.inp_so, g.inp_si) for g in used}
        if len(strides) == 1:
            so, si = strides.pop()
            self.pattern = (o * so + i * si)[:, None]
            self.so = self.si = None
        else:
            self.pattern = None
            self.so = np.fromiter((g.inp_so for g in used), np.int64, len(used))
            self.si = np.fromiter((g.inp_si for g in used), np.int64, len(used))
            self.so = o[:, None] * self.so[None, :]
            self.si = i[:, None] * self.si[None, :]
        return self

    def inp_index(self) -> np.ndarray:
        """Input entries read, shape ``(T, k)``: vector ``t`` of GEMM ``j`` at ``[t, j]``."""
        if self.pattern is not None:
            return self.pattern + self.base[None, :]
        return self.base[None, :] + self.so + self.si


@dataclass(frozen=True)
class _Flush:
    groups: tuple


@dataclass(frozen=True)
class _GemmRun:
    flushes: tuple  # _Flush objects and (index, instruction) of GEMMs executed on their own
    gemms: tuple  # instruction indices of all GEMMs of the run
    wgt_addrs: np.ndarray  # their weight blocks


# ---------------------------------------------------------------------------------- simulator
class Simulator:
    """Functional, bit-exact model of one hapm_fpga accelerator.

    Parameters
    ----------
    config : HardwareConfig
        The accelerator instance: array shape, buffer depths and data widths.

    Attributes
    ----------
    inp : numpy.ndarray
        Input buffer, shape ``(inp_depth, array_rows)``, activation dtype.
    wgt : numpy.ndarray
        Weight buffer, shape ``(wgt_depth, array_rows, array_cols)``, weight dtype; block
        ``[r][c]`` multiplies input channel ``r`` into output channel ``c``.
    acc : numpy.ndarray
        Accumulator buffer, shape ``(acc_depth, array_cols)``, int32.

    last_timing : TimingResult or None
        The cycle-level result of the last ``run(..., timing=True)`` (traces included).
    last_energy : EnergyReport or None
        Its energy breakdown.

    The buffers are zeroed at the start of every :meth:`run` and keep their final contents
    afterwards, for inspection.
    """

    def __init__(self, config: HardwareConfig):
        if not isinstance(config, HardwareConfig):
            raise TypeError(f"Simulator needs a HardwareConfig, got {type(config).__name__}")
        self.config = config
        self.rows = config.array_rows
        self.cols = config.array_cols
        self.act_dtype = np.dtype(config.act_dtype)
        self.wgt_dtype = np.dtype(config.weight_dtype)
        self.act_lo, self.act_hi = config.act_range
        self.depth = {
            Buffer.INP: config.inp_depth,
            Buffer.WGT: config.wgt_depth,
            Buffer.ACC: config.acc_depth,
        }
        # Elements of one buffer entry: the unit of LOAD/STORE DRAM addresses and strides.
        self.entry_elems = {
            Buffer.INP: self.rows,
            Buffer.WGT: self.rows * self.cols,
            Buffer.ACC: self.cols,
        }
        self.entry_shape = {
            Buffer.INP: (self.rows,),
            Buffer.WGT: (self.rows, self.cols),
            Buffer.ACC: (self.cols,),
        }
        # GEMM runs in float64 (BLAS) and is exact while every partial sum of a dot product is an
        # integer below 2**53.  The largest is rows * 2**(a-1) * 2**(w-1) (2**38 for 256 rows of
        # 16-bit data), so this always holds for a valid config; keep an integer path anyway.
        bound = self.rows * (1 << (config.act_bits - 1)) * (1 << (config.weight_bits - 1))
        self._gemm_dtype = np.float64 if bound < (1 << 53) else np.int64
        self._handlers = {
            Opcode.LOAD: self._exec_load,
            Opcode.STORE: self._exec_store,
            Opcode.GEMM: self._exec_gemm,
            Opcode.ALU: self._exec_alu,
        }
        self.inp = self.wgt = self.acc = None
        self._reset_buffers()
        self._timing_model = self._energy_model = None
        self._plan = None
        self.last_timing = self.last_energy = None

    # ------------------------------------------------------------------ public API
    def run(
        self,
        instructions: list[Instruction],
        dram: list[np.ndarray],
        layer: str = "",
        timing: bool = False,
    ) -> ExecutionStats:
        """Validate and execute a program.

        Parameters
        ----------
        instructions : list of isa.Instruction
            The decoded instruction stream; it must end with its only ``FINISH``.
        dram : list of numpy.ndarray
            ``dram[k]`` is DRAM slot ``k``: a flat (1-D) int8, int16 or int32 array.  ``STORE``
            instructions write into these arrays in place.
        layer : str
            Name recorded in the returned stats.
        timing : bool
            Also run the cycle-level timing and energy models: the simulator records which GEMMs
            found an all-zero weight block (for the Dynamic Sparsity Bypass), then fills
            ``cycles``, ``latency_ms``, ``energy_uj``, ``stall_cycles``, ``stalls``,
            ``utilisation`` and ``roofline_fraction`` of the stats and keeps the full results
            in :attr:`last_timing` and :attr:`last_energy`.  Off by default (the functional
            path stays as fast as before).

        Returns
        -------
        ExecutionStats
            Event counts of the run.

        Raises
        ------
        SimulatorError
            If the program is invalid (nothing is executed then) or a ``SHR`` reads shift
            amounts outside ``[0, 31]`` from the accumulator.
        """
        plan = self._get_plan(instructions, dram, layer)
        stats = dataclasses.replace(
            plan.stats, layer=layer, by_opcode=dict(plan.stats.by_opcode), stalls={}
        )
        self._reset_buffers()
        zero = bytearray(len(instructions)) if timing else None
        with _one_blas_thread():
            self._execute(plan, instructions, dram, zero)
        if timing:
            self._add_timing(stats, instructions, zero, plan)
        return stats

    def _execute(self, plan, instructions, dram, zero) -> None:
        handlers = self._handlers
        for step in plan.steps:
            if step.__class__ is int:
                insn = instructions[step]
                op = insn.opcode
                if op == Opcode.GEMM and zero is not None:
                    # What the bypass logic sees: the weight block when the GEMM executes.
                    zero[step] = not self.wgt[insn.wgt_addr].any()
                handler = handlers.get(op)
                if handler is not None:  # SYNC and FINISH only move tokens
                    handler(step, insn, dram)
            else:
                self._exec_gemm_run(step, zero)

    def validate(
        self, instructions: list[Instruction], dram: list[np.ndarray], layer: str = ""
    ) -> ExecutionStats:
        """Check a program without executing it.

        Returns the stats :meth:`run` would report (they do not depend on data) or raises
        :class:`SimulatorError` exactly as :meth:`run` would before executing anything.
        """
        return self._validate(instructions, dram, layer)[0]

    # ------------------------------------------------------------------ helpers
    def _add_timing(self, stats: ExecutionStats, instructions, zero, plan) -> None:
        """Run the timing and energy models and copy their results into ``stats``.

        The timing of a program depends only on its instructions and on which GEMMs found an
        all-zero weight block, so the result is kept with the plan and reused when a later run
        of the same program sees the same blocks (the common case: inference repeats).
        """
        if self._timing_model is None:
            self._timing_model = TimingModel(self.config)
            self._energy_model = EnergyModel(self.config)
        key = bytes(zero) if self.config.dsb_enabled else b""
        cached = plan.timing
        if cached is not None and cached[0] == key:
            result, energy = cached[1], cached[2]
        else:
            flags = [bool(z) for z in zero] if self.config.dsb_enabled else None
            result = self._timing_model.run(instructions, flags)
            energy = self._energy_model.estimate(result)
            plan.timing = (key, result, energy)
        stats.cycles = result.cycles
        stats.latency_ms = result.latency_ms
        stats.energy_uj = energy.total_uj
        stats.stall_cycles = result.stall_cycles
        stats.stalls = dict(result.stalls)
        stats.utilisation = result.utilisation
        stats.roofline_fraction = result.roofline_fraction
        self.last_timing = result
        self.last_energy = energy

    def _get_plan(self, instructions, dram, layer) -> _Plan:
        """The validated plan of a program, reused while the same program runs again.

        A plan holds what does not depend on data: the stats, the execution order, and the
        batches of consecutive GEMMs.  It is reused when the instructions are the same objects
        (they are frozen) and the DRAM slots still pass the checks the plan recorded; otherwise
        the program is validated from scratch, which raises the precise error.
        """
        key = tuple(instructions) if isinstance(instructions, (list, tuple)) else None
        plan = self._plan
        if (
            plan is not None
            and key is not None
            and isinstance(dram, (list, tuple))
            and plan.key == key
            and self._slots_ok(plan.slot_needs, dram)
        ):
            return plan
        stats, order, slot_needs = self._validate(instructions, dram, layer)
        plan = _Plan(
            key=key,
            stats=stats,
            slot_needs=slot_needs,
            steps=self._plan_steps(instructions, order),
        )
        self._plan = plan if key is not None else None
        return plan

    def _slots_ok(self, slot_needs, dram) -> bool:
        """Whether ``dram`` satisfies the slot requirements a plan recorded."""
        for k, (size, checks) in slot_needs.items():
            if k >= len(dram):
                return False
            slot = dram[k]
            for bits, writes in checks:
                if self._slot_problem(slot, bits, writes):
                    return False
            if slot.size < size:
                return False
        return True

    # ------------------------------------------------------------------ GEMM batching
    def _plan_steps(self, instructions, order) -> list:
        """Split the execution order into single instructions and runs of consecutive GEMMs.

        Between two instructions that are not GEMMs, the GEMMs read the input and weight
        buffers, which nothing changes meanwhile, and update accumulator entries.  A run is cut
        into *flushes*; a flush groups its GEMMs by accumulator pattern (same first entry,
        strides and loop counts, entries distinct), and the patterns of one flush occupy
        disjoint accumulator ranges.  Within a group, the sequential result is the sum of the
        products of the GEMMs from the last ``reset`` on (onto the old value if none resets),
        which is one matrix product ``[x_1 ... x_k] @ [W_1; ...; W_k]``: the order in which the
        GEMMs of a flush are applied does not change the result.
        """
        steps: list = []
        run: list = []
        GEMM = Opcode.GEMM
        for idx in order:
            insn = instructions[idx]
            if insn.opcode == GEMM:
                run.append(idx)
                continue
            if run:
                self._add_gemm_run(steps, instructions, run)
                run = []
            steps.append(idx)
        if run:
            self._add_gemm_run(steps, instructions, run)
        return steps

    def _add_gemm_run(self, steps, instructions, run) -> None:
        if len(run) == 1:
            steps.append(run[0])
            return
        flushes = []
        groups: dict = {}
        ranges: list = []  # (lo, hi, key) of the groups of the current flush

        def close():
            if groups:
                flushes.append(_Flush(tuple(_Group.build(k, v) for k, v in groups.items())))
                groups.clear()
                ranges.clear()

        for idx in run:
            g = instructions[idx]
            outer, inner, so, si = g.outer, g.inner, g.acc_so, g.acc_si
            key = (g.acc_addr, so, si, outer, inner)
            members = groups.get(key)
            if members is None:
                distinct = (
                    inner == 1
                    or outer == 1
                    or (si > 0 and so >= si * inner)
                    or (so > 0 and si >= so * outer)
                )
                if not distinct or (outer > 1 and so == 0) or (inner > 1 and si == 0):
                    # Entries repeat within the GEMM: execute it on its own, in order.
                    close()
                    flushes.append((idx, g))
                    continue
                lo = g.acc_addr
                hi = lo + (outer - 1) * so + (inner - 1) * si
                if any(not (hi < a or b < lo) for a, b, _ in ranges):
                    close()
                ranges.append((lo, hi, key))
                members = groups[key] = []
            members.append((idx, g))
        close()
        wgt_addrs = np.fromiter((instructions[i].wgt_addr for i in run), np.int64, len(run))
        steps.append(_GemmRun(tuple(flushes), tuple(run), wgt_addrs))

    def _exec_gemm_run(self, run: _GemmRun, zero) -> None:
        inp, wgt, acc = self.inp, self.wgt, self.acc
        if zero is not None:
            blocks = wgt[run.wgt_addrs]
        for item in run.flushes:
            if item.__class__ is tuple:  # a GEMM executed on its own: (index, instruction)
                self._exec_gemm(item[0], item[1], None)
                continue
            for grp in item.groups:
                X = inp[grp.inp_index()]  # (T, k, R)
                T = X.shape[0]
                X = X.reshape(T, -1)
                W = wgt[grp.wgt].reshape(-1, self.cols)
                dt = self._flush_dtype(X.shape[1])
                if dt is np.int64:
                    prod = X.astype(np.int64) @ W.astype(np.int64)
                else:
                    prod = (X.astype(dt) @ W.astype(dt)).astype(np.int64)
                if grp.reset:
                    acc[grp.acc] = _wrap32(prod)
                else:
                    acc[grp.acc] = _wrap32(acc[grp.acc] + prod)
        if zero is not None:
            flags = ~blocks.reshape(len(run.gemms), -1).any(axis=1)
            for idx, flag in zip(run.gemms, flags.tolist(), strict=True):
                zero[idx] = flag

    def _flush_dtype(self, K: int):
        """The exact dtype for a product with ``K`` terms per output: float32 while every
        partial sum stays below 2**24, float64 below 2**53, else int64."""
        cfg = self.config
        bound = K * (1 << (cfg.act_bits - 1)) * (1 << (cfg.weight_bits - 1))
        if bound < (1 << 24):
            return np.float32
        if bound < (1 << 53):
            return np.float64
        return np.int64

    def _reset_buffers(self) -> None:
        cfg = self.config
        self.inp = np.zeros((cfg.inp_depth, self.rows), dtype=self.act_dtype)
        self.wgt = np.zeros((cfg.wgt_depth, self.rows, self.cols), dtype=self.wgt_dtype)
        self.acc = np.zeros((cfg.acc_depth, self.cols), dtype=np.int32)

    @staticmethod
    def _error(idx: int, insn: Instruction, what: str) -> SimulatorError:
        return SimulatorError(f"instruction {idx} ({isa.disassemble(insn)}): {what}")

    # ------------------------------------------------------------------ validation
    def _validate(self, instructions, dram, layer):
        """Static checks of the whole stream, then the token schedule.

        Returns the stats of the program and the order in which the instructions execute.
        """
        if not isinstance(dram, (list, tuple)):
            raise SimulatorError(f"dram must be a list of numpy arrays, got {type(dram).__name__}")
        n = len(instructions)
        if n == 0:
            raise SimulatorError("empty program: a program must end with FINISH")
        err = self._error
        cfg = self.config
        R, C = self.rows, self.cols
        depth = self.depth
        slot_checked = {}  # (slot, elem_bits, writes) -> True once the slot passed the checks

        counts = [0] * len(Opcode)
        macs = alu_ops = read = written = 0
        modules = [0] * n
        pops = [()] * n
        pushes = [()] * n

        gemms = []
        GEMM = Opcode.GEMM
        for idx, insn in enumerate(instructions):
            if insn.__class__ is not Instruction and not isinstance(insn, Instruction):
                raise SimulatorError(
                    f"instruction {idx}: expected an isa.Instruction, got {type(insn).__name__}"
                )
            op = insn.opcode
            counts[op] += 1
            if op == GEMM:
                gemms.append(idx)
        # GEMMs (most of a program) are screened with numpy; only those that may be invalid,
        # and every other instruction, go through the checks below, in program order, so the
        # first invalid instruction is the one reported.
        flagged, macs = self._screen_gemms(instructions, gemms, modules, pops, pushes)
        if flagged is None:
            check = range(n)
        else:
            check = sorted(set(range(n)).difference(gemms).union(flagged))
        slot_needs: dict = {}

        for idx in check:
            insn = instructions[idx]
            op = insn.opcode

            # Field widths: everything below may assume non-negative, encodable values.
            for name, lo, hi, bits, kind in _FIELD_RANGES[op]:
                value = getattr(insn, name)
                if not lo <= value <= hi:
                    raise err(
                        idx,
                        insn,
                        f"field '{name}' = {value} does not fit its {bits}-bit {kind} encoding "
                        f"[{lo}, {hi}]",
                    )

            if op in (Opcode.LOAD, Opcode.STORE):
                buf = insn.buffer
                if buf > Buffer.ACC:
                    raise err(idx, insn, f"unknown buffer {buf}")
                if op == Opcode.STORE and buf != Buffer.ACC:
                    raise err(idx, insn, "STORE reads the accumulator buffer only")
                code = insn.elem_bits_code
                if code >= len(isa.ELEM_BITS):
                    raise err(idx, insn, f"invalid element width code {code}")
                bits = isa.ELEM_BITS[code]
                if op == Opcode.LOAD:
                    need = {Buffer.INP: cfg.act_bits, Buffer.WGT: cfg.weight_bits}.get(buf)
                    if need is not None and bits != need:
                        raise err(
                            idx,
                            insn,
                            f"a LOAD into the {_BUFFER_NAMES[buf]} needs {need}-bit DRAM "
                            f"elements, got {bits}-bit",
                        )
                elif (
                    insn.y_pad_top
                    or insn.y_pad_bottom
                    or insn.x_pad_left
                    or insn.x_pad_right
                    or insn.pad_min
                ):
                    raise err(idx, insn, "STORE has no padding: pad fields and pad_min must be 0")
                y, x = insn.y_size, insn.x_size
                if y < 1 or x < 1:
                    raise err(idx, insn, f"empty transfer: y_size={y}, x_size={x} (need >= 1)")
                rows_total = insn.y_pad_top + y + insn.y_pad_bottom
                cols_total = insn.x_pad_left + x + insn.x_pad_right
                last = insn.sram_addr + rows_total * cols_total - 1
                if last >= depth[buf]:
                    raise err(
                        idx,
                        insn,
                        f"{_BUFFER_NAMES[buf]} address {last} out of range [0, {depth[buf]})",
                    )
                # DRAM slot and range.
                k = insn.dram_slot
                if k >= len(dram):
                    raise err(idx, insn, f"DRAM slot {k} does not exist ({len(dram)} slots)")
                slot = dram[k]
                key = (k, bits, op == Opcode.STORE)
                if key not in slot_checked:
                    problem = self._slot_problem(slot, bits, op == Opcode.STORE)
                    if problem:
                        raise err(idx, insn, f"DRAM slot {k} {problem}")
                    slot_checked[key] = True
                E = self.entry_elems[buf]
                last = (insn.dram_addr + (y - 1) * insn.x_stride + x) * E - 1
                if last >= slot.size:
                    raise err(
                        idx, insn, f"DRAM slot {k} element {last} out of range [0, {slot.size})"
                    )
                need = slot_needs.get(k)
                if need is None:
                    need = slot_needs[k] = [0, set()]
                need[0] = max(need[0], last + 1)
                need[1].add((bits, op == Opcode.STORE))
                if op == Opcode.LOAD:
                    read += y * x * E * (bits // 8)
                else:
                    written += y * x * E * (bits // 8)

            elif op == Opcode.GEMM:
                if insn.array >= cfg.num_arrays:
                    raise err(idx, insn, f"array {insn.array} out of range [0, {cfg.num_arrays})")
                outer, inner = insn.outer, insn.inner
                if outer < 1 or inner < 1:
                    raise err(idx, insn, f"empty loop: outer={outer}, inner={inner} (need >= 1)")
                if insn.wgt_addr >= depth[Buffer.WGT]:
                    raise err(
                        idx,
                        insn,
                        f"weight buffer address {insn.wgt_addr} out of range "
                        f"[0, {depth[Buffer.WGT]})",
                    )
                for buf, base, so, si in (
                    (Buffer.INP, insn.inp_addr, insn.inp_so, insn.inp_si),
                    (Buffer.ACC, insn.acc_addr, insn.acc_so, insn.acc_si),
                ):
                    last = base + (outer - 1) * so + (inner - 1) * si
                    if last >= depth[buf]:
                        raise err(
                            idx,
                            insn,
                            f"{_BUFFER_NAMES[buf]} address {last} out of range [0, {depth[buf]})",
                        )
                macs += R * C * outer * inner

            elif op == Opcode.ALU:
                alu = insn.alu_op  # its 3-bit field has no unknown values
                outer, inner = insn.outer, insn.inner
                if outer < 1 or inner < 1:
                    raise err(idx, insn, f"empty loop: outer={outer}, inner={inner} (need >= 1)")
                acc_depth = depth[Buffer.ACC]
                last = insn.dst_addr + (outer - 1) * insn.dst_so + (inner - 1) * insn.dst_si
                if last >= acc_depth:
                    raise err(
                        idx,
                        insn,
                        f"accumulator buffer destination address {last} out of range "
                        f"[0, {acc_depth})",
                    )
                if alu == AluOp.REQUANT:
                    if insn.use_imm:
                        raise err(idx, insn, "REQUANT takes its multiplier from acc: use_imm=0")
                    if not 1 <= insn.imm <= 62:
                        raise err(idx, insn, f"REQUANT shift {insn.imm} out of range [1, 62]")
                elif alu == AluOp.ADD_REQUANT:
                    if insn.use_imm:
                        raise err(
                            idx, insn, "ADD_REQUANT takes bias and multiplier from acc: use_imm=0"
                        )
                    if not 0 <= insn.imm <= (REQUANT_RELU | REQUANT_SHIFT_MASK):
                        raise err(
                            idx,
                            insn,
                            f"ADD_REQUANT immediate {insn.imm}: only the shift and ReLU bits "
                            "may be set",
                        )
                    if not 1 <= insn.imm & REQUANT_SHIFT_MASK <= 62:
                        raise err(
                            idx,
                            insn,
                            f"ADD_REQUANT shift {insn.imm & REQUANT_SHIFT_MASK} out of range "
                            "[1, 62]",
                        )
                elif alu == AluOp.SHR and insn.use_imm and not 0 <= insn.imm <= 31:
                    raise err(idx, insn, f"SHR shift {insn.imm} out of range [0, 31]")
                rows = isa.alu_operand_rows(alu, insn.use_imm)
                if rows:
                    last = insn.src_addr + (outer - 1) * insn.src_so + (inner - 1) * insn.src_si
                    last += rows - 1  # ADD_REQUANT: the multiplier after the bias
                    if last >= acc_depth:
                        raise err(
                            idx,
                            insn,
                            f"accumulator buffer source address {last} out of range "
                            f"[0, {acc_depth})",
                        )
                alu_ops += C * outer * inner

            elif op == Opcode.SYNC:
                if insn.module > Module.STORE:
                    raise err(idx, insn, f"unknown module {insn.module}")

            elif op == Opcode.FINISH and idx != n - 1:
                raise err(idx, insn, "FINISH must be the last instruction (one FINISH per program)")

            # Dependency flags of the executing module.
            module = isa.module_of(insn)
            modules[idx] = module
            if insn.pop_prev or insn.pop_next or insn.push_prev or insn.push_next:
                p, q = [], []
                for flag in _FLAGS:
                    if getattr(insn, flag):
                        table = _POPS if flag.startswith("pop") else _PUSHES
                        queue = table.get((module, flag))
                        if queue is None:
                            raise err(
                                idx,
                                insn,
                                f"the {module.name.lower()} module has no "
                                f"{'previous' if flag.endswith('prev') else 'next'} module: "
                                f"{flag} is illegal",
                            )
                        (p if table is _POPS else q).append(queue)
                pops[idx] = tuple(p)
                pushes[idx] = tuple(q)

        last_insn = instructions[-1]
        if last_insn.opcode != Opcode.FINISH:
            raise err(n - 1, last_insn, "the program must end with FINISH")

        order = self._schedule(instructions, modules, pops, pushes)
        stats = ExecutionStats(
            layer=layer,
            instructions=n,
            by_opcode={op.name: counts[op] for op in Opcode if counts[op]},
            macs=macs,
            alu_ops=alu_ops,
            dram_bytes_read=read,
            dram_bytes_written=written,
        )
        slot_needs = {k: (size, tuple(sorted(c))) for k, (size, c) in slot_needs.items()}
        return stats, order, slot_needs

    def _screen_gemms(self, instructions, gemms, modules, pops, pushes):
        """Vectorised checks of the GEMMs; fills their modules and token queues.

        Returns ``(flagged, macs)``: the indices of GEMMs that may break a rule (they are
        checked one by one afterwards) and the MACs of the others.  ``(None, 0)`` when the
        fields cannot be screened (e.g. integers beyond 64 bits): then every instruction is
        checked one by one.
        """
        if not gemms:
            return [], 0
        ranges = _FIELD_RANGES[Opcode.GEMM]
        getter = attrgetter(*(r[0] for r in ranges))
        try:
            V = np.array([getter(instructions[i]) for i in gemms], dtype=np.int64)
        except (OverflowError, TypeError, ValueError):
            return None, 0
        col = {r[0]: V[:, j] for j, r in enumerate(ranges)}
        lo = np.array([r[1] for r in ranges], dtype=np.int64)
        hi = np.array([r[2] for r in ranges], dtype=np.int64)
        bad = ((V < lo) | (V > hi)).any(axis=1)
        outer, inner = col["outer"], col["inner"]
        depth = self.depth
        bad |= col["array"] >= self.config.num_arrays
        bad |= (outer < 1) | (inner < 1)
        bad |= col["wgt_addr"] >= depth[Buffer.WGT]
        for buf, base, so, si in ((Buffer.INP, "inp_addr", "inp_so", "inp_si"),
                                  (Buffer.ACC, "acc_addr", "acc_so", "acc_si")):  # fmt: skip
            last = col[base] + (outer - 1) * col[so] + (inner - 1) * col[si]
            bad |= last >= depth[buf]
        ok = ~bad
        macs = self.rows * self.cols * int((outer * inner)[ok].sum())
        idx = np.asarray(gemms, dtype=np.int64)
        compute = Module.COMPUTE
        for i in idx[ok].tolist():
            modules[i] = compute
        # Token flags: every flag is legal on the compute module.
        flags = ok & ((col["pop_prev"] | col["pop_next"] | col["push_prev"] | col["push_next"]) > 0)
        for j in np.flatnonzero(flags).tolist():
            i = gemms[j]
            pops[i] = tuple(
                q for f, q in (("pop_prev", _LD2CMP), ("pop_next", _ST2CMP)) if col[f][j]
            )
            pushes[i] = tuple(
                q for f, q in (("push_prev", _CMP2LD), ("push_next", _CMP2ST)) if col[f][j]
            )
        return idx[bad].tolist(), macs

    @staticmethod
    def _slot_problem(slot, bits: int, writes: bool) -> str:
        """Why ``slot`` cannot hold ``bits``-bit DRAM elements ("" when it can)."""
        if not isinstance(slot, np.ndarray):
            return f"is a {type(slot).__name__}, not a numpy array"
        if slot.ndim != 1:
            return f"must be a flat (1-D) array, got shape {slot.shape}"
        if slot.dtype != _DRAM_DTYPES[bits]:
            return f"has dtype {slot.dtype}, but the instruction moves int{bits} elements"
        if writes and not slot.flags.writeable:
            return "is read-only but the instruction stores into it"
        return ""

    def _schedule(self, instructions, modules, pops, pushes) -> list[int]:
        """Play out the token protocol; return the execution order of the instructions.

        Each module executes its own instructions in program order.  Round-robin over the
        modules (load, compute, store), each runs until it needs a token that is not there or has
        no instructions left.  Tokens do not depend on data, so this finds deadlocks and leftover
        tokens before anything executes.
        """
        per_module = [[], [], []]
        for idx, m in enumerate(modules):
            per_module[m].append(idx)
        pos = [0, 0, 0]
        tokens = [0, 0, 0, 0]
        last_push = [None] * 4
        order = []
        remaining = len(instructions)
        while remaining:
            progress = False
            for m in (Module.LOAD, Module.COMPUTE, Module.STORE):
                mine, p = per_module[m], pos[m]
                start = p
                while p < len(mine):
                    idx = mine[p]
                    need = pops[idx]
                    if need:
                        if any(tokens[q] == 0 for q in need):
                            break
                        for q in need:
                            tokens[q] -= 1
                    order.append(idx)
                    for q in pushes[idx]:
                        tokens[q] += 1
                        last_push[q] = idx
                    p += 1
                if p != start:
                    pos[m] = p
                    remaining -= p - start
                    progress = True
            if remaining and not progress:
                blocked = []
                for m in (Module.LOAD, Module.COMPUTE, Module.STORE):
                    if pos[m] < len(per_module[m]):
                        idx = per_module[m][pos[m]]
                        empty = [_QUEUE_NAMES[q] for q in pops[idx] if tokens[q] == 0]
                        blocked.append(
                            f"the {m.name.lower()} module waits at instruction {idx} "
                            f"({isa.disassemble(instructions[idx])}) for a token on the "
                            f"{' and '.join(empty)} queue"
                        )
                raise SimulatorError("deadlock: no module can make progress; " + "; ".join(blocked))
        leftovers = [
            f"{tokens[q]} token(s) on the {_QUEUE_NAMES[q]} queue, last pushed by instruction "
            f"{last_push[q]} ({isa.disassemble(instructions[last_push[q]])})"
            for q in range(4)
            if tokens[q]
        ]
        if leftovers:
            raise SimulatorError(
                "unconsumed dependency tokens at the end of the program: " + "; ".join(leftovers)
            )
        return order

    # ------------------------------------------------------------------ LOAD / STORE
    def _exec_load(self, idx, insn, dram):
        buf = insn.buffer
        E = self.entry_elems[buf]
        shape = self.entry_shape[buf]
        target = self.inp if buf == Buffer.INP else self.wgt if buf == Buffer.WGT else self.acc
        slot = dram[insn.dram_slot]
        y, x = insn.y_size, insn.x_size
        top, left = insn.y_pad_top, insn.x_pad_left
        rows_total = top + y + insn.y_pad_bottom
        cols_total = left + x + insn.x_pad_right
        # A strided view of the y rows of x entries: no copy of the DRAM slot.
        item = slot.strides[0]
        src = as_strided(
            slot[insn.dram_addr * E :],
            shape=(y, x * E),
            strides=(insn.x_stride * E * item, item),
            writeable=False,
        ).reshape((y, x) + shape)
        region = target[insn.sram_addr : insn.sram_addr + rows_total * cols_total].reshape(
            (rows_total, cols_total) + shape
        )
        if rows_total != y or cols_total != x:
            # Pad with 0, or with the minimum of the DRAM element type so that a following
            # max-pool ignores the padding (sign-extended when loading into the accumulator).
            pad = -(1 << (isa.ELEM_BITS[insn.elem_bits_code] - 1)) if insn.pad_min else 0
            region[:top] = pad
            region[top + y :] = pad
            region[top : top + y, :left] = pad
            region[top : top + y, left + x :] = pad
        # Assignment casts: int8/int16 -> int32 sign-extends for accumulator loads.
        region[top : top + y, left : left + x] = src

    def _exec_store(self, idx, insn, dram):
        C = self.cols
        slot = dram[insn.dram_slot]
        y, x = insn.y_size, insn.x_size
        values = self.acc[insn.sram_addr : insn.sram_addr + y * x]
        bits = isa.ELEM_BITS[insn.elem_bits_code]
        if bits < 32:
            # Narrowing saturates (a plain cast would wrap).
            values = np.clip(values, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        values = values.astype(slot.dtype).reshape(y, x * C)
        item = slot.strides[0]
        dst = as_strided(
            slot[insn.dram_addr * C :],
            shape=(y, x * C),
            strides=(insn.x_stride * C * item, item),
            writeable=True,
        )
        if y == 1 or insn.x_stride >= x:
            dst[...] = values  # rows do not overlap in DRAM
        else:
            # Overlapping rows: write in order so that later rows win, as in hardware.
            for r in range(y):
                dst[r] = values[r]

    # ------------------------------------------------------------------ GEMM
    def _exec_gemm(self, idx, insn, dram):
        outer, inner = insn.outer, insn.inner
        inp_index, _ = _loop_index(insn.inp_addr, insn.inp_so, insn.inp_si, outer, inner)
        acc_index, distinct = _loop_index(insn.acc_addr, insn.acc_so, insn.acc_si, outer, inner)
        # One matrix product for the whole loop nest: (n, R) @ (R, C).  In float64 every partial
        # sum is an exactly representable integer (see __init__), so the result is exact.
        gd = self._gemm_dtype
        prod = (self.inp[inp_index].astype(gd) @ self.wgt[insn.wgt_addr].astype(gd)).astype(
            np.int64
        )
        acc = self.acc
        if distinct:
            if insn.reset:
                acc[acc_index] = _wrap32(prod)
            else:
                acc[acc_index] = _wrap32(acc[acc_index] + prod)
            return
        # Some accumulator entries are hit by several iterations.
        if insn.reset:
            # Every iteration resets its entry, so the last iteration to hit an entry wins.
            rev_unique, rev_first = np.unique(acc_index[::-1], return_index=True)
            acc[rev_unique] = _wrap32(prod[acc_index.size - 1 - rev_first])
        else:
            # Addition modulo 2**32 is associative: sum per entry in int64, wrap once.
            unique, inverse = np.unique(acc_index, return_inverse=True)
            sums = np.zeros((unique.size, self.cols), dtype=np.int64)
            np.add.at(sums, inverse, prod)
            acc[unique] = _wrap32(acc[unique] + sums)

    # ------------------------------------------------------------------ ALU
    def _exec_alu(self, idx, insn, dram):
        op = insn.alu_op
        outer, inner = insn.outer, insn.inner
        acc = self.acc
        dst, dst_distinct = _loop_index(insn.dst_addr, insn.dst_so, insn.dst_si, outer, inner)

        if op == AluOp.ADD_REQUANT:
            self._exec_add_requant(idx, insn, dst, dst_distinct)
            return

        if op == AluOp.RELU or (insn.use_imm and op in (AluOp.MIN, AluOp.MAX)):
            # Idempotent operations: applying them once per distinct entry is the sequential
            # result even when entries repeat (duplicate writes then carry equal values).
            acc[dst] = self._alu(idx, insn, acc[dst].astype(np.int64), insn.imm)
            return

        if insn.use_imm and op != AluOp.REQUANT:
            if dst_distinct:
                acc[dst] = self._alu(idx, insn, acc[dst].astype(np.int64), insn.imm)
            elif op in (AluOp.ADD, AluOp.MUL):
                operand = np.full((outer * inner, self.cols), insn.imm, dtype=np.int64)
                self._alu_reduce(op, dst, operand)
            else:
                self._alu_loop(idx, insn, _as_array(dst), None)
            return

        src, _ = _loop_index(insn.src_addr, insn.src_so, insn.src_si, outer, inner)
        if self._src_ready(insn, dst, src):
            if dst_distinct:
                # Gather both operands before writing anything.
                acc[dst] = self._alu(
                    idx, insn, acc[dst].astype(np.int64), acc[src].astype(np.int64)
                )
                return
            if op in (AluOp.ADD, AluOp.MUL, AluOp.MAX, AluOp.MIN):
                # A reduction into repeated entries (e.g. pooling): associative and commutative.
                self._alu_reduce(op, dst, acc[src].astype(np.int64))
                return
        self._alu_loop(idx, insn, _as_array(dst), _as_array(src))

    def _exec_add_requant(self, idx, insn, dst, dst_distinct):
        """ADD_REQUANT: every iteration reads its destination, the bias at ``acc[s]`` and the
        multiplier at ``acc[s + 1]``, then writes the destination."""
        acc = self.acc
        src = _as_array(
            _loop_index(insn.src_addr, insn.src_so, insn.src_si, insn.outer, insn.inner)[0]
        )
        d = _as_array(dst)
        if dst_distinct and _read_before_written(d, src) and _read_before_written(d, src + 1):
            acc[dst] = self._alu(
                idx, insn, acc[dst].astype(np.int64),
                (acc[src].astype(np.int64), acc[src + 1].astype(np.int64)),
            )  # fmt: skip
            return
        for j in range(d.size):  # sequential fallback
            operand = (acc[src[j]].astype(np.int64), acc[src[j] + 1].astype(np.int64))
            acc[d[j]] = self._alu(idx, insn, acc[d[j]].astype(np.int64), operand)

    @staticmethod
    def _src_ready(insn, dst, src) -> bool:
        """Whether no iteration reads a source entry that an earlier iteration wrote."""
        outer, inner = insn.outer, insn.inner
        d_lo = insn.dst_addr
        d_hi = d_lo + (outer - 1) * insn.dst_so + (inner - 1) * insn.dst_si
        s_lo = insn.src_addr
        s_hi = s_lo + (outer - 1) * insn.src_so + (inner - 1) * insn.src_si
        if d_hi < s_lo or s_hi < d_lo:
            return True  # disjoint address ranges
        if (insn.dst_addr, insn.dst_so, insn.dst_si) == (insn.src_addr, insn.src_so, insn.src_si):
            # Every iteration reads the entry it writes; fine unless entries repeat.
            return not isinstance(dst, np.ndarray) or len(np.unique(dst)) == dst.size
        return _read_before_written(_as_array(dst), _as_array(src))

    def _alu_reduce(self, op, dst, operand):
        """Fold ``operand`` rows into repeated destination entries, in int64, then wrap."""
        unique, inverse = np.unique(dst, return_inverse=True)
        current = self.acc[unique].astype(np.int64)
        ufunc = {
            AluOp.ADD: np.add,
            AluOp.MUL: np.multiply,  # int64 products wrap mod 2**64, which preserves mod 2**32
            AluOp.MIN: np.minimum,
            AluOp.MAX: np.maximum,
        }[op]
        ufunc.at(current, inverse, operand)
        self.acc[unique] = _wrap32(current)

    def _alu_loop(self, idx, insn, dst, src):
        """Sequential fallback: one vector operation per iteration."""
        acc = self.acc
        imm = insn.imm
        for j in range(dst.size):
            d = dst[j]
            operand = imm if src is None else acc[src[j]].astype(np.int64)
            acc[d] = self._alu(idx, insn, acc[d].astype(np.int64), operand)

    def _alu(self, idx, insn, value, operand):
        """One ALU operation on int64 lanes; returns int32 lanes.

        ``value`` holds the destination lanes, ``operand`` the source lanes or the immediate.
        """
        op = insn.alu_op
        if op == AluOp.ADD:
            return _wrap32(value + operand)
        if op == AluOp.MUL:
            # |int32 * int32| < 2**62: the int64 product is exact before wrapping.
            return _wrap32(value * operand)
        if op == AluOp.SHR:
            if isinstance(operand, np.ndarray) and np.any((operand < 0) | (operand > 31)):
                bad = int(operand[(operand < 0) | (operand > 31)].flat[0])
                raise self._error(
                    idx, insn, f"SHR shift amount {bad} read from acc out of range [0, 31]"
                )
            # Round half up: add 2**(k-1) before the arithmetic shift; (1 << k) >> 1 is 0 for
            # k = 0, which leaves the value unchanged.  The sum fits easily in int64.
            return ((value + ((1 << operand) >> 1)) >> operand).astype(np.int32)
        if op == AluOp.MIN:
            return np.minimum(value, operand).astype(np.int32)
        if op == AluOp.MAX:
            return np.maximum(value, operand).astype(np.int32)
        if op == AluOp.RELU:
            return np.maximum(value, 0).astype(np.int32)
        lo = self.act_lo
        if op == AluOp.ADD_REQUANT:
            bias, operand = operand
            value = _wrap32(value + bias).astype(np.int64)
            shift = insn.imm & REQUANT_SHIFT_MASK
            if insn.imm & REQUANT_RELU:
                lo = max(lo, 0)
        else:
            shift = insn.imm
        # REQUANT: |dst * mult| <= 2**62 and the rounding term is at most 2**61, so the int64
        # sum cannot overflow; the result saturates to the activation range.
        scaled = (value * operand + (1 << (shift - 1))) >> shift
        return np.clip(scaled, lo, self.act_hi).astype(np.int32)
