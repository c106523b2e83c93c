"""The dependency-token protocol between the load, compute and store modules.

The three modules run concurrently, each on its own instructions in program order, and
synchronise only through four token queues: an instruction may *pop* a token from a queue (wait
until there is one) before it executes and *push* one after.  The queues link neighbours only
(load -> compute -> store), so the load module has no previous module and the store module no
next one.  Tokens do not depend on data: :func:`schedule` plays the protocol out on counters
before anything executes, which finds deadlocks and leftover tokens and gives the order in which
the simulator executes the instructions.
"""

from __future__ import annotations

from ...target import isa
from ...target.isa import TOKEN_QUEUES, Instruction, Module
from .errors import SimulatorError, instruction_error

__all__ = ["CMP2LD", "CMP2ST", "LD2CMP", "ST2CMP", "schedule", "token_queues"]

# The four dependency-token queues between the modules load -> compute -> store
# (isa.TOKEN_QUEUES, in its numbering).
LD2CMP, CMP2LD, CMP2ST, ST2CMP = range(len(TOKEN_QUEUES))
_QUEUE_NAMES = tuple(q.name for q in TOKEN_QUEUES)

# (module, flag) -> queue.  A flag missing here is illegal for that module: the load module has no
# previous module and the store module no next one.
_POPS = {(q.consumer, q.pop_flag): i for i, q in enumerate(TOKEN_QUEUES)}
_PUSHES = {(q.producer, q.push_flag): i for i, q in enumerate(TOKEN_QUEUES)}
_FLAGS = ("pop_prev", "pop_next", "push_prev", "push_next")


def token_queues(
    idx: int, insn: Instruction, module: Module
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The queues an instruction pops and pushes, from its dependency flags.

    Parameters
    ----------
    idx : int
        Index of the instruction (for the error message).
    insn : isa.Instruction
        The instruction.
    module : isa.Module
        The module that executes it (:func:`tvm_hapm.target.isa.module_of`).

    Returns
    -------
    pops, pushes : tuple of int
        Queue numbers (:data:`LD2CMP`, :data:`CMP2LD`, :data:`CMP2ST`, :data:`ST2CMP`), in the
        order of the flags ``pop_prev, pop_next`` and ``push_prev, push_next``.

    Raises
    ------
    SimulatorError
        If a flag names a neighbour the module does not have.
    """
    err = instruction_error
    p, q = [], []
    for flag in _FLAGS:
        if getattr(insn, flag):
            table = _POPS if flag.startswith("pop") else _PUSHES
            queue = table.get((module, flag))
            if queue is None:
                raise err(
                    idx,
                    insn,
                    f"the {module.name.lower()} module has no "
                    f"{'previous' if flag.endswith('prev') else 'next'} module: "
                    f"{flag} is illegal",
                )
            (p if table is _POPS else q).append(queue)
    return tuple(p), tuple(q)


def schedule(instructions, modules, pops, pushes) -> list[int]:
    """Play out the token protocol; return the execution order of the instructions.

    Each module executes its own instructions in program order.  Round-robin over the
    modules (load, compute, store), each runs until it needs a token that is not there or has
    no instructions left.  Tokens do not depend on data, so this finds deadlocks and leftover
    tokens before anything executes.

    Parameters
    ----------
    instructions : list of isa.Instruction
        The program (for the error messages).
    modules : list of isa.Module
        The module that executes each instruction.
    pops, pushes : list of tuple of int
        The queues each instruction pops and pushes (:func:`token_queues`).

    Returns
    -------
    list of int
        Instruction indices in execution order.

    Raises
    ------
    SimulatorError
        On a deadlock, or when tokens are left on a queue at the end of the program.
    """
    per_module = [[], [], []]
    for idx, m in enumerate(modules):
        per_module[m].append(idx)
    pos = [0, 0, 0]
    tokens = [0, 0, 0, 0]
    last_push = [None] * 4
    order = []
    remaining = len(instructions)
    while remaining:
        progress = False
        for m in (Module.LOAD, Module.COMPUTE, Module.STORE):
            mine, p = per_module[m], pos[m]
            start = p
            while p < len(mine):
                idx = mine[p]
                need = pops[idx]
                if need:
                    if any(tokens[q] == 0 for q in need):
                        break
                    for q in need:
                        tokens[q] -= 1
                order.append(idx)
                for q in pushes[idx]:
                    tokens[q] += 1
                    last_push[q] = idx
                p += 1
            if p != start:
                pos[m] = p
                remaining -= p - start
                progress = True
        if remaining and not progress:
            blocked = []
            for m in (Module.LOAD, Module.COMPUTE, Module.STORE):
                if pos[m] < len(per_module[m]):
                    idx = per_module[m][pos[m]]
                    empty = [_QUEUE_NAMES[q] for q in pops[idx] if tokens[q] == 0]
                    blocked.append(
                        f"the {m.name.lower()} module waits at instruction {idx} "
                        f"({isa.disassemble(instructions[idx])}) for a token on the "
                        f"{' and '.join(empty)} queue"
                    )
            raise SimulatorError("deadlock: no module can make progress; " + "; ".join(blocked))
    leftovers = [
        f"{tokens[q]} token(s) on the {_QUEUE_NAMES[q]} queue, last pushed by instruction "
        f"{last_push[q]} ({isa.disassemble(instructions[last_push[q]])})"
        for q in range(4)
        if tokens[q]
    ]
    if leftovers:
        raise SimulatorError(
            "unconsumed dependency tokens at the end of the program: " + "; ".join(leftovers)
        )
    return order
