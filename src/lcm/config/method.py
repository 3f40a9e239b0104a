"""The method section of the run-config tree (:mod:`lcm.config.run`): what a consistency run learns and how, one
config per command: :class:`LCDConfig` (``lcm distill``: LCM, TCD or PCM, the solver, the w range, the adversarial
and distribution-matching terms), :class:`LCFConfig` (``lcm finetune``) and :class:`TuneConfig` (``lcm tune``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lcm.config.knobs import knob, validate
from lcm.limits import MAX_STEPS
from lcm.maths.consistency import SIGMA_DATA, TIMESTEP_SCALING
from lcm.maths.losses import LossType
from lcm.maths.solvers import Solver
from lcm.maths.timesteps import DEFAULT_NUM_SOLVER_STEPS

__all__ = ["AdversarialInput", "Consistency", "ConsistencyConfig", "LCDConfig", "LCFConfig", "TuneConfig"]


@dataclass(frozen=True)
class ConsistencyConfig:
    """What LCD and LCF share: the skipping grid, the consistency distance and the target network."""

    num_solver_steps: int = knob(
        DEFAULT_NUM_SOLVER_STEPS, "N, the points of the skipping grid; k = T // N (the LCM samples on this grid)", lo=1,
        hi=1000,
    )  # fmt: skip
    loss: LossType = knob(LossType.HUBER, "consistency distance")
    huber_c: float = knob(0.001, "pseudo-Huber c", lo=0, open_lo=True)
    ema_decay: float = knob(0.95, "target EMA decay mu (full student)", lo=0, hi=1, open_hi=True)


class Consistency(str, Enum):
    """What the student learns to map a point of the trajectory onto (docs/methods.md)."""

    LCM = "lcm"  # the trajectory's end, x0 (Luo et al. 2023)
    TCD = "tcd"  # any earlier grid point s (Zheng et al. 2024, trajectory consistency)
    PCM = "pcm"  # the edge of its phase (Wang et al. 2024, phased consistency)


class AdversarialInput(str, Enum):
    """What the adversarial term's discriminator judges against training latents (docs/methods.md §4)."""

    PREDICTION = "prediction"  # the student's output for the pair, at its target time s
    ONE_STEP = "one-step"  # the student's 1-step sample: pure noise at t = T − 1 mapped to the clean end


