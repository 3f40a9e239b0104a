"""Shared fixtures. ``parity`` records the largest relative difference each parity test observed against
diffusers and prints them at the end of the run, so the figures in a report come from the run itself."""

from __future__ import annotations

import pytest
import torch

_PARITY: list[tuple[str, float, float]] = []


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours − ref| / max |ref|, in float64."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().clamp(min=1e-30)
    return float((ours - ref).abs().max() / scale)


class ParityRecorder:
    def __init__(self, name: str):
        self.name = name

    def __call__(self, ours, ref, tol: float = 1e-5, label: str = "") -> float:
        diff = rel_diff(ours, ref)
        _PARITY.append((f"{self.name}{'[' + label + ']' if label else ''}", diff, tol))
        assert diff <= tol, f"{self.name} {label}: relative difference {diff:.3e} > {tol:.0e}"
        return diff


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Caches (text embeddings, downloads) go to a temporary folder, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LCM_CACHE", str(tmp_path_factory.mktemp("lcm-cache")))
    yield
    mp.undo()


@pytest.fixture
def parity(request) -> ParityRecorder:
    return ParityRecorder(request.node.name)


def pytest_terminal_summary(terminalreporter):
    if not _PARITY:
        return
    worst: dict[str, tuple[float, float, int]] = {}
    for name, diff, tol in _PARITY:
        base = name.split("[")[0]
        prev = worst.get(base, (0.0, tol, 0))
        worst[base] = (max(prev[0], diff), tol, prev[2] + 1)
    terminalreporter.section("parity with diffusers: max relative difference per test")
    for base, (diff, tol, count) in sorted(worst.items()):
        terminalreporter.write_line(f"{base:<60} {diff:.2e} (tol {tol:.0e}, {count} comparisons)")
