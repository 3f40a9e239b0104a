"""The one training loop: distillation (LCD), fine-tuning (LCF) and the three stages of the embedded teacher. Knows
no LCM maths.

A :class:`Task` supplies the per-sample loss of a batch, the trainable parameters, what to checkpoint, what to do
after each optimiser step (EMA), and how to validate and export; the loop supplies Accelerate (devices, mixed
precision, gradient accumulation, many GPUs through ``accelerate launch``), the optimiser and its schedule, gradient
clipping, a guard against non-finite losses and gradients, safetensors checkpoints that resume exactly (history and
data position included), TensorBoard logging and progress.

A run folder ``out`` holds the export; everything else a run writes goes to ``out/train``: ``checkpoints/``,
``logs/``, ``validation/``, ``train_config.json``, ``train_history.json`` and the run's record ``run_config.json``.
A run owns its folder while it lives (:mod:`lcm.training.run_folder`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lcm.config.run import LoopConfig, OptimConfig
from lcm.models.fast import cpu_compiler, use_compile_cache
from lcm.training.checkpoint import checkpoint_steps, non_finite, restore_checkpoint, save_training_state
from lcm.training.optim import make_lr_scheduler, make_optimizer
from lcm.training.run_folder import (
    TRAIN_DIR,
    check_folder_state,
    differences,
    own_run_folder,
    write_run_record,
)
from lcm.training.tracking import flat_config, log_images, trackers

__all__ = ["TRAIN_DIR", "NonFiniteTraining", "Task", "Validation", "train", "train_dir"]


def train_dir(out: Path) -> Path:
    """Where a run keeps checkpoints, logs, validation grids and its history (the export stays in ``out``)."""
    return Path(out) / TRAIN_DIR


def cpu_processes(cpu: bool = False) -> bool:
    """Whether Accelerate must be told to use the CPU: asked for, or several processes on a machine without GPUs
    (Accelerate only sets up CPU processes with gloo when told so; otherwise each would run alone as rank 0)."""
    import os

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return cpu or (
        several and not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())
    )


class NonFiniteTraining(ValueError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


@dataclass(frozen=True)
class Validation:
    """What a task's validation gives the loop: metrics to log, and images for the trackers (``{tag: [N, H, W, 3]
    uint8}``, the form Accelerate's ``log_images`` takes)."""

    metrics: dict[str, float] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)


class Task:
    """What the loop needs from a training method (LCD, LCF) or a stage of the embedded teacher. A subclass
    implements the five abstract methods; the hooks do nothing unless overridden."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def wrap(self, prepare) -> list[torch.nn.Module]:
        """Let Accelerate wrap the modules that receive gradients (``prepare`` is ``accelerator.prepare``); return
        the wrapped modules (gradient accumulation skips their all-reduce on non-final micro-batches)."""
        raise NotImplementedError

    def loss(self, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Per-sample losses ``[B]`` of one batch."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # --- hooks ------------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups; a group's ``lr_scale`` multiplies the run's learning rate."""
        return [{"params": self.trainable_parameters()}]

    def compile(self) -> None:
        """``torch.compile`` the networks the loss calls, in place (``--compile on``)."""

    def before_optimizer_step(self, step: int) -> None:
        """Called before the micro-batches of optimiser step ``step`` (1-based), also the first after a resume: what
        a method schedules by the step (a curriculum) is set here, so a resumed run repeats it."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimiser step ``step`` (1-based), before any checkpoint of it: EMA updates belong here."""

    def log_metrics(self) -> dict[str, float]:
        """Extra values for the log line (called once per log line)."""
        return {}

    def validate(self, step: int, folder: Path) -> Validation:
        return Validation()

    def export(self, folder: Path) -> None:
        """Write the trained model into the run folder."""


