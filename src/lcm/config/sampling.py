"""The sampling settings of ``lcm sample`` (and the defaults ``lcm serve`` shares), each a knob: default, range and
help written once, the command's flags generated from them (:mod:`lcm.cli.flags`)."""

from __future__ import annotations

from dataclasses import dataclass

from lcm.config.knobs import knob, validate
from lcm.limits import MAX_BATCH, MAX_IMAGE_SIDE, MAX_IMAGES, MAX_SEED
from lcm.maths.timesteps import Sampler

__all__ = [
    "DEFAULT_GAMMA",
    "DEFAULT_STRENGTH",
    "DISTILLED_STEPS",
    "TEACHER_STEPS",
    "SampleConfig",
    "default_steps",
]

DEFAULT_GAMMA = 0.3  # TCD's γ (diffusers' ``eta`` of TCDScheduler.step)
DEFAULT_STRENGTH = 0.6  # img2img strength of lcm sample --image and lcm serve
DISTILLED_STEPS, TEACHER_STEPS = 4, 25  # steps when none are given: an LCM's few, a teacher's usual


def default_steps(sampler: Sampler) -> int:
    return DISTILLED_STEPS if sampler.for_distilled else TEACHER_STEPS


@dataclass(frozen=True)
class SampleConfig:
    sampler: Sampler | None = knob(
        None,
        "lcm (multistep consistency sampling) or tcd (TCD's stochastic sampler, --gamma) for LCMs; ddim, dpm "
        "(DPM-Solver 2M) or dpmpp (DPM-Solver++ 2M) for teachers",
        default_text="the one the model was distilled for: lcm, or tcd for TCD and PCM models; ddim for teachers",
    )
    steps: int | None = knob(
        None,
        "sampling steps",
        lo=1,
        hi=1000,
        default_text=f"{DISTILLED_STEPS} for lcm and tcd (a PCM model's phases), {TEACHER_STEPS} otherwise",
    )
    guidance: float | None = knob(
        None,
        "guidance weight w, the paper's (diffusers' guidance_scale is w + 1)",
        lo=0,
        default_text="the middle of an LCM's distillation range; 3 for the Fashion teacher, 6.5 for other teachers",
    )
    gamma: float = knob(
        DEFAULT_GAMMA,
        "TCD's stochasticity gamma in [0, 1] (diffusers' eta): each step goes down to s = (1 - gamma)·t_next and is "
        "re-noised up to t_next; 0 is deterministic. For --sampler tcd, the default sampler of TCD and PCM models "
        "(0 by default for PCM: deterministic steps at its phase edges)",
        lo=0,
        hi=1,
    )
    negative_guidance: float = knob(
        0.0,
        "LCMs only: S >= 0. Each step also runs the UNet on --negative-prompt (the empty prompt without one) and uses "
        "out(prompt) + S·(out(prompt) - out(negative)): a second UNet call per step. 0: the plain one-call sampler",
        lo=0,
    )
    strength: float = knob(
        DEFAULT_STRENGTH,
        "img2img strength: how much noise the init image gets; lcm keeps --steps steps on the first strength·N "
        "points of its skipping grid, the others run the last int(steps·strength) of their steps, as diffusers' "
        "img2img pipelines. Needs --image; with --mask the default is 1 and every sampler runs the last "
        "int(steps·strength) steps, as diffusers' inpainting pipeline",
        lo=0,
        hi=1,
        open_lo=True,
    )
    height: int | None = knob(
        None, "image height in pixels, a multiple of the VAE's scale factor", lo=1, hi=MAX_IMAGE_SIDE,
        default_text="the model's native size",
    )  # fmt: skip
    width: int | None = knob(
        None, "image width in pixels, a multiple of the VAE's scale factor", lo=1, hi=MAX_IMAGE_SIDE,
        default_text="the model's native size",
    )  # fmt: skip
    seed: int = knob(0, "seed of the first image; image i uses seed + i", lo=0, hi=MAX_SEED)
    num_images: int = knob(8, "images per prompt", lo=1, hi=MAX_IMAGES)
    batch_size: int = knob(64, "images per forward pass", lo=1, hi=MAX_BATCH)
    scale: int = knob(1, "integer nearest-neighbour upscaling of every PNG written", lo=1, hi=64)

    def __post_init__(self):
        validate(self)
        if self.seed + self.num_images - 1 > MAX_SEED:
            raise ValueError(f"--seed must be between 0 and {MAX_SEED - self.num_images + 1}, got {self.seed}")
