"""Small PNG line plots for evaluation results (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Series", "line_figure", "line_panels"]

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # label -> (x, y)


def line_panels(
    panels: Sequence[tuple[str, Series]], path: str | Path, xlabel: str, ylabel: str | Sequence[str], **options: Any
) -> Path:
    """Draw ``line_figure(panels, xlabel, ylabel, **options)`` into the PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line_figure(panels, xlabel, ylabel, **options).savefig(path, dpi=110)
    return path


def line_figure(
    panels: Sequence[tuple[str, Series]],
    xlabel: str,
    ylabel: str | Sequence[str],
    *,
    logx: bool = False,
    logy: bool | Sequence[bool] = False,
    xticks: Sequence[float] | None = None,
    panel_size: tuple[float, float] = (4.2, 3.4),
    annotate: Mapping[str, Sequence[str]] | None = None,
) -> Figure:
    """One row of panels ``(title, {label: (x, y)})`` sharing the x axis label; one line with markers per label.

    ``ylabel`` and ``logy`` are one value for all panels or one per panel; ``annotate`` writes a text next to each
    point of a label. A panel with more than three or long labels has its legend under it, off the points.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter
    from matplotlib.transforms import ScaledTranslation

    ylabels = [ylabel] * len(panels) if isinstance(ylabel, str) else list(ylabel)
    logys = [logy] * len(panels) if isinstance(logy, bool) else list(logy)
    # many or long labels would cover the points: such a panel's legend goes under it, in a strip added below
    below = [len(series) > 3 or max(map(len, series), default=0) > 24 for _, series in panels]
    legend_height = max((0.15 + 0.14 * len(s) for (_, s), b in zip(panels, below, strict=True) if b), default=0.0)
    figsize = (panel_size[0] * len(panels), panel_size[1] + legend_height)
    fig = Figure(figsize=figsize)  # not pyplot's: nothing global to close, no display backend
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, series), label_y, log_y, legend_below in zip(axes[0], panels, ylabels, logys, below, strict=True):
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
            # plain numbers (90, not 9 x 10^1) on the major and, where the axis spans under a decade, minor ticks
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.grid(alpha=0.3)
        if legend_below:
            under_xlabel = ax.transAxes + ScaledTranslation(0, -0.5, fig.dpi_scale_trans)  # half an inch lower
            legend = ax.legend(
                fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=under_xlabel, frameon=False
            )
            legend.set_in_layout(False)  # the figure's bottom strip is kept for it below
        else:
            ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, legend_height / figsize[1], 1, 1))
    return fig
