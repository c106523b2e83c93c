"""Profiles and traces of accelerator runs: per-layer reports, Chrome/Perfetto traces, tables.

The timing model (:mod:`tvm_hapm.runtime.timing`) records when every instruction ran; this
module turns the records of one model run into

* a **profile** (:func:`build_profile`): per layer and in total, cycles and milliseconds, array
  utilisation, the roofline bound and the fraction of it achieved, stall cycles by cause, DRAM
  traffic and energy by component (a JSON-serialisable dict);
* a **trace** (:func:`chrome_trace`) in the Chrome trace event format, which Perfetto
  (https://ui.perfetto.dev) and ``chrome://tracing`` load: one timeline in which the layers run
  one after the other, one track per module (load, compute, store) and one per systolic array;
  every instruction is a complete event (``"ph": "X"``) with its disassembly in ``args``;
* a **table** (:func:`profile_table`) for the terminal (rich).

Example
-------
.. code-block:: python

    with tvm_hapm.runtime.profile():
        vm["main"](x)
    stats = tvm_hapm.runtime.last_run_stats()
    report = build_profile(stats)
    trace = chrome_trace(stats.traces)
    rich.print(profile_table(report))
"""

from __future__ import annotations

from ..target import isa
from ..target.isa import Buffer, Opcode
from .timing import MODULES, STALL_CAUSES

__all__ = [
    "STALL_GROUPS",
    "TRACE_ARRAY_TID",
    "build_profile",
    "chrome_trace",
    "layer_profile",
    "profile_table",
]

#: Stall causes grouped by what the waiting module waits for.
STALL_GROUPS = {
    "waiting_on_load": ("compute_wait_load",),
    "waiting_on_compute": ("load_wait_compute", "store_wait_compute", "gemm_drain", "array_busy"),
    "waiting_on_store": ("compute_wait_store",),
    "waiting_on_dram_port": ("dram_port",),
}

#: Thread id of array ``a`` in a trace is ``TRACE_ARRAY_TID + a``; modules are 1, 2, 3.
TRACE_ARRAY_TID = 10
_LAYER_TID = 0


def _grouped(stalls: dict) -> dict:
    return {g: sum(stalls.get(c, 0) for c in causes) for g, causes in STALL_GROUPS.items()}


def layer_profile(stats, trace=None) -> dict:
    """The profile of one layer.

    Parameters
    ----------
    stats : ExecutionStats
        The layer's run statistics (run with timing).
    trace : LayerTrace, optional
        Its cycle-level record (:func:`tvm_hapm.runtime.profile`); adds the roofline bounds,
        busy cycles per module and array, and energy by component.

    Returns
    -------
    dict
        ``layer, kind, instructions, macs, cycles, latency_ms, utilisation, roofline_fraction,
        roofline_cycles, bound, compute_bound_cycles, memory_bound_cycles, stall_cycles, stalls,
        stalls_by_wait, dram_bytes_read, dram_bytes_written, dram_bytes, energy_uj`` and, with a
        trace, ``busy``, ``array_busy`` and ``energy`` (by component).
    """
    out = {
        "layer": stats.layer,
        "instructions": stats.instructions,
        "macs": stats.macs,
        "cycles": stats.cycles,
        "latency_ms": stats.latency_ms,
        "utilisation": stats.utilisation,
        "roofline_fraction": stats.roofline_fraction,
        "roofline_cycles": stats.roofline_fraction * stats.cycles,
        "stall_cycles": stats.stall_cycles,
        "stalls": {c: int(stats.stalls.get(c, 0)) for c in STALL_CAUSES},
        "stalls_by_wait": _grouped(stats.stalls),
        "dram_bytes_read": stats.dram_bytes_read,
        "dram_bytes_written": stats.dram_bytes_written,
        "dram_bytes": stats.dram_bytes,
        "energy_uj": stats.energy_uj,
    }
    if trace is not None:
        t = trace.timing
        cfg = trace.program.config
        out["kind"] = trace.program.info.get("kind", "")
        compute = t.macs / cfg.macs_per_cycle
        memory = t.dram_bytes / cfg.dram_bytes_per_cycle
        out["roofline_cycles"] = t.roofline_cycles
        out["compute_bound_cycles"] = compute
        out["memory_bound_cycles"] = memory
        out["bound"] = "compute" if compute >= memory else "memory"
        out["busy"] = dict(t.busy)
        out["array_busy"] = [int(v) for v in t.array_busy]
        out["energy"] = trace.energy.to_dict()
    return out


