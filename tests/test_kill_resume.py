"""SIGKILL at random points of a run, checkpoint writes and the export included, then ``--resume latest``: the
final weights equal an uninterrupted run's bit for bit, and so does every checkpoint a resumed run restored.

Each kill point is a separate process (tests/kill_child.py) that kills itself with SIGKILL at the chosen event;
runs are chained (killed, resumed and killed again) so that one run survives many kills. The data stream has
unreadable batches, so the recorded data position is exercised as well.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lcm.training.checkpoint import CorruptCheckpoint, checkpoint_steps, verify_checkpoint

CHILD = Path(__file__).with_name("kill_child.py")
MAX_STEPS, EVERY, ACCUMULATION = 12, 2, 2
CHECKPOINT_PHASES = ("mid-state", "before-meta", "before-rename", "before-prune")


def _child(out: Path, mode: str, *kill: str, keep: int = 2, new_run: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(out, mode, *kill), capture_output=True, text=True, env=_env(keep, new_run), timeout=600
    )


def _command(out: Path, mode: str, *kill: str) -> list[str]:
    return [sys.executable, str(CHILD), str(out), mode, *kill]


def _env(keep: int = 2, new_run: bool = False) -> dict[str, str]:
    env = {**os.environ, "KEEP_CHECKPOINTS": str(keep), "PYTHONPATH": str(CHILD.parent)}
    return {**env, "RESUME": "none"} if new_run else env


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _resume_step(out: Path) -> int:
    for step, path in checkpoint_steps(out / "train" / "checkpoints"):
        try:
            verify_checkpoint(path)
        except CorruptCheckpoint:
            continue
        return step
    return 0


def _kill_point(rng: random.Random, done: int, phase: str) -> tuple[str, int]:
    """The n-th event ``phase`` after step ``done``, at most two steps on (so that one run survives many kills)."""
    left = MAX_STEPS - done
    if not left or phase == "mid-export":
        return "mid-export", 1
    if phase == "mid-step":
        return phase, rng.randint(1, min(left, 2) * ACCUMULATION)  # the n-th micro-batch drawn by this process
    if phase == "after-update":
        return phase, rng.randint(1, min(left, 2))  # the n-th optimiser update of this process
    return phase, 1  # the next checkpoint this process writes


def _states(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path / "state.safetensors").items() if k.startswith("model.")}


def _survive(tmp_path: Path, mode: str, kills: int, seed: int, export: str) -> list[tuple[str, int, int]]:
    reference = tmp_path / "reference"
    done = _child(reference, mode, keep=100)
    assert done.returncode == 0, done.stderr[-3000:]
    out, rng, points = tmp_path / "killed", random.Random(seed), []
    phases = [*CHECKPOINT_PHASES, "mid-step", "after-update"]
    rng.shuffle(phases)  # every kind of kill point first, then any
    phases += rng.choices([*CHECKPOINT_PHASES, "mid-step", "after-update", "mid-export"], k=max(0, kills - 6))
    for phase in phases[:kills]:
        resumed_at = _resume_step(out)
        if resumed_at:  # what the next process restores equals the uninterrupted run's checkpoint of that step
            ours, ref = out / "train/checkpoints" / f"step-{resumed_at}", reference / "train/checkpoints"
            a, b = _states(ours), _states(ref / f"step-{resumed_at}")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"checkpoint {resumed_at}"
        phase, n = _kill_point(rng, resumed_at, phase)
        result = _child(out, mode, phase, str(n))
        assert result.returncode == -signal.SIGKILL, (phase, n, result.returncode, result.stderr[-3000:])
        points.append((phase, n, resumed_at))
    final = _child(out, mode)
    assert final.returncode == 0, final.stderr[-3000:]
    a, b = load_file(out / export), load_file(reference / export)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), points
    history = [h["step"] for h in json.loads((out / "train" / "train_history.json").read_text())]
    assert history == list(range(1, MAX_STEPS + 1))  # every step logged once, across all the resumes
    return points


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    points = _survive(tmp_path, "loop", kills=10, seed=0, export="model.safetensors")
    assert len(points) == 10 and {p[0] for p in points} >= set(CHECKPOINT_PHASES), points


def test_a_new_run_in_a_finished_killed_runs_folder_is_refused_and_a_second_live_run_too(tmp_path):
    """The harness on a reused folder and on two runs at once: a new run into a finished run's folder is refused and
    changes nothing; while a run lives (held mid-step), a second one on its folder is refused; once the first is
    killed, its lock is gone and a resume finishes exactly as an uninterrupted run."""
    reference = tmp_path / "reference"
    assert _child(reference, "loop").returncode == 0
    before = _snapshot(reference)
    again = _child(reference, "loop", keep=1, new_run=True)
    assert again.returncode != 0 and "holds another run" in again.stderr.strip().splitlines()[-1], again.stderr
    assert _snapshot(reference) == before  # every checkpoint, the export and the logs as they were

    out = tmp_path / "run"
    first = subprocess.Popen(_command(out, "loop", "hold", "5"), env=_env(), stdout=subprocess.DEVNULL)
    try:
        marker = Path(str(out) + ".holding")
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never reached its hold"
            time.sleep(0.05)
        held = _snapshot(out)
        second = _child(out, "loop")
        assert second.returncode != 0, second.stdout
        assert f"is in use by process {first.pid}" in second.stderr.strip().splitlines()[-1], second.stderr
        assert _snapshot(out) == held
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert _child(out, "loop").returncode == 0
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_twelve_points_loop(tmp_path, seed):
    assert len(_survive(tmp_path, "loop", kills=12, seed=seed, export="model.safetensors")) == 12


@pytest.mark.slow
def test_sigkill_ten_points_lcm_distill(tmp_path):
    from tiny_models import build_tiny_sd

    teacher = build_tiny_sd(tmp_path / "teacher", "epsilon")
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    g = torch.Generator().manual_seed(2)
    lines = []
    for i in range(8):
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(images / f"{i}.png")
        lines.append(f'{{"file_name": "{i}.png", "text": "a cat {i % 3}"}}')
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    mode = f"distill:{teacher}:{images}"
    assert len(_survive(tmp_path, mode, kills=10, seed=3, export="unet/diffusion_pytorch_model.safetensors")) == 10


@pytest.mark.slow
def test_sigkill_eight_points_flow_distill(tmp_path, captioned_images):
    """The same for a flow-matching (SD3-shaped) teacher: the exported transformer equals an uninterrupted run's."""
    from tiny_models import build_tiny_flow

    teacher = build_tiny_flow(tmp_path / "teacher", text_dim=384)
    mode = f"distill:{teacher}:{captioned_images}"
    assert len(_survive(tmp_path, mode, kills=8, seed=4, export="transformer/diffusion_pytorch_model.safetensors")) == 8
