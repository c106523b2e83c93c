"""FPGA resources of the RTL: Yosys synthesis of one hardware config for its Xilinx part.

:func:`synthesize` writes the config's ``hapm_config.svh``, runs Yosys 0.23 on the sources of
``hdl/`` (``synth_xilinx -family xc7`` for Zynq-7000, ``-family xcup`` for Zynq UltraScale+,
chosen from ``config.part``) and returns the :class:`Resources` it maps to: LUTs (logic, as
distributed RAM, as shift registers), flip-flops, DSP slices, block RAM in 36 Kb equivalents and
UltraRAM.  :data:`PART_BUDGETS` holds what each preset's part has, from Xilinx's data sheets, and
:meth:`Resources.fits` compares the two.  Yosys keeps the module hierarchy by default, so a
module instantiated many times (the PEs, the arrays) is mapped once.

The counts are Yosys's mapping, not Vivado's (whose optimisation and packing differ, LUTs
especially); timing (Fmax) cannot be checked without the vendor tools.

:func:`buffer_costs` is the analysis that chose the accumulator's structure: the block RAM
each port structure the RTL could use would take (one copy per read port, a live-value table or
XOR copies for several write ports, banks), computed from the primitives' shapes.  The RTL's
accumulator is banked by array (``hapm_acc_buf``: array ``k`` accumulates into bank ``k``, three
two-port copies per bank), so Yosys maps the whole design, accumulator included, to block RAM
and UltraRAM.  ``python -m tvm_hapm.rtl.synth <config>`` prints the synthesis and that table.

Example
-------
.. code-block:: python

    from tvm_hapm.rtl.synth import synthesize, part_budget
    res = synthesize(get_config("zedboard"), timeout=1800)
    print(res.summary(part_budget("xc7z020clg484-1")))
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..target.config import HardwareConfig
from .build import RtlToolError, hdl_sources, require_tool
from .params import config_header

__all__ = [
    "PART_BUDGETS",
    "RTL_ACCUMULATOR",
    "BufferCost",
    "PartBudget",
    "Resources",
    "SynthesisError",
    "block_ram_cost",
    "buffer_costs",
    "parse_stat",
    "part_budget",
    "prefers_uram",
    "synthesize",
    "ultra_ram_cost",
    "with_buffer",
    "yosys_family",
]


class SynthesisError(RtlToolError):
    """Yosys failed, timed out, or the part is not one this module knows."""


# ----------------------------------------------------------------------------- part budgets
@dataclass(frozen=True)
class PartBudget:
    """The programmable-logic resources of one FPGA device.

    Attributes
    ----------
    device : str
        The device name without package and speed grade (``xc7z020``).
    family : str
        Yosys's ``synth_xilinx -family`` for it (``xc7``, ``xcup``).
    lut, ff, dsp : int
        CLB LUTs, CLB flip-flops, DSP slices.
    bram36 : int
        36 Kb block RAMs (each can be two 18 Kb RAMs).
    uram : int
        288 Kb UltraRAMs (0 on Zynq-7000).
    source : str
        The data sheet the numbers come from.
    """

    device: str
    family: str
    lut: int
    ff: int
    dsp: int
    bram36: int
    uram: int
    source: str


# Zynq-7000: Xilinx DS190, "Zynq-7000 SoC Data Sheet: Overview", table "Zynq-7000 SoC Family
# Description" (programmable logic: LUTs, flip-flops, 36 Kb block RAMs, DSP slices).
# Zynq UltraScale+: Xilinx DS891, "Zynq UltraScale+ MPSoC Data Sheet: Overview", EV devices
# table (CLB LUTs, CLB flip-flops, block RAM blocks, UltraRAM blocks, DSP slices).
_DS190 = "Xilinx DS190 (Zynq-7000 SoC overview), family table"
_DS891 = "Xilinx DS891 (Zynq UltraScale+ MPSoC overview), EV device table"
PART_BUDGETS: dict[str, PartBudget] = {
    b.device: b
    for b in (
        PartBudget("xc7z010", "xc7", 17_600, 35_200, 80, 60, 0, _DS190),
        PartBudget("xc7z020", "xc7", 53_200, 106_400, 220, 140, 0, _DS190),
        PartBudget("xczu7ev", "xcup", 230_400, 460_800, 1_728, 312, 96, _DS891),
    )
}

#: Yosys family of a device-name prefix.
_FAMILIES = (("xc7z", "xc7"), ("xczu", "xcup"))


def yosys_family(part: str) -> str:
    """``synth_xilinx -family`` for a Xilinx part name: ``xc7`` for Zynq-7000 (``xc7z*``),
    ``xcup`` for Zynq UltraScale+ (``xczu*``).

    Raises
    ------
    SynthesisError
        For any other part (or none).
    """
    name = part.lower().strip()
    for prefix, family in _FAMILIES:
        if name.startswith(prefix):
            return family
    raise SynthesisError(
        f"cannot synthesise for part {part!r}: tvm_hapm.rtl.synth knows Zynq-7000 (xc7z*, "
        "Yosys family xc7) and Zynq UltraScale+ (xczu*, family xcup) parts only; set the "
        "config's 'part'"
    )


def part_budget(part: str) -> PartBudget:
    """The resources of ``part`` (``xc7z020clg484-1`` and ``xc7z020`` both work).

    Raises
    ------
    SynthesisError
        If the device is not in :data:`PART_BUDGETS`.
    """
    yosys_family(part)
    match = re.match(r"(xc7z\d+|xczu\d+[a-z]{2})", part.lower().strip())
    if match is None or match.group(1) not in PART_BUDGETS:
        raise SynthesisError(
            f"no resource budget for part {part!r}: known devices are "
            f"{sorted(PART_BUDGETS)} (tvm_hapm.rtl.synth.PART_BUDGETS)"
        )
    return PART_BUDGETS[match.group(1)]


# ----------------------------------------------------------------------------- cell counts
#: LUTs a distributed-RAM primitive occupies (UG474 and UG574, "distributed RAM").
_LUTRAM_LUTS = {
    "RAM16X1S": 1, "RAM32X1S": 1, "RAM64X1S": 1, "RAM128X1S": 2, "RAM256X1S": 4,
    "RAM512X1S": 8, "RAM16X1D": 2, "RAM32X1D": 2, "RAM64X1D": 2, "RAM128X1D": 4,
    "RAM256X1D": 8, "RAM32M": 4, "RAM64M": 4, "RAM32M16": 8, "RAM64M8": 8, "RAM64X8SW": 8,
    "RAM32X16DR8": 8,
}  # fmt: skip
_SRL = {"SRL16E", "SRLC16E", "SRLC32E"}
_LUT = {f"LUT{k}" for k in range(1, 7)}
_FF = {"FDRE", "FDSE", "FDCE", "FDPE", "LDCE", "LDPE"}
_DSP = {"DSP48E1", "DSP48E2"}
_BRAM36 = {"RAMB36E1": 1.0, "RAMB36E2": 1.0, "RAMB18E1": 0.5, "RAMB18E2": 0.5,
           "FIFO36E1": 1.0, "FIFO36E2": 1.0, "FIFO18E1": 0.5, "FIFO18E2": 0.5}  # fmt: skip
_URAM = {"URAM288", "URAM288_BASE"}
#: Primitives that are neither counted nor a sign of unmapped logic.
_OTHER_PRIMITIVES = {
    "CARRY4", "CARRY8", "MUXF7", "MUXF8", "MUXF9", "BUFG", "BUFGCTRL", "IBUF", "OBUF", "IOBUF",
    "INV", "GND", "VCC",
}  # fmt: skip


def _base_type(cell: str) -> str:
    """``FDRE_1`` (an inverted-clock variant) counts as ``FDRE``."""
    return cell[:-2] if cell.endswith("_1") else cell


@dataclass(frozen=True)
class Resources:
    """What a synthesised design uses.

    Attributes
    ----------
    lut : int
        LUTs used as logic.
    lutram : int
        LUTs used as distributed RAM.
    srl : int
        LUTs used as shift registers.
    ff : int
        Flip-flops.
    dsp : int
        DSP slices (DSP48E1 / DSP48E2).
    bram36 : float
        Block RAM in 36 Kb equivalents (an 18 Kb RAM is 0.5).
    uram : int
        UltraRAMs.
    cells : dict
        Every cell type of the design and its count (hierarchy included).
    unmapped : dict
        Cell types that are no Xilinx primitive: black boxes and logic Yosys did not map.
    family : str
        The Yosys family it was mapped for.
    top : str
        The top module.
    seconds : float
        Yosys's run time (0 for a parsed text).
    """

    lut: int = 0
    lutram: int = 0
    srl: int = 0
    ff: int = 0
    dsp: int = 0
    bram36: float = 0.0
    uram: int = 0
    cells: dict = field(default_factory=dict)
    unmapped: dict = field(default_factory=dict)
    family: str = ""
    top: str = ""
    seconds: float = 0.0

    @property
    def lut_total(self) -> int:
        """LUTs of every use (logic, RAM, shift registers): what a part's LUT count limits."""
        return self.lut + self.lutram + self.srl

    def usage(self, budget: PartBudget) -> dict[str, tuple[float, int]]:
        """``{resource: (used, available)}`` for LUT, FF, DSP, BRAM36 and URAM."""
        return {
            "LUT": (self.lut_total, budget.lut),
            "FF": (self.ff, budget.ff),
            "DSP": (self.dsp, budget.dsp),
            "BRAM36": (self.bram36, budget.bram36),
            "URAM": (self.uram, budget.uram),
        }

    def over_budget(self, budget: PartBudget) -> list[str]:
        """The resources of which the design uses more than ``budget`` has."""
        return [name for name, (used, have) in self.usage(budget).items() if used > have]

    def fits(self, budget: PartBudget) -> bool:
        """Whether every resource is within ``budget`` (and nothing is left unmapped)."""
        return not self.over_budget(budget) and not self.unmapped

    def summary(self, budget: PartBudget | None = None) -> str:
        """One line per resource, with the budget's share when given."""
        lines = [f"{self.top} ({self.family}), Yosys {self.seconds:.0f} s"]
        for name, (used, have) in self.usage(budget or _NO_BUDGET).items():
            share = f" / {have:,} ({100 * used / have:.0f}%)" if budget and have else ""
            lines.append(f"  {name:6s} {used:>10,.1f}{share}".replace(".0 ", " "))
        lines.append(f"  (LUT: {self.lut:,} logic, {self.lutram:,} RAM, {self.srl:,} SRL)")
        if self.unmapped:
            lines.append(f"  not mapped: {self.unmapped}")
        return "\n".join(lines)


