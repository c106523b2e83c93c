"""Shared fixtures; the helpers they use (and the tests import) live in :mod:`tvm_hapm.testing`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import tvm_hapm  # noqa: F401  (registers the target)
from tvm_hapm.testing import build_int_network


@pytest.fixture
def int_network():
    """:func:`tvm_hapm.testing.build_int_network`, the builder of a hand-built integer network."""
    return build_int_network


@pytest.fixture(scope="session")
def benchmark_script():
    """A loader of this checkout's ``benchmarks/<name>.py`` as a module, for tests of the scripts'
    bookkeeping (each script imports its sibling ``common`` by name)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        sys.path.insert(0, str(folder))
        try:
            spec = importlib.util.spec_from_file_location(
                f"{name}_benchmark", folder / f"{name}.py"
            )
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(folder))
        return module

    return load
