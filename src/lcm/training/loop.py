"""The one training loop: distillation (LCD), fine-tuning (LCF) and the three stages of the embedded teacher. Knows
no LCM maths.

A :class:`Task` supplies the per-sample loss of a batch, the trainable parameters, what to checkpoint, what to do
after each optimiser step (EMA), and how to validate and export; the loop supplies Accelerate (devices, mixed
precision, gradient accumulation, many GPUs through ``accelerate launch``), the optimiser and its schedule, gradient
clipping, safetensors checkpoints that resume exactly (history included), TensorBoard logging and progress.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from lcm.training.checkpoint import latest_checkpoint, load_training_state, save_training_state

__all__ = ["MIXED_PRECISION", "Task", "TrainConfig", "cosine_floor", "train"]

MIXED_PRECISION = ("no", "fp16", "bf16")  # Accelerate's autocast modes


@dataclass(frozen=True)
class TrainConfig:
    out: Path  # run folder: checkpoints/, logs/, validation/, and the export
    max_steps: int = 1000  # optimiser steps
    learning_rate: float = 1e-6
    lr_schedule: str = "constant"  # any diffusers.optimization scheduler name: constant, cosine, linear, …
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit (GPU)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 0
    noise_seed: int | None = None  # seed of the generator handed to Task.loss (default: from seed and rank)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    checkpoint_dir: Path | None = None  # where the step-N folders go (default: out/checkpoints)
    validate_every: int = 500  # 0: only at the end
    log_every: int = 10
    write_logs: bool = True  # TensorBoard logs, train_config.json and train_history.json in out
    resume: str | None = None  # "latest" or a checkpoint folder
    cpu: bool = False  # train on the CPU even where an accelerator is present
    label: str = "train"  # of the progress bar

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError("--max-steps must be at least 1")
        if self.checkpoint_every < 1:
            raise ValueError("--checkpoint-every must be at least 1")
        if self.keep_checkpoints < 1:
            raise ValueError("--keep-checkpoints must be at least 1")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("--gradient-accumulation-steps must be at least 1")
        if self.learning_rate <= 0:
            raise ValueError("--learning-rate must be positive")


class Task(Protocol):
    """What the loop needs from a training method (LCD, LCF) or a stage of the embedded teacher."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def wrap(self, prepare) -> list[torch.nn.Module]:
        """Let Accelerate wrap the modules that receive gradients (``prepare`` is ``accelerator.prepare``); return
        the wrapped modules (gradient accumulation skips their all-reduce on non-final micro-batches)."""

    def loss(self, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Per-sample losses ``[B]`` of one batch."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimiser step ``step`` (1-based), before any checkpoint of it: EMA updates belong here."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def validate(self, step: int, folder: Path) -> dict[str, float]: ...

    def export(self, folder: Path) -> None: ...


def _optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ValueError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def cosine_floor(warmup: int, total: int) -> Callable[[int], float]:
    """The "cosine_floor" schedule: linear warm-up to the full rate over ``warmup`` steps, then half a cosine down to
    10% of it at step ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.9 + 0.1

    return f


def _lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """A schedule over optimiser steps (Accelerate's would count micro-batches × processes)."""
    if cfg.lr_schedule == "cosine_floor":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_floor(cfg.lr_warmup_steps, cfg.max_steps))
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_schedule, optimizer, cfg.lr_warmup_steps, cfg.max_steps)


def _checkpoint_root(cfg: TrainConfig) -> Path:
    return cfg.checkpoint_dir if cfg.checkpoint_dir is not None else cfg.out / "checkpoints"


def _resolve_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        return latest_checkpoint(_checkpoint_root(cfg))  # nothing yet: a fresh start
    path = Path(cfg.resume)
    if not path.is_dir():
        raise ValueError(f"--resume {cfg.resume}: no such checkpoint folder (or use --resume latest)")
    return path


