"""The adversarial term of ``lcm distill --adversarial-weight λ`` (docs/methods.md §4): a discriminator in latent
space built on the frozen teacher, as PCM, LADD and SANA-Sprint do.

The student's output is a point of the trajectory at time s (s = 0 for the LCM, TCD's drawn s, PCM's phase edge).
Both it and a clean training latent z0 are diffused forward to the same level t' ~ U[s, max(s, t_max)]:

    fake = (α_t'/α_s)·ẑ_s + √(σ_t'² − (α_t'/α_s)²·σ_s²)·ε          real = α_t'·z0 + σ_t'·ε'

so that where the student is right, fake and real have the same marginal q(z_t'). The frozen teacher's encoder (its
down blocks and middle block, under the sample's own text condition) turns each into feature maps; a light head per
map (3×3 convolution, group norm, SiLU, 1×1 convolution) gives a logit per position. Hinge losses: the discriminator
minimises mean(relu(1 − D(real))) + mean(relu(1 + D(fake))), the student adds λ·(−mean D(fake)) per sample, with the
gradient through the frozen encoder into its output.

Cost: one teacher-encoder forward and backward (the fake) and one forward (the real) per micro-batch. The heads
train on the features the student's step already computed (detached), once per optimiser step, with their own AdamW;
heads, optimiser moments and step are part of every checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.text import TextEmbeddings

__all__ = [
    "AdversarialTerm",
    "TrainedTerm",
    "average_gradients",
    "encoder_features",
    "load_optimizer_state",
    "optimizer_state",
    "renoise",
]


class _Enough(Exception):
    """Raised by the hook on the last encoder block: the decoder half of the UNet is never run."""


def _encoder_blocks(unet) -> list[nn.Module]:
    unet = getattr(unet, "module", unet)  # a distributed wrapper
    unet = getattr(unet, "_orig_mod", unet)  # a compiled one
    blocks = list(unet.down_blocks)
    return blocks + [unet.mid_block] if unet.mid_block is not None else blocks


def encoder_features(model: LatentDiffusion, z: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> list:
    """The feature maps of ``model``'s UNet encoder at ``(z, t, text)``: every down block's output and the middle
    block's, in order. The up blocks are not run (a hook ends the forward at the last encoder block)."""
    blocks, features = _encoder_blocks(model.unet), []

    def keep(module, inputs, output):
        features.append(output[0] if isinstance(output, tuple) else output)
        if module is blocks[-1]:
            raise _Enough

    handles = [block.register_forward_hook(keep) for block in blocks]
    try:
        with torch.compiler.set_stance("force_eager"):  # hooks that end a forward are not for a compiled graph
            model.unet_output(z, t, text)
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return features


def _alpha_sigma(model: LatentDiffusion, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) per sample, with (1, 0) at t = 0 exactly (the clean end, as the trajectory function takes it)."""
    alpha, sigma = model.schedule.alpha_sigma_to(t.to(like.device))
    shape = (-1,) + (1,) * (like.ndim - 1)
    return alpha.to(like.dtype).reshape(shape), sigma.to(like.dtype).reshape(shape)


def renoise(
    model: LatentDiffusion, z_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """A sample of q(z_t | z_s) for per-sample ``s ≤ t``: the forward process from level s on to level t."""
    alpha_s, sigma_s = _alpha_sigma(model, s, z_s)
    alpha_t, sigma_t = _alpha_sigma(model, t, z_s)
    ratio = alpha_t / alpha_s
    return ratio * z_s + (sigma_t.square() - ratio.square() * sigma_s.square()).clamp(min=0).sqrt() * noise


class _Heads(nn.Module):
    """One logit head per encoder feature map."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1),
                nn.GroupNorm(math.gcd(32, c), c),
                nn.SiLU(),
                nn.Conv2d(c, 1, 1),
            )
            for c in channels
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logit maps ``[B, 1, h, w]``, one per feature map."""
        dtype = self.heads[0][0].weight.dtype
        return [head(f.to(dtype)) for head, f in zip(self.heads, features, strict=True)]


def _per_sample(maps: list[torch.Tensor], f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mean over heads of the per-sample spatial mean of ``f(logits)``: ``[B]``."""
    return torch.stack([f(m.float()).flatten(1).mean(1) for m in maps]).mean(0)


