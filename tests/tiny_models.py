"""Tiny, randomly initialised diffusers-format Stable Diffusion folders, built offline from configs.

The rest of the test-suite uses these wherever code loads "a Stable Diffusion checkpoint": the folders have the real
layout (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``; SDXL adds
``text_encoder_2/`` and ``tokenizer_2/``), the real scheduler configs and the real architecture families, at sizes that
keep each folder around 2 MB and a 2-step generation well under a second on a CPU. Nothing is downloaded: the CLIP
tokenizer's ``vocab.json`` / ``merges.txt`` are written here (a byte-level BPE over the 256 byte symbols, so any text
tokenizes without unknown tokens).

Shapes (defaults, ``sample_size=8``):

* VAE: 3 → 4 latent channels, four blocks ⇒ ``vae_scale_factor`` 8 as in SD, so latents 8² ↔ images 64².
* SD: UNet (32, 64), cross-attention 32 (= CLIP hidden size), CLIP 32-d / 2 layers / 4 heads, DDIMScheduler.
* SDXL: UNet (32, 64) with ``text_time`` added conditioning, cross-attention 64 (= 32 + 32 from the two encoders),
  pooled projection 32, EulerDiscreteScheduler.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CLIP_HIDDEN",
    "CLIP_VOCAB_SIZE",
    "MAX_LENGTH",
    "SDXL_TIME_EMBED_DIM",
    "VAE_SCALE_FACTOR",
    "build_tiny_flow",
    "build_tiny_flux",
    "build_tiny_sd3",
    "build_tiny_sd",
    "build_tiny_sdxl",
    "folder_size",
    "image_size",
    "tiny_clip_tokenizer",
    "tiny_flow_transformer",
    "tiny_scheduler_config",
    "tiny_text_encoder_config",
    "tiny_unet",
    "write_tiny_clip_tokenizer",
]

MAX_LENGTH = 77  # CLIP's context length (tokenizer ``model_max_length`` and ``max_position_embeddings``)
CLIP_HIDDEN = 32  # hidden size of every tiny CLIP text encoder
CLIP_VOCAB_SIZE = 1000  # text-encoder embedding rows; ≥ the tokenizer's vocabulary (see ``_vocab_and_merges``)
VAE_SCALE_FACTOR = 8  # 2 ** (len(vae block_out_channels) − 1), as in SD
SDXL_TIME_EMBED_DIM = 8  # ``addition_time_embed_dim``; SDXL's six micro-conditioning ids each get this many dims

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"  # CLIP's end-of-word suffix

# Words whose spellings become BPE merges, so common prompt words are single tokens (everything else falls back to
# byte symbols — still valid, just longer).
_WORDS = (
    "a an the of in on at with and photo picture painting drawing portrait image sneaker shoe shoes boot sandal "
    "dress shirt t-shirt trouser trousers pullover coat bag cat dog horse car house tree flower mountain river sky "
    "red blue green black white yellow high quality detailed realistic cartoon style studio lighting background "
    "by artist an astronaut riding moon sunset beach city street night"
).split()

# Stable Diffusion's schedule (SD 1.x / 2.x / XL all train on it).
_SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


# --- tokenizer ------------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table (what ``pre_tokenizers.ByteLevel`` emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary layout in miniature: 256 byte symbols, the same with ``</w>``, merges, then BOS and EOS last.

    Each word of ``_WORDS`` gets the merges that build it left to right (``p h``, ``ph o``, … ``phot o</w>``).
    """
    byte_symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in byte_symbols + [s + EOW for s in byte_symbols]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    table = _bytes_to_unicode()
    for word in _WORDS:
        chars = [table[b] for b in word.encode("utf-8")]
        chars[-1] += EOW
        token = chars[0]
        for char in chars[1:]:
            merged = token + char
            if merged not in vocab:
                merges.append((token, char))
                vocab[merged] = len(vocab)
            token = merged
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    assert len(vocab) <= CLIP_VOCAB_SIZE, len(vocab)
    return vocab, merges


def _write_bpe_files(path: Path) -> Path:
    """Write the BPE model as ``vocab.json`` + ``merges.txt`` (the files a slow or fast CLIPTokenizer reads)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_tiny_clip_tokenizer(path: Path, pad_token: str = EOS) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs of a tiny CLIP tokenizer into ``path``.

    ``CLIPTokenizer.from_pretrained(path)`` then loads it offline with ``model_max_length`` 77. ``pad_token`` is
    ``<|endoftext|>`` as SD 1.x's tokenizer; SDXL's second tokenizer pads with ``"!"``.
    """
    path = _write_bpe_files(path)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return path


