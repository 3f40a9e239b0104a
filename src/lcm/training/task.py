"""Training tasks for :func:`lcm.training.loop.train`: batches → latents and text conditions → the method's loss.

:class:`DistillTask` wraps :class:`lcm.training.lcd.LCD` (teacher-guided), :class:`FinetuneTask` wraps
:class:`lcm.training.lcf.LCF` (teacher-free); both share :class:`ConsistencyTask`.
"""

from __future__ import annotations

import copy
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from lcm.config.method import LCDConfig, LCFConfig
from lcm.config.run import StudentConfig, StudentKind, ValidationConfig
from lcm.images import save_grid
from lcm.maths.guidance import W_EMBEDDING_DIM, default_w
from lcm.maths.timesteps import Sampler
from lcm.models.export import export_lcm_folder, export_lora
from lcm.models.formats import consistency_scheduler_config
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import add_lora, full_student
from lcm.models.text import TextEmbeddings
from lcm.sample import generate
from lcm.training.lcd import LCD, LossMonitor
from lcm.training.lcf import LCF
from lcm.training.loop import Task, Validation

__all__ = ["ConsistencyTask", "DistillTask", "FinetuneTask", "encode_batch", "make_student"]


def make_student(
    model: LatentDiffusion, student: StudentConfig, seed: int, w_input: bool = True, init: str | None = None
):
    """(student, target) for ``student.kind``: a full UNet (w-conditioned unless ``w_input`` is false: CFG-free
    distillation) with an EMA copy, or LoRA adapters (target None). A UNet that already carries LoRA adapters (a
    loaded LCM-LoRA) keeps them and trains them further. ``init``: a distilled model folder whose network the full
    student (and so its target) starts from instead of the teacher's."""
    if student.kind is StudentKind.FULL:
        unet = full_student(model.unet, W_EMBEDDING_DIM if w_input else None)
        if init is not None:
            _load_network(unet, init)
        return unet, copy.deepcopy(unet).requires_grad_(False)
    if getattr(model.unet, "peft_config", None):
        for name, p in model.unet.named_parameters():
            p.requires_grad_("lora_" in name)
        return model.unet.train(), None
    return add_lora(model.unet, student.lora_rank, student.lora_alpha, student.lora_targets, seed).train(), None


def _load_network(student: torch.nn.Module, folder: str) -> None:
    """``student``'s weights, in place, from the network of the distilled model ``folder``; one line when it is not a
    model folder or its network is not the student's shape."""
    try:
        network = LatentDiffusion.from_pretrained(folder, with_text_encoder=False).unet
    except (OSError, ValueError) as err:
        raise ValueError(f"--init-student {folder}: {str(err).splitlines()[0]}") from None
    try:
        student.load_state_dict(network.state_dict(), strict=True)
    except RuntimeError:
        raise ValueError(
            f"--init-student {folder}: its network is not this student's shape (give a model lcm distill made from "
            "this teacher, with the same --cfg-free)"
        ) from None


