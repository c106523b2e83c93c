"""Running programs on the RTL, and comparing the RTL with the Python simulator.

:class:`RtlSimulator` has the interface of :class:`tvm_hapm.runtime.simulator.Simulator`: it
takes the decoded instruction stream and the DRAM slots (1-D NumPy arrays), runs the program on
the Verilator build of the accelerator (:func:`~tvm_hapm.rtl.build.build`) and writes the slots
back in place.  :func:`cosimulate` runs one program on both, with the same inputs, and reports
whether every slot agrees byte for byte and how the RTL's cycles compare with the timing model's.

Example
-------
.. code-block:: python

    result = cosimulate(program, dram)          # dram: the slots, as the driver packs them
    assert result.bit_exact, result.mismatches
    print(result.rtl_cycles, result.model_cycles)
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.driver import capture_layers, pack_dram
from ..runtime.simulator import Simulator
from ..target.config import HardwareConfig
from ..target.isa import INSTRUCTION_BYTES, Instruction, encode_stream
from ..target.program import Program
from .build import build
from .params import DRAM_SLOTS

__all__ = [
    "CosimResult",
    "RtlError",
    "RtlRun",
    "RtlSimulator",
    "cosimulate",
    "cosimulate_model",
    "summarize",
]

_STATUS = {
    1: "the cycle limit was reached (a deadlock or a hang in the RTL)",
    2: "the RTL raised its error flag (a token flag illegal for its module, or a SHR amount "
    "from the accumulator outside [0, 31])",
    3: "the RTL accessed DRAM outside the program's slots",
}


class RtlError(RuntimeError):
    """The RTL did not complete a program (the message says why)."""


@dataclass
class RtlRun:
    """What one RTL run reports.

    Attributes
    ----------
    cycles : int
        Cycles from start to done (all modules and arrays idle after FINISH).
    gemms_bypassed : int
        GEMMs the Dynamic Sparsity Bypass skipped.
    start, end : numpy.ndarray
        Per instruction (int64): the cycle its module started it (tokens popped; a GEMM: issued
        by the compute module) and the cycle after it ended (a GEMM: its array done).
    """

    cycles: int
    gemms_bypassed: int
    start: np.ndarray
    end: np.ndarray


class RtlSimulator:
    """Runs instruction streams on the Verilator model of ``config``'s accelerator.

    Parameters
    ----------
    config : HardwareConfig
        The accelerator; its RTL is built on first use (and cached across processes).
    max_cycles : int, optional
        Cycle limit of one run: a run that reaches it (a deadlock) raises :class:`RtlError`.
    """

    def __init__(self, config: HardwareConfig, max_cycles: int = 10**9):
        self.config = config
        self.max_cycles = int(max_cycles)
        self._exe: Path | None = None

    @property
    def executable(self) -> Path:
        if self._exe is None:
            self._exe = build(self.config)
        return self._exe

    def run(
        self,
        instructions: Sequence[Instruction],
        dram: list[np.ndarray],
        max_cycles: int | None = None,
    ) -> RtlRun:
        """Run a program; STOREs write into the arrays of ``dram`` in place.

        The program should be one the Python simulator accepts (run it through
        :meth:`Simulator.validate` first): the RTL, like hardware, does not check it.
        ``max_cycles`` overrides the simulator's cycle limit for this run.
        """
        limit = self.max_cycles if max_cycles is None else int(max_cycles)
        if len(dram) > DRAM_SLOTS:
            raise ValueError(
                f"a program addresses at most {DRAM_SLOTS} DRAM slots, got {len(dram)}"
            )
        stream = encode_stream(list(instructions))
        job = [
            b"HAPMJOB1",
            struct.pack(
                "<IQI", self.config.dram_latency_cycles, limit, len(stream) // INSTRUCTION_BYTES
            ),
            stream,
            struct.pack("<I", len(dram)),
        ]
        for slot in dram:
            data = np.ascontiguousarray(slot).tobytes()
            job += [struct.pack("<I", len(data)), data]
        with tempfile.TemporaryDirectory(prefix="hapm-rtl-") as tmp:
            job_path, result_path = Path(tmp) / "job", Path(tmp) / "result"
            job_path.write_bytes(b"".join(job))
            done = subprocess.run(
                [str(self.executable), str(job_path), str(result_path)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0 or not result_path.exists():
                raise RtlError(f"the RTL simulation failed: {done.stderr.strip()[-2000:]}")
            result = result_path.read_bytes()
        if result[:8] != b"HAPMRES1":
            raise RtlError("the RTL simulation wrote no valid result")
        status, cycles, bypassed, n_slots = struct.unpack_from("<IQQI", result, 8)
        if status:
            raise RtlError(f"the RTL did not complete the program: {_STATUS.get(status, status)}")
        pos = 8 + struct.calcsize("<IQQI")
        for slot in dram[:n_slots]:
            (size,) = struct.unpack_from("<I", result, pos)
            pos += 4
            if slot.flags.writeable:
                slot[...] = np.frombuffer(result, dtype=slot.dtype, count=slot.size, offset=pos)
            pos += size
        (n,) = struct.unpack_from("<I", result, pos)
        trace = np.frombuffer(result, dtype="<u8", count=2 * n, offset=pos + 4).reshape(n, 2)
        trace = trace.astype(np.int64)  # never-seen events (all ones) become -1
        return RtlRun(int(cycles), int(bypassed), start=trace[:, 0], end=trace[:, 1])


@dataclass
class CosimResult:
    """One program run on the RTL and on the Python simulator with the same inputs.

    Attributes
    ----------
    layer : str
        The program's layer name.
    bit_exact : bool
        Every DRAM slot holds the same bytes after both runs.
    mismatches : list of str
        The slots that differ, with their first differing element.
    rtl_cycles, model_cycles : int
        Cycles of the RTL, and of the timing model (:mod:`tvm_hapm.runtime.timing`).
    rtl_bypassed, model_bypassed : int
        GEMMs skipped by the Dynamic Sparsity Bypass in each.
    instructions : int
        Length of the program.
    rtl_seconds : float
        Wall time of the RTL run (the Verilator executable, file exchange included).
    """

    layer: str
    bit_exact: bool
    rtl_cycles: int
    model_cycles: int
    rtl_bypassed: int
    model_bypassed: int
    instructions: int
    mismatches: list = field(default_factory=list)
    rtl_seconds: float = 0.0

    @property
    def cycle_rel_diff(self) -> float:
        """``(model - rtl) / rtl``: the timing model's error relative to the RTL."""
        return (self.model_cycles - self.rtl_cycles) / max(self.rtl_cycles, 1)

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "instructions": self.instructions,
            "bit_exact": self.bit_exact,
            "rtl_cycles": self.rtl_cycles,
            "model_cycles": self.model_cycles,
            "cycle_rel_diff": self.cycle_rel_diff,
            "rtl_bypassed": self.rtl_bypassed,
            "model_bypassed": self.model_bypassed,
            "mismatches": list(self.mismatches),
            "rtl_seconds": round(self.rtl_seconds, 4),
        }