def build_profile(run_stats, config=None) -> dict:
    """Per-layer and total profile of a model run.

    Parameters
    ----------
    run_stats : RunStats
        :func:`tvm_hapm.runtime.last_run_stats` after a run; its ``traces`` (filled under
        :func:`tvm_hapm.runtime.profile`) add the roofline bounds and energy components.
    config : HardwareConfig, optional
        Recorded in the profile (default: the config of the first traced program).

    Returns
    -------
    dict
        ``{"config": ..., "clock_mhz": ..., "layers": [...], "total": {...}}``.  The total's
        cycles, latency, stalls, DRAM bytes and energy are sums over the layers (they run one
        after the other); its utilisation and roofline fraction are ``sum(x_i * cycles_i) /
        sum(cycles_i)``, i.e. ``sum(bound_i) / sum(cycles_i)`` for the roofline.
    """
    from .simulator import ExecutionStats

    traces = list(run_stats.traces)
    if traces and len(traces) != len(run_stats.layers):
        raise ValueError(
            f"{len(run_stats.layers)} layers but {len(traces)} traces: profile the whole run"
        )
    layers = [
        layer_profile(s, traces[i] if traces else None) for i, s in enumerate(run_stats.layers)
    ]
    total = layer_profile(ExecutionStats.total(run_stats.layers, layer="total"))
    total["layers"] = len(layers)
    if traces:
        total["kind"] = ""
        for key in ("compute_bound_cycles", "memory_bound_cycles", "roofline_cycles"):
            total[key] = sum(row[key] for row in layers)
        total["roofline_fraction"] = total["roofline_cycles"] / total["cycles"] if layers else 0.0
        total["busy"] = {m: sum(row["busy"][m] for row in layers) for m in MODULES}
        total["energy"] = {k: sum(row["energy"][k] for row in layers) for k in layers[0]["energy"]}
        if config is None:
            config = traces[0].program.config
    out = {"layers": layers, "total": total}
    if config is not None:
        out = {"config": config.to_dict(), "clock_mhz": float(config.clock_mhz), **out}
    return out


# ---------------------------------------------------------------------------------- trace
def _thread_events(pid: int, tid: int, name: str, order: int) -> list:
    meta = {"ph": "M", "pid": pid, "tid": tid}
    return [
        {**meta, "name": "thread_name", "args": {"name": name}},
        {**meta, "name": "thread_sort_index", "args": {"sort_index": order}},
    ]


