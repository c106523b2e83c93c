"""FPGA resources of a hardware config: the presets' synthesis counts, or an estimate.

The clock and logic term of the energy model (:mod:`tvm_hapm.runtime.energy`) needs the LUTs,
flip-flops, DSP slices, block RAMs and UltraRAMs the accelerator uses.  For the presets these are
the counts ``benchmarks/rtl.py`` records (Yosys, with the accumulator structure it chose), kept in
one data table, ``tvm_hapm/data/rtl_resources.json``; for any other config, or a preset whose
RTL parameters no longer match the table's, :func:`estimate_resources` computes them from the
config.  :func:`resources_of` picks.

The table is written by ``benchmarks/rtl.py`` (a full run synthesises every preset: minutes and
gigabytes), or from the record of such a run without Yosys::

    python -m tvm_hapm.rtl.resources benchmarks/results/rtl.json

The estimate takes the RTL's structure where it is known and fits the rest to the table:

* DSP slices: two int8 MACs per slice in the arrays (one otherwise), four per ALU lane (the
  32 x 32 multiplier), plus the presets' mean remainder (address arithmetic);
* block RAM (36 Kb): the input buffer once per array, the weight buffer once
  (:func:`tvm_hapm.rtl.synth.block_ram_cost`), plus the presets' mean remainder (the instruction
  queues); all in block RAM, none in UltraRAM;
* LUTs and flip-flops: ``a + b * macs_per_cycle + c * array_cols`` (the arrays, and the ALU's
  lanes and the entry widths), least squares over the presets: with three presets an
  interpolation through them, not a validated model;
* the accumulator: :func:`tvm_hapm.rtl.synth.buffer_costs` of the table's structure, added by
  :func:`tvm_hapm.rtl.synth.with_buffer` (UltraRAM on Zynq UltraScale+).

``tests/test_energy.py`` checks the estimate against every preset's counts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .. import atomic
from ..target.config import PRESETS, HardwareConfig
from .params import RtlConfigError, config_header
from .synth import (
    Resources,
    SynthesisError,
    block_ram_cost,
    buffer_costs,
    with_buffer,
    yosys_family,
)

__all__ = [
    "RESOURCE_TABLE",
    "ResourceCounts",
    "config_fingerprint",
    "estimate_resources",
    "load_resource_table",
    "resources_of",
    "synthesized_resources",
    "table_from_rtl_record",
    "write_resource_table",
]

#: The presets' synthesis counts (see the module docstring).
RESOURCE_TABLE = Path(__file__).resolve().parents[1] / "data" / "rtl_resources.json"
#: The resources of a count, in the table's and :class:`ResourceCounts`' order.
_KINDS = ("lut", "ff", "dsp", "bram36", "uram")
#: DSP slices of one ALU lane: its 32 x 32-bit multiplier (four 25 x 18 slices).
ALU_LANE_DSPS = 4
#: BRAM36 of the three instruction queues (512 x 128 bits, two each).
QUEUE_BRAM36 = 6


@dataclass(frozen=True)
class ResourceCounts:
    """What one accelerator instance uses on its FPGA.

    Attributes
    ----------
    lut, ff, dsp, bram36, uram : float
        LUTs (every use), flip-flops, DSP slices, 36 Kb block RAMs, UltraRAMs.
    source : str
        ``"synthesis"`` (the data table) or ``"estimate"``.
    """

    lut: float
    ff: float
    dsp: float
    bram36: float
    uram: float
    source: str

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in (*_KINDS, "source")}


def config_fingerprint(config: HardwareConfig) -> str | None:
    """A hash of what the RTL is built from: the constants of ``hapm_config.svh`` (comments, which
    name the config, left out) and the Yosys family of the part.  ``None`` for a config the RTL
    does not take."""
    try:
        header = config_header(config)
        family = yosys_family(config.part)
    except (RtlConfigError, SynthesisError):
        return None
    body = "\n".join(line for line in header.splitlines() if not line.startswith("//"))
    return hashlib.sha256(f"{family}\n{body}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the data table
def table_from_rtl_record(record: dict, presets: dict) -> dict:
    """The data table of a ``benchmarks/rtl.py`` record (its ``resources`` and ``meta``).

    Parameters
    ----------
    record : dict
        The JSON of ``benchmarks/results/rtl.json``.
    presets : dict of str to HardwareConfig
        The configs that were synthesised, by name (their fingerprints go into the table).

    Raises
    ------
    ValueError
        If the record has no ``resources`` (a ``--quick`` run) or names an unknown preset.
    """
    if "resources" not in record:
        raise ValueError("the record has no 'resources' (benchmarks/rtl.py without --quick)")
    meta = record.get("resources_meta") or record.get("meta", {})  # when synthesised alone
    table = {
        "about": "Yosys resource counts of the presets (tvm_hapm.rtl.resources); written by "
        "benchmarks/rtl.py or `python -m tvm_hapm.rtl.resources benchmarks/results/rtl.json`",
        "synthesised_at": {"commit": meta.get("commit"), "date": meta.get("date")},
        "presets": {},
    }
    for name, entry in sorted(record["resources"].items()):
        if name not in presets:
            raise ValueError(f"the record's resources name {name!r}, not one of {sorted(presets)}")
        rest = entry["without_accumulator"]
        table["presets"][name] = {
            "fingerprint": config_fingerprint(presets[name]),
            "part": entry["part"],
            "accumulator": entry["accumulator"],
            "total": {k: entry[k] for k in _KINDS},
            "without_accumulator": {k: rest[k] for k in _KINDS},
        }
    return table


def write_resource_table(table: dict, path: Path = RESOURCE_TABLE) -> Path:
    """Write ``table`` (:func:`table_from_rtl_record`) atomically to ``path``."""
    load_resource_table.cache_clear()
    _cached_fit.cache_clear()
    return atomic.write_text(path, json.dumps(table, indent=2, sort_keys=True) + "\n")


@lru_cache(maxsize=4)
def load_resource_table(path: Path = RESOURCE_TABLE) -> dict:
    """The data table (read once per path)."""
    return json.loads(Path(path).read_text())


def synthesized_resources(
    config: HardwareConfig, table: dict | None = None
) -> ResourceCounts | None:
    """The table's counts of the preset named like ``config``, ``None`` unless that preset was
    synthesised from the same RTL parameters (:func:`config_fingerprint`)."""
    entry = (table or load_resource_table())["presets"].get(config.name)
    if entry is None or entry["fingerprint"] != config_fingerprint(config):
        return None
    return ResourceCounts(*(float(entry["total"][k]) for k in _KINDS), source="synthesis")


# ----------------------------------------------------------------------------- the estimate
def _array_dsps(config: HardwareConfig) -> int:
    """DSP slices of the arrays: two MACs per slice when the RTL pairs the columns (int8 and an
    even number of columns, ``hapm_pe2``), else one."""
    pairs = config.act_bits == config.weight_bits == 8 and config.array_cols % 2 == 0
    per_array = config.array_rows * config.array_cols
    return config.num_arrays * (per_array // 2 if pairs else per_array)


def _buffer_bram36(config: HardwareConfig) -> float:
    """Block RAM of the input buffer (one copy per array) and the weight buffer (one copy)."""
    inp = block_ram_cost(config.array_rows * config.act_bits, config.inp_depth)
    wgt = block_ram_cost(
        config.array_rows * config.array_cols * config.weight_bits, config.wgt_depth
    )
    return config.num_arrays * inp + wgt


@dataclass(frozen=True)
class _Fit:
    """What the estimate takes from the table: linear LUT and flip-flop fits and the remainders
    of the DSP and block RAM structure, all without the accumulator."""

    lut: tuple
    ff: tuple
    dsp_rest: float
    bram36_rest: float
    accumulator: str


def _fit(table: dict, presets: dict) -> _Fit:
    known = [(presets[n], e) for n, e in sorted(table["presets"].items()) if n in presets]
    rows = [(cfg, e) for cfg, e in known if e["fingerprint"] == config_fingerprint(cfg)]
    if len({cfg.macs_per_cycle for cfg, _ in rows}) < 2:
        # The RTL changed since the table was written: its counts still say how the resources
        # grow with the arrays (tests/test_rtl_resources.py asks for the table to be refreshed).
        rows = known
    if len({cfg.macs_per_cycle for cfg, _ in rows}) < 2:
        raise ValueError(
            "the resource table has fewer than two presets of different sizes that match their "
            "configs: refresh it (python -m tvm_hapm.rtl.resources benchmarks/results/rtl.json)"
        )
    macs = np.array([cfg.macs_per_cycle for cfg, _ in rows], np.float64)
    lanes = np.array([cfg.array_cols for cfg, _ in rows], np.float64)
    design = np.stack([np.ones_like(macs), macs, lanes], axis=1)

    def line(kind):
        y = np.array([e["without_accumulator"][kind] for _, e in rows], np.float64)
        return tuple(float(c) for c in np.linalg.lstsq(design, y, rcond=None)[0])

    dsp_rest = [
        e["without_accumulator"]["dsp"] - _array_dsps(cfg) - ALU_LANE_DSPS * cfg.array_cols
        for cfg, e in rows
    ]
    # the block RAM remainder from the parts without UltraRAM (where Yosys's split between block
    # RAM and UltraRAM does not enter)
    bram_rest = [
        e["without_accumulator"]["bram36"] - _buffer_bram36(cfg)
        for cfg, e in rows
        if not e["without_accumulator"]["uram"]
    ] or [QUEUE_BRAM36]
    schemes = {e["accumulator"] for _, e in rows}
    return _Fit(
        line("lut"),
        line("ff"),
        float(np.mean(dsp_rest)),
        float(np.mean(bram_rest)),
        sorted(schemes)[0],
    )


@lru_cache(maxsize=8)
def _cached_fit(path: Path) -> _Fit:
    return _fit(load_resource_table(path), PRESETS)


def estimate_resources(
    config: HardwareConfig, accumulator: str | None = None, table_path: Path = RESOURCE_TABLE
) -> ResourceCounts:
    """The resources of ``config`` estimated from its parameters (see the module docstring).

    Parameters
    ----------
    config : HardwareConfig
        Any config.
    accumulator : str, optional
        The accumulator structure (a ``scheme`` of :func:`tvm_hapm.rtl.synth.buffer_costs`);
        default: the one of the presets in the table.
    table_path : Path
        The data table the fits come from.

    Returns
    -------
    ResourceCounts
        ``source="estimate"``.
    """
    fit = _cached_fit(Path(table_path))
    scheme = accumulator or fit.accumulator
    costs = [c for c in buffer_costs(config) if c.buffer == "acc" and c.scheme == scheme]
    if not costs:
        known = sorted({c.scheme for c in buffer_costs(config) if c.buffer == "acc"})
        raise ValueError(f"unknown accumulator structure {scheme!r}; known: {known}")
    macs = config.macs_per_cycle
    try:
        family = yosys_family(config.part)
    except SynthesisError:  # not a Zynq part: no UltraRAM
        family = ""
    lanes = config.array_cols

    def line(coef):
        return max(0, round(coef[0] + coef[1] * macs + coef[2] * lanes))

    rest = Resources(
        lut=line(fit.lut),
        ff=line(fit.ff),
        dsp=_array_dsps(config) + ALU_LANE_DSPS * config.array_cols + round(fit.dsp_rest),
        bram36=_buffer_bram36(config) + fit.bram36_rest,
        family=family,
    )
    total = with_buffer(rest, costs[0])
    return ResourceCounts(
        float(total.lut_total), float(total.ff), float(total.dsp), float(total.bram36),
        float(total.uram), source="estimate",
    )  # fmt: skip


def resources_of(config: HardwareConfig) -> ResourceCounts:
    """The synthesis counts of ``config`` if the table has them (:func:`synthesized_resources`),
    else :func:`estimate_resources`."""
    return synthesized_resources(config) or estimate_resources(config)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tvm_hapm.rtl.resources",
        description="Write the presets' resource table from a benchmarks/rtl.py record.",
    )
    parser.add_argument("record", help="benchmarks/results/rtl.json of a full run")
    parser.add_argument("-o", "--output", default=str(RESOURCE_TABLE))
    args = parser.parse_args(argv)
    table = table_from_rtl_record(json.loads(Path(args.record).read_text()), PRESETS)
    path = write_resource_table(table, Path(args.output))
    for name, entry in table["presets"].items():
        counts = ", ".join(f"{k} {entry['total'][k]:,}" for k in _KINDS)
        print(f"{name}: {counts} ({entry['accumulator']})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
