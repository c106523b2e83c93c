"""Integrity of compiled programs: a corrupt program is refused, never run to a different result.

Programs carry a SHA-256 of their bytes (``docs/isa.md`` section 5).  The fuzz test corrupts a
compiled conv program at seeded random positions (single bytes set to another value, single bits
flipped) and runs every corrupt program that is not refused: none may complete with another
output than the original's.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

import tvm_hapm  # noqa: F401
from tvm_hapm.runtime import RUN_FUNC, Simulator, run_program
from tvm_hapm.runtime.simulator import SimulatorError
from tvm_hapm.target import tir as htir
from tvm_hapm.target.config import get_config
from tvm_hapm.target.isa import IsaError
from tvm_hapm.target.program import Program, ProgramError

#: Corruptions of each kind; the issue's bar is 1,500 in all.
CORRUPTIONS = 750


def _conv_case():
    cfg = get_config("zedboard")
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (6, 3, 3, 3)).astype(np.int8)
    prog, consts = htir.conv2d_program(
        cfg, "conv", (1, 3, 7, 5), w, None, np.full(6, 300), 16, (-128, 127), padding=(1, 1, 1, 1)
    )
    x = rng.integers(-128, 128, (1, 3, 7, 5)).astype(np.int8)
    return prog, consts, x


def _outcome(data: bytes, consts, x, reference) -> str:
    """``"refused"``, ``"same"`` or ``"different"`` for running the program ``data``."""
    try:
        prog = Program.from_bytes(data)
        out = np.zeros(prog.slots[-1].shape, prog.slots[-1].dtype)
        y, _ = run_program(prog, Simulator(prog.config), [x, *consts, out], timing=False)
    except (ProgramError, IsaError, SimulatorError):
        return "refused"
    return "same" if np.array_equal(y, reference) else "different"


def _corruptions(data: bytes, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(CORRUPTIONS):
        pos = int(rng.integers(len(data)))
        value = (data[pos] + int(rng.integers(1, 256))) % 256  # any other byte value
        yield "byte", pos, data[:pos] + bytes([value]) + data[pos + 1 :]
    for _ in range(CORRUPTIONS):
        pos, bit = int(rng.integers(len(data))), int(rng.integers(8))
        yield "bit", pos, data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :]


def test_random_corruptions_are_all_refused():
    prog, consts, x = _conv_case()
    data = prog.to_bytes()
    reference = _outcome_reference(prog, consts, x)
    silent = []
    for kind, pos, bad in _corruptions(data, seed=12345):
        assert bad != data
        if _outcome(bad, consts, x, reference) != "refused":
            silent.append((kind, pos))
    assert silent == [], f"{len(silent)} of {2 * CORRUPTIONS} corruptions ran: {silent[:10]}"


def _outcome_reference(prog, consts, x):
    out = np.zeros(prog.slots[-1].shape, prog.slots[-1].dtype)
    y, _ = run_program(prog, Simulator(prog.config), [x, *consts, out], timing=False)
    return y


def test_checksum_error_names_the_layer():
    prog, _, _ = _conv_case()
    data = bytearray(prog.to_bytes())
    data[-40] ^= 0x10  # inside the instruction stream
    with pytest.raises(ProgramError, match=r"corrupt program 'conv'.*SHA-256"):
        Program.from_bytes(bytes(data))


def test_program_without_its_digest_is_refused():
    data = _conv_case()[0].to_bytes()
    with pytest.raises(ProgramError):
        Program.from_bytes(data[:-32])


def test_driver_refuses_a_corrupt_program_with_its_type():
    prog, consts, x = _conv_case()
    data = bytearray(prog.to_bytes())
    data[len(data) // 2] ^= 0x01
    out = np.zeros(prog.slots[-1].shape, prog.slots[-1].dtype)
    args = [tvm.runtime.tensor(a) for a in (np.frombuffer(bytes(data), np.uint8), x, *consts, out)]
    with pytest.raises(ProgramError, match="SHA-256"):
        tvm.get_global_func(RUN_FUNC)(*args)
