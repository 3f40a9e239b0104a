"""The evaluation plots keep a long legend off the points it labels, and inside the saved figure."""

from lcm.evaluation.plots import line_figure, line_panels


def _crowded_panel() -> dict[str, tuple[list[float], list[float]]]:
    # five long labels, flat lines spread over the whole y range: no box the size of their legend fits between points
    xs = [1.0 + 0.5 * i for i in range(15)]
    return {f"shipped>lcm+reg4-6k>lcm+reg4+adv1-dlr1e-3-{i}k": (xs, [100.0 * 1.5**i] * len(xs)) for i in range(5)}


def test_a_long_legend_covers_no_point_and_stays_in_the_figure(tmp_path):
    fig = line_figure([("crowded", _crowded_panel())], "steps", "FD-clf", logy=True)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    for line in ax.get_lines():
        for x, y in ax.transData.transform(line.get_xydata()):
            assert not legend.contains(x, y), f"the legend covers the point of {line.get_label()!r}"
    assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)
    assert legend.y1 < ax.xaxis.label.get_window_extent().y0, "the legend sits over the x axis label"
    assert line_panels([("crowded", _crowded_panel())], tmp_path / "p.png", "steps", "FD-clf").stat().st_size > 0