_NO_BUDGET = PartBudget("-", "-", 0, 0, 0, 0, 0, "-")


def _from_cells(cells: Mapping[str, int], **info) -> Resources:
    counts = dict(lut=0, lutram=0, srl=0, ff=0, dsp=0, bram36=0.0, uram=0)
    unmapped = {}
    for cell, n in cells.items():
        base = _base_type(cell)
        if base in _LUT:
            counts["lut"] += n
        elif base in _LUTRAM_LUTS:
            counts["lutram"] += n * _LUTRAM_LUTS[base]
        elif base in _SRL:
            counts["srl"] += n
        elif base in _FF:
            counts["ff"] += n
        elif base in _DSP:
            counts["dsp"] += n
        elif base in _BRAM36:
            counts["bram36"] += n * _BRAM36[base]
        elif base in _URAM:
            counts["uram"] += n
        elif base not in _OTHER_PRIMITIVES:
            unmapped[cell] = n
    return Resources(**counts, cells=dict(cells), unmapped=unmapped, **info)


_TEXT_CELL = re.compile(r"^\s+(\S+)\s+(\d+)\s*$")


def _cells_of_json(text: str) -> dict[str, int] | None:
    """The cell counts of ``stat -json``, or ``None`` if the text is not valid JSON (Yosys 0.23
    writes the hierarchy of a design more than two levels deep into its JSON as plain text)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if "design" in data:
        return dict(data["design"].get("num_cells_by_type", {}))
    cells: dict[str, int] = {}
    for module in data.get("modules", {}).values():
        for cell, n in module.get("num_cells_by_type", {}).items():
            cells[cell] = cells.get(cell, 0) + n
    return cells


def _cells_of_text(text: str) -> dict[str, int]:
    """The last "Number of cells" block of a plain ``stat`` report: the design hierarchy's
    totals when the design has a hierarchy, else the one module's."""
    blocks: list[dict[str, int]] = []
    inside = False
    for line in text.splitlines():
        if "Number of cells:" in line:
            blocks.append({})
            inside = True
        elif inside and (m := _TEXT_CELL.match(line)):
            blocks[-1][m.group(1)] = int(m.group(2))
        else:
            inside = False
    if not blocks:
        raise SynthesisError("no cell counts in the Yosys stat report")
    return blocks[-1]


