"""The banks of the accumulator buffer, and the placement of accumulator data in them.

The accumulator is ``num_arrays`` banks of consecutive entries: bank ``k`` is
``[k * D, (k + 1) * D)`` with ``D = acc_depth // num_arrays`` (the last bank also takes the
remainder).  Systolic array ``k`` accumulates into bank ``k`` only, so each bank is written by
one array and by the compute module (ALU, accumulator LOADs), never by two arrays: a bank is a
few copies of a two-port block RAM (``docs/isa.md``, "Accumulator banks"; the RTL's
``hapm_acc_buf``).  The ISA states it as a rule the simulator checks: *a GEMM on array ``k``
touches only entries of bank ``k``*.

The code generators allocate the accumulator as one flat space (each output-channel block's
region after the previous one).  :func:`place_accumulators` then moves every GEMM region into a
bank, round robin in the order the GEMMs first use them (a dispatch group's ``cob_group``
regions land on consecutive banks, so its GEMMs run on different arrays), and everything else
the program keeps in the accumulator (bias and multiplier rows, ALU-only operands) into the
banks' free space.  :func:`~tvm_hapm.target.schedule.assign_arrays` then gives every GEMM the
array of its bank.  :func:`acc_fits` is the capacity test the tile planners use, so that the
placement always succeeds for what they plan.
"""

from __future__ import annotations

import bisect
from operator import attrgetter

from .config import HardwareConfig
from .dependency import buffer_accesses
from .isa import Buffer, Instruction, Opcode

__all__ = [
    "BankPlacementError",
    "acc_bank",
    "acc_bank_range",
    "acc_fits",
    "place_accumulators",
]


class BankPlacementError(ValueError):
    """The accumulator data of a program does not fit the banks, or an instruction's range
    spans a GEMM region and other entries."""


