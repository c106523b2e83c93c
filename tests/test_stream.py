"""GEMM blocks (tvm_hapm.target.stream): a stream given as blocks and the same stream given as
instructions come out of every pass and of the encoder identical (docs/compile_time.md)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tvm_hapm.target import isa
from tvm_hapm.target.banks import place_accumulators
from tvm_hapm.target.config import get_config
from tvm_hapm.target.dependency import insert_dependency_tokens
from tvm_hapm.target.isa import Instruction, IsaError, Opcode
from tvm_hapm.target.program import Program, Slot
from tvm_hapm.target.schedule import (
    ConvSchedule,
    fuse_epilogues,
    hoist_prologues,
    interleave_epilogues,
)
from tvm_hapm.target.stream import (
    GemmBlock,
    GemmRun,
    as_blocks,
    encode_stream,
    expand,
    stream_length,
)
from tvm_hapm.testing import (
    direct_codegen,
    instruction_diff,
    prune_random_blocks,
    tiny_buffers_config,
)

CFG = get_config("zedboard")

# (cin, hw, cout, k, stride, pad, prune, fused, schedule)
LAYERS = [
    (32, 9, 32, 3, 1, 1, 0.0, False, None),
    (32, 9, 32, 3, 1, 1, 0.5, False, None),  # all-zero weight blocks: GEMMs dropped
    (32, 7, 32, 3, 1, 1, 0.0, True, ConvSchedule(3, 5, 1, 1, True)),  # edge tiles, fused
    (32, 14, 64, 1, 2, 0, 0.3, True, None),  # strided projection, pruned
    (16, 10, 16, 3, 1, 1, 0.9, False, ConvSchedule(1, 3, 1, 1, True)),  # most blocks zero
]


def _sequential(cfg, case, monkeypatch):
    """The direct generator's sequential stream of a layer, and its regions and buffering (the
    arguments of ``conv_stream_passes``)."""
    cin, hw, cout, k, stride, pad, prune, fused, schedule = case
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
    if prune:
        w = prune_random_blocks(cfg, w, 1, prune, rng)
    kwargs = {"strides": (stride, stride), "padding": (pad,) * 4}
    if fused:
        kwargs["residual"] = rng.integers(16, 3000, cout)
    seen = []
    passes = direct_codegen.conv_stream_passes
    monkeypatch.setattr(
        direct_codegen, "conv_stream_passes", lambda *a: seen.append(a) or passes(*a)
    )
    bias, mult = rng.integers(-500, 500, cout), rng.integers(1, 300, cout)
    direct_codegen.conv2d_program(
        cfg, "layer", (1, cin, hw, hw), w, bias, mult, 12, (0, 120), schedule=schedule, **kwargs
    )
    monkeypatch.undo()
    seq, _, prologues, double = seen[0]
    return seq, prologues, double


def _mixed(stream: list, rng) -> list:
    """The stream with its GEMM runs cut at random places into blocks and single GEMMs."""
    out: list = []
    for is_gemm, group in itertools.groupby(stream, key=lambda i: i.opcode == Opcode.GEMM):
        group = list(group)
        if not is_gemm or len(group) < 2:
            out += group
            continue
        cuts = sorted(rng.choice(np.arange(1, len(group)), min(4, len(group) - 1), False))
        for a, b in itertools.pairwise([0, *cuts, len(group)]):
            if rng.random() < 0.75:
                out.append(GemmBlock.from_instructions(group[a:b]))
            else:
                out += group[a:b]
    return out


@pytest.mark.parametrize("cfg", [CFG, tiny_buffers_config()], ids=["zedboard", "tiny"])
@pytest.mark.parametrize("case", LAYERS, ids=[str(c[:8]) for c in LAYERS])
def test_blocks_and_instructions_give_the_same_streams(cfg, case, monkeypatch):
    seq, prologues, double = _sequential(cfg, case, monkeypatch)
    if prologues and double:
        seq = hoist_prologues(seq, prologues)  # (positions: before any block)
    rng = np.random.default_rng(11)
    steps = [
        ("fuse_epilogues", fuse_epilogues),
        ("interleave_epilogues", lambda s: interleave_epilogues(s, cfg, bool(prologues))),
        ("place_accumulators", lambda s: place_accumulators(s, cfg)),
        ("insert_dependency_tokens", insert_dependency_tokens),
    ]
    plain = list(seq)
    streams = {"blocks": as_blocks(seq), "mixed": _mixed(seq, rng)}
    for name, step in steps:
        plain = step(plain)
        assert not any(isinstance(i, GemmBlock) for i in plain)  # instructions stay instructions
        for kind, stream in streams.items():
            stream = streams[kind] = step(stream)
            assert stream_length(stream) == len(plain)
            got = expand(stream)
            assert got == plain, f"{name}, {kind}: " + instruction_diff(plain, got)
        if name != "insert_dependency_tokens":  # (which expands the runs of a few GEMMs)
            assert any(isinstance(i, GemmBlock) for i in streams["blocks"])
    for stream in streams.values():
        assert encode_stream(stream) == isa.encode_stream(plain)


def test_block_values():
    insns = [Instruction(Opcode.GEMM, acc_addr=a, inp_addr=2 * a, outer=2, reset=a % 2)
             for a in range(6)]  # fmt: skip
    block = GemmBlock.from_instructions(insns)
    assert len(block) == 6 and block.instructions() == insns
    assert [hash(i) for i in block.instructions()] == [hash(i) for i in insns]
    assert [list(vars(i)) for i in block.instructions()] == [list(vars(i)) for i in insns]
    assert block[2:4].instructions() == insns[2:4]
    assert block.column("acc_addr").tolist() == list(range(6))
    moved = block.with_columns(array=1)
    assert moved.instructions() == [i.replace(array=1) for i in insns]
    assert block.instructions() == insns  # a value: unchanged
    same = GemmBlock.from_columns(
        6, {"acc_addr": range(6), "inp_addr": range(0, 12, 2), "reset": [0, 1] * 3}, {"outer": 2}
    )
    assert same.instructions() == insns
    with pytest.raises(IsaError):
        GemmBlock.from_columns(1, {"dst_addr": [1]})  # an ALU field
    with pytest.raises(ValueError):
        GemmBlock.from_instructions([Instruction(Opcode.FINISH)])
    run = GemmRun([insns[0], block[1:5], insns[5]])
    assert len(run) == 6
    assert [run.acc_access(j) for j in range(6)] == [(a, a, a % 2) for a in range(6)]
    assert expand(run.items_between(2, 6)) == insns[2:6]
    assert run.items_between(3, 3) == []


def test_encoder_refuses_a_block_out_of_range():
    block = GemmBlock.from_columns(2, {"acc_addr": [1, 1 << 20]})
    with pytest.raises(IsaError, match="acc_addr"):
        encode_stream([Instruction(Opcode.SYNC, module=1), block])


def test_program_expands_its_blocks_when_asked():
    insns = [Instruction(Opcode.GEMM, acc_addr=a, outer=1, inner=1) for a in range(20)]
    insns.append(Instruction(Opcode.FINISH))
    slots = [Slot("out", "output", "int8", (1, 8))]
    lazy = Program("layer", CFG, slots, [GemmBlock.from_instructions(insns[:20]), insns[20]])
    eager = Program("layer", CFG, slots, insns)
    assert lazy.instruction_count == eager.instruction_count == 21
    assert lazy.to_bytes() == eager.to_bytes()
    assert lazy.instructions == insns and lazy == eager
    assert Program.from_bytes(lazy.to_bytes()).instructions == insns
