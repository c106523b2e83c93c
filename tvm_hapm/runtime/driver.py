"""The host-side driver: TVM executables call it to run accelerator programs on the simulator.

Compiled modules reach the accelerator through one global function, ``hapm_fpga.run``
(registered when :mod:`tvm_hapm` is imported), called by ``R.call_dps_packed`` with the program
bytes, the layer's inputs and constants, and the output tensor to fill.  The driver packs the host
tensors into the accelerator's DRAM layout (``docs/isa.md``), runs the simulator and unpacks the
output in place: the role a kernel driver and DMA-able buffers play on a real board.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..target.program import Program, ProgramError, pack_activation, unpack_activation
from .simulator import ExecutionStats, Simulator

__all__ = [
    "BEGIN_RUN_FUNC",
    "PROGRAM_CACHE_SIZE",
    "RUN_FUNC",
    "LayerTrace",
    "RunStats",
    "begin_run",
    "cached_program",
    "capture_layers",
    "clear_program_cache",
    "last_run_stats",
    "profile",
    "program_cache_len",
    "pack_dram",
    "run_packed",
    "run_program",
    "run_tir_packed",
]

#: Name of the global function compiled executables call.
RUN_FUNC = "hapm_fpga.run"
#: Name of the global function a compiled entry function calls first (:func:`begin_run`).
BEGIN_RUN_FUNC = "hapm_fpga.begin_run"

#: Decoded programs (and a simulator each) kept for reuse; the least recently used go first.
#: A simulator holds its config's buffers (~1.5 MB on zcu104), so the cache is bounded.
PROGRAM_CACHE_SIZE = 128
_CACHE: OrderedDict[bytes, tuple[Program, Simulator]] = OrderedDict()
_CACHE_LOCK = threading.Lock()


@dataclass
class LayerTrace:
    """The cycle-level record of one accelerator program run (kept only under :func:`profile`).

    Attributes
    ----------
    program : Program
        The program that ran (its instructions give the trace its disassembly).
    timing : TimingResult
        Start and end cycle of every instruction, stalls, busy cycles and event counts.
    energy : EnergyReport
        Energy by component.
    """

    program: Program
    timing: object
    energy: object

    @property
    def layer(self) -> str:
        return self.program.layer


@dataclass
class RunStats:
    """What the accelerator did during the last model run, in total and per layer.

    Attributes
    ----------
    layers : list of ExecutionStats
        One entry per accelerator program executed, in execution order.
    traces : list of LayerTrace
        The per-instruction timing of each layer, parallel to ``layers``; filled only while a
        :func:`profile` block is active (it holds two integers per instruction).
    """

    layers: list[ExecutionStats] = field(default_factory=list)
    traces: list[LayerTrace] = field(default_factory=list)

    def _total(self) -> ExecutionStats:
        return ExecutionStats.total(self.layers, layer="total")

    @property
    def instructions(self) -> int:
        return self._total().instructions

    @property
    def macs(self) -> int:
        return self._total().macs

    @property
    def dram_bytes(self) -> int:
        return self._total().dram_bytes

    @property
    def by_opcode(self) -> dict:
        return self._total().by_opcode

    @property
    def cycles(self) -> int:
        """Accelerator cycles; the layers run one after the other."""
        return self._total().cycles

    @property
    def latency_ms(self) -> float:
        return self._total().latency_ms

    @property
    def energy_uj(self) -> float:
        return self._total().energy_uj

    def to_dict(self) -> dict:
        total = self._total().to_dict()
        total.pop("layer", None)
        return {**total, "layers": [s.to_dict() for s in self.layers]}


_CURRENT = RunStats()
_PROFILING = [0]
# The open capture_layers() records (a list each).
_CAPTURES: list[list] = []


@contextlib.contextmanager
def capture_layers() -> Iterator[list]:
    """Record every accelerator program run inside the block with copies of its host inputs
    and constants: a list of ``(program, arrays)`` in execution order, from which
    :func:`pack_dram` rebuilds each layer's DRAM (to rerun a layer elsewhere, e.g. on the RTL).

    Example
    -------
    .. code-block:: python

        with tvm_hapm.runtime.driver.capture_layers() as layers:
            vm["main"](x)
        for program, arrays in layers:
            out = np.zeros(program.slots[-1].shape, program.slots[-1].dtype)
            dram = pack_dram(program, [*arrays, out])
    """
    record: list = []
    _CAPTURES.append(record)
    try:
        yield record
    finally:
        _CAPTURES.remove(record)


@contextlib.contextmanager
def profile() -> Iterator[None]:
    """Keep the per-instruction timing of every accelerator layer run inside the block.

    Example
    -------
    .. code-block:: python

        with tvm_hapm.runtime.profile():
            vm["main"](x)
        stats = tvm_hapm.runtime.last_run_stats()     # stats.traces: one LayerTrace per layer
        report = tvm_hapm.runtime.report.build_profile(stats)
    """
    _PROFILING[0] += 1
    try:
        yield
    finally:
        _PROFILING[0] -= 1


def last_run_stats() -> RunStats:
    """Statistics of the most recent model run (a compiled entry function starts a run with
    :func:`begin_run`; a run without accelerator layers leaves them empty)."""
    return _CURRENT


def cached_program(data: bytes) -> tuple[Program, Simulator]:
    """The decoded program and a simulator for its config, decoded once per distinct program
    among the :data:`PROGRAM_CACHE_SIZE` most recently used.  A corrupt program, or one that
    leaves part of its output unwritten, raises :class:`ProgramError`."""
    key = hashlib.sha256(data).digest()
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is None:
            prog = Program.from_bytes(data)
            prog.check_outputs_written()
            hit = (prog, Simulator(prog.config))
            _CACHE[key] = hit
            while len(_CACHE) > PROGRAM_CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
        return hit


def program_cache_len() -> int:
    """How many decoded programs :func:`cached_program` holds."""
    with _CACHE_LOCK:
        return len(_CACHE)


def clear_program_cache() -> None:
    """Forget every decoded program (and its simulator)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def pack_dram(prog: Program, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The DRAM slots of ``prog`` holding host ``arrays`` (inputs and constants in slot order,
    output last: its slot is zeroed), packed as ``docs/isa.md`` section 4 says.

    Shapes and dtypes are checked against the slots (:class:`ProgramError`).
    """
    if len(arrays) != len(prog.slots):
        raise ProgramError(
            f"{prog.layer}: program has {len(prog.slots)} DRAM slots but was called with "
            f"{len(arrays)} tensors"
        )
    dram = []
    for slot, arr in zip(prog.slots, arrays, strict=True):
        if tuple(arr.shape) != slot.shape or str(arr.dtype) != slot.dtype:
            raise ProgramError(
                f"{prog.layer}: slot '{slot.name}' expects {slot.dtype}{list(slot.shape)}, got "
                f"{arr.dtype}{list(arr.shape)}"
            )
        if slot.role == "output":
            dram.append(np.zeros(slot.dram_elems, dtype=slot.dtype))
        elif slot.packing == "act":
            dram.append(pack_activation(arr, slot.vector).reshape(-1))
        else:
            dram.append(np.ascontiguousarray(arr).reshape(-1))
    return dram


def run_program(
    prog: Program, sim: Simulator, arrays: list[np.ndarray], timing: bool = True
) -> tuple:
    """Run ``prog`` on host arrays (inputs and constants in slot order, output last).

    With ``timing`` (the default) the cycle and energy model runs too (``docs/timing.md``).

    Returns ``(output_array, stats)``.  Shapes and dtypes are checked against the slots first.
    """
    dram = pack_dram(prog, arrays)
    stats = sim.run(prog.instructions, dram, layer=prog.layer, timing=timing)
    out_slot = prog.slots[-1]
    out = dram[-1]
    if out_slot.packing == "act":
        out = unpack_activation(out, out_slot.shape, out_slot.vector)
    return out.reshape(out_slot.shape), stats


def begin_run() -> None:
    """``hapm_fpga.begin_run()``: called first by every entry function compiled for hapm_fpga,
    so that :func:`last_run_stats` describes this run even when it runs no accelerator layer."""
    global _CURRENT
    _CURRENT = RunStats()


def run_tir_packed(program_b64, *tensors):
    """``hapm_fpga.run_tir(program_base64, *buffers)``: the entry of TIR kernels built by
    :mod:`tvm_hapm.target.tir`; runs the program on the simulator and fills the output."""
    prog, sim = cached_program(base64.b64decode(str(program_b64)))
    # The compiled caller passes DLTensors built on its stack: np.from_dlpack on them crashes
    # (they have no owner to keep alive), so copy in and out.
    arrays = [t.numpy() for t in tensors]
    y, _ = run_program(prog, sim, arrays)
    tensors[-1].copyfrom(np.ascontiguousarray(y))


def run_packed(program, *args):
    """``hapm_fpga.run(program_u8, *inputs, out)``: the entry compiled executables call."""
    global _CURRENT
    prog, sim = cached_program(np.from_dlpack(program).tobytes())
    arrays = [np.from_dlpack(a) for a in args]
    for record in _CAPTURES:
        record.append((prog, [np.array(a, copy=True) for a in arrays[:-1]]))
    y, stats = run_program(prog, sim, arrays)
    if prog.layer_index == 0:
        _CURRENT = RunStats()
    _CURRENT.layers.append(stats)
    if _PROFILING[0]:
        _CURRENT.traces.append(LayerTrace(prog, sim.last_timing, sim.last_energy))
    arrays[-1][...] = y