def train(task: Task, batches: Callable[[int], Iterable[Any]], cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg.max_steps`` optimiser steps of ``task``. ``batches(start)`` returns the endless batch stream from
    micro-batch ``start`` on (see :func:`lcm.data.loader.batch_stream`), so a resumed run continues at the same data
    position; a run resumed at its last step only restores the task's state. Returns a summary: ``steps``,
    ``steps_run`` (by this call), ``wall_seconds`` and the logged ``history`` of the whole run."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cfg.out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cfg.cpu,
        log_with="tensorboard" if cfg.write_logs else None,
        project_config=ProjectConfiguration(project_dir=str(cfg.out), logging_dir=str(cfg.out / "logs")),
    )
    params = task.trainable_parameters()
    optimizer = _optimizer(params, cfg)
    lr_scheduler = _lr_scheduler(optimizer, cfg)
    wrapped = task.wrap(accelerator.prepare)
    optimizer = accelerator.prepare(optimizer)
    noise_seed = cfg.seed * 1009 if cfg.noise_seed is None else cfg.noise_seed
    generator = torch.Generator().manual_seed(noise_seed + accelerator.process_index)

    step, elapsed, history = 0, 0.0, []
    resume = _resolve_resume(cfg)
    if resume is not None:
        state, meta = load_training_state(resume, optimizer.optimizer, generator)
        task.load_state_dict(state)
        step, elapsed = int(meta["step"]), float(meta.get("elapsed", 0.0))
        history = [h for h in meta.get("history", []) if h["step"] <= step]
        if accelerator.process_index > 0:  # the checkpoint holds rank 0's generator: give each rank its own stream
            generator.manual_seed((noise_seed + accelerator.process_index) * 100003 + step)
        with warnings.catch_warnings():  # replaying before any optimizer.step() is intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):  # schedules are functions of the step: replay them, no state to trust
                lr_scheduler.step()
        accelerator.print(f"resumed from {resume} at step {step}")
    if accelerator.is_main_process and cfg.write_logs:
        accelerator.init_trackers("lcm", config=_flat_config(cfg))
        (cfg.out / "train_config.json").write_text(json.dumps(_flat_config(cfg), indent=2) + "\n")

    first, t0 = step, time.time() - elapsed
    if step < cfg.max_steps:
        run = _Run(accelerator, task, optimizer, lr_scheduler, generator, params, wrapped, cfg, history)
        run.steps(iter(batches(step * cfg.gradient_accumulation_steps)), step, t0)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        task.export(cfg.out)
        if cfg.write_logs:
            (cfg.out / "train_history.json").write_text(json.dumps(history, indent=1) + "\n")
    accelerator.end_training()
    last = max(first, cfg.max_steps)  # a checkpoint past max_steps is restored, not trained further
    return {
        "steps": last,
        "steps_run": last - first,
        "wall_seconds": time.time() - t0,
        "history": history,
    }


class _Run:
    """The optimiser steps of one :func:`train` call (split out to keep set-up and stepping readable)."""

    def __init__(self, accelerator, task, optimizer, lr_scheduler, generator, params, wrapped, cfg, history):
        self.accelerator, self.task, self.optimizer, self.lr_scheduler = accelerator, task, optimizer, lr_scheduler
        self.generator, self.params, self.wrapped, self.cfg, self.history = generator, params, wrapped, cfg, history

    def steps(self, stream: Iterator[Any], step: int, t0: float) -> None:
        accelerator, cfg, task = self.accelerator, self.cfg, self.task
        bar = tqdm(
            total=cfg.max_steps,
            initial=step,
            desc=cfg.label,
            unit="step",
            disable=not accelerator.is_local_main_process,
        )
        samples_since, t_log = 0, time.time()
        while step < cfg.max_steps:
            loss, grad_norm, samples = self.one_step(stream)
            samples_since += samples
            self.lr_scheduler.step()
            step += 1
            task.after_optimizer_step(step)
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                rate = samples_since / max(time.time() - t_log, 1e-9)
                logs = {
                    "loss": float(accelerator.gather(loss.detach()).mean()),  # one sync per log, not per step
                    "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                    "lr": self.lr_scheduler.get_last_lr()[0],
                    "samples_per_second": rate,
                }
                accelerator.log(logs, step=step)
                self.history.append({"step": step, **logs})
                bar.set_postfix(loss=f"{logs['loss']:.4f}", samples_s=f"{rate:.1f}")
                samples_since, t_log = 0, time.time()
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                self.checkpoint(step, time.time() - t0)
            if accelerator.is_main_process and (
                (cfg.validate_every and step % cfg.validate_every == 0) or step == cfg.max_steps
            ):
                metrics = task.validate(step, cfg.out / "validation")
                if metrics:
                    accelerator.log(metrics, step=step)
        bar.close()

    def one_step(self, stream: Iterator[Any]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches: (last loss, grad norm, samples)."""
        accelerator, cfg = self.accelerator, self.cfg
        samples, grad_norm = 0, None
        for _ in range(cfg.gradient_accumulation_steps):
            batch = _next_readable(stream)
            with accelerator.accumulate(*self.wrapped):
                with accelerator.autocast():
                    losses = self.task.loss(batch, self.generator)
                loss = losses.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            samples += losses.shape[0] * accelerator.num_processes
        return loss, grad_norm, samples

    def checkpoint(self, step: int, elapsed: float) -> None:
        if not self.accelerator.is_main_process:
            return
        root = _checkpoint_root(self.cfg)
        meta = {"step": step, "elapsed": elapsed, "history": self.history}
        save_training_state(
            root / f"step-{step}", self.task.state_dict(), self.optimizer.optimizer, meta, self.generator
        )
        done = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name.split("-")[1].isdigit())
        for _, old in done[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def _next_readable(stream: Iterator[Any], patience: int = 1000) -> Any:
    """The next batch that holds at least one sample (a batch of unreadable files collates to None)."""
    for _ in range(patience):
        batch = next(stream)
        if batch is not None:
            return batch
    raise ValueError(f"{patience} batches in a row held no readable sample: check the data")


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) or v is None else v) for k, v in asdict(cfg).items()}
