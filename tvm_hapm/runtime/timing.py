"""Cycle-level timing model of the hapm_fpga accelerator.

The functional simulator (:mod:`tvm_hapm.runtime.simulator`) says *what* a program computes; this
module says *when*.  :class:`TimingModel` replays an instruction stream on a model of the
decoupled machine of ``docs/isa.md``:

* the load, compute and store modules run concurrently; each executes its own instructions in
  program order, one at a time, and they synchronise only through the four FIFO queues of
  dependency tokens (a ``pop_*`` waits for the completion time of the matching ``push_*``);
* the compute module *issues* a GEMM to its systolic array in one cycle and goes on with the next
  instruction; a GEMM waits for its own array (array ``k`` accumulates into accumulator bank
  ``k`` only, :mod:`tvm_hapm.target.banks`), so GEMMs on different arrays overlap;
* an ALU operation or accumulator LOAD waits for the busy arrays whose bank holds an entry it
  writes, and for the in-flight GEMMs whose accumulator range overlaps an entry it only reads
  (a scoreboard of one range per array); ``FINISH`` waits until every array is idle, and a
  token pushed by the compute module is released only when every GEMM issued so far has
  completed;
* LOADs use the DRAM read channel, first come first served; STOREs the write channel.

Every formula is in ``docs/timing.md``.  The energy of a run is computed from the event counts of
the returned :class:`TimingResult` by :mod:`tvm_hapm.runtime.energy`.

Example
-------
.. code-block:: python

    result = TimingModel(get_config("zedboard")).run(program.instructions)
    print(result.cycles, result.latency_ms, result.stalls)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..target.banks import acc_bank_range
from ..target.config import (
    ALU_LATENCY,
    DMA_REQUEST_CYCLES,
    FETCH_CYCLES,
    LOAD_DONE_CYCLES,
    HardwareConfig,
)
from ..target.isa import (
    ELEM_BITS,
    TOKEN_QUEUES,
    AluOp,
    Buffer,
    Instruction,
    Module,
    Opcode,
    alu_operand_rows,
)

__all__ = [
    "ALU_LATENCY",
    "MODULES",
    "STALL_CAUSES",
    "TimingError",
    "TimingModel",
    "TimingResult",
]


#: Module names, indexed like :class:`tvm_hapm.target.isa.Module`.
MODULES = ("load", "compute", "store")

#: Causes of stall cycles reported in :attr:`TimingResult.stalls`.
STALL_CAUSES = (
    "compute_wait_load",  # compute pops a load->compute token not yet pushed
    "compute_wait_store",  # compute pops a store->compute token not yet pushed
    "load_wait_compute",  # load pops a compute->load token not yet pushed
    "store_wait_compute",  # store pops a compute->store token not yet pushed
    "array_busy",  # a GEMM waits for its array, or another array writing the same accumulators
    "gemm_drain",  # ALU / accumulator LOAD / FINISH waits for in-flight GEMMs (scoreboard)
    "dram_port",  # a LOAD or STORE waits for the DRAM port held by another transfer
)
_CWL, _CWS, _LWC, _SWC, _ARRAY, _DRAIN, _PORT = range(len(STALL_CAUSES))


# Token queues as numbered in isa.TOKEN_QUEUES.  _POP_Q[module] = (queue of pop_prev, queue of
# pop_next), -1 where illegal; _PUSH_Q likewise for push_prev, push_next.
def _queue_table(role: str) -> tuple:
    table = {}
    for i, q in enumerate(TOKEN_QUEUES):
        if role == "pop":
            table[(q.consumer, q.pop_flag)] = i
        else:
            table[(q.producer, q.push_flag)] = i
    return tuple(
        tuple(table.get((m, f"{role}_{side}"), -1) for side in ("prev", "next")) for m in Module
    )


_POP_Q = _queue_table("pop")
_PUSH_Q = _queue_table("push")
_QUEUE_POPPER = tuple(int(q.consumer) for q in TOKEN_QUEUES)
# Stall cause of waiting on a queue: the popping module waits on the pusher.
_CAUSE_OF = {
    (Module.COMPUTE, Module.LOAD): _CWL, (Module.LOAD, Module.COMPUTE): _LWC,
    (Module.STORE, Module.COMPUTE): _SWC, (Module.COMPUTE, Module.STORE): _CWS,
}  # fmt: skip
_QUEUE_CAUSE = tuple(_CAUSE_OF[(q.consumer, q.producer)] for q in TOKEN_QUEUES)

_INF = float("inf")
# FINISH: its "range" covers every accumulator entry, so it waits for every array.
_ALL = (-1, 1 << 62, 0, -1)


def _scoreboard(ranges, t, arr_free, arr_lo, arr_hi, bank_lo, bank_hi):
    """Earliest start >= ``t`` of a compute instruction touching the accumulator ``ranges``
    ``(lo, hi, lo2, hi2)``: ``[lo, hi]`` the entries it writes (an ALU's destination, which it
    also reads), ``[lo2, hi2]`` the ones it only reads (an ALU operand).  It waits for every
    busy array whose *bank* holds an entry it writes (the bank's write port and first read
    port are the array's while it runs) and for every in-flight GEMM (the last one of each
    array) whose accumulator range overlaps an entry it reads.  Earlier GEMMs of an array
    ended before its last one was issued, hence before ``t``."""
    lo, hi, lo2, hi2 = ranges
    for b, free in enumerate(arr_free):
        if free > t and (
            (bank_lo[b] <= hi and lo <= bank_hi[b]) or (arr_lo[b] <= hi2 and lo2 <= arr_hi[b])
        ):
            t = free
    return t


class TimingError(RuntimeError):
    """A program the timing model cannot schedule (a token deadlock or a bad argument)."""


@dataclass
class TimingResult:
    """Cycle counts and event counts of one program run on the timing model.

    Attributes
    ----------
    cycles : int
        Cycles from the start until all three modules and all arrays are done.
    latency_ms : float
        ``cycles / clock_mhz / 1e3``.
    clock_mhz : float
        The clock the latency was computed with.
    busy : dict of str to int
        Cycles each module ("load", "compute", "store") spent executing instructions: LOAD /
        STORE from their start to their end minus DRAM-port waits, one issue cycle per GEMM, the
        full duration of every other instruction.
    array_busy : numpy.ndarray
        Cycles each systolic array spent on GEMMs (int64, one entry per array).
    stalls : dict of str to int
        Cycles modules waited, by cause (:data:`STALL_CAUSES`).
    start, end : numpy.ndarray
        Start and end cycle of every instruction, in program order (int64).  For a GEMM, the
        interval its array works on it; for LOAD / STORE, from the request to the last beat (and
        the padding written after it).
    macs : int
        MACs performed (GEMMs skipped by the Dynamic Sparsity Bypass excluded).
    macs_skipped : int
        MACs the bypass skipped.
    gemms_skipped : int
        GEMMs the bypass skipped.
    dram_bytes_read, dram_bytes_written : int
        DRAM traffic of LOAD and STORE (padding is generated on chip and not counted).
    buffer_reads, buffer_writes : dict of str to int
        Bytes read from / written to each on-chip buffer ("inp", "wgt", "acc").
    alu_add_lanes, alu_mul_lanes : int
        ALU lane operations; MUL and REQUANT count as multiplies, ADD_REQUANT as one of
        each, the rest as adds.
    utilisation : float
        ``macs / (macs_per_cycle * cycles)``: the fraction of the arrays' MAC-cycles used.
    roofline_cycles : float
        ``max(macs / macs_per_cycle, dram_bytes / dram_bytes_per_cycle)``: the cycles of the
        layer on an ideal machine with the same peak compute and DRAM bandwidth.
    roofline_fraction : float
        ``roofline_cycles / cycles`` (at most 1).
    """

    cycles: int = 0
    latency_ms: float = 0.0
    clock_mhz: float = 0.0
    busy: dict = field(default_factory=dict)
    array_busy: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    stalls: dict = field(default_factory=dict)
    start: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    end: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    macs: int = 0
    macs_skipped: int = 0
    gemms_skipped: int = 0
    dram_bytes_read: int = 0
    dram_bytes_written: int = 0
    buffer_reads: dict = field(default_factory=dict)
    buffer_writes: dict = field(default_factory=dict)
    alu_add_lanes: int = 0
    alu_mul_lanes: int = 0
    utilisation: float = 0.0
    roofline_cycles: float = 0.0
    roofline_fraction: float = 0.0

    @property
    def stall_cycles(self) -> int:
        """Total stall cycles over all causes."""
        return sum(self.stalls.values())

    @property
    def dram_bytes(self) -> int:
        """Total DRAM traffic in bytes."""
        return self.dram_bytes_read + self.dram_bytes_written

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (the per-instruction traces are left out)."""
        return {
            "cycles": self.cycles,
            "latency_ms": self.latency_ms,
            "clock_mhz": self.clock_mhz,
            "busy": dict(self.busy),
            "array_busy": [int(v) for v in self.array_busy],
            "stalls": dict(self.stalls),
            "stall_cycles": self.stall_cycles,
            "macs": self.macs,
            "macs_skipped": self.macs_skipped,
            "gemms_skipped": self.gemms_skipped,
            "dram_bytes_read": self.dram_bytes_read,
            "dram_bytes_written": self.dram_bytes_written,
            "buffer_reads": dict(self.buffer_reads),
            "buffer_writes": dict(self.buffer_writes),
            "alu_add_lanes": self.alu_add_lanes,
            "alu_mul_lanes": self.alu_mul_lanes,
            "utilisation": self.utilisation,
            "roofline_cycles": self.roofline_cycles,
            "roofline_fraction": self.roofline_fraction,
        }


