"""A diffusers-format latent diffusion model behind one interface (teacher, student or LCM alike).

A folder (or hub id) with ``unet/``, ``vae/``, ``scheduler/`` and a text encoder — a Stable Diffusion checkpoint or the
embedded Fashion-MNIST teacher, loaded by the same code. The model turns into the callables the maths expects:
:meth:`denoiser` / :meth:`guided_denoiser` for the solvers and teacher samplers, :meth:`consistency_fn` for LCMs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .consistency import SIGMA_DATA, TIMESTEP_SCALING, consistency_function
from .guidance import cfg_combine, w_embedding
from .parameterization import Denoised, PredictionType, to_denoised
from .schedule import NoiseSchedule
from .text import TextEmbeddings, TextEncoder, load_text_encoder

__all__ = ["LatentDiffusion"]


@dataclass(eq=False)
class LatentDiffusion:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    scheduler_config: dict
    text_encoder: TextEncoder | None
    source: str | None = None  # where it was loaded from (folder or hub id)
    lora_base: str | None = None  # for a loaded LCM-LoRA: its base model (``source`` is the LoRA folder)

    def __post_init__(self) -> None:
        self.schedule = NoiseSchedule.from_config(self.scheduler_config)
        self.prediction_type = PredictionType.parse(self.scheduler_config.get("prediction_type", "epsilon"))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        with_text_encoder: bool = True,
        lora: str | Path | None = None,
        lora_scale: float = 1.0,
    ) -> LatentDiffusion:
        """Load a model folder or hub id; a folder holding an exported LCM-LoRA loads its base model plus the LoRA.

        ``lora``: a LoRA file (or folder) made here or elsewhere (diffusers', kohya's or peft's naming) applied to the
        UNet at ``lora_scale``. It is taken for an LCM-LoRA: the model samples as an LCM, on the skipping grid of the
        LoRA's ``lcm_lora.json`` when it has one, else LCM-LoRA's N = 50.
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        from .export import LORA_META, lcm_scheduler_config

        path = str(path)
        if (Path(path) / LORA_META).is_file():
            if lora is not None:
                raise ValueError(f"{path} is an LCM-LoRA folder; give its base model as --model and it as --lora")
            meta = json.loads((Path(path) / LORA_META).read_text())
            model = cls.from_pretrained(meta["base_model"], device, with_text_encoder, lora=path, lora_scale=lora_scale)
            model.source, model.lora_base = path, meta["base_model"]
            return model
        if lora is not None:
            from .lora import apply_lora_file

            model = cls.from_pretrained(path, device, with_text_encoder)
            apply_lora_file(model.unet, lora, scale=lora_scale)
            meta_file = (Path(lora) if Path(lora).is_dir() else Path(lora).parent) / LORA_META
            original = json.loads(meta_file.read_text())["original_inference_steps"] if meta_file.is_file() else 50
            if not model.is_lcm:
                model.scheduler_config = lcm_scheduler_config(model.scheduler_config, original)
                model.__post_init__()
            model.lora_base = path
            return model
        looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1
        if looks_local and not Path(path).expanduser().is_dir():
            raise ValueError(f"no model folder at {path} (and it is not a hub id of the form owner/name)")
        if Path(path).exists() and not (Path(path) / "unet").is_dir():
            raise ValueError(f"{path} is not a diffusers model folder: it has no unet/ subfolder")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device).eval().requires_grad_(False)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device).eval().requires_grad_(False)
        scheduler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler"))
        text_encoder = load_text_encoder(path).to(device) if with_text_encoder else None
        return cls(unet, vae, scheduler_config, text_encoder, source=path)

    # --- properties -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def is_lcm(self) -> bool:
        """A distilled LCM: its UNet takes the w-embedding, or its scheduler is an LCMScheduler."""
        return (
            self.unet.config.get("time_cond_proj_dim") is not None
            or self.scheduler_config.get("_class_name") == "LCMScheduler"
        )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    # --- text, latents ----------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> TextEmbeddings:
        if self.text_encoder is None:
            raise ValueError("this model was loaded without its text encoder")
        return self.text_encoder.encode(prompts).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [−1, 1] → scaled latents (a posterior sample)."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [−1, 1] (float32)."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample.float().clamp(-1, 1)

    # --- the network as the maths sees it -------------------------------------------------------------------
    def unet_output(
        self, unet, z: torch.Tensor, t: torch.Tensor, text: TextEmbeddings, timestep_cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One UNet call at real-valued ``t`` ``[B]`` (``unet`` may be wrapped for distributed training)."""
        dtype = getattr(unet, "module", unet).dtype
        return unet(
            z.to(dtype),
            t.to(device=z.device, dtype=torch.float32),
            encoder_hidden_states=text.hidden_states.to(dtype),
            timestep_cond=None if timestep_cond is None else timestep_cond.to(dtype),
            added_cond_kwargs=self._added_conditions(text, z, dtype),
        ).sample

    def _added_conditions(self, text: TextEmbeddings, z: torch.Tensor, dtype) -> dict | None:
        """SDXL's micro-conditioning: pooled text embedding and (original size, crop, target size) time ids."""
        if self.unet.config.get("addition_embed_type") != "text_time":
            return None
        if text.pooled is None:
            raise ValueError("an SDXL UNet needs pooled text embeddings (use its two text encoders)")
        size = z.shape[-1] * self.vae_scale_factor
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=z.device, dtype=dtype)
        return {"text_embeds": text.pooled.to(dtype), "time_ids": time_ids.expand(z.shape[0], 6)}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _to_denoised(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> Denoised:
        alpha, sigma = self.schedule.alpha_sigma(t.cpu())
        return to_denoised(out.to(z.dtype), z, alpha, sigma, self.prediction_type)

    def denoiser(self, text: TextEmbeddings, unet=None):
        """Unguided denoiser ``(z, t) → Denoised`` conditioned on ``text``."""
        unet = unet or self.unet

        def denoise(z: torch.Tensor, t: torch.Tensor) -> Denoised:
            return self._to_denoised(self.unet_output(unet, z, t, text), z, t)

        return denoise

    def guided_denoiser(self, cond: TextEmbeddings, uncond: TextEmbeddings, w: torch.Tensor, unet=None):
        """Classifier-free guided denoiser, ``cond + w·(cond − uncond)``: ONE batched forward of 2B."""
        unet = unet or self.unet
        both = TextEmbeddings.cat([cond, uncond])

        def denoise(z: torch.Tensor, t: torch.Tensor) -> Denoised:
            out = self.unet_output(unet, torch.cat([z, z]), torch.cat([t, t]), both)
            out_c, out_u = out.chunk(2)
            return self._to_denoised(cfg_combine(out_c, out_u, w), z, t)

        return denoise

    def consistency_fn(self, text: TextEmbeddings, w: torch.Tensor | None, unet=None):
        """The LCM's ``f(z, t) → x̂0``; the w-embedding is passed when the UNet takes one."""
        unet = unet or self.unet
        proj_dim = unet.config.get("time_cond_proj_dim")
        if proj_dim is not None and w is None:
            raise ValueError("this LCM is guidance-conditioned: give the guidance weight w")
        emb = w_embedding(w.cpu(), proj_dim).to(self.device) if proj_dim is not None else None
        return lambda z, t: self.consistency_output(unet, z, t, text, emb)

    def consistency_output(
        self,
        unet,
        z: torch.Tensor,
        t: torch.Tensor,
        text: TextEmbeddings,
        w_emb: torch.Tensor | None,
        sigma_data: float = SIGMA_DATA,
        timestep_scaling: float = TIMESTEP_SCALING,
    ) -> torch.Tensor:
        """``f(z, w, c, t) = c_skip z + c_out x̂0`` of ``unet`` (Eq. 9, Luo et al. 2023), computed in float32+."""
        out = self.unet_output(unet, z, t, text, w_emb).float()
        x0 = self._to_denoised(out, z, t).x0
        return consistency_function(z, x0, t.to(z.device), sigma_data, timestep_scaling)
