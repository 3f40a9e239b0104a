"""``--report-to``: Accelerate's trackers, validation grids as images, and one-line refusals."""

import json

import pytest
import torch
from PIL import Image

from lcm.cli import main
from tiny_models import build_tiny_sd


@pytest.fixture(scope="module")
def sd_and_images(tmp_path_factory):
    sd = build_tiny_sd(tmp_path_factory.mktemp("sd"), "epsilon")
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(2)
    lines = []
    for i in range(4):
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of a cat {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return sd, folder


def _distill(sd, data, out, *extra):
    return main(["distill", "--teacher", str(sd), "--data", str(data), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--validate-every", "0", *extra])  # fmt: skip


def test_validation_grid_reaches_tensorboard(sd_and_images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sd, data = sd_and_images
    prompts = ["--validation-prompt", "a cat", "--validation-prompt", "a car"]
    assert _distill(sd, data, tmp_path / "run", *prompts, "--validate-every", "5") == 0  # and at the end
    grid = Image.open(tmp_path / "run" / "train" / "validation" / "step-000002.png")
    events = EventAccumulator(str(next((tmp_path / "run" / "train" / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "validation" in events.Tags()["images"]
    logged = events.Images("validation")[-1]
    assert logged.step == 2 and (logged.width, logged.height) == grid.size


def test_unknown_or_missing_trackers_are_refused_in_one_line(sd_and_images, tmp_path, capsys):
    sd, data = sd_and_images
    assert _distill(sd, data, tmp_path / "a", "--report-to", "tensorbored") == 2
    assert "--report-to: unknown tracker 'tensorbored'" in capsys.readouterr().err
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert _distill(sd, data, tmp_path / "b", "--report-to", "tensorboard,wandb") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--report-to wandb: the wandb package is not installed" in err[0]
