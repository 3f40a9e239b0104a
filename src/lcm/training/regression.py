"""The regression term of ``lcm distill --regression-weight λ --regression-pairs FILE`` (docs/methods.md §6): the
student's 1-step sample from a noise z is regressed onto the teacher's sample from the same z (Luhman & Luhman
2021's knowledge distillation; DMD's regression loss), over pairs that ``lcm pairs`` made beforehand.

A pairs file is safetensors: ``z`` and ``x0`` ``[N, C, h, w]`` (float32; ``x0`` scaled as training latents are),
``w`` ``[N]``, and ``probe``, the teacher's output on a fixed input (its fingerprint, which survives copies and
dtypes); the metadata hold the prompts (JSON) and how the pairs were made. Pair i depends on its index only: its
noise and w come from the generator of seed ``SEED·1,000,000 + i``, so a file is extended by drawing more.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lcm.maths.sampling import randn_per_image
from lcm.maths.timesteps import Sampler
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.text import TextEmbeddings

__all__ = ["PAIRS_FORMAT", "Pairs", "RegressionTerm", "load_pairs", "make_pairs", "pair_seeds", "teacher_probe"]

PAIRS_FORMAT = "lcm-regression-pairs/1"
PROBE_T = 500.0  # the fingerprint's input: seeded noise at this level, the empty prompt, unguided
PROBE_TOLERANCE = 2e-2  # relative RMS: float16/bfloat16 loads of the same teacher agree far closer


@dataclass(frozen=True)
class Pairs:
    z: torch.Tensor  # [N, C, h, w] the noise each teacher sample started from
    x0: torch.Tensor  # [N, C, h, w] the teacher's sample
    w: torch.Tensor  # [N] its guidance weight
    prompts: list[str]
    probe: torch.Tensor  # the teacher's output on the fixed probe input
    about: dict  # teacher, sampler, steps, w range, seed

    def __len__(self) -> int:
        return len(self.prompts)


def pair_seeds(seed: int, start: int, stop: int) -> list[int]:
    return [seed * 1_000_000 + i for i in range(start, stop)]


@torch.no_grad()
def teacher_probe(model: LatentDiffusion) -> torch.Tensor:
    """The teacher's output for one fixed noisy latent at ``PROBE_T`` under the empty prompt (float32, on the CPU)."""
    z = randn_per_image((1, *model.latent_shape), [torch.Generator().manual_seed(0)]).to(model.device)
    text = model.encode_prompts([""])
    return model.unet_output(z, torch.full((1,), PROBE_T, device=model.device), text).float().cpu()


