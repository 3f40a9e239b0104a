"""``lcm cache``: what training reads from a cache equals what it computes from the images, an interrupted cache
resumes to the same shards, a cache of another model is refused, and ``lcm distill --data CACHE`` trains."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import lcm.data.latent_cache as latent_cache
from lcm.cli import main
from lcm.config import LCDConfig
from lcm.data.base import collate_skip_none
from lcm.data.latent_cache import LatentCache, write_latent_cache
from lcm.data.sources import open_data
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.training.task import DistillTask

N_IMAGES = 10


@pytest.fixture(scope="module")
def sd_folder(tiny_sd):
    return tiny_sd


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(2)
    lines = []
    for i in range(N_IMAGES):
        pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of a cat {i % 3}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _cache(model, image_folder, out, **kw):
    dataset = open_data(str(image_folder), resolution=64)
    return write_latent_cache(model, dataset, out, {"data": "test"}, progress=False, **kw)


def test_cached_batch_equals_encoding_the_images(sd_folder, image_folder, tmp_path):
    """z0 and the text embeddings from the cache equal the VAE / text encoder run on the same images, with the same
    posterior draw (the reference side is the model's own encoders, not the cache code)."""
    model = LatentDiffusion.from_pretrained(sd_folder)
    _cache(model, image_folder, tmp_path / "cache", shard_size=4, batch_size=2)
    task = DistillTask(model, LCDConfig())
    images = collate_skip_none([open_data(str(image_folder), resolution=64)[i] for i in range(N_IMAGES)])
    cached = collate_skip_none([LatentCache(tmp_path / "cache")[i] for i in range(N_IMAGES)])
    assert cached["caption"] == images["caption"]

    z_ref = model.encode_images(images["pixel_values"], torch.Generator().manual_seed(5))
    cond_ref = model.encode_prompts(images["caption"])
    z, cond, uncond = task.encode_batch(cached, torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.hidden_states, cond_ref.hidden_states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond.hidden_states, model.encode_prompts([""] * N_IMAGES).hidden_states)
    # and the posterior really is sampled: another generator gives another z0
    z_other, _, _ = task.encode_batch(cached, torch.Generator().manual_seed(6))
    assert (z_other - z).abs().max() > 1e-3


def test_interrupted_cache_resumes_to_the_same_shards(sd_folder, image_folder, tmp_path, monkeypatch):
    model = LatentDiffusion.from_pretrained(sd_folder)
    whole = _cache(model, image_folder, tmp_path / "whole", shard_size=4, batch_size=2)
    assert [s["samples"] for s in whole["shards"]] == [4, 4, 2] and whole["complete"]

    calls, encode = {"n": 0}, latent_cache._encode

    def dying(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # the second shard's second batch: the process dies mid-shard
            raise KeyboardInterrupt
        return encode(model, batch)

    monkeypatch.setattr(latent_cache, "_encode", dying)
    with pytest.raises(KeyboardInterrupt):
        _cache(model, image_folder, tmp_path / "cut", shard_size=4, batch_size=2)
    monkeypatch.setattr(latent_cache, "_encode", encode)
    partial = json.loads((tmp_path / "cut" / "lcm_cache.json").read_text())
    assert len(partial["shards"]) == 1 and not partial["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        LatentCache(tmp_path / "cut")

    resumed = _cache(model, image_folder, tmp_path / "cut", shard_size=4, batch_size=2)
    assert resumed == whole
    for shard in whole["shards"]:
        a, b = load_file(tmp_path / "whole" / shard["file"]), load_file(tmp_path / "cut" / shard["file"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another model or data"):
        _cache(model, image_folder, tmp_path / "cut", shard_size=8, batch_size=2)


def test_cache_of_another_model_is_refused(sd_folder, image_folder, tmp_path):
    model = LatentDiffusion.from_pretrained(sd_folder)
    _cache(model, image_folder, tmp_path / "cache", shard_size=4, batch_size=2)
    with torch.no_grad():
        next(model.vae.encoder.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="cached with another model"):
        LatentCache(tmp_path / "cache").check_model(model)
    with pytest.raises(ValueError, match="cannot be cached"):
        open_data(str(tmp_path / "cache"), resolution=64, random_flip=True)


def test_distill_from_a_cache(sd_folder, image_folder, tmp_path, capsys):
    assert main(["cache", "--model", str(sd_folder), "--data", str(image_folder), "--out", str(tmp_path / "c"),
                 "--batch-size", "2", "--shard-size", "4", "--device", "cpu"]) == 0  # fmt: skip
    assert "cached 10 samples in 3 shards" in capsys.readouterr().out
    code = main(["distill", "--teacher", str(sd_folder), "--data", str(tmp_path / "c"), "--out", str(tmp_path / "r"),
                 "--max-steps", "2", "--batch-size", "4", "--validate-every", "0"])  # fmt: skip
    assert code == 0 and (tmp_path / "r" / "unet").is_dir()
    assert main(["cache", "--out", str(tmp_path / "x"), "--shard-size", "100", "--batch-size", "64"]) == 2
    assert "must be a multiple of --batch-size" in capsys.readouterr().err
