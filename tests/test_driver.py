"""The runtime driver: program container round trip and refusals of bad calls."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

import tvm_hapm  # noqa: F401
from tvm_hapm.runtime import RUN_FUNC, Simulator, run_program
from tvm_hapm.target import tir as htir
from tvm_hapm.target.config import get_config
from tvm_hapm.target.program import Program, ProgramError, pack_activation, unpack_activation


def _conv_program():
    cfg = get_config("zedboard")
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (6, 3, 3, 3)).astype(np.int8)
    return htir.conv2d_program(
        cfg, "conv", (1, 3, 7, 5), w, None, np.full(6, 300), 16, (-128, 127), padding=(1, 1, 1, 1)
    )


def test_container_round_trip_is_exact():
    prog, _ = _conv_program()
    data = prog.to_bytes()
    again = Program.from_bytes(data)
    assert again.instructions == prog.instructions and again.slots == prog.slots
    assert again.to_bytes() == data


@pytest.mark.parametrize("cut", [3, 20, -1])
def test_corrupt_containers_are_refused(cut):
    data = _conv_program()[0].to_bytes()
    with pytest.raises(ProgramError):
        Program.from_bytes(data[:cut])


def test_wrong_tensor_shapes_and_counts_are_refused():
    prog, consts = _conv_program()
    sim = Simulator(prog.config)
    x = np.zeros((1, 3, 7, 5), np.int8)
    out = np.zeros((1, 6, 7, 5), np.int8)
    run_program(prog, sim, [x, *consts, out])  # the right call works
    with pytest.raises(ProgramError, match="expects int8"):
        run_program(prog, sim, [np.zeros((1, 3, 7, 4), np.int8), *consts, out])
    with pytest.raises(ProgramError, match="expects int8"):
        run_program(prog, sim, [x, *consts, np.zeros((1, 6, 7, 4), np.int8)])
    with pytest.raises(ProgramError, match="slots"):
        run_program(prog, sim, [x, out])


def test_registered_function_refuses_garbage_programs():
    run = tvm.get_global_func(RUN_FUNC)
    garbage = tvm.runtime.tensor(np.frombuffer(b"not a program at all", np.uint8).copy())
    out = tvm.runtime.tensor(np.zeros(4, np.int8))
    with pytest.raises(Exception, match="bad magic"):
        run(garbage, out)


@pytest.mark.parametrize("shape, vector", [((2, 13, 3, 5), 8), ((3, 17), 16), ((1, 8, 1, 1), 8)])
def test_activation_packing_round_trip(shape, vector):
    x = np.random.default_rng(0).integers(-128, 128, shape).astype(np.int8)
    packed = pack_activation(x, vector)
    assert packed.shape[-1] == vector
    np.testing.assert_array_equal(unpack_activation(packed.reshape(-1), shape, vector), x)


def test_program_cache_is_bounded_and_keeps_the_recently_used(monkeypatch):
    from tvm_hapm.runtime import driver

    monkeypatch.setattr(driver, "PROGRAM_CACHE_SIZE", 2)
    driver.clear_program_cache()
    cfg = get_config("zedboard")
    rng = np.random.default_rng(1)
    blobs = []
    for k in range(3):
        w = rng.integers(-127, 128, (4 + k, 3, 3, 3)).astype(np.int8)
        prog, _ = htir.conv2d_program(
            cfg, f"conv{k}", (1, 3, 5, 5), w, None, np.full(4 + k, 300), 16, (-128, 127),
            padding=(1, 1, 1, 1),
        )  # fmt: skip
        blobs.append(prog.to_bytes())
    first = driver.cached_program(blobs[0])
    driver.cached_program(blobs[1])
    assert driver.cached_program(blobs[0]) is first  # a hit, and now the most recent
    driver.cached_program(blobs[2])  # evicts blobs[1], the least recently used
    assert driver.program_cache_len() == 2
    assert driver.cached_program(blobs[0]) is first
    assert driver.cached_program(blobs[1]) is not None and driver.program_cache_len() == 2
    driver.clear_program_cache()