def _checkpoint_root(cfg: LoopConfig, out: Path) -> Path:
    return cfg.checkpoint_dir if cfg.checkpoint_dir is not None else train_dir(out) / "checkpoints"


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that the JSON written is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def train(
    task: Task,
    batches: Callable[[int], Iterable[Any]],
    out: Path,
    cfg: LoopConfig,
    optim: OptimConfig,
    resume: str | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``cfg.max_steps`` optimiser steps of ``task`` with the optimiser ``optim``, in the run folder ``out``.

    ``batches(start)`` returns the endless batch stream from micro-batch ``start`` on (see
    :func:`lcm.data.loader.batch_stream`), so a resumed run continues at the same data position; a run resumed at
    its last step only restores the task's state. Returns a summary: ``steps``, ``steps_run`` (by this call),
    ``bad_steps`` (skipped for a non-finite loss or gradient), ``wall_seconds`` and the logged ``history``.

    The run owns its folder while it lives (:mod:`lcm.training.run_folder`): another live run on it, a folder that
    holds another run's state, or ``resume="latest"`` with nothing to resume are refused in one line before anything
    is written (``resume``: None for a new run, "latest", "auto" or a checkpoint folder). ``record`` (the run's
    settings, JSON-ready) goes to ``run_config.json`` and into every checkpoint; a resume from a checkpoint whose
    record differs (beyond what a resume may change) is refused.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    folder = train_dir(out)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cpu_processes(cfg.cpu),
        log_with=trackers(cfg.report_to) if cfg.write_logs else None,
        project_config=ProjectConfiguration(project_dir=str(folder), logging_dir=str(folder / "logs")),
    )
    owner = contextlib.ExitStack()
    asked, resume, error = resume, None, None
    if accelerator.is_main_process:
        try:
            decide = functools.partial(check_folder_state, folder, _checkpoint_root(cfg, out), asked, record)
            resume = owner.enter_context(own_run_folder(folder, " ".join(sys.argv)[:300], decide))
        except ValueError as err:
            error = str(err)
    if accelerator.num_processes > 1:  # every rank acts on rank 0's decision
        from accelerate.utils import broadcast_object_list

        resume, error = broadcast_object_list([resume, error], from_process=0)
    if error is not None:
        owner.close()
        raise ValueError(error)
    with owner:
        return _train(accelerator, task, batches, out, cfg, optim, resume, record)


def _train(accelerator, task: Task, batches, out: Path, cfg: LoopConfig, optim: OptimConfig, resume, record) -> dict:
    params = task.trainable_parameters()
    groups = task.parameter_groups()
    optimizer = make_optimizer(groups, optim)
    lr_scheduler = make_lr_scheduler(optimizer, optim, cfg.max_steps)
    wrapped = task.wrap(accelerator.prepare)
    optimizer = accelerator.prepare(optimizer)
    if cfg.compile.enabled(accelerator.device):
        use_compile_cache()  # first: asking Inductor anything (as cpu_compiler does) fixes its cache folder
        if accelerator.device.type == "cpu" and cpu_compiler() is None:
            accelerator.print("--compile: no C++ compiler found (Inductor needs one on the CPU); training eagerly")
        else:
            task.compile()  # in place: state dicts and checkpoints keep their keys
    noise_seed = cfg.seed * 1009 if cfg.noise_seed is None else cfg.noise_seed
    generator = torch.Generator().manual_seed(noise_seed + accelerator.process_index)

    def same_run(path: Path, meta: dict[str, Any]) -> None:
        saved = meta.get("run")
        if record is None or not isinstance(saved, dict):  # a checkpoint that recorded no settings
            return
        if changed := differences(saved, record):
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise ValueError(
                f"{path} was written by a run with other settings: {changed[0]}{more}; resume with the settings it "
                "was started with, or choose another --out"
            )

    run = _Run(accelerator, task, optimizer, lr_scheduler, generator, params, wrapped, out, cfg, optim, record)
    step, elapsed = 0, 0.0
    meta = None
    if resume is not None:
        meta = restore_checkpoint(
            resume,
            _checkpoint_root(cfg, out),
            optimizer.optimizer,
            generator,
            task.load_state_dict,
            accelerator.print,
            check=same_run,
        )
    if meta is not None:
        step, elapsed = int(meta["step"]), float(meta.get("elapsed", 0.0))
        run.resume_from(meta, step)
        if accelerator.process_index > 0:  # the checkpoint holds rank 0's generator: give each rank its own stream
            generator.manual_seed((noise_seed + accelerator.process_index) * 100003 + step)
        with warnings.catch_warnings():  # replaying before any optimizer.step() is intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):  # schedules are functions of the step: replay them, no state to trust
                lr_scheduler.step()
    if accelerator.is_main_process and record is not None:
        write_run_record(train_dir(out), record)
    if accelerator.is_main_process and cfg.write_logs:
        accelerator.init_trackers("lcm", config=flat_config(cfg, optim))
        (train_dir(out) / "train_config.json").write_text(json.dumps(flat_config(cfg, optim), indent=2) + "\n")

    first, t0 = step, time.time() - elapsed
    if step < cfg.max_steps:
        run.steps(iter(batches(run.position)), step, t0)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cfg.write_logs:
            history = json.dumps(_strict(run.history), indent=1, allow_nan=False)
            (train_dir(out) / "train_history.json").write_text(history + "\n")
        if bad := non_finite(task.state_dict()):
            raise ValueError(f"refusing to export: {bad} holds non-finite values (lower --learning-rate)")
        task.export(out)
    accelerator.end_training()
    if run.bad_steps:
        accelerator.print(f"skipped {run.bad_steps} optimiser steps with a non-finite loss or gradient")
    last = max(first, cfg.max_steps)  # a checkpoint past max_steps is restored, not trained further
    return {
        "steps": last,
        "steps_run": last - first,
        "bad_steps": run.bad_steps,
        "wall_seconds": time.time() - t0,
        "history": run.history,
    }


