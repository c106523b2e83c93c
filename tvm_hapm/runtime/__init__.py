"""The accelerator runtime: the bit-exact simulator and its registration with TVM."""

from .driver import RUN_FUNC, LayerTrace, RunStats, last_run_stats, profile, run_program
from .simulator import ExecutionStats, Simulator, SimulatorError

__all__ = [
    "RUN_FUNC",
    "ExecutionStats",
    "LayerTrace",
    "RunStats",
    "Simulator",
    "SimulatorError",
    "last_run_stats",
    "profile",
    "run_program",
]
