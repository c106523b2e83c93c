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
regions land on consecutive banks, so its GEMMs run on different arrays) and everything else
the program keeps in the accumulator (bias and multiplier rows) into the banks' free space,
and gives every GEMM the array of its bank (:func:`acc_bank`).  :func:`acc_fits` is the
capacity test the tile planners use, so that the placement always succeeds for what they
plan.
"""

from __future__ import annotations

import bisect

import numpy as np

from .config import HardwareConfig
from .dependency import buffer_accesses
from .isa import Buffer, Opcode
from .stream import GEMM_COLUMNS, GemmBlock, gemm_table

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
_GEMM_NEST_NAMES = ("acc_addr", "outer", "acc_so", "inner", "acc_si")


def _span(base: int, outer: int, so: int, inner: int, si: int) -> tuple[int, int]:
    last = base + (outer - 1) * so + (inner - 1) * si
    return (base, last) if last >= base else (last, base)


def place_accumulators(instructions: list, cfg: HardwareConfig) -> list:
    """Move a sequential stream's accumulator data into the banks (before arrays and tokens).

    The stream may hold GEMM blocks (:mod:`~tvm_hapm.target.stream`): their address and array
    columns are moved at once, and the result is what the instructions they stand for give.

    1. **Regions and runs.**  The accumulator ranges of all instructions, joined where they
       overlap: a part with a GEMM's range is a *region* (an output block: the GEMMs into one
       output-channel block, its initialisation, epilogue and store, also in the tiles where
       some of its GEMMs were dropped), a part without one a *run* (bias and multiplier rows;
       an output block whose weights were all pruned).
    2. **Placement.**  Each region goes to a bank, round robin in the order of the regions'
       first GEMMs, at the bank's next free entry (regions of one bank in their original
       order); then each run, in original order, to the bank with the most room left.
    3. Every accumulator address of every instruction is moved with the part that holds its
       range, and every GEMM gets its bank's array (:func:`acc_bank`, in the same
       ``replace``).  Relative offsets inside a part are kept, so strides do not change.  (An
       instruction whose range spans two output blocks joins them into one region: one bank,
       one array.)

    With one array, or no GEMM, the stream is returned unchanged.

    Raises
    ------
    BankPlacementError
        When the regions or the other data do not fit the banks.
    """
    A = cfg.num_arrays
    if A == 1:
        return instructions
    GEMM = Opcode.GEMM
    # ---- 1. the GEMMs' ranges, in first-use order: all GEMMs (instructions and blocks' rows)
    # as one table, their distinct spans found at once
    gemms = [insn for insn in instructions if insn.opcode == GEMM]
    if not gemms:
        return instructions
    table = gemm_table(gemms)
    distinct, row_span = _spans_by_first_use(table)
    first = {span: k for k, span in enumerate(distinct)}
    # ---- 2. the other instructions' ranges; every range joins those it overlaps (one
    # sweep over them sorted: the connected components of their overlap): a component with a
    # GEMM is a region, one without a run
    ranges = [(lo, hi, use) for (lo, hi), use in first.items()]
    no_gemm = len(first)  # sorts after every GEMM's use
    for insn in instructions:
        if insn.opcode != GEMM:
            for buf, lo, hi, _ in buffer_accesses(insn):
                if buf == Buffer.ACC:
                    ranges.append((lo, hi, no_gemm))
    ranges.sort()
    parts: list[list[int]] = []  # [lo, hi, first GEMM use or no_gemm]
    for lo, hi, use in ranges:
        if parts and lo <= parts[-1][1]:
            part = parts[-1]
            part[1] = max(part[1], hi)
            part[2] = min(part[2], use)
        else:
            parts.append([lo, hi, use])
    starts = [p[0] for p in parts]

    # ---- placement: regions round robin by first use, then the runs by room
    bank_lo, bank_hi = zip(*(acc_bank_range(cfg, k) for k in range(A)), strict=True)
    top = list(bank_lo)
    moved: list[int] = [0] * len(parts)  # new first entry of each part
    regions = sorted((k for k, p in enumerate(parts) if p[2] < no_gemm), key=lambda k: parts[k][2])
    bank_of = {k: n % A for n, k in enumerate(regions)}
    for k in sorted(regions):  # a bank's regions in their original order
        b = bank_of[k]
        moved[k] = top[b]
        top[b] += parts[k][1] - parts[k][0] + 1
        if top[b] > bank_hi[b] + 1:
            raise BankPlacementError(
                f"the GEMM regions of bank {b} need {top[b] - bank_lo[b]} entries, "
                f"the bank has {bank_hi[b] - bank_lo[b] + 1}"
            )
    for k, (lo, hi, use) in enumerate(parts):
        if use < no_gemm:
            continue
        room = [bank_hi[b] + 1 - top[b] for b in range(A)]
        b = max(range(A), key=lambda j: (room[j], -j))
        if hi - lo + 1 > room[b]:
            raise BankPlacementError(
                f"{hi - lo + 1} accumulator entries of constants and operands do not fit "
                f"the room left in any bank (at most {room[b]})"
            )
        moved[k] = top[b]
        top[b] += hi - lo + 1

    cache: dict[tuple[int, int], int] = {}

    def shift(lo: int, hi: int) -> int:
        """How far the range ``[lo, hi]`` moves (it lies in one part, by construction)."""
        d = cache.get((lo, hi))
        if d is None:
            k = bisect.bisect_right(starts, lo) - 1
            d = cache[(lo, hi)] = moved[k] - parts[k][0]
        return d

    # every GEMM's new accumulator address (moved with its span) and array (its bank's)
    moved_by = np.array([shift(*span) for span in distinct], np.int64)[row_span]
    addr = table[:, GEMM_COLUMNS.index("acc_addr")] + moved_by
    bank = np.minimum(addr // cfg.acc_bank_depth, A - 1)
    if len(gemms) > sum(g.__class__ is GemmBlock for g in gemms):  # single GEMM instructions
        addr_list, bank_list = addr.tolist(), bank.tolist()
    out = []
    row = 0  # the table row of the next GEMM
    for insn in instructions:
        op = insn.opcode
        if insn.__class__ is GemmBlock:
            end = row + len(insn)
            insn = insn.with_columns(acc_addr=addr[row:end], array=bank[row:end])
            row = end
        elif op == GEMM:
            a, b = addr_list[row], bank_list[row]
            row += 1
            if a != insn.acc_addr or b != insn.array:
                insn = insn.replace(acc_addr=a, array=b)
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


def _spans_by_first_use(table: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The distinct accumulator spans of GEMMs given as a block table, in order of first use
    (each as :func:`_span` gives it), and the position of each row's span among them."""
    base, outer, so, inner, si = (table[:, GEMM_COLUMNS.index(n)] for n in _GEMM_NEST_NAMES)
    last = base + (outer - 1) * so + (inner - 1) * si
    lo, hi = np.minimum(base, last), np.maximum(base, last)
    key = lo << 32 | hi
    uniq, first_row, inverse = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first_row, kind="stable")  # distinct spans by first use
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    ordered = uniq[order]
    distinct = list(zip((ordered >> 32).tolist(), (ordered & 0xFFFFFFFF).tolist(), strict=True))
    return distinct, rank[inverse.reshape(-1)]