class ConsistencyTask(Task):
    """What LCD and LCF share: batches → (z0, text), student bookkeeping, validation grids, checkpoints, export.

    ``method`` (:class:`lcm.training.lcd.LCD` or :class:`lcm.training.lcf.LCF`) supplies the loss and target update;
    ``validation_w`` is the guidance weight of the validation grids (subclasses resolve its default).
    """

    method_name = ""

    def __init__(
        self,
        model: LatentDiffusion,
        method,
        student: StudentConfig,
        validation_w: float,
        validation: ValidationConfig,
        provenance: dict | None = None,
    ):
        self.model, self.method, self.student_cfg = model, method, student
        self.kind, self.cfg, self.student = method.kind, method.cfg, method.student
        if student.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.uncond = model.encode_prompts([""])
        prompts = validation.prompts if validation.prompts is not None else default_validation_prompts(model)
        self.validation_prompts, self.validation_w = tuple(prompts), validation_w
        self.validation_seeds = tuple(validation.seeds)
        self.monitor = LossMonitor(model.schedule.num_train_timesteps, method.w_range, self.w_projection)
        self.provenance = {"method": self.method_name, "student": self.kind.value, **(provenance or {})}

    # --- the loop's Task ---------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def wrap(self, prepare) -> list[torch.nn.Module]:
        return [self.method.wrap(prepare)]

    def encode_batch(self, batch: dict[str, Any], generator: torch.Generator):
        return encode_batch(self.model, self.uncond, batch, generator)

    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        z0, cond, uncond = self.encode_batch(batch, generator)
        out = self.method.loss(z0, cond, uncond, generator)
        self.monitor.add(out)
        return out.loss

    def log_metrics(self) -> dict[str, float]:
        """Per-t / per-w loss and the w projection's norms since the last log line (see :class:`LossMonitor`), and
        the means every other term logs (the method's ``terms``: adversarial, distribution matching, regression)."""
        logs = self.monitor.read()
        for term in self.method.terms.values():
            logs.update(term.read())
        return logs

    def compile(self) -> None:
        self.method.compile()

    def before_optimizer_step(self, step: int) -> None:
        self.method.before_optimizer_step(step)

    def after_optimizer_step(self, step: int) -> None:
        self.method.update_target()
        for term in self.method.trained_terms.values():
            term.step()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.kind is StudentKind.FULL:
            state = {f"student.{k}": v for k, v in self.student.state_dict().items()}
            state.update({f"target.{k}": v for k, v in self.method.target.state_dict().items()})
        else:
            state = {f"lora.{n}": p for n, p in self.student.named_parameters() if p.requires_grad}
        for name, term in self.method.trained_terms.items():
            state.update({f"{name}.{k}": v for k, v in term.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, term in self.method.trained_terms.items():
            term.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")})
        if self.kind is StudentKind.FULL:
            self.student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})
            self.method.target.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("target.")})
            return
        params = dict(self.student.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith("lora."):
                    params[key[5:]].copy_(value)

    @property
    def w_projection(self) -> torch.nn.Parameter | None:
        """The full student's w projection (``time_embedding.cond_proj.weight``); None for a LoRA student."""
        if self.kind is not StudentKind.FULL or self.method.w_dim is None:  # no UNet w projection (Flux: guidance)
            return None
        return self.student.time_embedding.cond_proj.weight

    @torch.no_grad()
    def validate(self, step: int, folder: Path) -> Validation:
        """A labelled grid: rows = the LCM as it would be exported (the EMA target, or the LoRA student) at 1, 2, 4
        and 8 steps; columns = validation prompts × seeds. Drawn by :func:`lcm.sample.generate`, so it shows what
        ``lcm sample`` will draw; written to ``folder/step-NNNNNN.png`` and handed to the loop for the trackers."""
        import numpy as np
        from PIL import Image

        if not self.validation_prompts:
            return Validation()
        unet = self.method.target
        was_training = unet.training
        unet.eval()
        scheduler = consistency_scheduler_config(self.model.scheduler_config, self.cfg.num_solver_steps)
        lcm = self.model.with_network(unet, scheduler, self.cfg.sigma_data, self.cfg.timestep_scaling)
        consistency = getattr(self.cfg, "consistency", None)  # LCD's --method; LCF keeps the LCM's own
        if consistency is not None:
            lcm.consistency, lcm.phases, lcm.cfg_free = consistency.value, self.cfg.phases, self.cfg.cfg_free
        sampler, gamma = lcm.default_sampler, lcm.default_gamma
        prompts = [p for p in self.validation_prompts for _ in self.validation_seeds]
        seeds = [s for _ in self.validation_prompts for s in self.validation_seeds]
        steps = (1, 2, 4, 8)
        rows = [generate(lcm, prompts, sampler, n, self.validation_w, seeds, gamma=gamma) for n in steps]
        name = "LCM" if sampler is Sampler.LCM else f"{consistency.value.upper()} ({sampler.value}, γ {gamma:g})"
        labels = [f"{name} {n} step{'' if n == 1 else 's'}" for n in steps]
        columns = [f"{p}, seed {s}" for p, s in zip(prompts, seeds, strict=True)]
        path = save_grid(torch.cat(rows), folder / f"step-{step:06d}.png", scale=2, rows=labels, columns=columns)
        with Image.open(path) as grid:
            images = {"validation": np.asarray(grid.convert("RGB"))[None]}
        unet.train(was_training)
        return Validation(images=images)

    def export(self, folder: Path) -> None:
        settings = {k: v.value if isinstance(v, Enum) else v for k, v in vars(self.cfg).items()}
        provenance = {**self.provenance, self.method_name.lower(): settings}
        source = self.model.source or "unknown"
        steps, scheduler = self.cfg.num_solver_steps, self.model.scheduler_config
        constants = {"sigma_data": self.cfg.sigma_data, "timestep_scaling": self.cfg.timestep_scaling}
        if self.kind is StudentKind.FULL:
            export_lcm_folder(source, self.method.target, scheduler, steps, folder, provenance, **constants)
        elif self.student_cfg.fuse_lora:
            unet = copy.deepcopy(self.student)
            unet.fuse_lora()
            unet.unload_lora()
            export_lcm_folder(self.model.lora_base or source, unet, scheduler, steps, folder, provenance, **constants)
        else:
            export_lora(self.student, self.model.lora_base or source, steps, folder, provenance, **constants)


def encode_batch(model: LatentDiffusion, uncond: TextEmbeddings, batch: dict[str, Any], generator: torch.Generator):
    """(z0, cond, uncond) of a collated batch: a fresh VAE posterior sample, cached text embeddings, and ``uncond``
    (the empty prompt's embedding) once per sample.

    A latent cache's batch (:mod:`lcm.data.latent_cache`) holds the posterior and the embeddings already: the
    sample ``mean + std·ε`` draws ε from ``generator`` exactly as the VAE's own posterior sample would.
    """
    device, uncond = model.device, TextEmbeddings.cat([uncond] * len(batch["caption"]))
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        z0 = mean + std * torch.randn(mean.shape, generator=generator).to(device, mean.dtype)
        cond = TextEmbeddings(batch["hidden_states"], batch.get("pooled")).to(device)
        return z0.float(), cond, uncond
    z0 = model.encode_images(batch["pixel_values"], generator)
    cond = model.encode_prompts(batch["caption"], cache=True)
    return z0.to(device).float(), cond, uncond


def default_validation_prompts(model: LatentDiffusion) -> tuple[str, ...]:
    """The validation grid's prompts when none are given: the ten class prompts of the embedded family, two stock
    prompts otherwise."""
    if model.is_embedded:
        from lcm.data.captions import class_prompts

        return tuple(class_prompts())
    return ("a photo of an astronaut riding a horse", "a cosy cabin in a snowy forest, golden hour")


class DistillTask(ConsistencyTask):
    """Latent Consistency Distillation of ``model`` into a full or LoRA student.

    The validation grid's w defaults to the w the distilled LCM will default to: the middle of ``[w_min, w_max]``.
    """

    method_name = "LCD"

    def __init__(
        self,
        model: LatentDiffusion,
        cfg: LCDConfig | None = None,
        student: StudentConfig | None = None,
        seed: int = 0,
        validation: ValidationConfig | None = None,
        provenance: dict | None = None,
    ):
        cfg, student, validation = cfg or LCDConfig(), student or StudentConfig(), validation or ValidationConfig()
        unet, target = make_student(model, student, seed, w_input=not cfg.cfg_free, init=cfg.init_student)
        method = LCD(model, unet, student.kind, cfg, target, seed)
        # CFG-free: no distilled range, so real guidance at the family's usual w
        w = validation.w if validation.w is not None else default_w(method.w_range, model.is_embedded)
        super().__init__(model, method, student, w, validation, provenance)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """With ``--w-lr-scale`` other than 1, the w projection learns at its own rate (a group of its own)."""
        scale, projection = self.cfg.w_lr_scale, self.w_projection
        if scale == 1.0 or projection is None:
            return super().parameter_groups()
        rest = [p for p in self.trainable_parameters() if p is not projection]
        return [{"params": rest}, {"params": [projection], "lr_scale": scale}]


class FinetuneTask(ConsistencyTask):
    """Latent Consistency Fine-tuning of an LCM (``model``) on new data, without a teacher.

    Unset :class:`LCFConfig` values (w, consistency constants) are the LCM's own; the validation grid's w defaults
    to the w it is fine-tuned at.
    """

    method_name = "LCF"

    def __init__(
        self,
        model: LatentDiffusion,
        cfg: LCFConfig | None = None,
        student: StudentConfig | None = None,
        seed: int = 0,
        validation: ValidationConfig | None = None,
        provenance: dict | None = None,
    ):
        if not model.is_lcm:
            raise ValueError("lcm finetune needs an LCM (the output of lcm distill); for a teacher use lcm distill")
        if model.cfg_free:
            raise ValueError("lcm finetune of a CFG-free model is not built: its consistency fine-tuning feeds a w")
        cfg, student, validation = cfg or LCFConfig(), student or StudentConfig(), validation or ValidationConfig()
        unet, target = make_student(model, student, seed)
        method = LCF(model, unet, student.kind, cfg, target)
        w = method.cfg.w if validation.w is None else validation.w
        super().__init__(model, method, student, w, validation, provenance)
