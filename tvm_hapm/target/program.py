"""The accelerator program container: an instruction stream plus the table of its DRAM slots.

A :class:`Program` is what the codegen produces for one accelerated layer and what the runtime
driver executes.  Its binary form (``Program.to_bytes``) is deterministic::

    b"HAPMPRG2"  magic
    u32          length of the metadata JSON
    bytes        metadata JSON (sorted keys, UTF-8): layer, config, slots
    u32          number of instructions
    16 * n bytes the instruction stream (see :mod:`tvm_hapm.target.isa`)
    32 bytes     SHA-256 of everything before it

The digest is checked before anything else is decoded, wherever a program is loaded (a ``.hapm``
file, the constants of a ``model.so``, an RPC upload): a corrupt program is refused, never run.

DRAM slots are numbered in the order of the runtime call's arguments (inputs and constants, then
the output).  Each slot says how the host tensor is packed into the accelerator's DRAM layout:

* ``"act"``: an activation ``(N, C, H, W)`` (or ``(N, C)``) becomes ``(N, ceil(C/V), H, W, V)``
  with the channels zero-padded to a multiple of the vector length ``V``;
* ``"raw"``: the host tensor already is in DRAM layout (packed weights, bias, multipliers).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import numpy as np

from . import isa
from .config import HardwareConfig, HardwareConfigError
from .stream import GemmBlock, encode_stream, expand, stream_length

__all__ = ["Slot", "Program", "ProgramError", "pack_activation", "unpack_activation"]

MAGIC = b"HAPMPRG2"
#: Length of the SHA-256 trailer that closes every program.
DIGEST_BYTES = hashlib.sha256().digest_size


class ProgramError(ValueError):
    """A malformed program container or a host tensor that does not fit its slot."""


@dataclass(frozen=True)
class Slot:
    """One DRAM region of a program.

    Parameters
    ----------
    name : str
        What the region holds (e.g. ``"data"``, ``"weight"``, ``"out"``).
    role : str
        ``"input"`` (read), ``"output"`` (written back to the host) or ``"const"`` (compile-time).
    dtype : str
        Element type in DRAM, ``int8``, ``int16`` or ``int32``.
    shape : tuple of int
        Shape of the host tensor.
    packing : str
        ``"act"`` or ``"raw"`` (see the module docstring).
    vector : int
        Vector length ``V`` of the ``"act"`` packing.
    """

    name: str
    role: str
    dtype: str
    shape: tuple
    packing: str = "raw"
    vector: int = 1

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.role not in ("input", "output", "const"):
            raise ProgramError(f"slot {self.name!r}: unknown role {self.role!r}")
        if self.dtype not in ("int8", "int16", "int32"):
            raise ProgramError(f"slot {self.name!r}: unsupported DRAM dtype {self.dtype!r}")
        if self.packing not in ("act", "raw"):
            raise ProgramError(f"slot {self.name!r}: unknown packing {self.packing!r}")
        if self.packing == "act" and len(self.shape) not in (2, 4):
            raise ProgramError(f"slot {self.name!r}: 'act' packing needs a 2-D or 4-D shape")

    @property
    def dram_shape(self) -> tuple:
        if self.packing == "raw":
            return self.shape
        n, c, h, w = _as_nchw(self.shape)
        return (n, -(-c // self.vector), h, w, self.vector)

    @property
    def dram_elems(self) -> int:
        return int(np.prod(self.dram_shape, dtype=np.int64))


def _as_nchw(shape):
    return tuple(shape) + (1,) * (4 - len(shape))


def pack_activation(x: np.ndarray, vector: int) -> np.ndarray:
    """``(N, C, H, W)`` or ``(N, C)`` -> ``(N, ceil(C/V), H, W, V)``, channels zero-padded."""
    x4 = x.reshape(_as_nchw(x.shape))
    n, c, h, w = x4.shape
    cb = -(-c // vector)
    padded = np.zeros((n, cb * vector, h, w), dtype=x.dtype)
    padded[:, :c] = x4
    return np.ascontiguousarray(padded.reshape(n, cb, vector, h, w).transpose(0, 1, 3, 4, 2))


def unpack_activation(d: np.ndarray, shape: tuple, vector: int) -> np.ndarray:
    """Inverse of :func:`pack_activation` for a host tensor of ``shape``."""
    n, c, h, w = _as_nchw(shape)
    cb = -(-c // vector)
    x = d.reshape(n, cb, h, w, vector).transpose(0, 1, 4, 2, 3).reshape(n, cb * vector, h, w)
    return x[:, :c].reshape(shape)


class Program:
    """An instruction stream for one accelerated layer and the DRAM slots it addresses.

    Parameters
    ----------
    layer : str
        The layer's name.
    config : HardwareConfig
        The accelerator it runs on.
    slots : list of Slot
        Its DRAM regions, in the order of the runtime call's arguments.
    instructions : list
        Its instruction stream: instructions, or a stream with GEMM blocks
        (:mod:`~tvm_hapm.target.stream`), which :attr:`instructions` expands the first time it
        is read (encoding, :meth:`to_bytes`, does not need to).
    layer_index : int
        The layer's position in its network.
    info : dict, optional
        What the code generator reports (kind, schedule, source).
    """

    def __init__(
        self,
        layer: str,
        config: HardwareConfig,
        slots: list[Slot],
        instructions: list,
        layer_index: int = 0,
        info: dict | None = None,
    ):
        self.layer = layer
        self.config = config
        self.slots = slots
        self.stream = instructions
        self.layer_index = layer_index
        self.info = {} if info is None else info

    @property
    def stream(self) -> list:
        """The instruction stream as the code generator left it (GEMM blocks kept)."""
        return self._stream

    @stream.setter
    def stream(self, items) -> None:
        self._stream = items if isinstance(items, list) else list(items)
        plain = not any(item.__class__ is GemmBlock for item in self._stream)
        self._instructions = self._stream if plain else None

    @property
    def instructions(self) -> list[isa.Instruction]:
        """The instruction stream, one :class:`~tvm_hapm.target.isa.Instruction` each."""
        if self._instructions is None:
            self._instructions = self._stream = expand(self._stream)
        return self._instructions

    @instructions.setter
    def instructions(self, insns) -> None:
        self.stream = insns

    @property
    def instruction_count(self) -> int:
        """The number of instructions (without expanding GEMM blocks)."""
        return stream_length(self._stream)

    def __eq__(self, other) -> bool:
        if other.__class__ is not Program:
            return NotImplemented
        return (self.layer, self.config, self.slots, self.layer_index, self.info) == (
            other.layer, other.config, other.slots, other.layer_index, other.info
        ) and self.instructions == other.instructions  # fmt: skip

    __hash__ = None  # mutable, as the dataclass it was

    def __repr__(self) -> str:
        return (
            f"Program(layer={self.layer!r}, config={self.config.name!r}, "
            f"{len(self.slots)} slots, {self.instruction_count} instructions)"
        )

    def to_bytes(self) -> bytes:
        meta = {
            "layer": self.layer,
            "layer_index": self.layer_index,
            "config": self.config.to_dict(),
            "slots": [
                {
                    "name": s.name,
                    "role": s.role,
                    "dtype": s.dtype,
                    "shape": list(s.shape),
                    "packing": s.packing,
                    "vector": s.vector,
                }
                for s in self.slots
            ],
            "info": self.info,
        }
        meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        stream = encode_stream(self._stream)
        body = b"".join(
            [
                MAGIC,
                struct.pack("<I", len(meta_bytes)),
                meta_bytes,
                struct.pack("<I", len(stream) // isa.INSTRUCTION_BYTES),
                stream,
            ]
        )
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Program:
        data = bytes(data)
        if data[: len(MAGIC)] != MAGIC:
            raise ProgramError("not a hapm_fpga program (bad magic)")
        if len(data) < len(MAGIC) + DIGEST_BYTES:
            raise ProgramError(f"truncated program ({len(data)} bytes)")
        data, digest = data[:-DIGEST_BYTES], data[-DIGEST_BYTES:]
        if hashlib.sha256(data).digest() != digest:
            raise ProgramError(
                f"corrupt program{_claimed_layer(data)}: its SHA-256 does not match its contents"
            )
        pos = len(MAGIC)
        try:
            (meta_len,) = struct.unpack_from("<I", data, pos)
            pos += 4
            meta = json.loads(data[pos : pos + meta_len].decode())
            pos += meta_len
            (count,) = struct.unpack_from("<I", data, pos)
            pos += 4
        except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ProgramError(f"truncated or corrupt program header: {err}") from None
        body = data[pos:]
        if len(body) != count * isa.INSTRUCTION_BYTES:
            raise ProgramError(
                f"program declares {count} instructions ({count * isa.INSTRUCTION_BYTES} bytes) "
                f"but carries {len(body)} bytes"
            )
        try:
            slots = [
                Slot(
                    name=s["name"],
                    role=s["role"],
                    dtype=s["dtype"],
                    shape=tuple(s["shape"]),
                    packing=s["packing"],
                    vector=s["vector"],
                )
                for s in meta["slots"]
            ]
            config = HardwareConfig.from_dict(meta["config"])
            layer, layer_index, info = meta["layer"], meta["layer_index"], meta.get("info", {})
        except (KeyError, TypeError) as err:
            raise ProgramError(f"corrupt program metadata: missing {err}") from None
        except (HardwareConfigError, ProgramError) as err:
            raise ProgramError(f"corrupt program metadata: {err}") from None
        return cls(layer, config, slots, isa.decode_stream(body), layer_index, info)

    def check_outputs_written(self) -> None:
        """Refuse a program that leaves part of an output slot unwritten.

        The host reads every element of an output slot back, so an element no ``STORE`` writes
        would hand the model whatever the buffer held (zeros in the simulator), a silently wrong
        result.  STOREs move whole accumulator entries of ``array_cols`` elements.

        Raises
        ------
        ProgramError
            Naming the layer, the slot and how many of its DRAM elements are never written.
        """
        entry = self.config.array_cols
        written = {
            k: np.zeros(s.dram_elems, dtype=bool)
            for k, s in enumerate(self.slots)
            if s.role == "output"
        }
        for insn in self.instructions:
            if insn.opcode != isa.Opcode.STORE or insn.dram_slot not in written:
                continue
            mask = written[insn.dram_slot]
            elems = isa.dram_elements(insn, entry)
            mask[elems[elems < mask.size]] = True  # beyond the slot: the simulator refuses it
        for k, mask in written.items():
            if not mask.all():
                raise ProgramError(
                    f"{self.layer}: output slot {k} ('{self.slots[k].name}') has "
                    f"{int((~mask).sum())} of {mask.size} DRAM elements that no STORE writes"
                )


def _claimed_layer(data: bytes) -> str:
    """`` 'name'`` of the layer a (possibly corrupt) program's header names, or ``""``."""
    try:
        (meta_len,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        layer = json.loads(data[start : start + meta_len].decode())["layer"]
    except Exception:  # a corrupt header names nothing; the digest error stands on its own
        return ""
    return f" {layer!r}" if isinstance(layer, str) else ""
