"""The compile-speed paths give what the plain paths give (docs/compile_time.md).

* the walker's GEMM blocks (``tvm_hapm.target.tir.emit.GEMM_BLOCKS``): the stream of a layer
  equals the one walked loop iteration by loop iteration, as instructions and as bytes;
* :func:`~tvm_hapm.target.isa.instruction_block` equals one constructor call per row;
* :func:`~tvm_hapm.target.gc_pause.paused_gc` restores the collector as it found it.

(The token inserter's GEMM runs are checked against one GEMM at a time in test_dependency.py.)
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from tvm_hapm.target import tir as htir
from tvm_hapm.target.config import get_config
from tvm_hapm.target.gc_pause import paused_gc
from tvm_hapm.target.isa import Instruction, IsaError, Opcode, instruction_block
from tvm_hapm.target.schedule import ConvSchedule
from tvm_hapm.target.stream import GemmBlock
from tvm_hapm.target.tir import emit
from tvm_hapm.testing import instruction_diff, prune_random_blocks, tiny_buffers_config

CFG = get_config("zedboard")

# (cin, hw, cout, k, stride, pad, prune, fused, groups, schedule)
LAYERS = [
    (32, 9, 32, 3, 1, 1, 0.0, False, 1, None),
    (32, 9, 32, 3, 1, 1, 0.5, False, 1, None),  # all-zero weight blocks: GEMMs dropped
    (32, 7, 32, 3, 1, 1, 0.0, True, 1, ConvSchedule(3, 5, 1, 1, True)),  # edge tiles, fused
    (32, 14, 64, 1, 2, 0, 0.3, True, 1, None),  # strided projection, pruned
    (32, 8, 32, 3, 1, 1, 0.0, False, 4, None),  # grouped: block-diagonal weights
    (16, 10, 16, 3, 1, 1, 0.9, False, 1, ConvSchedule(1, 3, 1, 1, True)),  # most blocks zero
]


def _program(cfg, case, seed=5):
    cin, hw, cout, k, stride, pad, prune, fused, groups, schedule = case
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (cout, cin // groups, k, k)).astype(np.int8)
    if prune:
        w = prune_random_blocks(cfg, w, groups, prune, rng)
    kwargs = {"strides": (stride, stride), "padding": (pad,) * 4, "groups": groups}
    if fused:
        kwargs["residual"] = rng.integers(16, 3000, cout)
    bias, mult = rng.integers(-500, 500, cout), rng.integers(1, 300, cout)
    prog, _ = htir.conv2d_program(
        cfg, "layer", (1, cin, hw, hw), w, bias, mult, 12, (0, 120), schedule=schedule, **kwargs
    )
    return prog


@pytest.mark.parametrize("cfg", [CFG, tiny_buffers_config()], ids=["zedboard", "tiny"])
@pytest.mark.parametrize("case", LAYERS, ids=[str(c[:9]) for c in LAYERS])
def test_gemm_blocks_equal_the_walk(cfg, case, monkeypatch):
    calls = []

    class Counted:  # the walker's GemmBlock, counted
        @staticmethod
        def from_columns(*args):
            calls.append(1)
            return GemmBlock.from_columns(*args)

    monkeypatch.setattr(emit, "GemmBlock", Counted)
    prog = _program(cfg, case)
    assert calls  # the layer does have GEMM blocks
    monkeypatch.undo()
    encoded = prog.to_bytes()  # from the blocks' tables
    blocks = prog.instructions
    monkeypatch.setattr(emit, "GEMM_BLOCKS", False)
    walked = _program(cfg, case)
    assert not any(isinstance(item, GemmBlock) for item in walked.stream)
    assert walked.instructions == blocks, instruction_diff(blocks, walked.instructions)
    assert walked.to_bytes() == encoded


def test_instruction_block_equals_the_constructor():
    names = ("reset", "wgt_addr", "inp_addr", "acc_addr", "outer", "inner", "acc_so")
    rows = [(r % 2, r, r + 1, 3 * r, 2, 7, 5) for r in range(20)]
    block = instruction_block(Opcode.GEMM, names, rows)
    single = [Instruction(Opcode.GEMM, **dict(zip(names, row, strict=True))) for row in rows]
    assert block == single
    assert [list(vars(b)) for b in block] == [list(vars(s)) for s in single]  # field order
    assert [hash(b) for b in block] == [hash(s) for s in single]
    shared = {"array": 1, "inp_so": 4}
    with_fixed = instruction_block(Opcode.GEMM, names, rows, shared)
    assert with_fixed == [s.replace(**shared) for s in single]
    assert [list(vars(b)) for b in with_fixed] == [list(vars(s)) for s in single]
    with pytest.raises(IsaError):
        instruction_block(Opcode.GEMM, ("dst_addr",), [(1,)])  # an ALU field
    with pytest.raises(TypeError):
        instruction_block(Opcode.GEMM, ("nonsense",), [(1,)])


def test_replace_keeps_the_value_semantics():
    g = Instruction(Opcode.GEMM, wgt_addr=3, outer=2, inner=2)
    h = g.replace(array=1)
    assert (g.array, h.array) == (0, 1) and h.wgt_addr == 3
    assert list(vars(h)) == list(vars(g))
    assert h == Instruction(Opcode.GEMM, array=1, wgt_addr=3, outer=2, inner=2)
    with pytest.raises(IsaError):
        g.replace(dst_addr=1)


def test_paused_gc_restores_the_collector():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # a collector that was off stays off
    finally:
        gc.enable()

    @paused_gc()
    def inside():
        return gc.isenabled()

    assert inside() is False and gc.isenabled()


@pytest.mark.parametrize("fused", [False, True])
def test_a_repeated_layer_reuses_its_stream_with_its_own_shift(monkeypatch, fused):
    """Inside ``reuse_streams`` (one per compile), a convolution whose signature was emitted
    already is not scheduled and emitted again: its stream is the earlier one with its own
    requantization shift, instruction for instruction what a fresh compile gives.  Another
    clip is another signature."""
    from tvm_hapm.target.tir import layers

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (32, 16, 3, 3)).astype(np.int8)
    bias, mult = rng.integers(-500, 500, 32), rng.integers(1, 300, 32)
    kwargs = {"padding": (1, 1, 1, 1), "residual": rng.integers(16, 300, 32) if fused else None}

    def program(shift, clip=(0, 120)):
        return htir.conv2d_program(CFG, "c", (1, 16, 12, 10), w, bias, mult, shift, clip, **kwargs)

    fresh = {}
    for s in (11, 14):
        htir.clear_lowered_cache()  # a fresh compile: nothing kept from the other shift
        fresh[s] = program(s)[0]
    assert fresh[11].instructions != fresh[14].instructions  # the shift is in the stream
    emitted = []
    real = layers.emit_stream
    monkeypatch.setattr(layers, "emit_stream", lambda *a: emitted.append(1) or real(*a))
    with htir.reuse_streams():
        first, again = program(11)[0], program(14)[0]
        other_clip = program(14, (-128, 127))[0]
    assert len(emitted) == 2  # the second layer reused the first one's stream
    assert first.instructions == fresh[11].instructions
    assert again.instructions == fresh[14].instructions, instruction_diff(
        again.instructions, fresh[14].instructions
    )
    assert other_clip.instructions == program(14, (-128, 127))[0].instructions


@pytest.mark.parametrize("fused", [False, True])
def test_other_zero_blocks_reuse_the_lowered_function(monkeypatch, fused):
    """A convolution compiled again with other weights, other all-zero blocks and another
    shift is not defined, scheduled or lowered again (the kept function is walked with the new
    blocks and gets its own shift), and its stream is instruction for instruction a fresh
    compile's."""
    from tvm_hapm.target.tir import layers

    R, C = CFG.array_rows, CFG.array_cols
    rng = np.random.default_rng(1)
    w1 = rng.integers(-127, 128, (4 * C, 2 * R, 3, 3)).astype(np.int8)
    w2 = rng.integers(-127, 128, w1.shape).astype(np.int8)
    w1[:C, :R] = 0  # one block pair pruned in each, not the same one
    w2[C : 2 * C, R:] = 0
    bias, mult = rng.integers(-500, 500, 4 * C), rng.integers(1, 300, 4 * C)
    kwargs = {"padding": (1, 1, 1, 1), "residual": rng.integers(16, 300, 4 * C) if fused else None}

    def program(w, shift):
        return htir.conv2d_program(
            CFG, "c", (1, 2 * R, 12, 10), w, bias, mult, shift, (0, 120), **kwargs
        )[0]

    defined = []
    real = layers.conv2d_primfunc
    monkeypatch.setattr(
        layers, "conv2d_primfunc", lambda *a, **k: defined.append(1) or real(*a, **k)
    )
    htir.clear_lowered_cache()
    first = program(w1, 11)
    again = program(w2, 14)
    assert len(defined) == 1  # the second compile reused the lowered function
    htir.clear_lowered_cache()
    fresh = program(w2, 14)
    assert len(defined) == 2
    assert again.instructions != first.instructions  # other blocks, other shift: other stream
    assert again.instructions == fresh.instructions, instruction_diff(
        again.instructions, fresh.instructions
    )
