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


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random Stable-Diffusion-shaped teacher folder (epsilon prediction), shared read-only by the session."""
    from tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"), "epsilon")


@pytest.fixture(scope="session")
def captioned_images(tmp_path_factory):
    """Eight random 64² images with captions, in the imagefolder layout ``--data`` reads (read-only)."""
    import json

    from PIL import Image

    folder = tmp_path_factory.mktemp("captioned-images")
    g = torch.Generator().manual_seed(2)
    lines = []
    for i in range(8):
        pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of a cat {i % 3}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
