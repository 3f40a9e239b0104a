"""``accelerate launch --num_processes 2`` on the CPU (gloo): each rank trains on its own data, gradients are
synchronised (2 processes at batch B take the steps 1 process takes at batch 2B), only rank 0 writes the run folder,
and a 2-process run resumes from its checkpoint to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("mp_worker.py")
TOLERANCE = 1e-5  # float32 sums in another order (a 2-way all-reduce vs one batch)


def _launch(processes: int, *args: str) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed")
    # --multi_gpu selects torchrun; with no GPU the processes run on the CPU over gloo (--cpu would need mpirun)
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29613"]
    if processes == 1:
        command = [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, str(WORKER), *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_two_processes_equal_one_at_twice_the_batch_and_resume(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(1, str(one), "8", "4")
    _launch(2, str(two), "4", "4")
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"1 process x batch 8 vs 2 processes x batch 4, 4 AdamW steps: max |difference| {diff:.2e}")
    assert diff <= TOLERANCE
    seen = [json.loads(p.read_text()) for p in sorted(Path(f"{two}-seen").iterdir())]
    assert len(seen) == 2 and not set(seen[0]) & set(seen[1])  # different data per rank
    assert sorted(seen[0] + seen[1]) == sorted(json.loads(next(Path(f"{one}-seen").iterdir()).read_text()))
    assert sorted(p.name for p in (two / "train" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert [h["step"] for h in json.loads((two / "train" / "train_history.json").read_text())] == [1, 2, 3, 4]
    assert not list(two.glob("*.tmp")) and {p.name for p in two.iterdir()} == {"model.safetensors", "train"}

    resumed = tmp_path / "resumed"  # stopped after its step-2 checkpoint, resumed on 2 processes
    shutil.copytree(two / "train" / "checkpoints" / "step-2", resumed / "train" / "checkpoints" / "step-2")
    _launch(2, str(resumed), "4", "4", "latest")
    c = load_file(resumed / "model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.mark.slow
def test_two_process_flow_distill_exports(tmp_path, captioned_images):
    """lcm distill of a flow-matching (SD3-shaped) teacher on 2 processes: rank 0 alone writes the run folder and
    the export, which loads as a flow LCM."""
    from lcm.models.latent_diffusion import LatentDiffusion
    from tiny_models import build_tiny_flow

    teacher, out = build_tiny_flow(tmp_path / "teacher", text_dim=384), tmp_path / "lcm"
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29614", "-m", "lcm.cli"]
    command += ["distill", "--teacher", str(teacher), "--data", str(captioned_images), "--out", str(out)]
    command += ["--batch-size", "2", "--max-steps", "4", "--w-min", "3", "--w-max", "3", "--checkpoint-every", "2"]
    command += ["--validate-every", "0", "--solver", "heun", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    model = LatentDiffusion.from_pretrained(out)
    assert model.is_flow and model.is_lcm
    assert [h["step"] for h in json.loads((out / "train" / "train_history.json").read_text())] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_process_adversarial_distill_keeps_one_discriminator(tmp_path, tiny_sd, captioned_images):
    """lcm distill --adversarial-weight on 2 processes: each rank sees other data, yet the discriminator's gradients
    are averaged over the ranks, so both hold the same heads and moments after every step."""
    from safetensors.torch import load_file

    from lcm.models.latent_diffusion import LatentDiffusion

    out, heads = tmp_path / "tcd-adv", tmp_path / "heads"
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29615"]
    command += [str(WORKER.with_name("mp_adversarial.py")), str(heads), "distill", "--teacher", str(tiny_sd)]
    command += ["--data", str(captioned_images), "--out", str(out), "--method", "tcd", "--adversarial-weight", "0.1"]
    command += ["--batch-size", "2", "--max-steps", "3", "--num-solver-steps", "10", "--validate-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = [load_file(f"{heads}-rank-{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("optim.") for k in ranks[0])
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    history = json.loads((out / "train" / "train_history.json").read_text())
    assert history[-1]["step"] == 3
    assert LatentDiffusion.from_pretrained(out).consistency == "tcd"
