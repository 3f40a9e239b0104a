"""The Latent Consistency Distillation step (Algorithm 1 of Luo et al. 2023; docs/design.md §2). Knows no Accelerate.

One call of :meth:`LCD.loss`, for a batch of clean latents z0 and their text conditions:

1. draw (t_{n+k}, t_n) on the skipping grid, noise ε and a guidance weight w ~ U[w_min, w_max] per sample (with
   ``--cfg-free``: the captions to replace by the empty prompt instead, and no w reaches student or teacher);
2. ``z_{t_{n+k}} = α z0 + σ ε``;
3. the student's consistency output ``f_θ(z_{t_{n+k}}, w, c, t_{n+k})``;
4. without gradients: one solver step of the guided teacher, ``ẑ_{t_n} = Ψ(z_{t_{n+k}}, t_{n+k} → t_n)``
   (Eq. 8 with the augmented PF-ODE, Eq. 13; ``--cfg-free``: the unguided PF-ODE), and the target's
   ``f_θ⁻(ẑ_{t_n}, w, c, t_n)``;
5. ``d(f_θ, f_θ⁻)`` per sample.

With ``--method tcd`` or ``pcm`` both outputs map onto an earlier point s of the trajectory instead of its clean end
(:meth:`~lcm.models.latent_diffusion.LatentDiffusion.trajectory_output`, ``f(z, t → s)``): TCD draws s per sample
from 0 and the grid points at or below t_n, PCM takes the edge of the phase the pair lies in. With s = 0 both are
the LCM's loss exactly (tests/test_methods.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch

from lcm.config.method import AdversarialInput, Consistency, LCDConfig
from lcm.config.run import StudentKind
from lcm.maths.ema import ema_update
from lcm.maths.guidance import w_embedding
from lcm.maths.losses import consistency_loss
from lcm.maths.solvers import Solver, solve
from lcm.maths.timesteps import (
    FlowGrid,
    MixedGrid,
    Sampler,
    SkippingGrid,
    phase_edge_below,
    sampler_timesteps,
    trajectory_targets,
)
from lcm.models.formats import guidance_input, w_input_dim
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import adapters_disabled
from lcm.models.text import TextEmbeddings
from lcm.training.adversarial import AdversarialTerm, TrainedTerm
from lcm.training.distribution_matching import DistributionMatching
from lcm.training.regression import RegressionTerm

__all__ = ["LCD", "LCDConfig", "LCDOutput", "LossMonitor", "StudentTarget"]


class LCDOutput(NamedTuple):
    loss: torch.Tensor  # (B,) per-sample distance (plus λ times the adversarial term, when there is one)
    t_start: torch.Tensor  # (B,) t_{n+k}
    w: torch.Tensor  # (B,)
    consistency: torch.Tensor | None = None  # (B,) the distance alone, when ``loss`` holds more


class LossMonitor:
    """Per-t and per-w means of the per-sample loss between two log lines, and how the w projection moves.

    Sums stay on the device (no host sync per step); :meth:`read` returns them as floats and starts over. The t bins
    are quarters of [0, T); the w bins halves of [w_min, w_max]. For a w-conditioned full student it also reports
    the norm of the w projection ``time_embedding.cond_proj`` (zero at initialisation) and the RMS norm of its
    gradient over the steps since the last read.
    """

    T_BINS, W_BINS = 4, 2

    def __init__(self, num_train_timesteps: int, w_range: tuple[float, float] | None, w_projection=None):
        self.T, (self.w_lo, self.w_hi) = num_train_timesteps, w_range or (0.0, 0.0)  # None: no w bins
        self.w_projection = w_projection
        self.sums = self.counts = None
        self.grad_sq, self.grad_steps = None, 0
        if w_projection is not None and w_projection.requires_grad:
            w_projection.register_post_accumulate_grad_hook(self._grad_hook)

    def _grad_hook(self, param: torch.Tensor) -> None:
        sq = param.grad.detach().float().pow(2).sum()
        self.grad_sq = sq if self.grad_sq is None else self.grad_sq + sq
        self.grad_steps += 1

    def add(self, out: LCDOutput) -> None:
        loss = (out.loss if out.consistency is None else out.consistency).detach().float()
        t_bin = (out.t_start.to(loss.device) * self.T_BINS // self.T).clamp(0, self.T_BINS - 1).long()
        span = max(self.w_hi - self.w_lo, 1e-12)
        w_bin = ((out.w.to(loss.device) - self.w_lo) / span * self.W_BINS).clamp(0, self.W_BINS - 1).long()
        index = torch.cat([t_bin, self.T_BINS + w_bin])
        if self.sums is None:
            self.sums = torch.zeros(self.T_BINS + self.W_BINS, device=loss.device)
            self.counts = torch.zeros_like(self.sums)
        self.sums.index_add_(0, index, torch.cat([loss, loss]))
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=self.counts.dtype))

    def read(self) -> dict[str, float]:
        logs: dict[str, float] = {}
        if self.sums is not None:
            means, counts = (self.sums / self.counts.clamp(min=1)).tolist(), self.counts.tolist()
            width = self.T // self.T_BINS
            names = [f"loss_t{i * width}-{(i + 1) * width - 1}" for i in range(self.T_BINS)]
            if self.w_hi > self.w_lo:
                names += ["loss_w_low", "loss_w_high"]
            logs.update({name: means[i] for i, name in enumerate(names) if counts[i]})
            self.sums = self.counts = None
        if self.w_projection is not None:
            logs["w_proj_norm"] = float(self.w_projection.detach().norm())
            if self.grad_steps:
                logs["w_proj_grad_norm"] = float((self.grad_sq / self.grad_steps).sqrt())
            self.grad_sq, self.grad_steps = None, 0
        return logs


class StudentTarget:
    """Student, target and the consistency function shared by LCD and LCF."""

    adversarial: AdversarialTerm | None = None  # LCD's --adversarial-weight
    distribution_matching: DistributionMatching | None = None  # LCD's --dmd-weight
    regression: RegressionTerm | None = None  # LCD's --regression-weight (no network of its own)

    @property
    def terms(self) -> dict:
        """Every term beside the consistency loss, by name: each has ``read()``, the means it logs since the last
        read."""
        terms = {"adversarial": self.adversarial, "dmd": self.distribution_matching, "regression": self.regression}
        return {name: term for name, term in terms.items() if term is not None}

    @property
    def trained_terms(self) -> dict:
        """The terms that train networks of their own, by checkpoint prefix: each also has ``step()`` (after the
        student's optimiser step) and a state dict."""
        return {name: term for name, term in self.terms.items() if isinstance(term, TrainedTerm)}

    def __init__(self, model: LatentDiffusion, student, kind: StudentKind, cfg, target=None):
        self.model, self.student, self.kind, self.cfg = model, student, StudentKind(kind), cfg
        # where pairs are drawn: LCD's skipping grid, for a flow teacher at a random offset per pair (every σ)
        if model.is_flow:
            self.grid = FlowGrid(cfg.num_solver_steps, model.schedule)
        else:
            self.grid = SkippingGrid(cfg.num_solver_steps, model.schedule.num_train_timesteps)
        if self.kind is StudentKind.FULL:
            if target is None:
                raise ValueError("a full student needs an EMA target UNet")
            self.target = target.requires_grad_(False)
        else:
            self.target = student  # LoRA: the same weights, used under no_grad, no EMA
        self.w_dim = w_input_dim(student)  # the student's own w-embedding size; None: it takes no w
        # The student (as the loss calls it: see wrap) and the target as models, with this run's constants
        self.student_model, self.target_model = self._as_model(student), self._as_model(self.target)

    def _as_model(self, network) -> LatentDiffusion:
        return self.model.with_network(
            network, sigma_data=self.cfg.sigma_data, timestep_scaling=self.cfg.timestep_scaling
        )

    @property
    def w_conditioned(self) -> bool:
        return self.w_dim is not None or guidance_input(self.student)

    def wrap(self, prepare):
        """Train through ``prepare(student)`` (Accelerate's distributed wrapper of the same weights); returns it."""
        wrapped = prepare(self.student)
        self.student_model = self._as_model(wrapped)
        return wrapped

    # --- the networks -----------------------------------------------------------------------------------------
    def w_emb(self, w: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """The student's ``timestep_cond`` for guidance weights ``w`` ``[B]``, at its own embedding size (a
        guidance-distilled transformer's: its guidance scale 1 + w)."""
        if guidance_input(self.student):
            return (1.0 + w.float()).to(device)
        return w_embedding(w, self.w_dim).to(device) if self.w_dim is not None else None

    def compile(self) -> None:
        """``torch.compile`` every network the loss calls, in place (fixed shapes): student, target and the model's
        own (LCD's teacher). A LoRA student is its own target and teacher, so it is compiled once."""
        networks = {id(m): m for m in (self.student, self.target, self.model.unet)}
        for network in networks.values():
            network.compile(dynamic=False)

    def before_optimizer_step(self, step: int) -> None:
        """What a method schedules by the step (LCD: its skip curriculum); nothing by default."""

    def update_target(self) -> None:
        """θ⁻ ← μθ⁻ + (1 − μ)θ after each optimiser step (full student; the LoRA target is the student itself)."""
        if self.kind is StudentKind.FULL:
            ema_update(self.target, self.student, self.cfg.ema_decay)


class LCD(StudentTarget):
    """Owns student, target and teacher UNets of one distillation run and computes the LCD loss."""

    def __init__(self, model: LatentDiffusion, student, kind: StudentKind, cfg: LCDConfig, target=None, seed=0):
        super().__init__(model, student, kind, cfg, target)
        if cfg.solver.flow_only and not model.is_flow:
            raise ValueError(f"--solver {cfg.solver.value} is for flow-matching teachers; use ddim, dpm or dpmpp")
        if model.is_flow:
            self._check_flow(cfg)
            self.fine_grid = self.after_curriculum = self.grid
            self.coarse_grid = None
            return
        if cfg.adversarial_weight > 0:
            lr, t_max = cfg.adversarial_lr, cfg.adversarial_max_t
            self.adversarial = AdversarialTerm(model, cfg.adversarial_weight, lr, t_max, seed)
        if cfg.dmd_weight > 0:
            if self.kind is not StudentKind.FULL:
                raise ValueError("--dmd-weight is built for full students (its fake score copies the student's UNet)")
            self.distribution_matching = DistributionMatching(
                model, student, cfg.dmd_weight, cfg.dmd_lr, cfg.w_lr_scale, cfg.dmd_fake_updates
            )
        if cfg.regression_weight > 0:
            with self._teacher_context():  # the probe of the pairs' teacher: a LoRA student with adapters off
                self.regression = RegressionTerm(model, cfg.regression_pairs, cfg.regression_weight)
        # The teacher is ``model`` itself: its frozen original UNet, or for LoRA the student (the model's own UNet,
        # adapted in place) with its adapters disabled. The skipping grid: a curriculum or mixed skips, if asked.
        T, bias = model.schedule.num_train_timesteps, cfg.timestep_bias
        self.fine_grid = SkippingGrid(cfg.num_solver_steps, T, bias)
        coarse = cfg.coarse_num_solver_steps
        self.coarse_grid = SkippingGrid(coarse, T, bias) if coarse else None
        fraction = cfg.coarse_fraction
        self.after_curriculum = MixedGrid(self.fine_grid, self.coarse_grid, fraction) if fraction else self.fine_grid
        self.grid = self.after_curriculum

    @staticmethod
    def _check_flow(cfg: LCDConfig) -> None:
        """What a flow teacher's distillation does not have yet, refused in one line each."""
        if cfg.consistency is not Consistency.LCM:
            raise ValueError(f"--method {cfg.consistency.value} is not built for flow-matching teachers; use lcm")
        unbuilt = {"--adversarial-weight": cfg.adversarial_weight > 0, "--dmd-weight": cfg.dmd_weight > 0}
        unbuilt["--regression-weight"] = cfg.regression_weight > 0
        if flag := next((f for f, on in {**unbuilt, "--cfg-free": cfg.cfg_free}.items() if on), None):
            raise ValueError(f"{flag} is not built for flow-matching teachers")
        if cfg.coarse_num_solver_steps or cfg.coarse_fraction or cfg.timestep_bias:
            raise ValueError("coarse grids and --timestep-bias are for VP teachers; a flow teacher trains every σ")
        if cfg.solver is Solver.DPM_SOLVER_2:
            raise ValueError("--solver dpm (noise form) cannot reach a flow's σ = 0; use ddim (Euler), heun or dpmpp")

    def before_optimizer_step(self, step: int) -> None:
        """Skip curriculum: optimiser steps 1 … ``coarse_steps`` draw their pairs on the coarse grid, later ones on
        the fine grid or, with ``coarse_fraction``, on both."""
        coarse = self.coarse_grid is not None and step <= self.cfg.coarse_steps
        self.grid = self.coarse_grid if coarse else self.after_curriculum

    @property
    def w_range(self) -> tuple[float, float] | None:
        """The guidance weights this run trains on: w ~ U[w_min, w_max]; None for CFG-free (no w reaches a network)."""
        return None if self.cfg.cfg_free else (self.cfg.w_min, self.cfg.w_max)

    def target_times(
        self, t_start: torch.Tensor, t_end: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor | None:
        """Where the pair's outputs map to: None for the LCM (the clean end), TCD's drawn s, PCM's phase edge."""
        if self.cfg.consistency is Consistency.TCD:
            return trajectory_targets(t_end, self.fine_grid, generator)
        if self.cfg.consistency is Consistency.PCM:
            return phase_edge_below(t_start, self.fine_grid, self.cfg.phases)
        return None

    def _teacher_context(self):
        return adapters_disabled(self.student) if self.kind is StudentKind.LORA else nullcontext()

    # --- the step ---------------------------------------------------------------------------------------------
    def loss(
        self, z0: torch.Tensor, cond: TextEmbeddings, uncond: TextEmbeddings, generator: torch.Generator
    ) -> LCDOutput:
        """Per-sample LCD loss for clean latents ``z0`` ``[B, C, h, w]`` (already VAE-scaled)."""
        batch, device = z0.shape[0], z0.device
        if self.model.is_flow:  # a dynamic shift reads the batch's token count
            t_start, t_end = self.grid.sample(batch, generator, self.model.image_seq_len(*z0.shape[-2:]))
        else:
            t_start, t_end = self.grid.sample(batch, generator)  # t_{n+k}, t_n
        noise = torch.randn(z0.shape, generator=generator).to(device)
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * torch.rand(batch, generator=generator)
        if self.cfg.cfg_free:  # the student takes no w and learns the unguided trajectory, conditional or not
            dropped = torch.rand(batch, generator=generator) < self.cfg.caption_dropout
            cond, w_emb = cond.where(~dropped.to(device), uncond), None
        else:
            w_emb = self.w_emb(w, device)
        z_start = self.model.schedule.add_noise(z0, noise, t_start)
        t_start, t_end = t_start.to(device), t_end.to(device)

        s = self.target_times(t_start, t_end, generator)
        if s is None:
            prediction = self.student_model.consistency_output(z_start, t_start, cond, w_emb)
        else:
            prediction = self.student_model.trajectory_output(z_start, t_start, s, cond, w_emb)

        with torch.no_grad():
            with self._teacher_context():
                if self.cfg.cfg_free:
                    teacher = self.model.denoiser(cond)
                else:
                    teacher = self.model.guided_denoiser(cond, uncond, w.to(device))
                z_end = solve(self.cfg.solver, teacher, z_start, t_start, t_end, self.model.schedule)
            if s is None:
                target = self.target_model.consistency_output(z_end.to(z0.dtype), t_end, cond, w_emb)
            else:
                target = self.target_model.trajectory_output(z_end.to(z0.dtype), t_end, s, cond, w_emb)

        loss = consistency_loss(prediction, target, self.cfg.loss, self.cfg.huber_c)
        if not self.terms:
            return LCDOutput(loss, t_start, w)
        # the terms' draws come after every draw above: λ > 0 keeps them all
        if self.adversarial_input_one_step or self.distribution_matching is not None:  # drawn once for both terms
            x = self.one_step(torch.randn(z0.shape, generator=generator).to(device, z0.dtype), cond, w_emb)
        extra = torch.zeros_like(loss)
        if self.adversarial is not None:
            fake, s = (x, None) if self.adversarial_input_one_step else (prediction, s)
            ctx = self._teacher_context
            extra = extra + self.adversarial.generator_loss(self.model, fake, s, z0, cond, generator, ctx)
        if self.distribution_matching is not None:
            extra = extra + self.distribution_matching.generator_loss(x, cond, uncond, w, w_emb, generator)
        if self.regression is not None:  # its draws last of all
            extra = extra + self.regression.generator_loss(
                self.one_step, self.w_emb, batch, generator, device, z0.dtype
            )
        return LCDOutput(loss + extra.to(loss.dtype), t_start, w, consistency=loss)

    @property
    def adversarial_input_one_step(self) -> bool:
        return self.adversarial is not None and self.cfg.adversarial_input is AdversarialInput.ONE_STEP

    def one_step(self, z: torch.Tensor, cond: TextEmbeddings, w_emb: torch.Tensor | None) -> torch.Tensor:
        """The student's 1-step sample from pure noise ``z`` at t = T − 1, as the method's sampler draws it
        (``--adversarial-input one-step``): the LCM's consistency output; TCD's and PCM's step to t = 0 from the
        raw prediction, α_0·x̂0 + σ_0·ε̂ (:func:`lcm.maths.sampling.sample_tcd`)."""
        # where a 1-step sample starts (the one timestep rule's: T − 1), the same for LCM's and TCD's samplers
        start = sampler_timesteps(Sampler.LCM, 1, self.model.scheduler_config, self.model.schedule)
        t = start.to(z.device).expand(z.shape[0])
        if self.cfg.consistency is Consistency.LCM:
            return self.student_model.consistency_output(z, t, cond, w_emb)
        x0, eps = self.student_model.denoised(z, t, cond, w_emb)
        alpha, sigma = self.model.schedule.alpha_sigma_at(0.0)
        return alpha * x0 + sigma * eps
