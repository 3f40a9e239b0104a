"""The tiny offline Stable Diffusion folders of ``tests/tiny_models.py`` load back and generate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import (
    CLIP_HIDDEN,
    CLIP_VOCAB_SIZE,
    MAX_LENGTH,
    VAE_SCALE_FACTOR,
    build_tiny_sd,
    build_tiny_sdxl,
    folder_size,
    image_size,
    tiny_clip_tokenizer,
    write_tiny_clip_tokenizer,
)

MAX_BYTES = 5_000_000  # every tiny folder stays under 5 MB
PROMPTS = ("a photo of a sneaker", "")
SD_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
SDXL_FILES = SD_FILES + (
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
)


@pytest.fixture(scope="module")
def sd_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny SD folder per prediction type (same seed, so identical weights)."""
    root = tmp_path_factory.mktemp("tiny-sd")
    return {p: build_tiny_sd(root / p, prediction_type=p) for p in ("epsilon", "v_prediction")}


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny SDXL folder."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "sdxl")


def _tokenize(tokenizer, prompt: str) -> list[int]:
    """Token ids as the SD pipelines ask for them: padded to max length, truncated."""
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids


# --- tokenizer ------------------------------------------------------------------------------------------------------
def test_tokenizer_from_bpe_files_pads_to_77(tmp_path: Path) -> None:
    """vocab.json + merges.txt alone load with ``CLIPTokenizer.from_pretrained``; any text pads/truncates to 77."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp_path / "tok"))
    assert tokenizer.model_max_length == MAX_LENGTH
    assert (tmp_path / "tok" / "merges.txt").read_text().startswith("#version: 0.2\n")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for prompt in (*PROMPTS, "An astronaut riding a HORSE, café ÜBER 😀 1234!! 'tis", "word " * 200):
        ids = _tokenize(tokenizer, prompt)
        assert len(ids) == MAX_LENGTH
        assert ids[0] == bos and eos in ids
        assert max(ids) < CLIP_VOCAB_SIZE and len(tokenizer) <= CLIP_VOCAB_SIZE
    ids = _tokenize(tokenizer, "a photo of a sneaker")
    assert tokenizer.convert_ids_to_tokens(ids[:7]) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "sneaker</w>",
        "<|endoftext|>",
    ]
    assert ids[6:] == [eos] * (MAX_LENGTH - 6)  # SD 1.x pads with <|endoftext|>
    assert _tokenize(tokenizer, "") == [bos] + [eos] * (MAX_LENGTH - 1)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a sneaker"


def test_saved_tokenizers_load_and_match(sd_paths: dict[str, Path], sdxl_path: Path) -> None:
    """The pipelines' saved tokenizer folders load and tokenize like the in-memory tokenizer; SDXL's 2nd pads "!"."""
    from transformers import CLIPTokenizer

    reference = tiny_clip_tokenizer()
    for folder in (sd_paths["epsilon"] / "tokenizer", sdxl_path / "tokenizer", sdxl_path / "tokenizer_2"):
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        assert tokenizer.model_max_length == MAX_LENGTH
        for prompt in PROMPTS:
            ids, ref = _tokenize(tokenizer, prompt), _tokenize(reference, prompt)
            assert len(ids) == MAX_LENGTH
            if folder.name == "tokenizer":
                assert ids == ref
            else:
                n = ref.index(reference.eos_token_id) + 1  # identical up to the first EOS, then "!" padding
                assert ids[:n] == ref[:n] and set(ids[n:]) == {tokenizer.convert_tokens_to_ids("!")}


# --- folders --------------------------------------------------------------------------------------------------------
def test_layout_and_size(sd_paths: dict[str, Path], sdxl_path: Path) -> None:
    """Diffusers layout, safetensors only, each folder < 5 MB; the same seed gives the same weights."""
    for path, files in ((sd_paths["epsilon"], SD_FILES), (sd_paths["v_prediction"], SD_FILES), (sdxl_path, SDXL_FILES)):
        missing = [f for f in files if not (path / f).is_file()]
        assert not missing, f"{path}: missing {missing}"
        assert not list(path.rglob("*.bin")), "weights must be safetensors"
        assert folder_size(path) < MAX_BYTES, (path, folder_size(path))
    index = json.loads((sd_paths["epsilon"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert json.loads((sdxl_path / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (sd_paths["epsilon"] / weights).read_bytes() == (sd_paths["v_prediction"] / weights).read_bytes()


def test_components_load(sd_paths: dict[str, Path], sdxl_path: Path) -> None:
    """``UNet2DConditionModel`` and ``DDPMScheduler.load_config`` read the sub-folders; configs are SD's."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    for path, prediction_type, context in (
        (sd_paths["epsilon"], "epsilon", CLIP_HIDDEN),
        (sd_paths["v_prediction"], "v_prediction", CLIP_HIDDEN),
        (sdxl_path, "epsilon", 2 * CLIP_HIDDEN),
    ):
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        assert unet.config.sample_size == 8 and unet.config.in_channels == 4
        assert unet.config.cross_attention_dim == context
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        assert 2 ** (len(vae.config.block_out_channels) - 1) == VAE_SCALE_FACTOR
        config = DDPMScheduler.load_config(path, subfolder="scheduler")
        assert config["prediction_type"] == prediction_type
        assert (config["beta_schedule"], config["beta_start"], config["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
        assert config["set_alpha_to_one"] is False and config["steps_offset"] == 1
        assert config["timestep_spacing"] == "leading" and config["num_train_timesteps"] == 1000
        scheduler = DDPMScheduler.from_config(config)
        assert scheduler.config.prediction_type == prediction_type
    assert json.loads((sd_paths["epsilon"] / "vae/config.json").read_text())["scaling_factor"] == 0.18215
    xl_unet = UNet2DConditionModel.from_pretrained(sdxl_path, subfolder="unet").config
    assert xl_unet.addition_embed_type == "text_time" and xl_unet.projection_class_embeddings_input_dim == 6 * 8 + 32


# --- generation -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_pipeline_generates(sd_paths: dict[str, Path], prediction_type: str) -> None:
    """``StableDiffusionPipeline.from_pretrained`` → 2 steps at 64² with guidance: finite images in [0, 1]."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_paths[prediction_type])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == VAE_SCALE_FACTOR
    assert pipe.scheduler.config.prediction_type == prediction_type
    size = image_size()
    images = pipe(
        list(PROMPTS),
        num_inference_steps=2,
        guidance_scale=7.5,
        height=size,
        width=size,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, size, size, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_sdxl_pipeline_generates(sdxl_path: Path) -> None:
    """``StableDiffusionXLPipeline.from_pretrained`` → 2 steps at 64² with guidance: finite images."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == VAE_SCALE_FACTOR and pipe.default_sample_size == 8
    size = image_size()
    images = pipe(
        list(PROMPTS),
        num_inference_steps=2,
        guidance_scale=5.0,
        height=size,
        width=size,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, size, size, 3)
    assert np.isfinite(images).all()


def test_other_seed_and_sample_size(tmp_path: Path) -> None:
    """``seed`` changes the weights; ``sample_size`` 4 gives 4² latents and 32² default images."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    path = build_tiny_sd(tmp_path / "sd", seed=1, sample_size=4)
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.sample_size == 4
    images = pipe("a photo of a sneaker", num_inference_steps=2, output_type="np").images  # default size
    assert images.shape == (1, image_size(4), image_size(4), 3) == (1, 32, 32, 3)
    assert np.isfinite(images).all()
    other = build_tiny_sd(tmp_path / "sd0", seed=0, sample_size=4)
    a = load_file(path / "unet/diffusion_pytorch_model.safetensors")
    b = load_file(other / "unet/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_project_loader_reads_tiny_sd(sd_paths: dict[str, Path]) -> None:
    """The project's own loader takes the tiny SD folder as a teacher (UNet, VAE, schedule, CLIP encoder)."""
    from lcm.models.latent_diffusion import LatentDiffusion

    model = LatentDiffusion.from_pretrained(sd_paths["v_prediction"])
    assert model.latent_shape == (4, 8, 8)
    text = model.encode_prompts(list(PROMPTS))
    assert text.hidden_states.shape == (2, MAX_LENGTH, CLIP_HIDDEN)
    assert torch.isfinite(text.hidden_states).all()


def test_bad_arguments(tmp_path: Path) -> None:
    """Unknown prediction types and odd sample sizes are refused before anything is written."""
    with pytest.raises(ValueError, match="prediction_type"):
        build_tiny_sd(tmp_path / "a", prediction_type="x0")
    with pytest.raises(ValueError, match="sample_size"):
        build_tiny_sd(tmp_path / "b", sample_size=5)
