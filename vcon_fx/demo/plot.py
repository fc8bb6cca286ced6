"""The demo's plot: test accuracy over the fine-tuning steps, abrupt against VCON, β on a second axis."""

from __future__ import annotations

import os
from pathlib import Path

from ..io.atomic import atomic_path
from .results import DemoRow

__all__ = ["plot_histories"]


def plot_histories(rows: list[DemoRow], path: str | os.PathLike, *, dense_accuracy: float | None = None,
                   title: str = "") -> Path:
    """Test accuracy over fine-tuning steps, abrupt vs VCON, β on a second axis: one panel per method (writes `path`).

    Uses matplotlib's object API with the Agg canvas, so no global backend is changed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(rows), 1)
    cols = min(n, 2)
    nrows = (n + cols - 1) // cols
    fig = Figure(figsize=(6.2 * cols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, row in enumerate(rows):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for key, label, color in (("history_abrupt", f"abrupt  → {row.acc_abrupt:.3f}", "tab:red"),
                                  ("history_vcon", f"VCON  → {row.acc_vcon:.3f}", "tab:blue")):
            pts = getattr(row, key)
            if pts:
                ax.plot([p[0] for p in pts], [p[2] for p in pts], color=color, label=label, lw=1.6)
        if dense_accuracy is not None:
            ax.axhline(dense_accuracy, color="grey", ls=":", lw=1, label=f"dense {dense_accuracy:.3f}")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.0, 1.02)
        ax.set_title(f"{row.method}: {row.setting}, Q = {row.transition}")
        twin = ax.twinx()
        betas = row.beta_vcon or [p[1] for p in row.history_vcon]
        steps = range(len(betas)) if row.beta_vcon else [p[0] for p in row.history_vcon]
        if betas:
            twin.plot(list(steps), betas, color="tab:green", ls="--", lw=1.2, label="β (VCON)")
        twin.set_ylabel("β", color="tab:green")
        twin.set_ylim(-0.02, 1.02)
        handles, labels = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax.legend(handles + h2, labels + l2, loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
