"""Latent Consistency Fine-tuning (LCF; Luo et al. 2023 §4.4; docs/design.md §3). Teacher-free; knows no Accelerate.

The consistency-*training* estimator replaces the teacher's ODE step: both ends of a skipping step share the same
noise, ``z_{t_{n+k}} = α_{t_{n+k}} z0 + σ_{t_{n+k}} ε`` and ``z_{t_n} = α_{t_n} z0 + σ_{t_n} ε``, and the loss is
``d(f_θ(z_{t_{n+k}}, w, c, t_{n+k}), f_θ⁻(z_{t_n}, w, c, t_n))`` with an EMA target θ⁻.

How w is set: an LCM is conditioned on the guidance weight w, but without a teacher there is no guided ODE whose
w could be distilled. LCF therefore trains at ONE fixed w (``LCFConfig.w``, by default the LCM's own default w,
``LatentDiffusion.default_w``: the middle of its distillation range): the fine-tuned model adapts its mapping at that
w, and other w stay close to what LCD taught. The consistency constants default to the LCM's own as well (those its
export recorded), so fine-tuning continues the function the LCM was distilled as.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lcm.config.method import LCFConfig
from lcm.config.run import StudentKind
from lcm.maths.losses import consistency_loss
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.text import TextEmbeddings
from lcm.training.lcd import LCDOutput, StudentTarget

__all__ = ["LCF", "for_model"]


def for_model(cfg: LCFConfig, model: LatentDiffusion) -> LCFConfig:
    """``cfg`` with every unset value taken from the LCM being fine-tuned (module docstring)."""
    return replace(
        cfg,
        w=model.default_w if cfg.w is None else cfg.w,
        sigma_data=model.sigma_data if cfg.sigma_data is None else cfg.sigma_data,
        timestep_scaling=model.timestep_scaling if cfg.timestep_scaling is None else cfg.timestep_scaling,
    )


class LCF(StudentTarget):
    """Owns student and target of one fine-tuning run and computes the LCF loss."""

    def __init__(self, model: LatentDiffusion, student, kind: StudentKind, cfg: LCFConfig, target=None):
        super().__init__(model, student, kind, for_model(cfg, model), target)

    @property
    def w_range(self) -> tuple[float, float]:
        """LCF holds the guidance input at one w."""
        return self.cfg.w, self.cfg.w

    def loss(
        self, z0: torch.Tensor, cond: TextEmbeddings, uncond: TextEmbeddings | None, generator: torch.Generator
    ) -> LCDOutput:
        """Per-sample LCF loss for clean latents ``z0``; ``uncond`` is unused (no guidance without a teacher)."""
        batch, device = z0.shape[0], z0.device
        t_start, t_end = self.grid.sample(batch, generator)
        noise = torch.randn(z0.shape, generator=generator).to(device)  # shared by both ends
        w = torch.full((batch,), float(self.cfg.w))
        w_emb = self.w_emb(w, device)
        z_start = self.model.schedule.add_noise(z0, noise, t_start)
        z_end = self.model.schedule.add_noise(z0, noise, t_end)
        t_start, t_end = t_start.to(device), t_end.to(device)

        prediction = self.student_model.consistency_output(z_start, t_start, cond, w_emb)
        with torch.no_grad():
            target = self.target_model.consistency_output(z_end, t_end, cond, w_emb)
        return LCDOutput(consistency_loss(prediction, target, self.cfg.loss, self.cfg.huber_c), t_start, w)