class TimingModel:
    """Cycle-level model of one hapm_fpga accelerator instance.

    Parameters
    ----------
    config : HardwareConfig
        Array shape, DRAM bandwidth and latency, clock and the Dynamic Sparsity Bypass settings.
    alu_latency : int, optional
        Pipeline depth of the vector ALU (default :data:`ALU_LATENCY`).

    Notes
    -----
    The model assumes a program the functional simulator accepts (fields in range, buffers in
    bounds); it checks only what it needs to schedule: token flags legal for the executing
    module and the absence of deadlock.
    """

    def __init__(self, config: HardwareConfig, alu_latency: int = ALU_LATENCY):
        if not isinstance(config, HardwareConfig):
            raise TypeError(f"TimingModel needs a HardwareConfig, got {type(config).__name__}")
        if alu_latency < 0:
            raise ValueError(f"alu_latency must be >= 0, got {alu_latency}")
        self.config = config
        self.alu_latency = int(alu_latency)

    # ------------------------------------------------------------------ cost formulas
    def gemm_cycles(self, vectors: int) -> int:
        """Cycles one array spends on a dense GEMM streaming ``vectors`` input vectors.

        Weight-stationary, SCALE-Sim style: ``R`` (weight preload) ``+ (R + C - 2)`` (skew fill
        and drain) ``+ vectors`` (one vector per cycle), i.e. ``2R + C + vectors - 2``.
        """
        return self.config.gemm_fixed_cycles + vectors

    def alu_cycles(self, vectors: int) -> int:
        """Cycles of an ALU instruction over ``vectors`` accumulator vectors: latency + vectors."""
        return self.alu_latency + vectors

    # ------------------------------------------------------------------ the model
    # One function on purpose (over 150 lines): the replay is the hot loop of every simulated
    # run, 2.0 us per instruction (ResNet-20, 6,520 instructions), and a handler call per
    # instruction costs 0.05 us more (2%), several helpers a multiple of that.
    def run(
        self,
        instructions: Sequence[Instruction],
        gemm_zero_weights: Sequence[bool] | None = None,
    ) -> TimingResult:
        """Schedule a program cycle by cycle.

        Parameters
        ----------
        instructions : sequence of isa.Instruction
            The program (as accepted by :class:`~tvm_hapm.runtime.simulator.Simulator`).
        gemm_zero_weights : sequence of bool, optional
            Whether each GEMM's weight block was all zero when it executed (the simulator records
            this with ``Simulator.run(..., timing=True)``).  Either one flag per instruction
            (flags of non-GEMM instructions are ignored) or one per GEMM in program order.
            ``None``: no block is zero.  Used only when ``config.dsb_enabled``.

        Returns
        -------
        TimingResult
            Cycles, latency, stalls, traces and event counts.

        Raises
        ------
        TimingError
            On a token deadlock, an illegal token flag or a wrong number of zero flags.
        """
        # One method on purpose (over 150 lines): the timing model's hot loop, run for every
        # simulated layer; its two passes (costs per instruction, then the modules' schedule)
        # keep their locals in fast local variables instead of attributes of helper objects.
        cfg = self.config
        n = len(instructions)
        R, C, A = cfg.array_rows, cfg.array_cols, cfg.num_arrays
        bpc = cfg.dram_bytes_per_cycle
        lat = cfg.dram_latency_cycles
        store_fixed = cfg.store_fixed_cycles
        dsb = cfg.dsb_enabled
        dsb_cycles = cfg.dsb_check_cycles
        alu_lat = self.alu_latency
        gemm_fixed = cfg.gemm_fixed_cycles
        inp_b = R * cfg.act_bytes
        wgt_b = R * C * cfg.weight_bytes
        acc_b = C * cfg.acc_bytes
        entry_bytes = (inp_b, wgt_b, acc_b)
        entry_elems = (R, R * C, C)
        mul_ops = (AluOp.MUL, AluOp.REQUANT, AluOp.ADD_REQUANT)
        mul_only = (AluOp.MUL, AluOp.REQUANT)  # ADD_REQUANT is an add and a multiply

        zero = self._zero_flags(instructions, gemm_zero_weights) if dsb else None

        # ---- pass 1: per-instruction module, costs, tokens and event counts (program order)
        module = [0] * n
        kind = [0] * n  # 0 DMA, 1 GEMM, 2 other
        cost = [1] * n  # DMA: data beats; GEMM: array cycles; other: duration
        extra = [0] * n  # GEMM: its array
        acc_lo = [0] * n  # GEMM: accumulator range written
        acc_hi = [0] * n
        # ALU / LOAD acc / FINISH: accumulator ranges checked against the in-flight GEMMs
        # (the scoreboard): (lo, hi, lo2, hi2), the second range empty unless an ALU operand.
        drain: list = [None] * n
        # LOAD: (beats per entry, padding before the data, cycles from the first data write to
        # the last write, padding after the data)
        dma: list = [None] * n
        pops: list = [()] * n
        pushes: list = [()] * n
        macs = macs_skipped = gemms_skipped = 0
        read = written = 0
        rd = [0, 0, 0]
        wr = [0, 0, 0]
        add_lanes = mul_lanes = 0
        LOAD, STORE, GEMM = Opcode.LOAD, Opcode.STORE, Opcode.GEMM
        ALU, SYNC = Opcode.ALU, Opcode.SYNC
        ACC = Buffer.ACC
        for i, insn in enumerate(instructions):
            op = insn.opcode
            if op == GEMM:
                m = 1
                kind[i] = 1
                extra[i] = insn.array
                t = insn.outer * insn.inner
                acc_lo[i] = insn.acc_addr
                acc_hi[i] = (
                    insn.acc_addr + (insn.outer - 1) * insn.acc_so + (insn.inner - 1) * insn.acc_si
                )
                rd[1] += wgt_b
                if zero is not None and zero[i]:
                    # the issue cycle and the check; a reset GEMM still zeroes its accumulators
                    cost[i] = 1 + dsb_cycles + (t if insn.reset else 0)
                    macs_skipped += R * C * t
                    gemms_skipped += 1
                    if insn.reset:
                        wr[2] += t * acc_b
                else:
                    cost[i] = gemm_fixed + t
                    macs += R * C * t
                    rd[0] += t * inp_b
                    wr[2] += t * acc_b
                    if not insn.reset:
                        rd[2] += t * acc_b
            elif op in (LOAD, STORE):
                buf = insn.buffer
                y, x = insn.y_size, insn.x_size
                nbytes = y * x * entry_elems[buf] * (ELEM_BITS[insn.elem_bits_code] >> 3)
                cost[i] = -(-nbytes // bpc)
                if op == LOAD:
                    m = 1 if buf == ACC else 0
                    cols = insn.x_pad_left + x + insn.x_pad_right
                    entries = (insn.y_pad_top + y + insn.y_pad_bottom) * cols
                    if buf == ACC:
                        lo = insn.sram_addr
                        drain[i] = (lo, lo + entries - 1, 0, -1)
                    # The DMA writes one entry per cycle in region order: the padding before the
                    # first data entry while the data is on its way, a data entry once its e
                    # beats have arrived; between two rows, the p padding entries while the next
                    # entry's beats arrive; the padding after the last data entry.
                    e = -(-cost[i] // (y * x))
                    pre = insn.y_pad_top * cols + insn.x_pad_left
                    post = insn.x_pad_right + insn.y_pad_bottom * cols
                    p = insn.x_pad_right + insn.x_pad_left
                    tail = y * (x - 1) * e + (y - 1) * (p + 1 if p + 1 > e else e) + post
                    dma[i] = (e, pre, tail, post)
                    wr[buf] += entries * entry_bytes[buf]
                    read += nbytes
                else:
                    m = 2
                    rd[2] += y * x * acc_b
                    written += nbytes
            elif op == ALU:
                m = 1
                kind[i] = 2
                t = insn.outer * insn.inner
                cost[i] = alu_lat + t
                rd[2] += t * acc_b
                wr[2] += t * acc_b
                alu = insn.alu_op
                dlo = insn.dst_addr
                dhi = dlo + (insn.outer - 1) * insn.dst_so + (insn.inner - 1) * insn.dst_si
                slo, shi = 0, -1
                rows = alu_operand_rows(alu, insn.use_imm)
                if rows:
                    rd[2] += rows * t * acc_b
                    slo = insn.src_addr
                    shi = slo + (insn.outer - 1) * insn.src_so + (insn.inner - 1) * insn.src_si
                    shi += rows - 1  # ADD_REQUANT: the multiplier after the bias
                drain[i] = (dlo, dhi, slo, shi)
                if alu not in mul_only:
                    add_lanes += t * C
                if alu in mul_ops:
                    mul_lanes += t * C
            else:
                kind[i] = 2
                if op == SYNC:
                    m = insn.module
                else:  # FINISH
                    m = 1
                    drain[i] = _ALL
            module[i] = m
            if insn.pop_prev or insn.pop_next:
                pops[i] = self._queues(i, insn, m, _POP_Q, "pop")
            if insn.push_prev or insn.push_next:
                pushes[i] = self._queues(i, insn, m, _PUSH_Q, "push")

        # ---- pass 2: time-ordered schedule of the three modules
        mine = ([], [], [])
        for i in range(n):
            mine[module[i]].append(i)
        length = [len(mine[0]), len(mine[1]), len(mine[2])]
        pos = [0, 0, 0]
        free = [0, 0, 0]  # cycle at which each module can start its next instruction
        arr_free = [0] * A
        # accumulator range of the last GEMM of each array (earlier ones are done by then)
        arr_lo = [-1] * A
        arr_hi = [-2] * A
        banks = [acc_bank_range(cfg, b) for b in range(A)]
        bank_lo = [b[0] for b in banks]
        bank_hi = [b[1] for b in banks]
        max_arr = 0  # max(arr_free): when all in-flight GEMMs are done
        port_free = 0  # the DRAM read channel (LOADs)
        pushed = ([], [], [], [])  # release cycle of every token pushed, per queue
        popped = [0, 0, 0, 0]
        stall = [0] * len(STALL_CAUSES)
        busy = [0, 0, 0]
        array_busy = [0] * A
        start = [0] * n
        end = [0] * n
        # Earliest start of each module's next instruction; None: to be recomputed.
        cand = [None, None, None]
        remaining = n
        while remaining:
            for m in (0, 1, 2):
                if cand[m] is None:
                    if pos[m] == length[m]:
                        cand[m] = _INF
                        continue
                    i = mine[m][pos[m]]
                    t = free[m] if free[m] > i + FETCH_CYCLES else i + FETCH_CYCLES
                    for q in pops[i]:
                        k = popped[q]
                        if k == len(pushed[q]):
                            t = _INF
                            break
                        if pushed[q][k] > t:  # noqa: PLR1730 (hot loop: no call)
                            t = pushed[q][k]
                    d = drain[i]
                    if d is not None and max_arr > t:
                        t = _scoreboard(d, t, arr_free, arr_lo, arr_hi, bank_lo, bank_hi)
                    cand[m] = t
            c0, c1, c2 = cand
            if c0 <= c1 and c0 <= c2:
                m = 0
            elif c1 <= c2:
                m = 1
            else:
                m = 2
            if cand[m] == _INF:
                raise self._deadlock(instructions, mine, pos, pops, pushed, popped)
            i = mine[m][pos[m]]
            pos[m] += 1
            remaining -= 1
            cand[m] = None

            # Start: fetched and the module free, then each popped token, then GEMM drain.
            t = free[m] if free[m] > i + FETCH_CYCLES else i + FETCH_CYCLES
            for q in pops[i]:
                pt = pushed[q][popped[q]]
                popped[q] += 1
                if pt > t:
                    stall[_QUEUE_CAUSE[q]] += pt - t
                    t = pt
            d = drain[i]
            if d is not None and max_arr > t:
                ready = _scoreboard(d, t, arr_free, arr_lo, arr_hi, bank_lo, bank_hi)
                stall[_DRAIN] += ready - t
                t = ready

            k = kind[i]
            if k == 0:
                d = dma[i]
                if d is not None:  # LOAD, on the DRAM read channel
                    request = t + DMA_REQUEST_CYCLES + lat  # the first beat, without contention
                    if port_free > request:
                        stall[_PORT] += port_free - request
                        data = port_free
                    else:
                        data = request
                    pre_done = t + DMA_REQUEST_CYCLES + d[1]
                    first = data + d[0] if data + d[0] > pre_done else pre_done
                    last_write = first + d[2]
                    port_free = last_write - d[3]  # the cycle after the last beat
                    e = last_write + LOAD_DONE_CYCLES
                    busy[m] += e - t - (data - request)
                else:
                    # STORE: the write channel is the store module's alone and the module runs
                    # one STORE at a time, so it never waits for the channel
                    e = t + store_fixed + cost[i]
                    busy[m] += e - t
                free[m] = e
                release = e
            elif k == 1:  # GEMM: wait for its array (its bank is its own), issue in one cycle
                a = extra[i]
                ready = arr_free[a]
                lo, hi = acc_lo[i], acc_hi[i]
                if ready > t:
                    stall[_ARRAY] += ready - t
                    t = ready
                arr_lo[a], arr_hi[a] = lo, hi
                e = t + cost[i]
                arr_free[a] = e
                array_busy[a] += cost[i]
                max_arr = max(max_arr, e)
                free[1] = t + 1
                busy[1] += 1
                release = max_arr + 1  # its tokens: pushed when the GEMMs are done (below)
            else:  # ALU, SYNC, FINISH
                e = t + cost[i]
                free[m] = e
                busy[m] += cost[i]
                release = e
            start[i] = t
            end[i] = e
            if pushes[i]:
                if m == 1 and max_arr > release:
                    # compute tokens wait for every GEMM issued so far; pushed in the cycle the
                    # last array is done, popped from the next
                    release = max_arr + 1
                for q in pushes[i]:
                    pushed[q].append(release)
                    cand[_QUEUE_POPPER[q]] = None

        cycles = max(free[0], free[1], free[2], max_arr, max(end, default=0))
        latency_ms = cycles / cfg.clock_mhz / 1e3
        roofline = max(macs / cfg.macs_per_cycle, (read + written) / bpc)
        names = ("inp", "wgt", "acc")
        return TimingResult(
            cycles=cycles,
            latency_ms=latency_ms,
            clock_mhz=float(cfg.clock_mhz),
            busy=dict(zip(MODULES, busy, strict=True)),
            array_busy=np.asarray(array_busy, dtype=np.int64),
            stalls=dict(zip(STALL_CAUSES, stall, strict=True)),
            start=np.asarray(start, dtype=np.int64),
            end=np.asarray(end, dtype=np.int64),
            macs=macs,
            macs_skipped=macs_skipped,
            gemms_skipped=gemms_skipped,
            dram_bytes_read=read,
            dram_bytes_written=written,
            buffer_reads=dict(zip(names, rd, strict=True)),
            buffer_writes=dict(zip(names, wr, strict=True)),
            alu_add_lanes=add_lanes,
            alu_mul_lanes=mul_lanes,
            utilisation=macs / (cfg.macs_per_cycle * cycles) if cycles else 0.0,
            roofline_cycles=float(roofline),
            roofline_fraction=roofline / cycles if cycles else 0.0,
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _zero_flags(instructions, flags) -> list | None:
        """Per-instruction zero-weight flags from per-instruction or per-GEMM flags."""
        if flags is None:
            return None
        flags = list(flags)
        n = len(instructions)
        if len(flags) == n:
            return flags
        gemms = [i for i, insn in enumerate(instructions) if insn.opcode == Opcode.GEMM]
        if len(flags) != len(gemms):
            raise TimingError(
                f"gemm_zero_weights has {len(flags)} flags; expected one per instruction ({n}) "
                f"or one per GEMM ({len(gemms)})"
            )
        out = [False] * n
        for i, flag in zip(gemms, flags, strict=True):
            out[i] = flag
        return out

    @staticmethod
    def _queues(idx, insn, m, table, what) -> tuple:
        out = []
        for flag, q in zip(("prev", "next"), table[m], strict=True):
            if getattr(insn, f"{what}_{flag}"):
                if q < 0:
                    other = "previous" if flag == "prev" else "next"
                    raise TimingError(
                        f"instruction {idx}: the {MODULES[m]} module has no {other} module: "
                        f"{what}_{flag} is illegal"
                    )
                out.append(q)
        return tuple(out)

    @staticmethod
    def _deadlock(instructions, mine, pos, pops, pushed, popped) -> TimingError:
        names = ("load->compute", "compute->load", "compute->store", "store->compute")
        blocked = []
        for m in (0, 1, 2):
            if pos[m] < len(mine[m]):
                i = mine[m][pos[m]]
                empty = [names[q] for q in pops[i] if popped[q] == len(pushed[q])]
                blocked.append(
                    f"the {MODULES[m]} module waits at instruction {i} "
                    f"({instructions[i].opcode.name}) for the {' and '.join(empty)} queue"
                )
        return TimingError("deadlock: " + "; ".join(blocked))