@dataclass(frozen=True)
class LCDConfig(ConsistencyConfig):
    consistency: Consistency = knob(
        Consistency.LCM,
        "what the student maps a noisy point onto: lcm (the clean end, x0), tcd (any earlier grid point s, drawn "
        "per sample; sampled with TCD's sampler) or pcm (the edge of its phase, --phases; sampled deterministically "
        "at the edges)",
        flag="--method",
    )
    phases: int = knob(1, "PCM's phases M: the grid's N points split into M runs; must divide N", lo=1, hi=1000)
    solver: Solver = knob(
        Solver.DDIM,
        "ODE solver of the teacher (Psi of one skipping step): ddim (a flow teacher's Euler step), dpm "
        "(DPM-Solver-2; not for flow teachers), dpmpp (DPM-Solver++(2S)), heun (flow-matching teachers only)",
    )
    w_min: float = knob(2.0, "smallest guidance w drawn (the paper's w; diffusers' guidance_scale - 1)", lo=0)
    w_max: float = knob(14.0, "largest guidance w drawn", lo=0)
    w_lr_scale: float = knob(
        1.0, "learning-rate multiplier of the full student's zero-initialised w projection", lo=0, open_lo=True
    )
    coarse_num_solver_steps: int | None = knob(
        None,
        "skip curriculum, coarse to fine: the first --coarse-steps optimiser steps draw their (t_{n+k}, t_n) pairs "
        "on a grid of this many points (a larger skip k), the rest on --num-solver-steps",
        lo=1,
        hi=1000,
        default_text="none",
    )
    coarse_steps: int = knob(0, "optimiser steps on the coarse grid (0: no curriculum)", lo=0, hi=MAX_STEPS)
    coarse_fraction: float = knob(
        0.0,
        "mixed skips: after the --coarse-steps, draw each pair on the --coarse-num-solver-steps grid with this "
        "probability, otherwise on the --num-solver-steps grid",
        lo=0,
        hi=1,
    )
    timestep_bias: float = knob(
        0.0,
        "draw the skipping grid's i-th point (i = 1 ... N, ascending t) as t_{n+k} with probability ∝ i^γ: 0 is the "
        "paper's uniform draw; 1 draws the top point N times as often as the lowest",
        lo=0,
    )
    cfg_free: bool = knob(
        False,
        "CFG-free distillation (PCM's variant): the teacher's solver runs unguided (its conditional prediction), "
        "--caption-dropout of the captions are the empty prompt, and the student takes no w; the model then samples "
        "with real classifier-free guidance at w (two network calls per step, negative prompts work)",
    )
    caption_dropout: float = knob(
        0.1,
        "with --cfg-free: fraction of captions replaced by the empty prompt, so that the student also learns the "
        "unconditional trajectory that guidance at sampling needs",
        lo=0,
        hi=1,
    )
    adversarial_weight: float = knob(
        0.0,
        "λ of the adversarial term (docs/methods.md §4): a discriminator on the frozen teacher's encoder features "
        "tells the student's outputs from training latents, both re-noised to one level; 0 turns it off",
        lo=0,
    )
    adversarial_lr: float = knob(1e-4, "the discriminator's learning rate (its own AdamW)", lo=0, open_lo=True)
    adversarial_max_t: float = knob(
        500.0,
        "the discriminator's highest noise level: the student's output at s and the data are re-noised to a "
        "level t' ~ U[s, max(s, this)]",
        lo=0,
    )
    adversarial_input: AdversarialInput = knob(
        AdversarialInput.PREDICTION,
        "what the discriminator judges: prediction (the student's output for the pair, at its target time s) or "
        "one-step (its 1-step sample from pure noise, as a 1-step generator is used; one more student forward and "
        "backward per step)",
    )
    dmd_weight: float = knob(
        0.0,
        "λ of the distribution-matching term (DMD2; docs/methods.md §5): the student's 1-step sample is moved towards "
        "what the guided teacher denoises it into and away from what a fake score trained on the student's own "
        "samples does; full students; 0 turns it off",
        lo=0,
    )
    dmd_lr: float = knob(4e-4, "the fake score's learning rate (its own AdamW)", lo=0, open_lo=True)
    dmd_fake_updates: int = knob(1, "fake-score updates per training step (DMD2's two time-scale rule: 5)", lo=1, hi=20)
    regression_weight: float = knob(
        0.0,
        "λ of the regression term (DMD's; docs/methods.md §6): the student's 1-step sample from each drawn pair's "
        "noise is regressed onto the teacher's sample from it (mean squared error in latent space), over the pairs "
        "of --regression-pairs; 0 turns it off",
        lo=0,
    )
    regression_pairs: str | None = knob(
        None, "the regression term's pairs: a file lcm pairs made with this run's teacher", default_text="none"
    )
    init_student: str | None = knob(
        None, "start the full student (its target, the fake score) from this model lcm distill made from the same "
        "teacher, not from the teacher: a second stage, e.g. with --dmd-weight", default_text="the teacher",
    )  # fmt: skip
    timestep_scaling: float = TIMESTEP_SCALING  # consistency constants (docs/design.md §2)
    sigma_data: float = SIGMA_DATA

    def __post_init__(self):
        validate(self)
        if self.dmd_weight > 0 and self.cfg_free:
            raise ValueError("--dmd-weight needs a w-conditioned student: drop --cfg-free")
        if self.dmd_fake_updates > 1 and not self.dmd_weight > 0:
            raise ValueError("--dmd-fake-updates is the distribution-matching term's: add --dmd-weight > 0")
        if (self.regression_weight > 0) != (self.regression_pairs is not None):
            raise ValueError("--regression-weight > 0 and --regression-pairs FILE go together: give both or neither")
        if self.regression_weight > 0 and self.cfg_free:
            raise ValueError(
                "--regression-weight needs a w-conditioned student (its pairs are guided): drop --cfg-free"
            )
        if self.adversarial_input is AdversarialInput.ONE_STEP and not self.adversarial_weight > 0:
            raise ValueError("--adversarial-input one-step is the adversarial term's: add --adversarial-weight > 0")
        if self.w_min > self.w_max:
            raise ValueError(f"--w-min must not exceed --w-max, got --w-min {self.w_min:g} > --w-max {self.w_max:g}")
        coarse = self.coarse_num_solver_steps
        if coarse is not None and coarse > self.num_solver_steps:
            raise ValueError(
                f"--coarse-num-solver-steps must lie in [1, --num-solver-steps = {self.num_solver_steps}] (a coarser "
                f"grid), got {coarse}"
            )
        if coarse is None and (self.coarse_steps or self.coarse_fraction):
            raise ValueError("--coarse-steps and --coarse-fraction need --coarse-num-solver-steps")
        if self.phases > 1 and self.consistency is not Consistency.PCM:
            raise ValueError(f"--phases is PCM's: add --method pcm (or drop --phases {self.phases})")
        if self.consistency is Consistency.PCM and self.num_solver_steps % self.phases:
            raise ValueError(
                f"--phases must divide --num-solver-steps = {self.num_solver_steps} (the phases split its grid), "
                f"got {self.phases}"
            )
        if self.consistency is not Consistency.LCM and coarse is not None:
            raise ValueError(
                f"--method {self.consistency.value} draws its targets on one grid: drop --coarse-num-solver-steps"
            )


@dataclass(frozen=True)
class LCFConfig(ConsistencyConfig):
    w: float | None = knob(
        None, "guidance w fed to the LCM while fine-tuning", lo=0, flag="--lcf-w",
        default_text="the LCM's own default w, the middle of the range it was distilled on",
    )  # fmt: skip
    timestep_scaling: float | None = None  # None: the LCM's own (recorded by its export)
    sigma_data: float | None = None

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class TuneConfig:
    """Fine-tuning a diffusion model (not an LCM) with its own denoising loss: a style LoRA or a full UNet, to be
    stacked with an LCM-LoRA or merged (``lcm tune``)."""

    caption_dropout: float = knob(
        0.1, "fraction of captions replaced by the empty prompt, so classifier-free guidance keeps working", lo=0, hi=1
    )

    def __post_init__(self):
        validate(self)
