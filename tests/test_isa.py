"""Tests of the instruction encoding, decoding and disassembly (:mod:`tvm_hapm.target.isa`)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_hapm.target import isa
from tvm_hapm.target.isa import (
    INSTRUCTION_BYTES,
    LAYOUTS,
    AluOp,
    Buffer,
    Instruction,
    IsaError,
    Module,
    Opcode,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "isa.md"
SETTINGS = settings(max_examples=150, deadline=None, database=None)  # no .hypothesis dir


def field_range(name: str, bits: int) -> tuple[int, int]:
    """Inclusive range of a field, written from the ISA definition (``imm`` is signed)."""
    if name == "imm":
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def offsets(op: Opcode) -> dict[str, tuple[int, int]]:
    """Field name -> (first bit, width)."""
    out, pos = {}, 0
    for name, bits in LAYOUTS[op]:
        out[name] = (pos, bits)
        pos += bits
    return out


def used_bits(op: Opcode) -> int:
    return sum(bits for _, bits in LAYOUTS[op])


@st.composite
def instructions(draw, op=None):
    """A random valid instruction: every field anywhere within its width."""
    op = draw(st.sampled_from(list(Opcode))) if op is None else op
    fields = {
        name: draw(st.integers(*field_range(name, bits)))
        for name, bits in LAYOUTS[op]
        if name != "opcode"
    }
    return Instruction(op, **fields)


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("op", list(Opcode), ids=lambda o: o.name)
@SETTINGS
@given(data=st.data())
def test_encode_decode_round_trip(op, data):
    insn = data.draw(instructions(op))
    raw = isa.encode(insn)
    assert isinstance(raw, bytes) and len(raw) == INSTRUCTION_BYTES
    back = isa.decode(raw)
    assert back == insn
    assert back.opcode is op
    assert isa.encode(back) == raw


@pytest.mark.parametrize("op", list(Opcode), ids=lambda o: o.name)
def test_fields_sit_at_their_bit_offsets(op):
    """Each field is packed little-endian from bit 0 in LAYOUTS order; check all-ones values."""
    for name, (start, bits) in offsets(op).items():
        if name == "opcode":
            continue
        lo, hi = field_range(name, bits)
        value = lo if name == "imm" else hi  # the sign bit alone for imm, all ones otherwise
        word = int.from_bytes(isa.encode(Instruction(op, **{name: value})), "little")
        expected_bits = (1 << (bits - 1)) if name == "imm" else ((1 << bits) - 1)
        assert word == int(op) | (expected_bits << start), name


def test_header_is_common_to_all_opcodes():
    for op in Opcode:
        assert [n for n, _ in LAYOUTS[op][:5]] == [
            "opcode",
            "pop_prev",
            "pop_next",
            "push_prev",
            "push_next",
        ]
        assert used_bits(op) <= 128


def test_imm_is_twos_complement():
    insn = Instruction(Opcode.ALU, imm=-1, alu_op=AluOp.ADD, use_imm=1)
    start, bits = offsets(Opcode.ALU)["imm"]
    word = int.from_bytes(isa.encode(insn), "little")
    assert (word >> start) & ((1 << bits) - 1) == (1 << bits) - 1
    assert isa.decode(isa.encode(insn)).imm == -1


@SETTINGS
@given(st.lists(instructions(), max_size=12))
def test_stream_round_trip(insns):
    data = isa.encode_stream(insns)
    assert len(data) == INSTRUCTION_BYTES * len(insns)
    assert isa.decode_stream(data) == insns


@SETTINGS
@given(st.lists(instructions(), min_size=1, max_size=40))
def test_stream_encoding_is_the_concatenation_of_instruction_encodings(insns):
    """The vectorised stream encoder against the one-instruction encoder, bit for bit."""
    assert isa.encode_stream(insns) == b"".join(isa.encode(i) for i in insns)


@pytest.mark.parametrize("op", list(Opcode), ids=lambda o: o.name)
def test_stream_encoding_refuses_out_of_range_fields(op):
    good = [Instruction(Opcode.GEMM, outer=3), Instruction(Opcode.FINISH)]
    for name, bits in LAYOUTS[op]:
        if name == "opcode":
            continue
        lo, hi = field_range(name, bits)
        for bad in (lo - 1, hi + 1, 1 << 70):
            with pytest.raises(IsaError, match=f"{op.name}.{name} = {bad}"):
                isa.encode_stream(good + [Instruction(op, **{name: bad})] + good)


def test_instructions_are_immutable_values():
    a = Instruction(Opcode.GEMM, outer=2, acc_addr=5)
    b = Instruction(Opcode.GEMM, acc_addr=5, outer=2)
    assert a == b and hash(a) == hash(b) and a != a.replace(outer=3)
    assert a.replace(outer=3).outer == 3 and a.outer == 2  # the original is unchanged
    with pytest.raises(AttributeError):
        a.outer = 4
    with pytest.raises(IsaError, match="GEMM has no field 'x_size'"):
        a.replace(x_size=1)
    with pytest.raises(TypeError, match="no field 'colour'"):
        Instruction(Opcode.GEMM, colour=1)
    assert a.replace(opcode=Opcode.ALU, acc_addr=0, outer=2).opcode is Opcode.ALU
    assert pickle.loads(pickle.dumps(a)) == a


# ------------------------------------------------------------------------------ refusals
@SETTINGS
@given(code=st.sampled_from([6, 7]), rest=st.integers(0, (1 << 125) - 1))
def test_decode_refuses_unknown_opcodes(code, rest):
    raw = ((rest << 3) | code).to_bytes(INSTRUCTION_BYTES, "little")
    with pytest.raises(IsaError, match=f"unknown opcode {code}"):
        isa.decode(raw)


@pytest.mark.parametrize("op", list(Opcode), ids=lambda o: o.name)
@SETTINGS
@given(data=st.data())
def test_decode_refuses_reserved_bits(op, data):
    insn = data.draw(instructions(op))
    bit = data.draw(st.integers(used_bits(op), 127))
    word = int.from_bytes(isa.encode(insn), "little") | (1 << bit)
    with pytest.raises(IsaError, match="reserved bits"):
        isa.decode(word.to_bytes(INSTRUCTION_BYTES, "little"))


@pytest.mark.parametrize("length", [0, 1, 15, 17, 32])
def test_decode_refuses_wrong_length(length):
    with pytest.raises(IsaError, match="16 bytes"):
        isa.decode(bytes(length))


@pytest.mark.parametrize("length", [1, 15, 17, 33])
def test_decode_stream_refuses_partial_instruction(length):
    with pytest.raises(IsaError, match="not a multiple of 16"):
        isa.decode_stream(bytes(length))


def test_decode_stream_names_the_bad_instruction():
    good = isa.encode(Instruction(Opcode.FINISH))
    with pytest.raises(IsaError, match="instruction 2: unknown opcode 7"):
        isa.decode_stream(good + good + b"\x07" + bytes(15))


@pytest.mark.parametrize("op", list(Opcode), ids=lambda o: o.name)
def test_encode_refuses_out_of_range_fields(op):
    for name, bits in LAYOUTS[op]:
        if name == "opcode":
            continue
        lo, hi = field_range(name, bits)
        for bad in (lo - 1, hi + 1):
            with pytest.raises(IsaError, match=name):
                isa.encode(Instruction(op, **{name: bad}))


def test_instruction_refuses_fields_of_other_opcodes():
    with pytest.raises(IsaError, match="SYNC has no field 'imm'"):
        Instruction(Opcode.SYNC, imm=1)
    with pytest.raises(IsaError, match="FINISH has no field 'buffer'"):
        Instruction(Opcode.FINISH, buffer=1)
    with pytest.raises(ValueError):
        Instruction(9)


# ------------------------------------------------------------------------------ helpers
def test_module_of():
    assert isa.module_of(Instruction(Opcode.LOAD, buffer=Buffer.INP)) == Module.LOAD
    assert isa.module_of(Instruction(Opcode.LOAD, buffer=Buffer.WGT)) == Module.LOAD
    assert isa.module_of(Instruction(Opcode.LOAD, buffer=Buffer.ACC)) == Module.COMPUTE
    assert isa.module_of(Instruction(Opcode.STORE, buffer=Buffer.ACC)) == Module.STORE
    assert isa.module_of(Instruction(Opcode.GEMM)) == Module.COMPUTE
    assert isa.module_of(Instruction(Opcode.ALU)) == Module.COMPUTE
    assert isa.module_of(Instruction(Opcode.FINISH)) == Module.COMPUTE
    for m in Module:
        assert isa.module_of(Instruction(Opcode.SYNC, module=m)) == m


def test_elem_bits():
    assert [Instruction(Opcode.LOAD, elem_bits_code=c).elem_bits for c in range(3)] == [8, 16, 32]


@pytest.mark.parametrize("op", list(Opcode), ids=lambda o: o.name)
@SETTINGS
@given(data=st.data())
def test_disassemble_is_one_line_naming_the_opcode(op, data):
    # Any encodable instruction disassembles, including invalid buffer/ALU/module codes.
    insn = data.draw(instructions(op))
    text = isa.disassemble(insn)
    assert "\n" not in text and text == text.strip()
    assert text.split()[0] == op.name.lower()
    for flag in ("pop_prev", "pop_next", "push_prev", "push_next"):
        assert (flag in text) == bool(getattr(insn, flag))


def test_disassemble_examples():
    insn = Instruction(
        Opcode.GEMM, reset=1, array=2, wgt_addr=3, acc_addr=4, outer=2, inner=5, pop_prev=1
    )
    assert isa.disassemble(insn) == (
        "gemm   array2 acc[4+0o+0i] = inp[0+0o+0i] x wgt[3] o<2 i<5 [pop_prev]"
    )
    load = Instruction(
        Opcode.LOAD, buffer=Buffer.INP, dram_slot=1, sram_addr=7, y_size=2, x_size=3, x_stride=4
    )
    assert isa.disassemble(load) == "load   inp[7] <- dram1.i8[0] rows=2 cols=3 stride=4"
    relu = Instruction(Opcode.ALU, alu_op=AluOp.RELU, outer=1, inner=1)
    assert isa.disassemble(relu) == "alu    relu acc[0+0o+0i] o<1 i<1"
    assert isa.disassemble(Instruction(Opcode.FINISH, pop_next=1)) == "finish [pop_next]"
    fused = Instruction(
        Opcode.ALU, alu_op=AluOp.ADD_REQUANT, dst_addr=8, src_addr=2, outer=1, inner=4,
        dst_si=1, imm=12 | isa.REQUANT_RELU,
    )  # fmt: skip
    assert isa.disassemble(fused) == (
        "alu    add_requant acc[8+0o+1i], acc[2+0o+0i](+1) >> 12, relu o<1 i<4"
    )


# ------------------------------------------------------------------------------ the reference
def test_docs_encoding_tables_match_layouts():
    """docs/isa.md lists every field's bit range; it must agree with LAYOUTS."""
    text = DOCS.read_text()
    for op in Opcode:
        heading = re.search(rf"^### {op.name} \(opcode {int(op)}\)$", text, re.M)
        assert heading, f"no encoding table for {op.name} in {DOCS}"
        rows = []
        for line in text[heading.end() :].splitlines()[1:]:
            if line.startswith("### ") or line.startswith("## "):
                break
            m = re.match(r"^\| (\d+)(?:-(\d+))? \| `(\w+)` \| (\d+) \|", line)
            if m:
                first, last, name, width = m.groups()
                last = last or first
                rows.append((name, int(first), int(last), int(width)))
        expected = [(n, s, s + b - 1, b) for n, (s, b) in offsets(op).items()]
        if used_bits(op) < 128:
            expected.append(("reserved", used_bits(op), 127, 128 - used_bits(op)))
        assert rows == expected, op.name


@pytest.mark.parametrize(
    "insn",
    [
        Instruction(Opcode.LOAD, buffer=-1, elem_bits_code=-2, y_size=1, x_size=1),
        Instruction(Opcode.ALU, alu_op=-1, outer=1, inner=1),
        Instruction(Opcode.SYNC, module=-1),
    ],
    ids=["load", "alu", "sync"],
)
def test_disassemble_shows_negative_codes(insn):
    # error messages disassemble the instruction they refuse, whatever its fields hold
    text = isa.disassemble(insn)
    assert "-1" in text and "\n" not in text
