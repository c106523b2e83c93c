"""hapm_fpga as hardware: the accelerator's RTL, its Verilator co-simulation against the Python
simulator, and its FPGA resources.

* ``hdl/``: the SystemVerilog sources (read ``README.md`` first);
* :mod:`~tvm_hapm.rtl.params`: the constants of the RTL, generated from a ``HardwareConfig``
  and the ISA layout;
* :mod:`~tvm_hapm.rtl.build`: the Verilator build of one config (cached);
* :mod:`~tvm_hapm.rtl.cosim`: :class:`RtlSimulator` and :func:`cosimulate`;
* :mod:`~tvm_hapm.rtl.synth`: FPGA resources with Yosys (:func:`~tvm_hapm.rtl.synth.synthesize`)
  against the part's budget, and the block RAM of the buffers' port structures.

The Debian packages ``verilator`` (simulation) and ``yosys`` (synthesis) are needed; importing
this package needs neither.
"""

from .build import RtlToolError, build
from .cosim import (
    CosimResult,
    RtlError,
    RtlRun,
    RtlSimulator,
    cosimulate,
    cosimulate_model,
    summarize,
)
from .params import RtlConfigError, check_config, config_header

__all__ = [
    "CosimResult",
    "RtlConfigError",
    "RtlError",
    "RtlRun",
    "RtlSimulator",
    "RtlToolError",
    "build",
    "check_config",
    "config_header",
    "cosimulate",
    "cosimulate_model",
    "summarize",
]