def cosimulate(
    program: Program | Sequence[Instruction],
    dram: list[np.ndarray],
    config: HardwareConfig | None = None,
    rtl: RtlSimulator | None = None,
) -> CosimResult:
    """Run one program on the Python simulator (with its timing model) and on the RTL.

    Parameters
    ----------
    program : Program or sequence of isa.Instruction
        The program; a bare stream needs ``config``.
    dram : list of numpy.ndarray
        The DRAM slots before the run; they are not modified (each side runs on a copy).
    config : HardwareConfig, optional
        Defaults to the program's.
    rtl : RtlSimulator, optional
        Reuse one (its build is looked up once).

    Returns
    -------
    CosimResult
    """
    if isinstance(program, Program):
        instructions, layer = program.instructions, program.layer
        config = config or program.config
    else:
        instructions, layer = list(program), ""
    if config is None:
        raise ValueError("cosimulate needs the hardware config of a bare instruction stream")
    model_dram = [np.array(s, copy=True) for s in dram]
    sim = Simulator(config)
    stats = sim.run(instructions, model_dram, layer=layer, timing=True)
    rtl = rtl or RtlSimulator(config)
    rtl_dram = [np.array(s, copy=True) for s in dram]
    t0 = time.perf_counter()
    run = rtl.run(instructions, rtl_dram)
    rtl_seconds = time.perf_counter() - t0
    mismatches = []
    for k, (a, b) in enumerate(zip(model_dram, rtl_dram)):
        if not np.array_equal(a, b):
            first = int(np.flatnonzero(a != b)[0])
            mismatches.append(
                f"slot {k}: element {first} is {int(b[first])} on the RTL, "
                f"{int(a[first])} on the simulator ({int(np.sum(a != b))} elements differ)"
            )
    return CosimResult(
        layer=layer,
        bit_exact=not mismatches,
        rtl_cycles=run.cycles,
        model_cycles=int(stats.cycles),
        rtl_bypassed=run.gemms_bypassed,
        model_bypassed=int(sim.last_timing.gemms_skipped),
        instructions=len(instructions),
        mismatches=mismatches,
        rtl_seconds=rtl_seconds,
    )


def cosimulate_model(run, rtl: dict | None = None, progress=None) -> list[CosimResult]:
    """Co-simulate every accelerator layer of one model run, layer by layer.

    Parameters
    ----------
    run : callable
        Runs the compiled model once, e.g. ``lambda: vm["main"](x)``; every accelerator program
        it executes is captured (:func:`~tvm_hapm.runtime.driver.capture_layers`) with its
        inputs and rerun on the RTL and on the Python simulator.
    rtl : dict, optional
        ``{config name: RtlSimulator}`` to reuse builds.
    progress : callable, optional
        Called as ``progress(done, total)`` after each layer.

    Returns
    -------
    list of CosimResult
        One per layer run, in execution order.
    """
    with capture_layers() as layers:
        run()
    rtl = {} if rtl is None else rtl
    results = []
    for k, (program, arrays) in enumerate(layers):
        sim = rtl.setdefault(program.config.name, RtlSimulator(program.config))
        out_slot = program.slots[-1]
        out = np.zeros(out_slot.shape, out_slot.dtype)
        results.append(cosimulate(program, pack_dram(program, [*arrays, out]), rtl=sim))
        if progress is not None:
            progress(k + 1, len(layers))
    return results


def summarize(results: list[CosimResult]) -> dict:
    """The report of a network's co-simulation (its layers run one after the other): whether
    every layer is bit-exact, the layers, the largest per-layer and the network's relative
    cycle difference ``(model - rtl) / rtl``, and the RTL's simulation speed."""
    rtl = sum(r.rtl_cycles for r in results)
    model = sum(r.model_cycles for r in results)
    rtl_seconds = sum(r.rtl_seconds for r in results)
    return {
        "bit_exact": all(r.bit_exact for r in results),
        "layers": [r.to_dict() for r in results],
        "max_layer_cycle_rel_diff": max((abs(r.cycle_rel_diff) for r in results), default=0.0),
        "network_rtl_cycles": rtl,
        "network_model_cycles": model,
        "network_cycle_rel_diff": (model - rtl) / max(rtl, 1),
        "instructions": sum(r.instructions for r in results),
        "rtl_seconds": round(rtl_seconds, 2),
        "rtl_cycles_per_second": round(rtl / max(rtl_seconds, 1e-9)),
    }