def chrome_trace(traces, max_events: int | None = None, pid: int = 1) -> dict:
    """A Chrome trace (JSON object format) of the layers of one run, one after the other.

    Parameters
    ----------
    traces : list of LayerTrace
        ``last_run_stats().traces`` of a run made under :func:`tvm_hapm.runtime.profile`.
    max_events : int, optional
        Stop adding instruction events once this many were written (the layer spans are always
        written); ``otherData.truncated`` then says so.  ``None``: no limit.
    pid : int
        Process id of the accelerator in the trace.

    Returns
    -------
    dict
        ``{"traceEvents": [...], "displayTimeUnit": "ns", "otherData": {...}}``.  Times are in
        microseconds at the config clock (``ts = cycle / clock_mhz``); ``args.cycles`` holds the
        exact start cycle and duration.  Tracks (``tid``): 0 the layers, 1 load, 2 compute,
        3 store, ``10 + a`` systolic array ``a``.  A GEMM is an issue event of one cycle on the
        compute track and its array interval on the array's track; a LOAD or STORE lasts from
        its request to its last beat (padding included) on the module that executes it.
    """
    events: list = []
    if not traces:
        return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"cycles": 0}}
    cfg = traces[0].program.config
    mhz = float(cfg.clock_mhz)
    events.append(
        {"ph": "M", "pid": pid, "tid": 0, "name": "process_name",
         "args": {"name": f"hapm_fpga ({cfg.name}, {mhz:g} MHz)"}}
    )  # fmt: skip
    events += _thread_events(pid, _LAYER_TID, "layers", 0)
    for m, name in enumerate(MODULES):
        events += _thread_events(pid, m + 1, f"{name} module", m + 1)
    arrays = max(t.program.config.num_arrays for t in traces)
    for a in range(arrays):
        events += _thread_events(pid, TRACE_ARRAY_TID + a, f"array {a}", TRACE_ARRAY_TID + a)

    GEMM, LOAD, STORE, SYNC = Opcode.GEMM, Opcode.LOAD, Opcode.STORE, Opcode.SYNC
    offset = 0
    written = 0
    truncated = False
    for li, tr in enumerate(traces):
        prog, timing = tr.program, tr.timing
        cycles = int(timing.cycles)
        events.append(
            {"ph": "X", "pid": pid, "tid": _LAYER_TID, "name": prog.layer, "cat": "layer",
             "ts": offset / mhz, "dur": cycles / mhz,
             "args": {"layer_index": li, "cycles": cycles, "start_cycle": offset,
                      "instructions": len(prog.instructions)}}
        )  # fmt: skip
        if max_events is not None and written + 2 * len(prog.instructions) > max_events:
            truncated = True
        else:
            starts = timing.start.tolist()
            ends = timing.end.tolist()
            for i, insn in enumerate(prog.instructions):
                op = insn.opcode
                s, e = starts[i], ends[i]
                text = isa.disassemble(insn)
                if op == GEMM:
                    events.append(
                        {"ph": "X", "pid": pid, "tid": 2, "name": "GEMM issue", "cat": "compute",
                         "ts": (offset + s) / mhz, "dur": 1 / mhz,
                         "args": {"layer": prog.layer, "insn": i, "cycle": s, "cycles": 1,
                                  "disasm": text}}
                    )  # fmt: skip
                    tid = TRACE_ARRAY_TID + insn.array
                    cat = "array"
                    written += 1
                else:
                    if op == LOAD:
                        m = 1 if insn.buffer == Buffer.ACC else 0
                    elif op == STORE:
                        m = 2
                    elif op == SYNC:
                        m = int(insn.module)
                    else:
                        m = 1
                    tid = m + 1
                    cat = MODULES[m]
                events.append(
                    {"ph": "X", "pid": pid, "tid": tid, "name": op.name, "cat": cat,
                     "ts": (offset + s) / mhz, "dur": (e - s) / mhz,
                     "args": {"layer": prog.layer, "insn": i, "cycle": s, "cycles": e - s,
                              "disasm": text}}
                )  # fmt: skip
                written += 1
        offset += cycles
    return {
        "traceEvents": events,
        "displayTimeUnit": "ns",
        "otherData": {
            "config": cfg.name,
            "clock_mhz": mhz,
            "cycles": offset,
            "layers": len(traces),
            "instruction_events": written,
            "truncated": truncated,
        },
    }


# ---------------------------------------------------------------------------------- table
def profile_table(profile: dict, title: str = "Accelerator profile"):
    """A rich table of a profile: one row per layer and the total."""
    from rich.table import Table

    table = Table(title=title)
    columns = (
        "layer", "cycles", "ms", "util", "roofline", "bound", "wait load", "wait compute",
        "wait store", "DRAM KiB", "µJ",
    )  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("layer", "bound") else "right")

    def add(row, style=None):
        waits = row["stalls_by_wait"]
        table.add_row(
            row["layer"],
            f"{row['cycles']:,}",
            f"{row['latency_ms']:.3f}",
            f"{row['utilisation']:.0%}",
            f"{row['roofline_fraction']:.0%}",
            row.get("bound", ""),
            f"{waits['waiting_on_load']:,}",
            f"{waits['waiting_on_compute']:,}",
            f"{waits['waiting_on_store']:,}",
            f"{row['dram_bytes'] / 1024:,.1f}",
            f"{row['energy_uj']:,.1f}",
            style=style,
        )

    for row in profile["layers"]:
        add(row)
    if profile["layers"]:
        table.add_section()
        add(profile["total"], style="bold")
    return table
