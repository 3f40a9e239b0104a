"""``lcm demo`` at its defaults reproduces the table the README shows (about 5 minutes on 2 cores: ``-m slow``)."""

import re
from pathlib import Path

import pytest

from lcm.cli import main
from lcm.data.fashion_mnist import DEBIAN_DIR
from lcm.evaluation.results import load_results

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_demo_rows() -> dict[tuple[str, int], tuple[float, float]]:
    """(method, steps) → (FD-clf, prompt accuracy) from the README's `lcm demo` table: the section's first table
    (the long recipe's table follows it in the same form)."""
    text = README.read_text().split("## What `lcm demo` does", 1)[1].split("\n## ", 1)[0]
    tables = [t for t in text.split("\n\n") if t.lstrip().startswith("| method |")]
    rows = {}
    for line in tables[0].splitlines():
        m = re.match(
            r"\|\s*\**(teacher DDIM|LCM)\**\s*\|\s*(\d+)\s*\|\s*\d+\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", line
        )
        if m:
            rows[(m.group(1), int(m.group(2)))] = (float(m.group(3)), float(m.group(4)))
    return rows


def test_readme_table_is_parsed():
    rows = readme_demo_rows()
    assert sorted(rows) == [(m, s) for m in ("LCM", "teacher DDIM") for s in (1, 2, 4, 8)]


@pytest.mark.slow
@pytest.mark.skipif(not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="needs dataset-fashion-mnist")
def test_demo_reproduces_the_readme_table(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    records = load_results(tmp_path / "demo" / "results.json")[1]
    got = {
        (r.method, r.steps): (round(r.metrics["fd_clf"], 1), round(r.metrics["prompt_accuracy"], 3)) for r in records
    }
    assert got == readme_demo_rows()