def tiny_clip_tokenizer(pad_token: str = EOS):
    """The tiny ``CLIPTokenizer`` (written to a temporary folder and loaded back, as a real one is loaded)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(Path(tmp), pad_token=pad_token))


# --- configs ----------------------------------------------------------------------------------------------------------
def tiny_text_encoder_config(projection_dim: int = CLIP_HIDDEN, hidden_act: str = "quick_gelu"):
    """``CLIPTextConfig``: 32-d, 2 layers, 4 heads, 77 positions; special-token ids match the tiny tokenizer.

    ``eos_token_id`` is the real id (not the legacy 2), so the pooled output is taken at the first ``<|endoftext|>``.
    """
    from transformers import CLIPTextConfig

    vocab, _ = _vocab_and_merges()
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=projection_dim,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )


def tiny_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """SD's scheduler config (scaled-linear 0.00085 → 0.012, 1000 steps, ``leading`` spacing, offset 1)."""
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return {**_SD_SCHEDULE, "prediction_type": prediction_type}


def image_size(sample_size: int = 8) -> int:
    """Pixel size of the images a tiny model generates by default: ``sample_size × vae_scale_factor``."""
    return sample_size * VAE_SCALE_FACTOR


def _tiny_vae(sample_size: int, scaling_factor: float):
    """AutoencoderKL 3 → 4 channels, four 8-channel blocks (three down-samplings: ``vae_scale_factor`` 8)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=image_size(sample_size),
        scaling_factor=scaling_factor,
    )


def _check(path: Path, sample_size: int) -> Path:
    if sample_size < 4 or sample_size % 2:
        raise ValueError(f"sample_size must be even and ≥ 4 (the UNet down-samples once), got {sample_size}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save(pipe: Any, path: Path) -> None:
    """``save_pretrained`` (safetensors), then ``vocab.json`` / ``merges.txt`` next to each saved tokenizer.

    transformers 5 saves a tokenizer as ``tokenizer.json`` only; the BPE files keep the folder loadable by any
    CLIPTokenizer (slow or fast, transformers 4 or 5), as a real SD checkpoint's ``tokenizer/`` is.
    """
    pipe.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # (Flux's tokenizer_2 is the tiny CLIP one too)
        if getattr(pipe, name, None) is not None:
            _write_bpe_files(path / name)


# --- builders -----------------------------------------------------------------------------------------------------
def build_tiny_sd(path: Path, prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 8) -> Path:
    """Write an SD-1.5-shaped ``StableDiffusionPipeline`` folder (random weights, safetensors) to ``path``.

    UNet (32, 64) with one ``CrossAttnDownBlock2D`` / ``DownBlock2D`` pair, cross-attention 32, latents
    ``4 × sample_size²``; VAE factor 8 (images ``8·sample_size`` px), scaling 0.18215; CLIP 32-d; DDIMScheduler with
    SD's schedule and ``prediction_type``. Returns ``path``.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    scheduler = DDIMScheduler.from_config(tiny_scheduler_config(prediction_type))
    path = _check(path, sample_size)
    unet = tiny_unet(seed=seed, sample_size=sample_size)  # seeded first: the VAE and text encoder draw after it
    vae = _tiny_vae(sample_size, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(tiny_text_encoder_config())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save(pipe, path)
    return path


def build_tiny_sdxl(path: Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write an SDXL-shaped ``StableDiffusionXLPipeline`` folder (random weights, safetensors) to ``path``.

    Two 32-d CLIP encoders (the second ``CLIPTextModelWithProjection``, projection 32, pooled output); UNet (32, 64)
    with ``DownBlock2D`` / ``CrossAttnDownBlock2D`` as SDXL, linear projections, cross-attention 64 (= 32 + 32),
    ``text_time`` added conditioning (``6 × 8 + 32 = 80`` inputs); VAE factor 8 with SDXL's scaling 0.13025;
    EulerDiscreteScheduler with SDXL's config. Returns ``path``.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = _check(path, sample_size)
    scheduler = EulerDiscreteScheduler.from_config(
        {**tiny_scheduler_config("epsilon"), "interpolation_type": "linear", "use_karras_sigmas": False}
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_text_encoder_config())
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_encoder_config(hidden_act="gelu"))
    pooled_dim = text_encoder_2.config.projection_dim
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=1,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + pooled_dim,
        norm_num_groups=32,
    )
    vae = _tiny_vae(sample_size, scaling_factor=0.13025)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )
    _save(pipe, path)
    return path


