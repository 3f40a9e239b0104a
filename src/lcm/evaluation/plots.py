"""Small PNG line plots for evaluation results (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["Series", "line_panels"]

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # label -> (x, y)


def line_panels(
    panels: Sequence[tuple[str, Series]],
    path: str | Path,
    xlabel: str,
    ylabel: str | Sequence[str],
    *,
    logx: bool = False,
    logy: bool | Sequence[bool] = False,
    xticks: Sequence[float] | None = None,
    panel_size: tuple[float, float] = (4.2, 3.4),
    annotate: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """One row of panels ``(title, {label: (x, y)})`` sharing the x axis label; one line with markers per label.

    ``ylabel`` and ``logy`` are one value for all panels or one per panel; ``annotate`` writes a text next to each
    point of a label.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ylabels = [ylabel] * len(panels) if isinstance(ylabel, str) else list(ylabel)
    logys = [logy] * len(panels) if isinstance(logy, bool) else list(logy)
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]), squeeze=False)
    for ax, (title, series), label_y, log_y in zip(axes[0], panels, ylabels, logys, strict=True):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o", markersize=4, label=label)
            for xi, yi, text in zip(x, y, (annotate or {}).get(label, ()), strict=False):
                ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label_y)
        if logx:
            ax.set_xscale("log", base=2)
        if xticks is not None:
            ax.set_xticks(list(xticks), [f"{t:g}" for t in xticks])
            ax.minorticks_off()
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
