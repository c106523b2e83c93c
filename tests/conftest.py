"""Shared fixtures; the helpers they use (and the tests import) live in :mod:`tvm_hapm.testing`."""

from __future__ import annotations

import pytest

import tvm_hapm  # noqa: F401  (registers the target)
from tvm_hapm.testing import build_int_network


@pytest.fixture
def int_network():
    """:func:`tvm_hapm.testing.build_int_network`, the builder of a hand-built integer network."""
    return build_int_network