def tiny_unet(in_channels: int = 4, w_conditioned: bool = False, seed: int = 0, sample_size: int = 8):
    """A bare ``UNet2DConditionModel`` shaped as the tiny SD folder's: (32, 64), cross-attention 32, 4 output channels.

    ``in_channels`` 4 is a text-to-image UNet, 9 an inpainting one (``[z, mask, masked-image latents]``, 4 + 1 + 4,
    the layout of SD-inpainting); ``w_conditioned`` gives it an LCM's w-embedding input (``time_cond_proj_dim``
    256). Random weights from ``seed``; in eval mode.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CLIP_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
        time_cond_proj_dim=256 if w_conditioned else None,
    ).eval()


def folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def tiny_flow_transformer(
    seed: int = 0, sample_size: int = 8, text_dim: int = CLIP_HIDDEN, pooled_dim: int | None = None
):
    """An SD3-shaped MMDiT (``SD3Transformer2DModel``): patch 2, one joint block, two heads of 8, context ``text_dim``
    (pooled: ``pooled_dim``, default the same), latents ``4 × sample_size²``; random weights from ``seed``."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        caption_projection_dim=16,
        pooled_projection_dim=pooled_dim or text_dim,
        pos_embed_max_size=sample_size // 2,
    )


def _tiny_shifted_vae(sample_size: int, scaling_factor: float, shift_factor: float):
    """:func:`_tiny_vae` with a latent shift (SD3's and Flux's VAEs centre their latents)."""
    vae = _tiny_vae(sample_size, scaling_factor=scaling_factor)
    vae.register_to_config(shift_factor=shift_factor)
    return vae


def build_tiny_flow(path: Path, shift: float = 3.0, seed: int = 0, sample_size: int = 8, text_dim: int = 384) -> Path:
    """A flow-matching model folder (SD3's layout without its three text encoders): ``transformer/`` (random
    :func:`tiny_flow_transformer`), ``vae/`` (with SD3's ``shift_factor``), ``scheduler/``
    (``FlowMatchEulerDiscreteScheduler`` at ``shift``) and, for ``text_dim`` 384, the embedded MiniLM text encoder's
    reference. Returns ``path``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lcm.models.text import write_reference

    path = _check(path, sample_size)
    tiny_flow_transformer(seed, sample_size, text_dim).save_pretrained(path / "transformer", safe_serialization=True)
    _tiny_shifted_vae(sample_size, 1.5305, 0.0609).save_pretrained(path / "vae", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(shift=shift).save_config(path / "scheduler")
    if text_dim == 384:
        write_reference(path)
    return path


def build_tiny_sd3(path: Path, shift: float = 3.0, seed: int = 0, sample_size: int = 8) -> Path:
    """A ``StableDiffusion3Pipeline`` folder (``model_index.json`` and all) without T5 (``text_encoder_3`` None,
    which SD3 allows): two 32-d CLIPs with 16-d projections (pooled 32), an MMDiT whose context is 96 wide (the
    CLIPs' 64 zero-padded, as T5's width would pad them), a VAE with SD3's ``shift_factor``, and
    ``FlowMatchEulerDiscreteScheduler`` at ``shift``. Returns ``path``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    path = _check(path, sample_size)
    transformer = tiny_flow_transformer(seed, sample_size, text_dim=96, pooled_dim=32)
    vae = _tiny_shifted_vae(sample_size, 1.5305, 0.0609)
    encoders = [CLIPTextModelWithProjection(tiny_text_encoder_config(projection_dim=16)) for _ in range(2)]
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=encoders[1],
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    _save(pipe, path)
    return path


def build_tiny_flux(path: Path, seed: int = 0, sample_size: int = 8, guidance: bool = True) -> Path:
    """A ``FluxPipeline`` folder: a guidance-distilled ``FluxTransformer2DModel`` (one double and one single block,
    two heads of 8, rotary axes 2 + 2 + 4) on packed 2×2 patches of 4-channel latents, a 32-d CLIP (pooled) and a
    32-d T5 (context; it reads the tiny byte-level tokenizer, padded to Flux's 512 tokens), a VAE with a shift
    factor whose ``sample_size`` fixes the default image size, and a dynamically shifted
    ``FlowMatchEulerDiscreteScheduler`` (Flux's μ rule). Returns ``path``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    path = _check(path, sample_size)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4),
    )
    vae = _tiny_shifted_vae(sample_size, 0.3611, 0.1159)
    t5 = T5EncoderModel(T5Config(vocab_size=CLIP_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4))
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=CLIPTextModel(tiny_text_encoder_config()),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=tiny_clip_tokenizer(),
        transformer=transformer,
    )
    _save(pipe, path)
    return path
