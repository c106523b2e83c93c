"""The hapm_fpga target: hardware configs, target tags, ISA, schedules and code generation."""

from . import isa
from .config import DEFAULT_PRESET, PRESETS, HardwareConfig, HardwareConfigError, get_config
from .tag import hapm_target

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "HardwareConfig",
    "HardwareConfigError",
    "get_config",
    "hapm_target",
    "isa",
]
