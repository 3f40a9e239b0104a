"""The distribution-matching term of ``lcm distill --dmd-weight λ`` (docs/methods.md §5): DMD2's gradient (Yin et al.
2024, arXiv 2405.14867) on the student's 1-step sample, beside the consistency loss.

x is the student's 1-step sample from pure noise, as its 1-step sampler draws it (:meth:`LCD.one_step`). It is
diffused to a level t ~ U{T/50, …, 49T/50}, x_t = α_t·x + σ_t·ε, and denoised twice:

    x̂0_real: the frozen teacher with classifier-free guidance at the sample's w (the distribution to match)
    x̂0_fake: the fake score, a copy of the student's network as the run starts (so it takes the same w input),
             trained online to denoise the student's own 1-step samples (the distribution the student has)

    g = (x̂0_fake − x̂0_real) / mean|x − x̂0_real|        (per sample; the mean over the sample's elements)

g is the KL gradient between the student's 1-step distribution and the teacher's, at level t, normalised per sample.
The student adds λ·½·mean((x − sg(x − g))²) per sample, whose gradient on x is λ·g/numel: the sample moves towards
what the teacher denoises it into and away from what the student's own distribution does. No gradient goes through
either score network.

The fake score trains once per optimiser step (``--dmd-fake-updates K``: K times, DMD2's two time-scale rule), on the
(detached) samples the student's step drew, at levels and noise drawn for each update in that step, with the
ε-prediction loss and its own AdamW (its w projection at the student's ``--w-lr-scale``); its weights,
moments and step are part of every checkpoint.
Cost per micro-batch: one more student forward and backward (the 1-step sample; shared with
``--adversarial-input one-step``), a guided teacher forward (2B), and K of the fake score's forwards and backwards.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.text import TextEmbeddings
from lcm.training.adversarial import TrainedTerm

__all__ = ["DistributionMatching"]

LEVELS = (0.02, 0.98)  # the fraction of T between which the levels are drawn (DMD2's)


class DistributionMatching(TrainedTerm):
    """The fake score of one distillation run: its network and optimiser, the student's term, and the fake score's
    step on the samples the student's step drew (logged: ``dmd_grad``, mean |g|; ``dmd_fake``, its ε loss)."""

    prefix = "fake"

    def __init__(
        self,
        model: LatentDiffusion,
        student: nn.Module,
        weight: float,
        lr: float,
        w_lr_scale: float = 1.0,
        updates: int = 1,
    ):
        super().__init__()
        self.model, self.weight, self.updates = model, weight, updates
        self.fake = self.network = copy.deepcopy(student).requires_grad_(True).train()
        self.fake_model = model.with_network(self.fake)
        T = model.schedule.num_train_timesteps
        self.levels = (round(LEVELS[0] * T), round(LEVELS[1] * T))
        # its w projection learns at the student's w rate (zero-initialised in both, it must learn as fast how the
        # student's samples depend on w, or it models their mixture over w and pushes each w towards the others)
        projection = getattr(getattr(self.fake, "time_embedding", None), "cond_proj", None)
        projection = getattr(projection, "weight", None)
        groups = [{"params": [p for p in self.fake.parameters() if p is not projection]}]
        if projection is not None:
            groups.append({"params": [projection], "lr": lr * w_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.0, 0.99), weight_decay=0.0)

    def generator_loss(
        self,
        x: torch.Tensor,
        cond: TextEmbeddings,
        uncond: TextEmbeddings,
        w: torch.Tensor,
        w_emb: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """λ·½·mean((x − sg(x − g))²) per sample ``[B]`` for the student's 1-step samples ``x`` at guidance ``w``
        (``w_emb``: the student's input for it); keeps the samples for :meth:`step`."""
        batch, device = x.shape[0], x.device
        t = torch.randint(self.levels[0], self.levels[1] + 1, (batch,), generator=generator).to(device)
        noise = torch.randn(x.shape, generator=generator).to(device, x.dtype)
        draws = []  # (levels, noise) of each of the fake score's updates
        for _ in range(self.updates):
            fake_noise = torch.randn(x.shape, generator=generator).to(device, x.dtype)
            fake_t = torch.randint(self.levels[0], self.levels[1] + 1, (batch,), generator=generator).to(device)
            draws.append((fake_t, fake_noise))
        with torch.no_grad():
            z_t = self.model.schedule.add_noise(x.detach(), noise, t)
            real = self.model.guided_denoiser(cond, uncond, w.to(device))(z_t, t).x0.float()
            fake = self.fake_model.denoised(z_t, t, cond, w_emb).x0.float()
            scale = (x.detach().float() - real).abs().flatten(1).mean(1).clamp(min=1e-8)
            g = torch.nan_to_num((fake - real) / scale.reshape(-1, *(1,) * (x.ndim - 1)))
        self.pending.append((x.detach(), draws, cond, None if w_emb is None else w_emb.detach()))
        self._add("dmd_grad", g.abs().mean())
        loss = 0.5 * (x.float() - (x.detach().float() - g)).square().flatten(1).mean(1)
        return self.weight * loss

    def step(self) -> None:
        """The fake score's updates (``updates`` of them) on the samples kept since the last step, each at its own
        levels and noise (ε-prediction loss); an update is skipped, and its gradients dropped, when its loss is not
        finite."""
        if not self.pending:
            return
        for k in range(self.updates):
            losses = []
            for x, draws, cond, w_emb in self.pending:
                t, noise = draws[k]
                z_t = self.model.schedule.add_noise(x, noise, t)
                eps = self.fake_model.denoised(z_t, t, cond, w_emb).eps
                losses.append((eps - noise.float()).square().mean())
            self._update(torch.stack(losses).mean(), "dmd_fake")
        self.pending.clear()