def acc_bank(cfg: HardwareConfig, addr: int) -> int:
    """The bank of accumulator entry ``addr``."""
    return min(addr // cfg.acc_bank_depth, cfg.num_arrays - 1)


def acc_bank_range(cfg: HardwareConfig, bank: int) -> tuple[int, int]:
    """First and last entry of ``bank``."""
    D = cfg.acc_bank_depth
    last = cfg.acc_depth - 1 if bank == cfg.num_arrays - 1 else (bank + 1) * D - 1
    return bank * D, last


def acc_fits(cfg: HardwareConfig, regions, region_entries, other_entries):
    """Whether ``regions`` GEMM regions of ``region_entries`` each and ``other_entries`` of
    other accumulator data (one run) fit the banks as :func:`place_accumulators` places them.

    Round robin gives banks ``0 .. r-1`` ``q + 1`` regions and the others ``q``
    (``regions = q * A + r``); the other data goes to the bank with the most room, the last
    one (``q`` regions, and the remainder of the division).  Works on numbers and, element
    by element, on numpy arrays.
    """
    A, D = cfg.num_arrays, cfg.acc_bank_depth
    last = cfg.acc_depth - (A - 1) * D
    q, r = regions // A, regions % A
    return ((q + (r > 0)) * region_entries <= D) & (other_entries <= last - q * region_entries)


#: A GEMM's accumulator loop nest, in :func:`_span`'s argument order.
_GEMM_NEST = attrgetter("acc_addr", "outer", "acc_so", "inner", "acc_si")


def _span(base: int, outer: int, so: int, inner: int, si: int) -> tuple[int, int]:
    last = base + (outer - 1) * so + (inner - 1) * si
    return (base, last) if last >= base else (last, base)


def place_accumulators(instructions: list[Instruction], cfg: HardwareConfig) -> list:
    """Move a sequential stream's accumulator data into the banks (before arrays and tokens).

    1. **GEMM regions.**  The accumulator ranges the GEMMs write, merged where they overlap
       (the GEMMs of one output-channel block into one tile write one region; an edge tile's
       smaller range lies inside its block's region).  Each region goes to a bank, round
       robin in the order of the regions' first GEMMs, at the bank's next free entry (regions
       of one bank in their original order).
    2. **Other data.**  The entries other instructions touch outside the regions, merged into
       runs wherever their ranges overlap (an output block whose weights were all pruned has no
       GEMM: its epilogue and store make it a run of its own); each run goes, in original
       order, to the bank with the most room left, after its regions.
    3. Every accumulator address of every instruction is moved with the region or run that
       holds its range, and every GEMM gets its bank's array (the rule of
       :func:`~tvm_hapm.target.schedule.assign_arrays`, applied in the same step).  Relative
       offsets inside a region or run are kept, so strides do not change; an instruction
       whose range is neither inside one region nor outside all of them is refused (it would
       be split by the move).

    With one array, or no GEMM, the stream is returned unchanged.

    Raises
    ------
    BankPlacementError
        When the regions or the other data do not fit, or a range straddles a region.
    """
    A = cfg.num_arrays
    if A == 1:
        return instructions
    GEMM = Opcode.GEMM
    # ---- 1. GEMM regions: merged intervals, first-use order (a GEMM's range computed once
    # per distinct nest: a convolution has few, and hundreds of thousands of GEMMs)
    spans: dict[tuple, tuple[int, int]] = {}
    first: dict[tuple[int, int], int] = {}
    for insn in instructions:
        if insn.opcode == GEMM:
            nest = _GEMM_NEST(insn)
            if nest not in spans:
                spans[nest] = span = _span(*nest)
                if span not in first:
                    first[span] = len(first)
    if not first:
        return instructions
    regions: list[list[int]] = []  # [lo, hi, first use]
    for (lo, hi), use in sorted(first.items()):
        if regions and lo <= regions[-1][1]:
            r = regions[-1]
            r[1] = max(r[1], hi)
            r[2] = min(r[2], use)
        else:
            regions.append([lo, hi, use])
    starts = [r[0] for r in regions]

    def region_of(lo: int, hi: int) -> int:
        """Index of the region holding ``[lo, hi]``, or -1 when it holds none of it."""
        k = bisect.bisect_right(starts, hi) - 1
        if k < 0 or regions[k][1] < lo:
            return -1
        if regions[k][0] <= lo and hi <= regions[k][1]:
            return k
        raise BankPlacementError(
            f"accumulator range [{lo}, {hi}] straddles the GEMM region "
            f"[{regions[k][0]}, {regions[k][1]}]: it cannot move into a bank"
        )

    # ---- 2. other data: runs of entries touched outside the regions
    runs: list[list[int]] = []
    for insn in instructions:
        if insn.opcode == GEMM:
            continue
        for buf, lo, hi, _ in buffer_accesses(insn):
            if buf == Buffer.ACC and region_of(lo, hi) < 0:
                runs.append([lo, hi])
    runs.sort()
    merged: list[list[int]] = []  # overlapping ranges only: adjacent blocks may part
    for lo, hi in runs:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])

    # ---- placement
    bank_lo = [acc_bank_range(cfg, k)[0] for k in range(A)]
    bank_hi = [acc_bank_range(cfg, k)[1] for k in range(A)]
    top = list(bank_lo)
    by_use = sorted(range(len(regions)), key=lambda k: regions[k][2])
    bank_of = {k: n % A for n, k in enumerate(by_use)}
    moved: list[int] = [0] * len(regions)  # new first entry of each region
    for k, (lo, hi, _) in enumerate(regions):
        b = bank_of[k]
        moved[k] = top[b]
        top[b] += hi - lo + 1
        if top[b] > bank_hi[b] + 1:
            raise BankPlacementError(
                f"the GEMM regions of bank {b} need {top[b] - bank_lo[b]} entries, "
                f"the bank has {bank_hi[b] - bank_lo[b] + 1}"
            )
    run_moved = []
    for lo, hi in merged:
        room = [bank_hi[b] + 1 - top[b] for b in range(A)]
        b = max(range(A), key=lambda j: (room[j], -j))
        if hi - lo + 1 > room[b]:
            raise BankPlacementError(
                f"{hi - lo + 1} accumulator entries of constants and operands do not fit "
                f"the room left in any bank (at most {room[b]})"
            )
        run_moved.append(top[b])
        top[b] += hi - lo + 1
    run_starts = [r[0] for r in merged]

    cache: dict[tuple[int, int], int] = {}

    def shift(lo: int, hi: int) -> int:
        """How far the range ``[lo, hi]`` moves."""
        d = cache.get((lo, hi))
        if d is None:
            k = region_of(lo, hi)
            if k >= 0:
                d = moved[k] - regions[k][0]
            else:
                j = bisect.bisect_right(run_starts, lo) - 1
                d = run_moved[j] - merged[j][0]
            cache[(lo, hi)] = d
        return d

    # every GEMM nest's new accumulator address and array (its bank's: assign_arrays' rule,
    # applied here in the same replace)
    moves = {}
    for nest, span in spans.items():
        addr = nest[0] + shift(*span)
        moves[nest] = (addr, acc_bank(cfg, addr))
    out = []
    for insn in instructions:
        op = insn.opcode
        if op == GEMM:
            addr, bank = moves[_GEMM_NEST(insn)]
            if addr != insn.acc_addr or bank != insn.array:
                insn = insn.replace(acc_addr=addr, array=bank)
        elif op == Opcode.ALU:
            d = shift(*_span(insn.dst_addr, insn.outer, insn.dst_so, insn.inner, insn.dst_si))
            fields = {"dst_addr": insn.dst_addr + d} if d else {}
            accesses = buffer_accesses(insn)
            if len(accesses) > 2:  # an accumulator operand
                _, lo, hi, _ = accesses[2]
                s = shift(lo, hi)
                if s:
                    fields["src_addr"] = insn.src_addr + s
            if fields:
                insn = insn.replace(**fields)
        elif (op == Opcode.LOAD and insn.buffer == Buffer.ACC) or op == Opcode.STORE:
            _, lo, hi, _ = buffer_accesses(insn)[0]
            d = shift(lo, hi)
            if d:
                insn = insn.replace(sram_addr=insn.sram_addr + d)
        out.append(insn)
    return out
