"""tvm-hapm: the hapm_fpga FPGA CNN accelerator as an Apache TVM target.

Importing the package registers everything with TVM: the ``hapm_fpga`` target tags, the Relax
offload pipeline (``tvm.compile(mod, target="hapm_fpga")`` offloads with no extra argument), the
TIR pipeline (``tvm.build`` of scheduled accelerator kernels) and the runtime functions compiled
executables call to run accelerator programs on the simulator.
"""

from . import passes, runtime, target  # registers tags, pipelines and hapm_fpga.run
from .cost import measure as _measure  # noqa: F401  (registers hapm_fpga.measure)
from .passes.quantize import Quantize, quantize
from .target import tir as _tir  # noqa: F401  (registers the TIR pipeline, hapm_fpga.run_tir)
from .target.config import HardwareConfig, get_config, register_config

__all__ = [
    "HardwareConfig",
    "Quantize",
    "get_config",
    "passes",
    "quantize",
    "register_config",
    "runtime",
    "target",
]
__version__ = "0.1.0"
