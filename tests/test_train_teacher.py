"""A 2-step run of every ``lcm train-teacher`` stage, and the folder it writes used like any diffusers model."""

import json
import shutil

import pytest
import torch
from PIL import Image

from lcm.cli import main
from lcm.data.fashion_mnist import DEBIAN_DIR
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler, generate

pytestmark = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="needs the Debian package dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def smoke_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    args = ["train-teacher", "--out", str(out), "--vae-steps", "2", "--unet-steps", "2", "--classifier-steps", "2"]
    args += ["--max-train-images", "512", "--batch-size", "16", "--checkpoint-every", "1", "--sample-every", "2"]
    assert main(args) == 0
    return out


def test_folder_layout(smoke_teacher):
    for part in ("vae/config.json", "unet/config.json", "scheduler/scheduler_config.json", "classifier/config.json"):
        assert (smoke_teacher / part).is_file(), part
    assert (smoke_teacher / "text_encoder" / "lcm_text_encoder.json").is_file()
    assert (smoke_teacher / "samples" / "final.png").is_file()
    report = json.loads((smoke_teacher / "training_report.json").read_text())
    assert set(report["wall_seconds"]) == {"vae", "unet", "classifier"}
    vae_config = json.loads((smoke_teacher / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(report["scaling_factor"]) and vae_config["scaling_factor"] > 0


def _count_optimizer_steps(monkeypatch) -> list[int]:
    """Every AdamW step taken from now on (each stage trains with AdamW) appends to the returned list."""
    calls, step = [], torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        calls.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    return calls


def test_rerun_resumes_instead_of_retraining(smoke_teacher, monkeypatch):
    """Finished stages only restore their checkpoints; a stage without one trains again, to the same weights."""
    weights = {p: p.read_bytes() for p in smoke_teacher.glob("*/*.safetensors")}
    assert {p.parent.name for p in weights} == {"vae", "unet", "classifier"}
    shutil.rmtree(smoke_teacher / "checkpoints" / "classifier")
    shutil.rmtree(smoke_teacher / "classifier")
    steps = _count_optimizer_steps(monkeypatch)
    args = ["train-teacher", "--out", str(smoke_teacher), "--vae-steps", "2", "--unet-steps", "2"]
    args += ["--classifier-steps", "2", "--max-train-images", "512", "--batch-size", "16", "--sample-every", "2"]
    assert main(args) == 0
    assert len(steps) == 2  # the classifier's two steps; none of the VAE's or the UNet's
    for path, data in weights.items():
        assert path.read_bytes() == data, path


def test_loads_like_any_diffusers_model_and_samples(smoke_teacher, tmp_path):
    model = LatentDiffusion.from_pretrained(smoke_teacher)
    assert not model.is_lcm and model.latent_shape == (4, 8, 8)
    images = generate(model, ["a sneaker", "running shoes"], Sampler.DPM_SOLVER_PP_2M, 2, 3.0, [0, 1])
    assert images.shape == (2, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    with pytest.raises(ValueError, match="needs an LCM"):
        generate(model, ["a sneaker"], Sampler.LCM, 2, 3.0, [0])


def test_sample_cli_writes_a_grid(smoke_teacher, tmp_path):
    out = tmp_path / "pngs"
    args = ["sample", "--model", str(smoke_teacher), "--prompt", "a sneaker", "--prompt", "a bag"]
    args += ["--num-images", "3", "--steps", "2", "--out", str(out), "--scale", "1", "--grid"]
    assert main(args) == 0
    singles = sorted(out.glob("0*.png"))
    assert len(singles) == 6 and all(Image.open(p).size == (32, 32) for p in singles)
    assert Image.open(out / "grid.png").size[0] > 3 * 32  # three columns plus labels


def test_image_i_does_not_depend_on_batch_size(smoke_teacher):
    model = LatentDiffusion.from_pretrained(smoke_teacher)
    prompts, seeds = ["a coat", "a bag", "a dress"], [5, 6, 7]
    together = generate(model, prompts, Sampler.DDIM, 3, 2.0, seeds, batch_size=3)
    apart = generate(model, prompts, Sampler.DDIM, 3, 2.0, seeds, batch_size=1)
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-4)


def test_not_a_model_folder_is_a_clear_error(tmp_path):
    assert main(["sample", "--model", str(tmp_path), "--prompt", "x"]) == 2
