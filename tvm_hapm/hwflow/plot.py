"""The Pareto plot of HW-Flow's candidates (see :mod:`tvm_hapm.hwflow`)."""

from __future__ import annotations

from .. import atomic
from .optimize import OptimizeResult

__all__ = ["pareto_plot"]


def pareto_plot(results, path, objective: str | None = None) -> str:
    """Objective (latency or energy) vs validation accuracy of every evaluated candidate of one
    or more :class:`OptimizeResult`; winners marked with a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [results] if isinstance(results, OptimizeResult) else list(results)
    objective = objective or results[0].objective
    key = "latency_ms" if objective == "latency" else "energy_uj"
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, r in enumerate(results):
        color = f"C{i}"
        h = r.history
        ax.scatter([c[key] for c in h], [100 * c["accuracy"] for c in h], s=10, alpha=0.5,
                   color=color, label=f"{r.method} / {r.level}")  # fmt: skip
        win = next((c for c in h if c["index"] == getattr(r, "winner_index", -1)), None)
        if win is not None:
            ax.scatter([win[key]], [100 * win["accuracy"]], marker="*", s=200, color=color,
                       edgecolor="k", zorder=5)  # fmt: skip
    r0 = results[0]
    ax.axhline(100 * r0.val_dense_accuracy, color="grey", lw=0.8, ls=":", label="dense")
    budget = getattr(r0, "budget", None)
    if budget is not None:
        ax.axhline(100 * r0.val_dense_accuracy - budget, color="red", lw=0.6, ls="--",
                   label="accuracy budget")  # fmt: skip
    ax.set_xlabel(
        f"predicted {objective} ({'ms' if objective == 'latency' else 'µJ'}), level's model"
    )
    ax.set_ylabel("validation top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic.write_figure(path, fig)
    plt.close(fig)
    return str(path)
