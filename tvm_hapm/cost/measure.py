"""Measuring accelerator programs: locally, in parallel workers, or over TVM's RPC tracker.

A *measurement* runs one :class:`~tvm_hapm.target.program.Program` through the timing and energy
models (``docs/timing.md``) and returns its cycles, latency and energy.  The same measurement is
registered as the global function ``hapm_fpga.measure`` (program bytes in, JSON out), so any
process that imports :mod:`tvm_hapm` can serve it: a local worker pool, or RPC servers registered
with TVM's tracker, the distributed runner TVM itself uses to reach remote boards.  Replacing the
timing model by a real board later only changes what ``hapm_fpga.measure`` does on the server.

Example
-------
.. code-block:: python

    with LocalFarm(num_servers=2) as farm:            # tracker + servers on loopback
        runner = RPCRunner("127.0.0.1", farm.port, key=farm.key)
        results = runner.run([prog.to_bytes() for prog in programs])
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time
from dataclasses import asdict, dataclass

from ..target.program import Program

__all__ = [
    "MEASURE_FUNC",
    "MeasureResult",
    "measure_program",
    "LocalRunner",
    "RPCRunner",
    "LocalFarm",
]

#: Global function a measurement server exposes: ``hapm_fpga.measure(program_bytes) -> json``.
MEASURE_FUNC = "hapm_fpga.measure"


@dataclass(frozen=True)
class MeasureResult:
    """Cycles, latency (ms) and energy (µJ) of one program; ``error`` is set instead on failure."""

    cycles: int = 0
    latency_ms: float = 0.0
    energy_uj: float = 0.0
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def measure_program(program: Program | bytes) -> MeasureResult:
    """Run the timing and energy models on one program (no functional simulation needed:
    all-zero weight blocks are already removed from the stream by the compiler)."""
    from ..runtime.energy import EnergyModel
    from ..runtime.timing import TimingModel

    prog = program if isinstance(program, Program) else Program.from_bytes(bytes(program))
    result = TimingModel(prog.config).run(prog.instructions)
    energy = EnergyModel(prog.config).estimate(result)
    return MeasureResult(int(result.cycles), float(result.latency_ms), float(energy.total_uj))


def measure_json(data) -> str:
    """``hapm_fpga.measure(program_bytes)``: :func:`measure_program` as JSON (errors included)."""
    try:
        return json.dumps(measure_program(bytes(data)).to_dict())
    except Exception as err:
        return json.dumps(MeasureResult(error=f"{type(err).__name__}: {err}").to_dict())


def _measure_bytes(data: bytes) -> dict:
    return json.loads(measure_json(data))


class LocalRunner:
    """Measure programs in this process (``num_workers=1``) or in a pool of worker processes.

    Parameters
    ----------
    num_workers : int
        Worker processes; each imports :mod:`tvm_hapm` once (a few seconds), so a pool pays off
        only for many or large programs.
    """

    def __init__(self, num_workers: int = 1):
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.num_workers = num_workers

    def run(self, programs: list[bytes]) -> list[MeasureResult]:
        if self.num_workers == 1 or len(programs) <= 1:
            return [MeasureResult(**_measure_bytes(p)) for p in programs]
        with concurrent.futures.ProcessPoolExecutor(self.num_workers) as pool:
            return [MeasureResult(**r) for r in pool.map(_measure_bytes, programs)]


class RPCRunner:
    """Measure programs on RPC servers found through a TVM RPC tracker.

    Parameters
    ----------
    tracker_host, tracker_port : str, int
        Address of the tracker (``python -m tvm.exec.rpc_tracker``).
    key : str
        Device key the servers registered with.
    num_parallel : int
        Sessions used at once (one thread each).
    timeout : float
        Seconds a session may live.
    """

    def __init__(self, tracker_host, tracker_port, key="hapm_fpga", num_parallel=2, timeout=60):
        self.tracker = (tracker_host, int(tracker_port))
        self.key = key
        self.num_parallel = num_parallel
        self.timeout = timeout

    def _measure_batch(self, programs: list[bytes]) -> list[MeasureResult]:
        from tvm import rpc

        client = rpc.connect_tracker(*self.tracker)
        session = client.request(self.key, session_timeout=self.timeout)
        func = session.get_function(MEASURE_FUNC)
        return [MeasureResult(**json.loads(func(bytearray(p)))) for p in programs]

    def run(self, programs: list[bytes]) -> list[MeasureResult]:
        """Measure ``programs``; results come back in the same order."""
        if not programs:
            return []
        parts = max(1, min(self.num_parallel, len(programs)))
        batches = [programs[k::parts] for k in range(parts)]
        with concurrent.futures.ThreadPoolExecutor(parts) as pool:
            done = list(pool.map(self._measure_batch, batches))
        out: list = [None] * len(programs)
        for k, results in enumerate(done):
            out[k::parts] = results
        return out


def _server_init():
    import tvm_hapm  # noqa: F401  (registers hapm_fpga.measure in the server)


class LocalFarm(contextlib.AbstractContextManager):
    """An RPC tracker and ``num_servers`` measurement servers on loopback, stopped on exit.

    For tests and for using the cores of one machine through the same code path as a farm of
    machines or boards.
    """

    def __init__(self, num_servers: int = 2, key: str = "hapm_fpga", wait_seconds: float = 60):
        self.num_servers = num_servers
        self.key = key
        self.wait_seconds = wait_seconds
        self.tracker = None
        self.servers: list = []

    @property
    def port(self) -> int:
        return self.tracker.port

    def __enter__(self) -> LocalFarm:
        from tvm import rpc
        from tvm.rpc.server import Server
        from tvm.rpc.tracker import Tracker

        self.tracker = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
        try:
            for _ in range(self.num_servers):
                self.servers.append(
                    Server(
                        host="127.0.0.1",
                        port=9300,
                        port_end=9400,
                        tracker_addr=("127.0.0.1", self.tracker.port),
                        key=self.key,
                        silent=True,
                        server_init_callback=_server_init,
                    )
                )
            client = rpc.connect_tracker("127.0.0.1", self.tracker.port)
            deadline = time.monotonic() + self.wait_seconds
            while True:
                free = client.summary()["queue_info"].get(self.key, {}).get("free", 0)
                if free >= self.num_servers:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"only {free} of {self.num_servers} RPC servers registered with the "
                        f"tracker within {self.wait_seconds} s"
                    )
                time.sleep(0.2)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.terminate()
        self.servers = []
        if self.tracker is not None:
            with contextlib.suppress(Exception):
                self.tracker.terminate()
            self.tracker = None
