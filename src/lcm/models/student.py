"""The student of LCD: a full UNet with the w-embedding, or LoRA adapters on the teacher's UNet (docs/design.md §2)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from lcm.config.run import DEFAULT_LORA_TARGETS, StudentKind
from lcm.maths.guidance import W_EMBEDDING_DIM
from lcm.models.formats import is_flow_network, w_input_dim

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "StudentKind",
    "adapters_disabled",
    "add_lora",
    "full_student",
]


def full_student(teacher_unet, w_embedding_dim: int | None = W_EMBEDDING_DIM):
    """A copy of the teacher UNet that also takes the w-embedding as ``timestep_cond`` (a flow MMDiT, or
    ``w_embedding_dim`` None for CFG-free distillation: a plain copy).

    The new projection ``time_embedding.cond_proj`` is zero-initialised, so the student starts exactly equal to the
    teacher (diffusers' script leaves it random).
    """
    from diffusers import UNet2DConditionModel

    if w_embedding_dim is None or w_input_dim(teacher_unet) is not None or is_flow_network(teacher_unet):
        # already w-conditioned (e.g. distilling an LCM further), or a flow MMDiT, which takes no w: distilled at one w
        student = copy.deepcopy(teacher_unet)
    else:
        # diffusers drops every key listed in "_use_default_values" (set on a UNet built in memory by from_config)
        config = {k: v for k, v in teacher_unet.config.items() if k != "_use_default_values"}
        config["time_cond_proj_dim"] = w_embedding_dim
        student = UNet2DConditionModel.from_config(config)
        missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
        assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher_unet.device).float().train().requires_grad_(True)


def add_lora(
    unet, rank: int = 64, alpha: float | None = None, targets: Sequence[str] = DEFAULT_LORA_TARGETS, seed: int = 0
):
    """Add trainable LoRA adapters (peft) to ``unet`` in place; everything else frozen. ``lora_A`` is drawn from
    ``seed`` (``lora_B`` starts at zero, so the student starts equal to the teacher).

    ``alpha`` defaults to ``rank`` (scale 1): the official LCM-LoRA code omitted it and trained at scale 0.125.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {rank}")
    names = {name for name, _ in unet.named_modules()}
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not present:
        raise ValueError(f"none of the LoRA target modules {list(targets)} exist in this UNet")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=present)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    return unet


@contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """The teacher inside an LCM-LoRA student: the same UNet with its adapters switched off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
