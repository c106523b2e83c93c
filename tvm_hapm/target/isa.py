"""The hapm_fpga instruction set: the one definition of opcodes, fields, encoding and text form.

Every instruction is 128 bits (16 bytes, little-endian).  Fields are packed from bit 0 upwards in
the order of :data:`LAYOUTS`; the first seven bits are common to all instructions::

    bits 0-2  opcode
    bit  3    pop_prev    wait for a token from the previous module
    bit  4    pop_next    wait for a token from the next module
    bit  5    push_prev   give a token to the previous module
    bit  6    push_next   give a token to the next module

Modules are ordered ``load -> compute -> store`` as in VTA's decoupled access/execute design;
"previous" and "next" are relative to the module that executes the instruction
(:func:`module_of`).  The semantics of every instruction are in ``docs/isa.md`` and, executable,
in :mod:`tvm_hapm.runtime.simulator`.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SIGNED_FIELDS",
    "Opcode",
    "Buffer",
    "AluOp",
    "Module",
    "Instruction",
    "INSTRUCTION_FIELDS",
    "LAYOUTS",
    "INSTRUCTION_BYTES",
    "IsaError",
    "encode",
    "decode",
    "encode_stream",
    "pack_rows",
    "decode_stream",
    "instruction_block",
    "module_of",
    "dram_elements",
    "disassemble",
    "ELEM_BITS",
    "ELEM_CODE",
    "TOKEN_QUEUES",
    "TokenQueue",
    "MAX_INNER_STRIDE",
    "MAX_LOOP",
    "MAX_OUTER_STRIDE",
    "MAX_PAD",
    "MAX_TRANSFER",
    "field_max",
    "REQUANT_RELU",
    "REQUANT_SHIFT_MASK",
    "alu_operand_rows",
]

INSTRUCTION_BYTES = 16
_INSTRUCTION_BITS = INSTRUCTION_BYTES * 8


class IsaError(ValueError):
    """An instruction or stream that does not follow the ISA."""


class Opcode(enum.IntEnum):
    LOAD = 0  # DRAM -> on-chip buffer, 2-D strided, with padding
    STORE = 1  # accumulator buffer -> DRAM, narrowing with saturation
    GEMM = 2  # one weight block on one systolic array, over a 2-level loop of vectors
    ALU = 3  # vector ALU on the accumulator buffer, over a 2-level loop
    SYNC = 4  # no operation; carries dependency tokens for one module
    FINISH = 5  # end of program


class Buffer(enum.IntEnum):
    INP = 0  # input buffer: vectors of array_rows activations
    WGT = 1  # weight buffer: blocks of array_rows x array_cols weights
    ACC = 2  # accumulator buffer: vectors of array_cols int32 lanes


class AluOp(enum.IntEnum):
    ADD = 0  # dst = wrap32(dst + operand)
    MUL = 1  # dst = wrap32(dst * operand)
    SHR = 2  # dst = (dst + 2**(k-1)) >> k  (arithmetic, round half up; k = 0 leaves dst)
    MIN = 3  # dst = min(dst, operand)
    MAX = 4  # dst = max(dst, operand)
    REQUANT = 5  # dst = sat_act((int64(dst) * acc[src] + 2**(imm-1)) >> imm)
    RELU = 6  # dst = max(dst, 0)
    # dst = sat_act([max(0,] (int64(wrap32(dst + acc[src])) * acc[src+1] + 2**(k-1)) >> k [)]),
    # k = imm & REQUANT_SHIFT_MASK, the max only if imm & REQUANT_RELU: a convolution's whole
    # epilogue (bias, requantization, ReLU) in one pass over the accumulator
    ADD_REQUANT = 7


#: ADD_REQUANT's immediate: the shift in the low bits, the ReLU flag above them
REQUANT_SHIFT_MASK = 0x3F
REQUANT_RELU = 0x40


def alu_operand_rows(alu_op: int, use_imm: int) -> int:
    """Accumulator entries an ALU iteration reads from ``acc[src]`` onwards: 0 for RELU and for
    an immediate operand, 2 for ADD_REQUANT (bias, then multiplier), else 1.  REQUANT and
    ADD_REQUANT always read the accumulator (an immediate is refused)."""
    if alu_op == AluOp.ADD_REQUANT:
        return 2
    if alu_op == AluOp.RELU or (use_imm and alu_op != AluOp.REQUANT):
        return 0
    return 1


class Module(enum.IntEnum):
    LOAD = 0
    COMPUTE = 1
    STORE = 2


@dataclass(frozen=True)
class TokenQueue:
    """A dependency-token queue between neighbouring modules (``docs/isa.md``).

    Attributes
    ----------
    name : str
        ``"<producer>-><consumer>"``.
    producer, consumer : Module
        The module that pushes and the one that pops.
    push_flag, pop_flag : str
        The instruction flag of each (``push_next`` / ``push_prev``, ``pop_prev`` /
        ``pop_next``: the queues link neighbours only, load -> compute -> store).
    """

    name: str
    producer: Module
    push_flag: str
    consumer: Module
    pop_flag: str


#: The four token queues, in the numbering the simulator and the timing model use.
TOKEN_QUEUES = (
    TokenQueue("load->compute", Module.LOAD, "push_next", Module.COMPUTE, "pop_prev"),
    TokenQueue("compute->load", Module.COMPUTE, "push_prev", Module.LOAD, "pop_next"),
    TokenQueue("compute->store", Module.COMPUTE, "push_next", Module.STORE, "pop_prev"),
    TokenQueue("store->compute", Module.STORE, "push_prev", Module.COMPUTE, "pop_next"),
)


# DRAM element width codes of LOAD/STORE.
ELEM_BITS = (8, 16, 32)

_COMMON = (("opcode", 3), ("pop_prev", 1), ("pop_next", 1), ("push_prev", 1), ("push_next", 1))
_MEM = (
    ("buffer", 2),
    ("dram_slot", 4),
    ("elem_bits_code", 2),
    ("pad_min", 1),
    ("sram_addr", 18),
    ("dram_addr", 32),
    ("y_size", 12),
    ("x_size", 12),
    ("x_stride", 16),
    ("y_pad_top", 4),
    ("y_pad_bottom", 4),
    ("x_pad_left", 4),
    ("x_pad_right", 4),
)
_LOOP = (("outer", 10), ("inner", 10))

#: Field layout of every opcode: (name, bits), packed from bit 0.  ``imm`` is two's complement.
LAYOUTS: dict[Opcode, tuple[tuple[str, int], ...]] = {
    Opcode.LOAD: _COMMON + _MEM,
    Opcode.STORE: _COMMON + _MEM,
    Opcode.GEMM: _COMMON
    + (("reset", 1), ("array", 4), ("wgt_addr", 16), ("inp_addr", 18), ("acc_addr", 18))
    + _LOOP
    + (("inp_so", 14), ("inp_si", 6), ("acc_so", 14), ("acc_si", 6)),
    Opcode.ALU: _COMMON
    + (("alu_op", 3), ("use_imm", 1), ("imm", 16), ("dst_addr", 18), ("src_addr", 18))
    + _LOOP
    + (("dst_so", 14), ("dst_si", 6), ("src_so", 14), ("src_si", 6)),
    Opcode.SYNC: _COMMON + (("module", 2),),
    Opcode.FINISH: _COMMON,
}
#: Fields encoded in two's complement (the others are unsigned).
SIGNED_FIELDS = frozenset({"imm"})

for _op, _layout in LAYOUTS.items():  # checked once, at import: the layout is the contract
    assert sum(b for _, b in _layout) <= _INSTRUCTION_BITS, _op


def field_max(op: Opcode, name: str) -> int:
    """The largest value the unsigned field ``name`` of ``op`` encodes."""
    return (1 << dict(LAYOUTS[op])[name]) - 1


# The limits the code generators, schedulers and cost models plan by, derived from the layout.
#: Rows (``y_size``) and entries per row (``x_size``) of one LOAD or STORE.
MAX_TRANSFER = field_max(Opcode.LOAD, "x_size")
#: Padding of one LOAD side (so the largest conv padding the accelerator takes).
MAX_PAD = field_max(Opcode.LOAD, "y_pad_top")
#: Extent of a GEMM or ALU loop (``outer``, ``inner``).
MAX_LOOP = field_max(Opcode.GEMM, "outer")
#: Outer and inner strides of a GEMM or ALU loop (the inner one bounds a conv's stride).
MAX_OUTER_STRIDE = field_max(Opcode.GEMM, "inp_so")
MAX_INNER_STRIDE = field_max(Opcode.GEMM, "inp_si")
#: The ``elem_bits_code`` of each DRAM element width.
ELEM_CODE = {bits: code for code, bits in enumerate(ELEM_BITS)}
assert MAX_TRANSFER == field_max(Opcode.LOAD, "y_size")
assert MAX_LOOP == field_max(Opcode.ALU, "inner") and MAX_OUTER_STRIDE == field_max(
    Opcode.ALU, "dst_so"
)


#: The fields of :class:`Instruction` after ``opcode``, in encoding-independent declaration
#: order; every one defaults to 0 and only those of the opcode's layout may be non-zero.
INSTRUCTION_FIELDS = (
    "pop_prev",
    "pop_next",
    "push_prev",
    "push_next",
    # LOAD / STORE
    "buffer",
    "dram_slot",
    "elem_bits_code",
    "pad_min",
    "sram_addr",
    "dram_addr",
    "y_size",
    "x_size",
    "x_stride",
    "y_pad_top",
    "y_pad_bottom",
    "x_pad_left",
    "x_pad_right",
    # GEMM
    "reset",
    "array",
    "wgt_addr",
    "inp_addr",
    "acc_addr",
    # GEMM / ALU loops
    "outer",
    "inner",
    "inp_so",
    "inp_si",
    "acc_so",
    "acc_si",
    # ALU
    "alu_op",
    "use_imm",
    "imm",
    "dst_addr",
    "src_addr",
    "dst_so",
    "dst_si",
    "src_so",
    "src_si",
    # SYNC
    "module",
)
_ZERO_FIELDS = dict.fromkeys(INSTRUCTION_FIELDS, 0)
#: Gives a new instruction its field dictionary (Instruction.__setattr__ refuses writes).
_SET_DICT = object.__setattr__
_COLUMN = {name: k for k, name in enumerate(("opcode", *INSTRUCTION_FIELDS))}


class Instruction:
    """One decoded instruction: an immutable value.  Unused fields of an opcode stay 0.

    Construct with keyword arguments, e.g. ``Instruction(Opcode.GEMM, array=1, wgt_addr=3, ...)``.
    A field the opcode does not encode must be 0 (:class:`IsaError`); field *ranges* are checked
    when encoding.  Compilation builds hundreds of thousands of these, so construction is two
    dictionary updates rather than a dataclass ``__init__`` (40 frozen-attribute writes).
    """

    __match_args__ = ("opcode",)

    def __init__(self, opcode: Opcode | int, **fields):
        d = self.__dict__
        op = d["opcode"] = opcode if opcode.__class__ is Opcode else Opcode(opcode)
        d.update(_ZERO_FIELDS)
        if fields:
            self._check(op, fields)
            d.update(fields)

    @staticmethod
    def _check(op: Opcode, fields: dict) -> None:
        if _ENCODED[op].issuperset(fields):
            return
        for name, value in fields.items():
            if name not in _ZERO_FIELDS:
                raise TypeError(f"Instruction has no field {name!r}")
            if name not in _ENCODED[op] and value != 0:
                raise IsaError(f"{op.name} has no field '{name}'")

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name):
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other) -> bool:
        if other.__class__ is not Instruction:
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(tuple(self.__dict__.values()))

    def __repr__(self) -> str:
        set_fields = "".join(f", {k}={v}" for k, v in self.__dict__.items() if k != "opcode" and v)
        return f"Instruction({self.opcode.name}{set_fields})"

    def __reduce__(self):
        return (
            _rebuild,
            (self.opcode, {k: v for k, v in self.__dict__.items() if k != "opcode" and v}),
        )

    @property
    def elem_bits(self) -> int:
        return ELEM_BITS[self.elem_bits_code]

    def replace(self, **changes) -> Instruction:
        """A copy with ``changes`` applied (checked as the constructor checks them)."""
        if "opcode" in changes:
            fields = {k: v for k, v in self.__dict__.items() if k != "opcode"}
            fields.update(changes)
            return Instruction(**fields)
        self._check(self.opcode, changes)
        d = self.__dict__.copy()
        d.update(changes)
        new = object.__new__(Instruction)
        _SET_DICT(new, "__dict__", d)  # (a copied dict: cheaper than filling the new one)
        return new


def _rebuild(opcode, fields) -> Instruction:
    return Instruction(opcode, **fields)


def instruction_block(opcode: Opcode, names, rows, fixed: dict | None = None) -> list[Instruction]:
    """Instructions of one opcode from rows of field values: what ``[Instruction(opcode,
    **fixed, **dict(zip(names, row))) for row in rows]`` gives, for a loop's worth of
    instructions.

    The field names are checked once for the whole block rather than once per instruction
    (the emitter builds ~10^5 GEMMs this way), and the fields every instruction shares are set
    once.

    Parameters
    ----------
    opcode : Opcode
        The opcode of every instruction.
    names : sequence of str
        Field names, one per column of ``rows``.
    rows : iterable of sequences of int
        One row of Python ints per instruction (not NumPy integers: the fields of an
        :class:`Instruction` are ``int``).
    fixed : dict, optional
        Fields with the same value in every instruction.

    Returns
    -------
    list of Instruction
    """
    op = opcode if opcode.__class__ is Opcode else Opcode(opcode)
    names = tuple(names)
    fixed = fixed or {}
    Instruction._check(op, {**fixed, **dict.fromkeys(names, 1)})
    template = {"opcode": op, **_ZERO_FIELDS, **fixed}
    new, copy, set_dict = object.__new__, template.copy, _SET_DICT
    out = []
    for row in rows:
        d = copy()
        d.update(zip(names, row))
        insn = new(Instruction)
        set_dict(insn, "__dict__", d)
        out.append(insn)
    return out


# The fields each opcode encodes (the others must stay 0); computed once, checked on construction.
_ENCODED = {op: frozenset(name for name, _ in layout) for op, layout in LAYOUTS.items()}


def dram_elements(insn: Instruction, entry_elems: int) -> np.ndarray:
    """The DRAM elements (of its slot) a ``LOAD`` or ``STORE`` moves: ``y_size`` rows of
    ``x_size`` entries of ``entry_elems`` elements, ``x_stride`` entries apart (the padding a
    LOAD adds on chip moves nothing)."""
    rows = insn.dram_addr + np.arange(insn.y_size, dtype=np.int64) * insn.x_stride
    cols = np.arange(insn.x_size * entry_elems, dtype=np.int64)
    return (rows[:, None] * entry_elems + cols[None, :]).reshape(-1)


def module_of(insn: Instruction) -> Module:
    """The module that executes ``insn`` (LOADs into the accumulator run on compute, as in VTA)."""
    op = insn.opcode
    if op == Opcode.LOAD:
        return Module.COMPUTE if insn.buffer == Buffer.ACC else Module.LOAD
    if op == Opcode.STORE:
        return Module.STORE
    if op == Opcode.SYNC:
        return Module(insn.module)
    return Module.COMPUTE


def _field_range(name: str, bits: int) -> tuple[int, int]:
    """Inclusive range of a field of ``bits`` bits (two's complement for :data:`SIGNED_FIELDS`)."""
    if name in SIGNED_FIELDS:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def encode(insn: Instruction) -> bytes:
    """Encode one instruction into 16 bytes; a field out of its range raises :class:`IsaError`."""
    word = 0
    pos = 0
    for name, bits in LAYOUTS[insn.opcode]:
        value = int(getattr(insn, name))
        lo, hi = _field_range(name, bits)
        if name in SIGNED_FIELDS:
            if not lo <= value <= hi:
                raise IsaError(f"{insn.opcode.name}.{name} = {value} outside [{lo}, {hi}]")
            value &= (1 << bits) - 1
        elif not lo <= value <= hi:
            raise IsaError(
                f"{insn.opcode.name}.{name} = {value} does not fit in {bits} unsigned bits"
            )
        word |= value << pos
        pos += bits
    return word.to_bytes(INSTRUCTION_BYTES, "little")


def decode(data: bytes) -> Instruction:
    """Decode 16 bytes; an unknown opcode or non-zero unused bits raise :class:`IsaError`."""
    if len(data) != INSTRUCTION_BYTES:
        raise IsaError(f"an instruction is {INSTRUCTION_BYTES} bytes, got {len(data)}")
    word = int.from_bytes(data, "little")
    code = word & 0b111
    try:
        opcode = Opcode(code)
    except ValueError:
        raise IsaError(f"unknown opcode {code}") from None
    fields = {}
    pos = 0
    for name, bits in LAYOUTS[opcode]:
        value = (word >> pos) & ((1 << bits) - 1)
        if name in SIGNED_FIELDS and value >> (bits - 1):
            value -= 1 << bits
        fields[name] = value
        pos += bits
    if word >> pos:
        raise IsaError(f"{opcode.name}: reserved bits {pos}..127 are not zero")
    fields["opcode"] = opcode
    return Instruction(**fields)


def encode_stream(insns) -> bytes:
    """Encode a list of instructions, byte for byte as :func:`encode` does one by one.

    Vectorised over the stream (a compiled network has ~10^5 instructions): the fields become
    an integer table, each opcode's rows are range-checked and packed into two 64-bit halves
    (:func:`pack_rows`).  Any field out of range sends the stream through :func:`encode`, which
    names the first offending instruction.
    """
    insns = list(insns)
    if not insns:
        return b""
    width = len(_COLUMN)
    try:  # each instruction's __dict__ holds opcode, then INSTRUCTION_FIELDS, in order
        flat = itertools.chain.from_iterable(i.__dict__.values() for i in insns)
        table = np.fromiter(flat, np.int64, count=len(insns) * width).reshape(-1, width)
    except OverflowError:
        return b"".join(encode(i) for i in insns)
    words = np.zeros((len(insns), 2), dtype="<u8")
    for op in np.unique(table[:, 0]):
        rows = np.flatnonzero(table[:, 0] == op)
        opcode = Opcode(int(op))
        names = [name for name, _ in LAYOUTS[opcode][1:]]
        packed = pack_rows(opcode, table[np.ix_(rows, [_COLUMN[n] for n in names])], names)
        if packed is None:
            return b"".join(encode(i) for i in insns)
        words[rows] = packed
    return words.tobytes()


def pack_rows(opcode: Opcode, table: np.ndarray, names) -> np.ndarray | None:
    """The encoded words of instructions of one opcode given as an integer table.

    Parameters
    ----------
    opcode : Opcode
        The opcode of every row.
    table : numpy.ndarray
        ``(n, len(names))`` integers, one row per instruction.
    names : sequence of str
        The column of each field: every field of ``LAYOUTS[opcode]`` after the opcode, in
        any order (a field of the layout that is missing from ``names`` is an error).

    Returns
    -------
    numpy.ndarray or None
        ``(n, 2)`` little-endian 64-bit halves (``.tobytes()`` is the stream, as
        :func:`encode` gives it row by row), or None when a field is out of its range.
    """
    column = {name: k for k, name in enumerate(names)}
    half = [np.full(len(table), int(opcode), np.uint64), np.zeros(len(table), np.uint64)]
    pos = LAYOUTS[opcode][0][1]  # after the opcode
    for name, bits in LAYOUTS[opcode][1:]:
        value = table[:, column[name]]
        lo, hi = _field_range(name, bits)
        if len(value) and (value.min() < lo or value.max() > hi):
            return None
        v = (value & ((1 << bits) - 1)).astype(np.uint64)
        if pos >= 64:
            half[1] |= v << np.uint64(pos - 64)
        else:
            half[0] |= v << np.uint64(pos)  # bits beyond 64 fall off here ...
            if pos + bits > 64:
                half[1] |= v >> np.uint64(64 - pos)  # ... and land in the upper half
        pos += bits
    return np.stack(half, axis=1).astype("<u8", copy=False)


def decode_stream(data: bytes) -> list[Instruction]:
    if len(data) % INSTRUCTION_BYTES:
        raise IsaError(
            f"instruction stream of {len(data)} bytes is not a multiple of {INSTRUCTION_BYTES}"
        )
    out = []
    for k in range(0, len(data), INSTRUCTION_BYTES):
        try:
            out.append(decode(data[k : k + INSTRUCTION_BYTES]))
        except IsaError as err:
            raise IsaError(f"instruction {k // INSTRUCTION_BYTES}: {err}") from None
    return out


def _deps(insn: Instruction) -> str:
    flags = [n for n in ("pop_prev", "pop_next", "push_prev", "push_next") if getattr(insn, n)]
    return (" [" + " ".join(flags) + "]") if flags else ""


def disassemble(insn: Instruction) -> str:
    """One line of assembly text for ``insn``."""
    op = insn.opcode
    if op in (Opcode.LOAD, Opcode.STORE):
        # Invalid codes still disassemble (as numbers) so that error messages can show them.
        buf = (
            Buffer(insn.buffer).name.lower()
            if 0 <= insn.buffer < len(Buffer)
            else f"buf{insn.buffer}"
        )
        width = (
            f"i{ELEM_BITS[insn.elem_bits_code]}"
            if 0 <= insn.elem_bits_code < len(ELEM_BITS)
            else f"bits{insn.elem_bits_code}"
        )
        pads = (insn.y_pad_top, insn.y_pad_bottom, insn.x_pad_left, insn.x_pad_right)
        pad = (
            f" pad={','.join(map(str, pads))}{' min' if insn.pad_min else ''}" if any(pads) else ""
        )
        arrow = (
            f"{buf}[{insn.sram_addr}] <- dram{insn.dram_slot}.{width}[{insn.dram_addr}]"
            if op == Opcode.LOAD
            else f"dram{insn.dram_slot}.{width}[{insn.dram_addr}] <- {buf}[{insn.sram_addr}]"
        )
        text = (
            f"{op.name.lower():6s} {arrow} rows={insn.y_size} cols={insn.x_size} "
            f"stride={insn.x_stride}{pad}"
        )
    elif op == Opcode.GEMM:
        text = (
            f"gemm   array{insn.array} acc[{insn.acc_addr}+{insn.acc_so}o+{insn.acc_si}i] "
            f"{'=' if insn.reset else '+='} inp[{insn.inp_addr}+{insn.inp_so}o+{insn.inp_si}i] "
            f"x wgt[{insn.wgt_addr}] o<{insn.outer} i<{insn.inner}"
        )
    elif op == Opcode.ALU:
        valid = 0 <= insn.alu_op < len(AluOp)
        name = AluOp(insn.alu_op).name.lower() if valid else f"op{insn.alu_op}"
        if insn.alu_op == AluOp.RELU:
            operand = ""
        elif insn.alu_op == AluOp.REQUANT:
            operand = f", acc[{insn.src_addr}+{insn.src_so}o+{insn.src_si}i] >> {insn.imm}"
        elif insn.alu_op == AluOp.ADD_REQUANT:
            relu = ", relu" if insn.imm & REQUANT_RELU else ""
            operand = (
                f", acc[{insn.src_addr}+{insn.src_so}o+{insn.src_si}i](+1) "
                f">> {insn.imm & REQUANT_SHIFT_MASK}{relu}"
            )
        elif insn.use_imm:
            operand = f", #{insn.imm}"
        else:
            operand = f", acc[{insn.src_addr}+{insn.src_so}o+{insn.src_si}i]"
        text = (
            f"alu    {name} acc[{insn.dst_addr}+{insn.dst_so}o+{insn.dst_si}i]{operand} "
            f"o<{insn.outer} i<{insn.inner}"
        )
    elif op == Opcode.SYNC:
        text = f"sync   {Module(insn.module).name.lower() if 0 <= insn.module < 3 else insn.module}"
    else:
        text = "finish"
    return text + _deps(insn)
