"""The terminal output of the ``hapm`` command line: the progress display with one status per
stage, and the tables shared by several commands (placement, run statistics)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text


# ---------------------------------------------------------------------------------- progress
class _StatusColumn(SpinnerColumn):
    """A spinner while a stage runs, then ``done``, or ``failed`` for a stage that raised."""

    def render(self, task):
        if task.fields.get("failed"):
            return Text("failed", style="bold red")
        return super().render(task)


@contextlib.contextmanager
def progress_display(console: Console) -> Iterator[Progress]:
    """A rich progress display with one line per stage (spinner, bar, count, elapsed time)."""
    progress = Progress(
        _StatusColumn(finished_text=Text("done", style="green")),
        TextColumn("{task.description:<28}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        yield progress


@contextlib.contextmanager
def stage(progress: Progress, description: str, total: int = 1):
    """Show one stage; yields ``advance(n=1)``. The stage is completed when the block ends.

    On an exception, the stage is marked as failed and the exception propagates.
    """
    task = progress.add_task(description, total=total)
    try:
        yield lambda n=1: progress.advance(task, n)
    except BaseException:
        progress.update(task, failed=True)
        progress.stop_task(task)
        raise
    progress.update(task, completed=total)
    progress.stop_task(task)


# ---------------------------------------------------------------------------------- tables
def placement_table(accelerator: list[dict], host: dict, title: str = "What runs where") -> Table:
    """Accelerator layers (kind, instructions) and host operators (count)."""
    table = Table(title=title)
    table.add_column("where")
    table.add_column("layer / operator")
    table.add_column("kind")
    table.add_column("instructions", justify="right")
    table.add_column("count", justify="right")
    for row in accelerator:
        table.add_row(
            "[cyan]accelerator[/]",
            row["layer"],
            row.get("kind", ""),
            f"{row.get('instructions', 0):,}",
            "1",
        )
    if accelerator and host:
        table.add_section()
    for op, count in host.items():
        table.add_row("[yellow]host[/]", op.removeprefix("relax."), "operator", "", str(count))
    return table


def run_stats_table(layers: list, title: str = "Accelerator statistics") -> Table:
    """Per-layer instructions, MACs, DRAM bytes, cycles, latency, energy and roofline fraction
    of :class:`ExecutionStats` objects."""
    from ..runtime import ExecutionStats

    table = Table(title=title)
    columns = ("layer", "instructions", "MACs", "DRAM bytes", "cycles", "ms", "µJ", "roofline")
    for col in columns:
        table.add_column(col, justify="left" if col == "layer" else "right")

    def add(s, style=None):
        table.add_row(
            s.layer,
            f"{s.instructions:,}",
            f"{s.macs:,}",
            f"{s.dram_bytes:,}",
            f"{s.cycles:,}",
            f"{s.latency_ms:.3f}",
            f"{s.energy_uj:.1f}",
            f"{s.roofline_fraction:.0%}",
            style=style,
        )

    for s in layers:
        add(s)
    if layers:
        table.add_section()
        add(ExecutionStats.total(layers, layer="total"), style="bold")
    return table
