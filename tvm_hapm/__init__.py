"""tvm-hapm: the hapm_fpga FPGA CNN accelerator as an Apache TVM target.

Importing the package registers everything with TVM: the ``hapm_fpga`` target tags, the Relax
offload pipeline (``tvm.compile(mod, target="hapm_fpga")`` offloads with no extra argument) and
the runtime function compiled executables call to run accelerator programs on the simulator.
"""

from . import target  # noqa: F401  (registers the target tags)
from . import runtime  # noqa: F401  (registers hapm_fpga.run)
from . import passes  # noqa: F401  (registers the pipelines)
try:  # TEMP until quantize lands
    from .passes.quantize import Quantize, quantize
except ImportError:
    pass
from .target.config import HardwareConfig, get_config, register_config

__all__ = ["HardwareConfig", "Quantize", "get_config", "quantize", "register_config"]
__version__ = "0.1.0"