def parse_stat(text: str, family: str = "", top: str = "", seconds: float = 0.0) -> Resources:
    """The :class:`Resources` of Yosys's ``stat`` report.

    ``text`` is the plain report (its last "Number of cells" block counts: the design
    hierarchy's totals, or the one module's) or well-formed ``stat -json`` output (its
    ``design`` section).

    Raises
    ------
    SynthesisError
        If the text holds no cell counts.
    """
    cells = _cells_of_json(text) if text.lstrip().startswith("{") else None
    if cells is None:
        cells = _cells_of_text(text)
    return _from_cells(cells, family=family, top=top, seconds=seconds)


# ----------------------------------------------------------------------------- running Yosys
def synthesize(
    config: HardwareConfig,
    top: str = "hapm_top",
    timeout: float = 3600.0,
    blackbox: Iterable[str] = (),
    flatten: bool = False,
    family: str | None = None,
) -> Resources:
    """Synthesise ``config``'s RTL (or one module of it) for its part with Yosys.

    Parameters
    ----------
    config : HardwareConfig
        The accelerator; its ``part`` chooses the Yosys family.
    top : str
        The top module: ``hapm_top`` (the accelerator) or any module of ``hdl/``
        (``hapm_pe``, ``hapm_systolic``, ``hapm_gemm``, ``hapm_alu``, ...).
    timeout : float
        Seconds Yosys may run; it is killed after that.
    blackbox : iterable of str
        Modules to set aside (counted as unmapped cells, not synthesised), e.g.
        ``("hapm_acc_buf",)`` to see the design without its accumulator.
    flatten : bool
        Flatten the hierarchy first (slower on big arrays: every PE is mapped on its own).
    family : str, optional
        Override the family derived from ``config.part``.

    Returns
    -------
    Resources
        Totals over the hierarchy under ``top``.

    Raises
    ------
    SynthesisError
        If the part is unknown, Yosys fails or runs out of time.
    RtlToolError
        If Yosys is not installed.
    """
    family = family or yosys_family(config.part)
    header = config_header(config)
    yosys = require_tool("yosys")
    options = "-noiopad -noclkbuf" + (" -flatten" if flatten else "")
    if family == "xcup":
        options += " -uram"
    with tempfile.TemporaryDirectory(prefix="hapm-synth-") as tmp:
        work = Path(tmp)
        (work / "hapm_config.svh").write_text(header)
        sources = " ".join(str(p) for p in hdl_sources())
        script = [f"read_verilog -sv -I{work} {sources}"]
        script += [f"blackbox {name}" for name in blackbox]
        script += [
            f"synth_xilinx -family {family} -top {top} {options}",
            f"tee -q -o {work / 'stat.txt'} stat",
        ]
        (work / "synth.ys").write_text("\n".join(script) + "\n")
        log = work / "yosys.log"
        start = time.monotonic()
        with subprocess.Popen(
            [yosys, "-q", "-l", str(log), "-s", str(work / "synth.ys")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: a timeout ends yosys-abc too
            env={**os.environ, "TMPDIR": str(work)},  # and ABC's scratch folders go with it
        ) as proc:
            try:
                _, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise SynthesisError(
                    f"Yosys did not finish synthesising {top} of config {config.name!r} in "
                    f"{timeout:.0f} s (a memory Yosys maps to flip-flops? see blackbox=)"
                ) from None
        seconds = time.monotonic() - start
        if proc.returncode != 0 or not (work / "stat.txt").exists():
            text = (stderr or "") + (log.read_text() if log.exists() else "")
            errors = [line for line in text.splitlines() if line.startswith("ERROR")]
            raise SynthesisError(
                f"Yosys failed on {top} of config {config.name!r} (exit {proc.returncode}):\n"
                + ("\n".join(errors) or text[-3000:])
            )
        return parse_stat((work / "stat.txt").read_text(), family, top, seconds)


# ----------------------------------------------------------------------------- buffer costs
#: The :func:`buffer_costs` structure the RTL's accumulator (``hapm_acc_buf``) has.
RTL_ACCUMULATOR = "banked by array (the RTL)"

#: Simple-dual-port shapes (depth, width) of a 36 Kb and an 18 Kb block RAM: the same on
#: 7-series (UG473) and UltraScale (UG573).  An UltraRAM is 4K x 72 (UG573).
_BRAM36_SHAPES = ((32768, 1), (16384, 2), (8192, 4), (4096, 9), (2048, 18), (1024, 36), (512, 72))
_BRAM18_SHAPES = ((16384, 1), (8192, 2), (4096, 4), (2048, 9), (1024, 18), (512, 36))
_URAM_DEPTH, _URAM_WIDTH = 4096, 72


def block_ram_cost(width: int, depth: int) -> float:
    """36 Kb block RAMs (an 18 Kb one counts 0.5) of one ``width`` x ``depth`` memory with one
    write and one read port: columns of the one primitive shape that costs least, as Yosys maps
    the buffers of the presets (Vivado may mix shapes and save a little)."""
    shapes = [(d, w, 1.0) for d, w in _BRAM36_SHAPES] + [(d, w, 0.5) for d, w in _BRAM18_SHAPES]
    return min(math.ceil(depth / d) * math.ceil(width / w) * unit for d, w, unit in shapes)


def ultra_ram_cost(width: int, depth: int) -> int:
    """UltraRAMs of one ``width`` x ``depth`` memory with one write and one read port."""
    return math.ceil(depth / _URAM_DEPTH) * math.ceil(width / _URAM_WIDTH)


@dataclass(frozen=True)
class BufferCost:
    """The memory one buffer needs under one port structure.

    Attributes
    ----------
    buffer : str
        ``inp``, ``wgt`` or ``acc``.
    scheme : str
        The structure (see :func:`buffer_costs`).
    copies : int
        Memories of one write and one read port it is made of.
    bram36 : float
        Their cost in 36 Kb block RAMs.
    uram : int
        Their cost in UltraRAMs instead (UltraScale+ only; 0 otherwise).
    ff : int
        Flip-flops of the structure (a live-value table, or the whole memory).
    lut : int
        LUTs of its multiplexers and XORs, estimated: a LUT6 selects one of four inputs (one
        more LUT per three more inputs) or XORs six.
    exact : bool
        Whether it implements the RTL's ports as they are: the same ISA and the same cycles
        (``False``: a lower bound, or it needs a change of the ISA contract or of the timing).
    note : str
        What it takes.
    """

    buffer: str
    scheme: str
    copies: int
    bram36: float
    uram: int
    ff: int
    lut: int
    exact: bool
    note: str


def buffer_costs(config: HardwareConfig) -> list[BufferCost]:
    """The block RAM (and UltraRAM) of the buffers of ``config`` under each port structure.

    Every structure is built of memories with one write and one read port (a block RAM in
    simple-dual-port mode), each holding a whole buffer or a bank of it:

    * ``inp``, ``copy per read port``: ``num_arrays`` copies, written together (what Yosys
      infers from ``hapm_ram``);
    * ``wgt``, ``one copy``: one read port serves every array (an array reads its block only in
      the cycle after its GEMM issues, and one GEMM issues per cycle);
    * ``acc`` (``1 + A`` write ports: compute, arrays; ``4 + A`` read ports: store, ALU x 3,
      arrays):

      - ``flip-flops``: what Yosys makes of ``hapm_ram``, every bit a flip-flop;
      - ``copy per read port``: ``4 + A`` copies: serves one writer only, a lower bound;
      - ``live-value table``: a copy per (write port, read port) pair and a table of which
        writer wrote each entry last (``ceil(log2(1 + A))`` flip-flops per entry; LaForest and
        Steffan, FPGA 2010);
      - ``XOR multiport``: ``(1 + A) x (A + 4 + A)`` copies, no table (LaForest et al., FPGA
        2012);
      - ``banked by array``: ``A`` banks of ``acc_depth / A`` entries, GEMMs on array ``k`` only
        into bank ``k`` (an ISA change); per bank two writers (array ``k``, compute) and five
        readers (array ``k``, store, ALU x 3) through a live-value table: ``10 A`` bank copies;
      - ``banked, compute waits``: as above, the compute module's writes to a bank wait while
        its array writes (a timing change too): ``5 A`` bank copies;
      - ``banked by array (the RTL)``: as above, and the ALU reads two operands a cycle (its
        destination through the array's copy, its source through one of its own; ADD_REQUANT's
        multiplier once, before its loop), the store through a third: ``3 A`` bank copies.
        :data:`RTL_ACCUMULATOR`, what ``hapm_acc_buf`` is;
      - ``interleaved banks``: the ISA unchanged, ``B`` banks interleaved by address (``B``, a
        power of two, at least the ``2 A + 5`` ports), one copy each; two accesses to one bank
        in a cycle stall (a timing change, which the compiler's placement can avoid).

    ``exact`` is true for the structures that keep the ISA and the RTL's cycles as they are.
    """
    A, D = config.num_arrays, config.acc_depth
    W = config.array_cols * config.acc_bits
    xcup = yosys_family(config.part) == "xcup" if config.part else False

    def mux(n: int) -> int:  # LUT6s of an n-to-1 multiplexer of one bit
        return 0 if n <= 1 else math.ceil((n - 1) / 3)

    def xor(n: int) -> int:  # LUT6s of an n-input XOR
        return 0 if n <= 1 else math.ceil((n - 1) / 5)

    def cost(buf, scheme, copies, width, depth, exact, note, ff=0, lut=0):
        return BufferCost(
            buf,
            scheme,
            copies,
            copies * block_ram_cost(width, depth),
            copies * ultra_ram_cost(width, depth) if xcup else 0,
            ff,
            lut,
            exact,
            note,
        )

    inp_w = config.array_rows * config.act_bits
    wgt_w = config.array_rows * config.array_cols * config.weight_bits
    nw, nr = 1 + A, 4 + A
    lvt_bits = max(1, math.ceil(math.log2(nw)))
    bank = max(1, D // A)
    banks = 1 << math.ceil(math.log2(2 * A + 5))
    return [
        cost("inp", "copy per read port", A, inp_w, config.inp_depth, True, "one per array"),
        cost("wgt", "one copy", 1, wgt_w, config.wgt_depth, True, "the issuing array reads"),
        cost("acc", "flip-flops", 0, W, D, True, "Yosys's mapping of hapm_ram",
             ff=D * W, lut=nr * W * mux(D)),
        cost("acc", "copy per read port", nr, W, D, False, "one writer only: a lower bound"),
        cost("acc", "live-value table", nw * nr, W, D, True,
             f"{nw} x {nr} copies + a {D} x {lvt_bits}-bit table",
             ff=D * lvt_bits, lut=nr * (W * mux(nw) + lvt_bits * mux(D))),
        cost("acc", "XOR multiport", nw * (nw - 1 + nr), W, D, True,
             f"{nw} x {nw - 1 + nr} copies", lut=(nr + nw) * W * xor(nw)),
        cost("acc", "banked by array", 10 * A, W, bank, False,
             "ISA: array k accumulates in bank k", ff=D, lut=(4 * mux(A) + 5 * A) * W),
        cost("acc", "banked, compute waits", 5 * A, W, bank, False,
             "ISA: array k in bank k; timing: compute writes wait", lut=4 * W * mux(A)),
        cost("acc", RTL_ACCUMULATOR, 3 * A, W, bank, False,
             "ISA: array k in bank k, one multiplier per ADD_REQUANT; timing: compute waits",
             lut=2 * W * mux(A)),
        cost("acc", "interleaved banks", banks, W, max(1, D // banks), False,
             f"timing: {banks} banks, a bank conflict stalls",
             lut=W * (nr * mux(banks) + banks * mux(nw))),
    ]  # fmt: skip


def prefers_uram(cost: BufferCost, family: str) -> bool:
    """Whether a buffer of ``cost`` takes less silicon in UltraRAM than in block RAM on
    ``family`` (an UltraRAM counted as eight BRAM36, as in 36 Kb terms): where Yosys's mapping
    puts it, and where :func:`with_buffer` adds it."""
    return family == "xcup" and 0 < cost.uram * 8 < cost.bram36


def with_buffer(res: Resources, cost: BufferCost, uram: bool | None = None) -> Resources:
    """``res`` of a design synthesised with ``hapm_acc_buf`` as a black box, plus the memory
    ``cost`` says the accumulator takes (the black box leaves :attr:`Resources.unmapped`).

    ``uram`` chooses UltraRAM instead of block RAM for it (default: :func:`prefers_uram`).
    """
    if uram is None:
        uram = prefers_uram(cost, res.family)
    unmapped = {k: v for k, v in res.unmapped.items() if k != "hapm_acc_buf"}
    return Resources(
        lut=res.lut + cost.lut,
        lutram=res.lutram,
        srl=res.srl,
        ff=res.ff + cost.ff,
        dsp=res.dsp,
        bram36=res.bram36 + (0.0 if uram else cost.bram36),
        uram=res.uram + (cost.uram if uram else 0),
        cells=res.cells,
        unmapped=unmapped,
        family=res.family,
        top=f"{res.top} + acc ({cost.scheme})",
        seconds=res.seconds,
    )


def _main(argv: list[str] | None = None) -> int:
    import argparse

    from ..target.config import get_config

    parser = argparse.ArgumentParser(
        prog="python -m tvm_hapm.rtl.synth",
        description="Synthesise a config's RTL with Yosys and compare with its part; then the "
        "block RAM of the accumulator structures considered (buffer_costs).",
    )
    parser.add_argument("config", help="preset name or JSON file")
    parser.add_argument("--top", default="hapm_top")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    cfg = get_config(args.config)
    budget = part_budget(cfg.part)
    res = synthesize(cfg, top=args.top, timeout=args.timeout)
    print(res.summary(budget))
    if args.top == "hapm_top":
        print("accumulator structures considered (block RAM of the accumulator alone):")
        for cost in buffer_costs(cfg):
            if cost.buffer == "acc":
                print(
                    f"  {cost.scheme:28s} BRAM36 {cost.bram36:8.1f} URAM {cost.uram:5d} "
                    f"FF {cost.ff:9,d} LUT {cost.lut:9,d}"
                    f"{'' if cost.exact else '  (' + cost.note + ')'}"
                )
    return 0 if res.fits(budget) or args.top != "hapm_top" else 1


if __name__ == "__main__":
    raise SystemExit(_main())