class TrainedTerm:
    """What a term beside the consistency loss that trains a network of its own shares (the discriminator, DMD's fake
    score): the network's update once per optimiser step, running means for the log, and the network's weights and
    AdamW moments as checkpoint state (``PREFIX.<weight>``, ``optim.<index>.<moment>``)."""

    network: nn.Module
    optimizer: torch.optim.Optimizer
    prefix: str

    def __init__(self) -> None:
        self.pending: list[tuple] = []  # what the student's micro-batches saw since the last update, detached
        self.sums: dict[str, tuple[torch.Tensor | float, int]] = {}  # name → (sum on the device, count)

    def _update(self, loss: torch.Tensor, name: str) -> None:
        """One update of the network on ``loss`` (logged as ``name``); skipped, and its gradients dropped, when the
        loss is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            average_gradients(self.network.parameters())
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._add(name, loss.detach())

    def _add(self, name: str, value: torch.Tensor) -> None:
        total, count = self.sums.get(name, (0.0, 0))
        self.sums[name] = (total + value.float(), count + 1)

    def read(self) -> dict[str, float]:
        """The means of the logged values since the last read."""
        out = {name: float(total) / count for name, (total, count) in self.sums.items()}
        self.sums = {}
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{self.prefix}.{k}": v for k, v in self.network.state_dict().items()}
        return {**state, **optimizer_state(self.optimizer)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        start = len(self.prefix) + 1
        self.network.load_state_dict({k[start:]: v for k, v in state.items() if k.startswith(f"{self.prefix}.")})
        load_optimizer_state(self.optimizer, state)


class AdversarialTerm(TrainedTerm):
    """The discriminator of one distillation run: its heads and optimiser, the generator loss the student adds, and
    the discriminator's step on the features the student's step saw (logged: ``adv_g``, the generator term as the
    student sees it; ``adv_d``, the discriminator's loss; ``adv_d_real`` and ``adv_d_fake``, its mean logits)."""

    prefix = "heads"

    def __init__(self, model: LatentDiffusion, weight: float, lr: float, t_max: float, seed: int = 0):
        super().__init__()
        self.weight, self.t_max = weight, min(float(t_max), model.schedule.num_train_timesteps - 1)
        channels = self._channels(model)
        with torch.random.fork_rng(devices=[]):  # the heads' initialisation leaves the global stream alone
            torch.manual_seed(seed)
            self.heads = _Heads(channels).to(model.device)
        self.network = self.heads
        self.optimizer = torch.optim.AdamW(self.heads.parameters(), lr=lr, betas=(0.0, 0.99), weight_decay=0.0)

    @staticmethod
    def _channels(model: LatentDiffusion) -> list[int]:
        blocks = _encoder_blocks(model.unet)
        config = getattr(getattr(model.unet, "module", model.unet), "config", None)
        out = list(config.block_out_channels) if config is not None else []
        if len(out) == len(blocks) - 1:  # every down block, then the middle block at the last width
            return [*out, out[-1]]
        return out[: len(blocks)]

    def generator_loss(
        self,
        model: LatentDiffusion,
        prediction: torch.Tensor,
        s: torch.Tensor | None,
        z0: torch.Tensor,
        cond: TextEmbeddings,
        generator: torch.Generator,
        teacher: Callable[[], AbstractContextManager],
    ) -> torch.Tensor:
        """λ·(−D(fake)) per sample ``[B]``, for the student's ``prediction`` at ``s`` (None: the clean end) and the
        data ``z0`` of the same batch; keeps both feature sets (detached) for :meth:`step`. ``teacher()`` is the
        context in which ``model`` is the frozen teacher (a LoRA student's adapters off)."""
        batch, device = z0.shape[0], z0.device
        s = torch.zeros(batch, device=device) if s is None else s.to(device).float()
        u = torch.rand(batch, generator=generator).to(device)
        t = s + u * (torch.clamp(torch.full_like(s, self.t_max), min=s) - s)
        noise_fake = torch.randn(z0.shape, generator=generator).to(device, z0.dtype)
        noise_real = torch.randn(z0.shape, generator=generator).to(device, z0.dtype)
        zeros = torch.zeros_like(s)
        fake = renoise(model, prediction.to(z0.dtype), s, t, noise_fake)
        real = renoise(model, z0, zeros, t, noise_real)
        with teacher():
            fake_features = encoder_features(model, fake, t, cond)
            with torch.no_grad():
                real_features = encoder_features(model, real, t, cond)
        self.heads.requires_grad_(False)  # the student's gradient goes through the heads, not into them
        try:
            logits = self.heads(fake_features)
        finally:
            self.heads.requires_grad_(True)
        self.pending.append(([f.detach() for f in real_features], [f.detach() for f in fake_features]))
        g = _per_sample(logits, lambda x: -x)
        self._add("adv_g", g.detach().mean())
        return self.weight * g

    def step(self) -> None:
        """One discriminator update on the features kept since the last one (hinge loss); skipped, and its
        gradients dropped, when the loss is not finite."""
        if not self.pending:
            return
        self.heads.train()
        losses = []
        for real, fake in self.pending:
            d_real, d_fake = self.heads(real), self.heads(fake)
            loss_real = _per_sample(d_real, lambda x: torch.relu(1 - x)).mean()
            loss_fake = _per_sample(d_fake, lambda x: torch.relu(1 + x)).mean()
            losses.append(loss_real + loss_fake)
            self._add("adv_d_real", _per_sample(d_real, lambda x: x).detach().mean())
            self._add("adv_d_fake", _per_sample(d_fake, lambda x: x).detach().mean())
        self.pending.clear()
        self._update(torch.stack(losses).mean(), "adv_d")


def average_gradients(parameters) -> None:
    """Average the parameters' gradients over processes (every rank keeps identical copies); nothing in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's moments and steps as flat tensors, ``optim.<param index>.<name>`` (a checkpoint's part)."""
    state = {}
    for i, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            state[f"optim.{i}.{key}"] = torch.as_tensor(value)
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_state`: the ``optim.`` keys of ``state`` back into ``optimizer``."""
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            moments.setdefault(int(i), {})[name] = value.clone()
    saved = optimizer.state_dict()
    optimizer.load_state_dict({"state": moments, "param_groups": saved["param_groups"]})
