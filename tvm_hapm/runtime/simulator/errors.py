"""The simulator's error type and the message format that names an offending instruction."""

from __future__ import annotations

from ...target import isa
from ...target.isa import Instruction

__all__ = ["SimulatorError", "instruction_error"]


class SimulatorError(RuntimeError):
    """A program the simulator refuses to run.

    The message names the offending instruction (index and disassembly) and what is wrong.
    """


def instruction_error(idx: int, insn: Instruction, what: str) -> SimulatorError:
    """The error for instruction ``idx``: ``"instruction 7 (<disassembly>): <what>"``.

    Parameters
    ----------
    idx : int
        Index of the instruction in the program.
    insn : isa.Instruction
        The instruction (disassembled into the message).
    what : str
        What is wrong with it.

    Returns
    -------
    SimulatorError
        The error, for the caller to raise.
    """
    return SimulatorError(f"instruction {idx} ({isa.disassemble(insn)}): {what}")
