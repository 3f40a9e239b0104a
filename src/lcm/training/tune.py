"""``lcm tune``: fine-tune a diffusion model (a teacher, not an LCM) on image-caption data with its own denoising
loss — the style LoRA or fine-tune that an LCM-LoRA is then stacked with (``lcm sample --lora``) or merged into
(``lcm merge``), as in the LCM-LoRA paper's "acceleration vector" use.

The loss is the model's own training objective: ``z_t = α_t z0 + σ_t ε`` at ``t ~ U{0, …, T−1}``, the squared error
of the network output against what its prediction type should give for (z0, ε) (ε, v or x0), with a fraction of
the captions replaced by the empty prompt so that classifier-free guidance keeps working. A LoRA student exports a
``pytorch_lora_weights.safetensors`` without an ``lcm_lora.json`` (it is not an accelerator); a full student, or a
LoRA with ``--fuse-lora``, a diffusers folder with the base's scheduler.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from lcm.config.method import TuneConfig
from lcm.config.run import StudentConfig, StudentKind, ValidationConfig
from lcm.images import save_grid
from lcm.maths.guidance import default_w
from lcm.maths.parameterization import to_model_output
from lcm.maths.timesteps import Sampler
from lcm.models.export import export_model_folder
from lcm.models.formats import TUNE_RECORD
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.lora import write_lora_file
from lcm.models.student import add_lora
from lcm.models.text import TextEmbeddings
from lcm.sample import generate
from lcm.training.loop import Task, Validation
from lcm.training.task import default_validation_prompts, encode_batch

__all__ = ["TuneTask"]


class TuneTask(Task):
    """The denoising fine-tune of ``model``'s UNet: LoRA adapters (the base frozen) or the whole UNet."""

    def __init__(
        self,
        model: LatentDiffusion,
        cfg: TuneConfig | None = None,
        student: StudentConfig | None = None,
        seed: int = 0,
        validation: ValidationConfig | None = None,
        provenance: dict | None = None,
    ):
        if model.is_lcm:
            raise ValueError(
                "lcm tune fine-tunes a diffusion model with its own loss; an LCM is fine-tuned by lcm finetune"
            )
        self.model, self.cfg = model, cfg or TuneConfig()
        self.student_cfg, validation = student or StudentConfig(), validation or ValidationConfig()
        if self.student_cfg.kind is StudentKind.LORA:
            s = self.student_cfg
            self.unet = add_lora(model.unet, s.lora_rank, s.lora_alpha, s.lora_targets, seed).train()
        else:
            self.unet = model.unet.requires_grad_(True).train()
        if self.student_cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.uncond = model.encode_prompts([""])
        prompts = validation.prompts if validation.prompts is not None else default_validation_prompts(model)
        self.validation_prompts, self.validation_seeds = tuple(prompts), tuple(validation.seeds)
        self.validation_w = validation.w if validation.w is not None else default_w(None, model.is_embedded)
        self.provenance = {"method": "tune", "student": self.student_cfg.kind.value, **(provenance or {})}

    # --- the loop's Task -----------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def wrap(self, prepare) -> list[torch.nn.Module]:
        self.unet = prepare(self.unet)
        return [self.unet]

    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        z0, cond, uncond = encode_batch(self.model, self.uncond, batch, generator)
        batch_size, schedule = len(z0), self.model.schedule
        dropped = torch.rand(batch_size, generator=generator) < self.cfg.caption_dropout
        cond = _where(dropped.to(z0.device), uncond, cond)
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=generator).to(z0.device)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        alpha, sigma = schedule.alpha_sigma(t)
        target = to_model_output(z0, noise, alpha, sigma, self.model.prediction_type)
        output = self.model.with_network(self.unet).unet_output(schedule.add_noise(z0, noise, t), t.float(), cond)
        return (output.float() - target).square().flatten(1).mean(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        unet = getattr(self.unet, "module", self.unet)
        return {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(getattr(self.unet, "module", self.unet).named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                params[key.removeprefix("unet.")].copy_(value)

    @torch.no_grad()
    def validate(self, step: int, folder: Path) -> Validation:
        """A grid of the tuned model sampled as a teacher: DDIM at 8 and 25 steps (rows) × prompts and seeds."""
        import numpy as np
        from PIL import Image

        if not self.validation_prompts:
            return Validation()
        unet = getattr(self.unet, "module", self.unet)
        was_training = unet.training
        unet.eval()
        tuned = self.model.with_network(unet)
        prompts = [p for p in self.validation_prompts for _ in self.validation_seeds]
        seeds = [s for _ in self.validation_prompts for s in self.validation_seeds]
        rows = [generate(tuned, prompts, Sampler.DDIM, n, self.validation_w, seeds) for n in (8, 25)]
        columns = [f"{p}, seed {s}" for p, s in zip(prompts, seeds, strict=True)]
        path = save_grid(
            torch.cat(rows), folder / f"step-{step:06d}.png", scale=2, rows=["DDIM 8 steps", "DDIM 25 steps"],
            columns=columns,
        )  # fmt: skip
        with Image.open(path) as grid:
            images = {"validation": np.asarray(grid.convert("RGB"))[None]}
        unet.train(was_training)
        return Validation(images=images)

    def export(self, folder: Path) -> None:
        unet = getattr(self.unet, "module", self.unet)
        settings = {"tune": vars(self.cfg), **self.provenance}
        if self.student_cfg.kind is StudentKind.LORA and not self.student_cfg.fuse_lora:
            write_lora_file(unet, folder)
        else:  # a model folder: the whole UNet, or the base with the LoRA fused in
            if self.student_cfg.kind is StudentKind.LORA:
                unet = copy.deepcopy(unet)
                unet.fuse_lora()
                unet.unload_lora()
            export_model_folder(self.model.source, unet, folder)
        (folder / TUNE_RECORD).write_text(json.dumps(settings, indent=2, default=str) + "\n")


def _where(mask: torch.Tensor, a: TextEmbeddings, b: TextEmbeddings) -> TextEmbeddings:
    """Per sample, ``a`` where ``mask`` holds, else ``b``."""
    states = torch.where(mask[:, None, None], a.hidden_states, b.hidden_states)
    pooled = None if a.pooled is None else torch.where(mask[:, None], a.pooled, b.pooled)
    return TextEmbeddings(states, pooled)
