"""Building the RTL: the Verilator simulation of one hardware config.

:func:`build` writes the config's ``hapm_config.svh`` next to the sources of ``hdl/``, runs
Verilator on them with the C++ test bench ``sim/harness.cpp`` and returns the executable.  Builds
are cached by the digest of everything that goes into them (sources, header, Verilator version),
under ``$HAPM_RTL_CACHE`` or ``~/.cache/tvm-hapm/rtl``; a build is made in a temporary folder
and renamed into place, so an interrupted build never leaves a broken cache entry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..target.config import HardwareConfig
from .params import config_header, harness_defines

__all__ = ["HDL_DIR", "RtlToolError", "build", "cache_root", "hdl_sources", "require_tool"]

HDL_DIR = Path(__file__).parent / "hdl"
_HARNESS = Path(__file__).parent / "sim" / "harness.cpp"
_EXECUTABLE = "hapm_rtlsim"
#: Verilator's warnings that the sources knowingly trigger (unused bits of wide buses, one
#: module per file is not the layout) are not errors; every other warning is.
_VERILATOR_WAIVED = ("-Wno-DECLFILENAME", "-Wno-UNUSEDSIGNAL")


class RtlToolError(RuntimeError):
    """A tool the RTL flow needs is missing or failed; the message says how to get it."""


def require_tool(name: str) -> str:
    """The path of ``name`` (``verilator``, ``yosys``), or :class:`RtlToolError` saying how to
    install it."""
    path = shutil.which(name)
    if path is None:
        raise RtlToolError(
            f"{name} is not installed: the RTL flow needs the Debian package '{name}' "
            f"(sudo apt-get install {name}); the README's test command installs it"
        )
    return path


def hdl_sources() -> list[Path]:
    """The SystemVerilog sources, in a fixed order."""
    return sorted(HDL_DIR.glob("*.sv"))


def cache_root() -> Path:
    return Path(os.environ.get("HAPM_RTL_CACHE", Path.home() / ".cache" / "tvm-hapm" / "rtl"))


def _digest(header: str, version: str) -> str:
    h = hashlib.sha256(header.encode())
    h.update(version.encode())
    for path in [*hdl_sources(), _HARNESS]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build(config: HardwareConfig, jobs: int = 2) -> Path:
    """The Verilator executable simulating ``config``'s accelerator (built if not cached).

    Raises
    ------
    RtlConfigError
        If the RTL does not implement the config (:func:`~tvm_hapm.rtl.params.check_config`).
    RtlToolError
        If Verilator is missing or the build fails (the message holds its output).
    """
    header = config_header(config)
    verilator = require_tool("verilator")
    version = subprocess.run(
        [verilator, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    target = cache_root() / f"{config.name}-{_digest(header, version)}"
    exe = target / _EXECUTABLE
    if exe.exists():
        return exe
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        (work / "hapm_config.svh").write_text(header)
        cmd = [
            verilator, "--cc", "--exe", "--build", "-O3", "--x-assign", "fast",
            "--x-initial", "fast", "-Wall", *_VERILATOR_WAIVED, "--top-module", "hapm_top",
            "-j", str(jobs), "-I" + str(work), "-Mdir", str(work / "obj"), "-o", _EXECUTABLE,
            "-CFLAGS", " ".join(["-O2", *(f"-D{d}" for d in harness_defines(config))]),
            *map(str, hdl_sources()), str(_HARNESS),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RtlToolError(
                f"Verilator failed to build the RTL of config {config.name!r}:\n"
                + (done.stderr or done.stdout)[-4000:]
            )
        shutil.move(str(work / "obj" / _EXECUTABLE), work / _EXECUTABLE)
        shutil.rmtree(work / "obj")
        try:
            os.rename(work, target)  # atomic; another process may have won the race
        except OSError:
            if not exe.exists():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return exe
