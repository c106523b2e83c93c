"""tvm-hapm: the hapm_fpga FPGA CNN accelerator as an Apache TVM target.

Importing the package registers everything with TVM (:mod:`tvm_hapm._registry`, the one place
that does): the ``hapm_fpga`` target tags, the Relax offload pipeline
(``tvm.compile(mod, target="hapm_fpga")`` offloads with no extra argument), the TIR pipeline
(``tvm.build`` of scheduled accelerator kernels), the partition patterns and the runtime
functions compiled executables call to run accelerator programs on the simulator.
:func:`register` does it again (idempotent), e.g. after TVM's pipeline maps were reloaded.
"""

from . import passes, runtime, target
from ._registry import register
from .passes.quantize import Quantize, quantize
from .target.config import HardwareConfig, get_config
from .target.tag import register_config

register()

__all__ = [
    "HardwareConfig",
    "Quantize",
    "get_config",
    "passes",
    "quantize",
    "register",
    "register_config",
    "runtime",
    "target",
]
__version__ = "0.1.0"
