"""Registration of the ``hapm_fpga`` target tags.

TVM target kinds can only be defined in C++, so hapm_fpga is an ``llvm`` target (the host CPU
compiles everything that is not offloaded) distinguished by its ``keys`` and ``device``; the
hardware config is selected by the target's ``model`` attribute.  Importing :mod:`tvm_hapm`
registers ``hapm_fpga`` (the default preset) and ``hapm_fpga-<preset>`` for every preset.
"""

from __future__ import annotations

import tvm

from .config import DEFAULT_PRESET, PRESETS, HardwareConfig, add_config, get_config

__all__ = ["TARGET_KEY", "register_config", "register_config_tag", "register_tags", "hapm_target"]

TARGET_KEY = "hapm_fpga"


def _tag_config(model: str) -> dict:
    return {"kind": "llvm", "keys": [TARGET_KEY, "cpu"], "device": TARGET_KEY, "model": model}


def register_config_tag(name: str) -> str:
    """Register ``hapm_fpga-<name>`` for a known config name; returns the tag."""
    get_config(name)  # validate first: a failed registration leaves a half-registered tag
    tag = f"{TARGET_KEY}-{name}"
    tvm.target.register_tag(tag, _tag_config(name), override=True)
    return tag


def register_config(config: HardwareConfig) -> str:
    """Register a custom config so that the tag ``hapm_fpga-<name>`` selects it.

    Returns the tag name.  Re-registering an identical config is a no-op; a different config
    under an existing name is refused (a tag must mean one machine).
    """
    add_config(config)
    return register_config_tag(config.name)


def register_tags() -> None:
    tvm.target.register_tag(TARGET_KEY, _tag_config(DEFAULT_PRESET), override=True)
    for name in PRESETS:
        register_config_tag(name)


def hapm_target(config=None) -> tvm.target.Target:
    """The TVM target of a config (name, object or JSON path); registers custom configs."""
    if isinstance(config, HardwareConfig):
        return tvm.target.Target(register_config(config))
    cfg = get_config(config)
    return tvm.target.Target(f"{TARGET_KEY}-{cfg.name}")
