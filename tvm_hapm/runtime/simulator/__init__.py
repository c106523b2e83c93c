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

The package has one module per concern (in ``tvm_hapm.runtime.simulator``):

* ``validate``: the static checks of phase 1 (:func:`~.validate.validate_program`);
* ``tokens``: the dependency-token queues and the execution order they imply;
* ``execute``: the bit-exact semantics of each instruction, phase 2;
* ``gemm_batch``: runs of consecutive GEMMs executed as a few large matrix products;
* ``stats`` and ``errors``: :class:`ExecutionStats` and :class:`SimulatorError`, re-exported
  here;
* this module: the :class:`Simulator`, which holds the state and ties them together.

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
from dataclasses import dataclass

import numpy as np

from ...target.config import HardwareConfig
from ...target.isa import Buffer, Instruction, Opcode
from ..energy import EnergyModel
from ..timing import TimingModel
from .errors import SimulatorError
from .execute import HANDLERS
from .gemm_batch import exec_gemm_run, plan_steps
from .stats import ExecutionStats
from .validate import slots_ok, validate_program

__all__ = ["ExecutionStats", "Simulator", "SimulatorError"]


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
    steps: list  # instruction indices and GEMM runs (gemm_batch.plan_steps), in execution order
    timing: tuple | None = None  # (zero-flag key, TimingResult, EnergyReport) of the last run


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

    config : HardwareConfig
        The accelerator instance.
    rows, cols : int
        ``config.array_rows`` and ``config.array_cols``.
    act_dtype, wgt_dtype : numpy.dtype
        dtypes of the input and weight buffers.
    act_lo, act_hi : int
        The activation range ``config.act_range`` (REQUANT saturates to it).
    depth : dict of Buffer to int
        Entries of each buffer.
    entry_elems : dict of Buffer to int
        Elements of one entry of each buffer: the unit of LOAD/STORE DRAM addresses and strides.
    entry_shape : dict of Buffer to tuple
        Shape of one entry of each buffer.
    gemm_dtype : type
        dtype in which a single GEMM's product is computed exactly: ``numpy.float64`` (BLAS)
        when every partial sum stays below 2**53, else ``numpy.int64``.

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
        self.gemm_dtype = np.float64 if bound < (1 << 53) else np.int64
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
        handlers = HANDLERS
        for step in plan.steps:
            if step.__class__ is int:
                insn = instructions[step]
                op = insn.opcode
                if op == Opcode.GEMM and zero is not None:
                    # What the bypass logic sees: the weight block when the GEMM executes.
                    zero[step] = not self.wgt[insn.wgt_addr].any()
                handler = handlers.get(op)
                if handler is not None:  # SYNC and FINISH only move tokens
                    handler(self, step, insn, dram)
            else:
                exec_gemm_run(self, step, zero)

    def validate(
        self, instructions: list[Instruction], dram: list[np.ndarray], layer: str = ""
    ) -> ExecutionStats:
        """Check a program without executing it.

        Returns the stats :meth:`run` would report (they do not depend on data) or raises
        :class:`SimulatorError` exactly as :meth:`run` would before executing anything.
        """
        return validate_program(self, instructions, dram, layer)[0]

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
            and slots_ok(plan.slot_needs, dram)
        ):
            return plan
        stats, order, slot_needs = validate_program(self, instructions, dram, layer)
        plan = _Plan(
            key=key,
            stats=stats,
            slot_needs=slot_needs,
            steps=plan_steps(instructions, order),
        )
        self._plan = plan if key is not None else None
        return plan

    def _reset_buffers(self) -> None:
        cfg = self.config
        self.inp = np.zeros((cfg.inp_depth, self.rows), dtype=self.act_dtype)
        self.wgt = np.zeros((cfg.wgt_depth, self.rows, self.cols), dtype=self.wgt_dtype)
        self.acc = np.zeros((cfg.acc_depth, self.cols), dtype=np.int32)