class _Run:
    """The optimiser steps of one :func:`train` call (split out to keep set-up and stepping readable)."""

    def __init__(self, accelerator, task, optimizer, lr_scheduler, generator, params, wrapped, out, cfg, optim, record):
        self.accelerator, self.task, self.optimizer, self.lr_scheduler = accelerator, task, optimizer, lr_scheduler
        self.generator, self.params, self.wrapped, self.out, self.cfg = generator, params, wrapped, out, cfg
        self.optim = optim
        self.record = record  # the run's settings, written into every checkpoint
        self.history: list[dict[str, Any]] = []
        self.position = 0  # micro-batches this rank has drawn from the stream, unreadable ones included
        self.bad_steps, self.bad_in_a_row = 0, 0

    def resume_from(self, meta: dict[str, Any], step: int) -> None:
        accelerator = self.accelerator
        self.history = [h for h in meta.get("history", []) if h["step"] <= step]
        self.bad_steps, self.bad_in_a_row = meta.get("bad_steps", [0, 0])
        positions = meta.get("data_positions")
        if positions is not None and len(positions) == accelerator.num_processes:
            self.position = int(positions[accelerator.process_index])
        else:
            if positions is not None:
                accelerator.print(
                    f"the checkpoint was written by {len(positions)} processes, this run has "
                    f"{accelerator.num_processes}: the data order differs from an uninterrupted run"
                )
            self.position = step * self.cfg.gradient_accumulation_steps

    def steps(self, stream: Iterator[Any], step: int, t0: float) -> None:
        accelerator, cfg = self.accelerator, self.cfg
        bar = tqdm(
            total=cfg.max_steps,
            initial=step,
            desc=cfg.label,
            unit="step",
            disable=not accelerator.is_local_main_process,
        )
        try:
            self._steps(stream, step, t0, bar)
        finally:
            bar.close()  # also when a step fails: the error then starts a line of its own

    def _steps(self, stream: Iterator[Any], step: int, t0: float, bar) -> None:
        accelerator, cfg, task = self.accelerator, self.cfg, self.task
        samples_since, t_log = 0, time.time()
        while step < cfg.max_steps:
            task.before_optimizer_step(step + 1)
            loss, grad_norm, samples, ok = self.one_step(stream)
            samples_since += samples
            self.lr_scheduler.step()  # a skipped step still advances the schedule: it stays a function of the step
            step += 1
            if ok:
                self.bad_in_a_row = 0
                task.after_optimizer_step(step)
            else:
                self.bad_steps += 1
                self.bad_in_a_row += 1
                if self.bad_in_a_row >= cfg.max_bad_steps:
                    raise NonFiniteTraining(
                        f"stopped at step {step}: {self.bad_in_a_row} optimiser steps in a row had a non-finite loss "
                        f"or gradient (--max-bad-steps {cfg.max_bad_steps}); lower --learning-rate or check the data"
                    )
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                rate = samples_since / max(time.time() - t_log, 1e-9)
                logs = {
                    "loss": float(accelerator.gather(loss.detach()).mean()),  # one sync per log, not per step
                    "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                    "lr": self.lr_scheduler.get_last_lr()[0],
                    "samples_per_second": rate,
                }
                logs.update(task.log_metrics())
                accelerator.log({k: v for k, v in logs.items() if math.isfinite(v)}, step=step)
                self.history.append({"step": step, **_strict(logs), "bad_steps": self.bad_steps})
                bar.set_postfix(loss=f"{logs['loss']:.4f}", samples_s=f"{rate:.1f}", bad=self.bad_steps)
                samples_since, t_log = 0, time.time()
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                self.checkpoint(step, time.time() - t0)
            if (
                accelerator.is_main_process
                and cfg.validate_every
                and (step % cfg.validate_every == 0 or step == cfg.max_steps)
            ):
                # Compiled networks run eagerly here: a grid's batch size would otherwise compile a graph of its own.
                with torch.compiler.set_stance("force_eager"):
                    result = task.validate(step, train_dir(self.out) / "validation")
                if result.metrics:
                    accelerator.log(result.metrics, step=step)
                if result.images and cfg.write_logs:
                    log_images(accelerator, result.images, step)

    def one_step(self, stream: Iterator[Any]) -> tuple[torch.Tensor, torch.Tensor | None, int, bool]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches: (mean loss, grad norm, samples,
        whether the update was applied). A step whose loss or gradient is not finite (on any rank) is skipped."""
        accelerator, cfg = self.accelerator, self.cfg
        samples, grad_norm, total, ok = 0, None, None, True
        for _ in range(cfg.gradient_accumulation_steps):
            batch = self.next_batch(stream)
            with accelerator.accumulate(*self.wrapped):
                with accelerator.autocast():
                    losses = self.task.loss(batch, self.generator)
                loss = losses.mean()
                accelerator.backward(loss)
                total = loss.detach() if total is None else total + loss.detach()
                if accelerator.sync_gradients:
                    # Clipping at +inf multiplies by exactly 1, so the norm is measured (for the guard) unclipped.
                    norm = self.optim.max_grad_norm
                    max_norm = norm if norm is not None else math.inf
                    grad_norm = accelerator.clip_grad_norm_(self.params, max_norm)
                    ok = self.finite(total, grad_norm)
                    if ok:
                        self.optimizer.step()
                    elif accelerator.scaler is not None:  # fp16: what GradScaler does on an overflow
                        accelerator.scaler.update(accelerator.scaler.get_scale() / 2)
                    self.optimizer.zero_grad(set_to_none=True)
            samples += losses.shape[0] * accelerator.num_processes
        return total / cfg.gradient_accumulation_steps, grad_norm, samples, ok

    def finite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """Whether every rank's loss and the (synchronised) gradient norm are finite.

        One scalar device-to-host copy per optimiser step (not per micro-batch). Keeping the decision on the device
        instead would mean masking AdamW's update of every parameter and moment, which its fused kernels do not
        offer; the copy costs one kernel-launch latency per step, small next to a UNet's forward and backward.
        """
        flag = torch.isfinite(loss.float())
        if grad_norm is not None:
            flag = flag & torch.isfinite(torch.as_tensor(grad_norm, device=flag.device).float())
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.gather(flag.reshape(1).float()).min() > 0
        return bool(flag)

    def next_batch(self, stream: Iterator[Any], patience: int = 1000) -> Any:
        """The next batch that holds at least one sample (a batch of unreadable files collates to None); every
        batch drawn counts towards the data position a checkpoint records."""
        for _ in range(patience):
            batch = next(stream)
            self.position += 1
            if batch is not None:
                return batch
        raise ValueError(f"{patience} batches in a row held no readable sample: check the data")

    def checkpoint(self, step: int, elapsed: float) -> None:
        accelerator = self.accelerator
        position = torch.tensor([self.position], device=accelerator.device)
        positions = [int(p) for p in accelerator.gather(position).tolist()]  # every rank takes part
        state = self.task.state_dict()
        if bad := non_finite(state):  # cannot follow a skipped step; guards a task that changes weights itself
            raise ValueError(f"refusing to write checkpoint step-{step}: {bad} holds non-finite values")
        if not accelerator.is_main_process:
            return
        root = _checkpoint_root(self.cfg, self.out)
        meta = {
            "step": step,
            "elapsed": elapsed,
            "history": self.history,
            "data_positions": positions,
            "bad_steps": [self.bad_steps, self.bad_in_a_row],
        }
        if self.record is not None:
            meta["run"] = self.record
        save_training_state(root / f"step-{step}", state, self.optimizer.optimizer, meta, self.generator)
        for _, old in checkpoint_steps(root)[self.cfg.keep_checkpoints :]:
            shutil.rmtree(old, ignore_errors=True)