def save_pairs(path: Path, pairs: Pairs) -> None:
    """Write ``pairs`` to ``path`` atomically (a crash leaves the previous file)."""
    from safetensors.torch import save_file

    tensors = {"z": pairs.z, "x0": pairs.x0, "w": pairs.w, "probe": pairs.probe}
    meta = {"format": PAIRS_FORMAT, "prompts": json.dumps(pairs.prompts), "about": json.dumps(pairs.about)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_pairs(path: str | Path) -> Pairs:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--regression-pairs {path}: no such file (make one with lcm pairs)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != PAIRS_FORMAT:
                raise ValueError(f"--regression-pairs {path}: not a pairs file of lcm pairs")
            tensors = {k: f.get_tensor(k) for k in ("z", "x0", "w", "probe")}
    except Exception as err:  # safetensors' own errors: a truncated or foreign file
        if isinstance(err, ValueError) and str(err).startswith("--regression-pairs"):
            raise
        raise ValueError(f"--regression-pairs {path}: unreadable ({err})") from None
    prompts = json.loads(meta["prompts"])
    if not len(prompts) == len(tensors["z"]) == len(tensors["x0"]) == len(tensors["w"]):
        raise ValueError(f"--regression-pairs {path}: its tensors and prompts disagree in length")
    return Pairs(**tensors, prompts=prompts, about=json.loads(meta["about"]))


@torch.no_grad()
def make_pairs(
    teacher: LatentDiffusion,
    prompts: Sequence[str],
    about: dict,
    old: Pairs | None = None,
    batch_size: int = 64,
    on_batch: Callable[[Pairs], None] | None = None,
) -> Pairs:
    """Pairs for ``prompts`` (pair i for prompt i): noise from seed ``about["seed"]``·1,000,000 + i, then
    w ~ U[w_min, w_max] from the same generator, then the teacher's ``about["sampler"]`` sample at ``about["steps"]``
    steps under classifier-free guidance at w (the empty prompt unconditional). ``old`` pairs (made with the same
    ``about``) are kept and continued; ``on_batch`` sees the pairs so far after every batch (to save them)."""
    from lcm.sample import teacher_latents

    sampler, steps, seed = Sampler(about["sampler"]), about["steps"], about["seed"]
    w_min, w_max = about["w_min"], about["w_max"]
    probe = teacher_probe(teacher)
    done = 0 if old is None else len(old)
    if old is not None:
        check_teacher(old, probe, "the pairs file")
        if old.prompts != list(prompts[:done]):
            raise ValueError("the pairs file was made from other prompts: give another --out or the same --prompts")
    zs, xs, ws = ([old.z], [old.x0], [old.w]) if old is not None and done else ([], [], [])
    pairs = old
    for start in range(done, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        gens = [torch.Generator().manual_seed(s) for s in pair_seeds(seed, start, stop)]
        z = randn_per_image((stop - start, *teacher.latent_shape), gens)
        w = w_min + (w_max - w_min) * torch.stack([torch.rand((), generator=g) for g in gens])
        cond = teacher.encode_prompts(list(prompts[start:stop]))
        uncond = teacher.encode_prompts([""] * (stop - start))
        x0 = teacher_latents(teacher, z.to(teacher.device), cond, uncond, sampler, steps, w)
        zs.append(z)
        xs.append(x0.float().cpu())
        ws.append(w)
        pairs = Pairs(torch.cat(zs), torch.cat(xs), torch.cat(ws), list(prompts[:stop]), probe, about)
        if on_batch is not None:
            on_batch(pairs)
    return pairs


def check_teacher(pairs: Pairs, probe: torch.Tensor, what: str = "--regression-pairs") -> None:
    """Refuse pairs another network made: the teacher's output on the probe input must match the file's."""
    if pairs.probe.shape != probe.shape:
        raise ValueError(f"{what}: made by a teacher of latents {tuple(pairs.z.shape[1:])}, not this one's")
    error = (pairs.probe - probe).pow(2).mean().sqrt() / pairs.probe.pow(2).mean().sqrt().clamp_min(1e-12)
    if error > PROBE_TOLERANCE:
        made_by = pairs.about.get("teacher", "?")
        raise ValueError(f"{what}: made by another teacher ({made_by}; outputs differ by {error:.1%})")


class RegressionTerm:
    """λ·mean((x − x̂0)²) per sample: x the student's 1-step sample from a drawn pair's noise, under its prompt and
    w, x̂0 the teacher's sample from it. The pairs are drawn from the step's generator after every other draw."""

    def __init__(self, model: LatentDiffusion, path: str | Path, weight: float):
        self.model, self.weight = model, weight
        self.sums: tuple[torch.Tensor | float, int] = (0.0, 0)  # the error's sum over micro-batches, their count
        self.pairs = load_pairs(path)
        if tuple(self.pairs.z.shape[1:]) != tuple(model.latent_shape):
            shape = tuple(self.pairs.z.shape[1:])
            raise ValueError(f"--regression-pairs {path}: latents {shape}, the teacher's are {model.latent_shape}")
        check_teacher(self.pairs, teacher_probe(model))

    def generator_loss(
        self,
        one_step: Callable[[torch.Tensor, TextEmbeddings, torch.Tensor | None], torch.Tensor],
        w_emb: Callable[[torch.Tensor, torch.device], torch.Tensor | None],
        batch: int,
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        idx = torch.randint(0, len(self.pairs), (batch,), generator=generator)
        text = self.model.encode_prompts([self.pairs.prompts[i] for i in idx], cache=True)
        x = one_step(self.pairs.z[idx].to(device, dtype), text, w_emb(self.pairs.w[idx], device))
        error = (x.float() - self.pairs.x0[idx].to(device)).pow(2).mean(dim=tuple(range(1, x.ndim)))
        total, count = self.sums
        self.sums = (total + error.detach().mean(), count + 1)
        return self.weight * error

    def read(self) -> dict[str, float]:
        """``reg``: the mean squared error (without λ) of the micro-batches since the last read."""
        (total, count), self.sums = self.sums, (0.0, 0)
        return {"reg": float(total) / count} if count else {}
