"""The report of an evaluation: ``results.md`` (a table per w and metric in the paper's layout, then every row) and
the plots (metrics against steps; for several w, the guidance trade-off)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lcm.evaluation.metrics import METRICS
from lcm.evaluation.plan import EvalSettings
from lcm.evaluation.results import Record

__all__ = ["LABELS", "brief", "markdown_report", "markdown_table", "write_report"]

LABELS = {
    "fd_clf": "FD-clf ↓",
    "kid_clf": "KID-clf ↓",
    "prompt_accuracy": "prompt accuracy ↑",
    "fid": "FID ↓",
    "kid": "KID ↓",
    "clip_score": "CLIP score ↑",
}
_DISTANCES = ("fid", "fd_clf")
_QUALITIES = ("clip_score", "prompt_accuracy")


def _fmt(key: str, value: float) -> str:
    if key.startswith("kid"):  # ~1e-3 in Inception features, hundreds in the classifier's
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}"
    return f"{value:.3f}" if key == "prompt_accuracy" else f"{value:.1f}"


def brief(r: Record) -> str:
    """The metric values of a row on one line."""
    return ", ".join(f"{LABELS[k][:-2]} {_fmt(k, v)}" for k, v in r.metrics.items())


def _ordered(records: Sequence[Record], attr: str) -> list:
    return list(dict.fromkeys(getattr(r, attr) for r in records))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> str:
    """The one Markdown table writer: ``header`` and ``rows`` of cells (already formatted, or ``str()``-ed), the
    first ``left`` columns left-aligned and the rest (numbers) right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" if i < left else "---:" for i in range(len(header))) + " |",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_report(records: Sequence[Record], settings: EvalSettings) -> str:
    """``results.md``: per w, a methods × steps table of each metric; then every row with its costs and model."""
    keys = [METRICS[m][0] for m in settings.metrics]
    ws, methods = _ordered(records, "w"), _ordered(records, "method")
    steps = sorted(set(r.steps for r in records))
    n = records[0].n_samples if records else 0
    lines = [
        "# lcm eval",
        "",
        f"{n} images per row; prompts: {settings.prompts}; reference: {settings.reference}; seed {settings.seed} "
        "(image i has the same prompt and initial noise in every row); teacher timestep spacing: "
        f"{settings.teacher_spacing}. NFE: network evaluations per image (a guided teacher step costs two).",
    ]
    if "fd_clf" in keys or "kid_clf" in keys:
        lines.append(
            "FD-clf and KID-clf are Fréchet and kernel distances in the Fashion-MNIST classifier's features: offline "
            "metrics of the embedded benchmark, not FID."
        )
    by_key = {(r.method, r.steps, r.w): r for r in records}
    for w in ws:
        lines += ["", f"## w = {w:g}"]
        for key in keys:
            cells = [[_fmt(key, by_key[m, s, w].metrics[key]) if (m, s, w) in by_key else "—" for s in steps]
                     for m in methods]  # fmt: skip
            table = markdown_table(
                ["method", *(f"{s} steps" for s in steps)], [[m, *c] for m, c in zip(methods, cells, strict=True)]
            )
            lines += ["", f"### {LABELS[key]}", "", table.rstrip()]
    header = ["method", "steps", "w", "NFE/image", "s/image", *(LABELS[k] for k in keys), "model"]
    rows = [
        [r.method, r.steps, f"{r.w:g}", r.nfe_per_image, f"{r.seconds_per_image * 1000:.2f} ms",
         *(_fmt(k, r.metrics[k]) for k in keys), r.model]
        for r in records
    ]  # fmt: skip
    return "\n".join([*lines, "", "## Every row", "", markdown_table(header, rows)])


def write_report(records: Sequence[Record], settings: EvalSettings, out: Path) -> None:
    """``results.md``, ``steps.png`` (``steps_w<w>.png`` per w of a sweep) and, for several w, ``w_sweep.png``."""
    from lcm.evaluation.plots import line_panels

    (out / "results.md").write_text(markdown_report(records, settings))
    keys = [METRICS[m][0] for m in settings.metrics]
    ws, methods = _ordered(records, "w"), _ordered(records, "method")
    steps = sorted(set(r.steps for r in records))
    for w in ws:
        panels = []
        for key in keys:
            series = {}
            for m in methods:
                mine = sorted((r for r in records if r.method == m and r.w == w), key=lambda r: r.steps)
                series[m] = ([r.steps for r in mine], [r.metrics[key] for r in mine])
            panels.append((f"{LABELS[key]} (w = {w:g})", series))
        name = "steps.png" if len(ws) == 1 else f"steps_w{w:g}.png"
        positive = [key in _DISTANCES and all(r.metrics[key] > 0 for r in records) for key in keys]
        line_panels(
            panels, out / name, "sampling steps", [LABELS[k] for k in keys], logx=True, logy=positive, xticks=steps
        )
    if len(ws) > 1:
        x_key = next((k for k in _QUALITIES if k in keys), None)
        y_key = next((k for k in _DISTANCES if k in keys), None)
        series, notes = {}, {}
        for m in methods:
            for st in sorted(set(r.steps for r in records if r.method == m)):
                mine = sorted((r for r in records if r.method == m and r.steps == st), key=lambda r: r.w)
                label = f"{m}, {st} steps"
                if x_key and y_key:
                    series[label] = ([r.metrics[x_key] for r in mine], [r.metrics[y_key] for r in mine])
                    notes[label] = [f"w={r.w:g}" for r in mine]
                else:
                    series[label] = ([r.w for r in mine], [r.metrics[keys[0]] for r in mine])
        if x_key and y_key:
            positive = all(y > 0 for _, ys in series.values() for y in ys)
            line_panels(
                [("guidance trade-off", series)],
                out / "w_sweep.png",
                LABELS[x_key],
                LABELS[y_key],
                logy=positive,
                annotate=notes,
                panel_size=(7.0, 5.0),
            )
        else:
            line_panels([("guidance sweep", series)], out / "w_sweep.png", "w", LABELS[keys[0]])
