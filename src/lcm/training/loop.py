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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from lcm.limits import MAX_STEPS
from lcm.models.fast import Compile, cpu_compiler, use_compile_cache
from lcm.training.checkpoint import checkpoint_steps, non_finite, restore_checkpoint, save_training_state
from lcm.training.optim import LR_SCHEDULES, cosine_floor, make_lr_scheduler, make_optimizer
from lcm.training.run_folder import (
    RESUME_MODES,
    TRAIN_DIR,
    check_folder_state,
    differences,
    own_run_folder,
    write_run_record,
)
from lcm.training.tracking import TRACKERS, flat_config, log_images, trackers

__all__ = [
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "TRAIN_DIR",
    "NonFiniteTraining",
    "Task",
    "TrainConfig",
    "cosine_floor",
    "train",
]

MIXED_PRECISION = ("no", "fp16", "bf16")  # Accelerate's autocast modes


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@dataclass(frozen=True)
class TrainConfig:
    out: Path  # run folder: the export; training state in out/train
    max_steps: int = 1000  # optimiser steps
    learning_rate: float = 1e-6
    lr_schedule: str = "constant"  # one of LR_SCHEDULES
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
    checkpoint_dir: Path | None = None  # where the step-N folders go (default: out/train/checkpoints)
    validate_every: int = 500  # and at the end; 0: never
    log_every: int = 10
    write_logs: bool = True  # TensorBoard logs, train_config.json and train_history.json in out/train
    resume: str | None = None  # "latest", "auto" (latest, or a new run when there is none) or a checkpoint folder
    cpu: bool = False  # train on the CPU even where an accelerator is present
    label: str = "train"  # of the progress bar
    max_bad_steps: int = 10  # stop after this many optimiser steps in a row with a non-finite loss or gradient
    compile: str = "auto"  # torch.compile the task's networks: auto (CUDA only), on, off (lcm.models.fast.Compile)
    report_to: tuple[str, ...] = ("tensorboard",)  # Accelerate trackers (with write_logs); validation grids too

    def __post_init__(self):
        _check(1 <= self.max_steps <= MAX_STEPS, f"--max-steps must be between 1 and {MAX_STEPS}, got {self.max_steps}")
        _check(_positive(self.learning_rate), f"--learning-rate must be a positive number, got {self.learning_rate}")
        _check(
            self.lr_schedule in LR_SCHEDULES,
            f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
        )
        _check(self.lr_warmup_steps >= 0, f"--lr-warmup-steps must be at least 0, got {self.lr_warmup_steps}")
        for name, beta in (("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)):
            _check(0 <= beta < 1, f"{name} must lie in [0, 1), got {beta}")
        wd = self.adam_weight_decay
        _check(math.isfinite(wd) and wd >= 0, f"--adam-weight-decay must be a number >= 0, got {wd}")
        acc = self.gradient_accumulation_steps
        _check(acc >= 1, f"--gradient-accumulation-steps must be at least 1, got {acc}")
        norm = self.max_grad_norm
        _check(norm is None or _positive(norm), f"--max-grad-norm must be a positive number, got {norm}")
        _check(
            self.mixed_precision in MIXED_PRECISION,
            f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}",
        )
        for name, seed in (("--seed", self.seed), ("noise_seed", self.noise_seed)):
            _check(seed is None or 0 <= seed < 2**32, f"{name} must lie in [0, 2**32), got {seed}")
        _check(self.checkpoint_every >= 1, f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}")
        every = self.validate_every
        _check(every >= 0, f"--validate-every must be at least 0 (0: never), got {every}")
        _check(self.log_every >= 1, f"--log-every must be at least 1, got {self.log_every}")
        _check(self.max_bad_steps >= 1, f"--max-bad-steps must be at least 1, got {self.max_bad_steps}")
        _check(
            self.resume is None or bool(str(self.resume).strip()),
            f"--resume takes {' or '.join(RESUME_MODES)} or a checkpoint folder",
        )
        for tracker in self.report_to:
            _check(tracker in TRACKERS, f"--report-to: unknown tracker {tracker!r} ({', '.join(TRACKERS)})")
        modes = [c.value for c in Compile]
        _check(self.compile in modes, f"--compile must be one of {', '.join(modes)}, got {self.compile!r}")

    @property
    def train_dir(self) -> Path:
        """Where checkpoints, logs, validation grids and the history go (the export stays in ``out``)."""
        return self.out / TRAIN_DIR


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


class Task(Protocol):
    """What the loop needs from a training method (LCD, LCF) or a stage of the embedded teacher."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def wrap(self, prepare) -> list[torch.nn.Module]:
        """Let Accelerate wrap the modules that receive gradients (``prepare`` is ``accelerator.prepare``); return
        the wrapped modules (gradient accumulation skips their all-reduce on non-final micro-batches)."""

    def loss(self, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Per-sample losses ``[B]`` of one batch."""

    def before_optimizer_step(self, step: int) -> None:
        """Optional. Called before the micro-batches of optimiser step ``step`` (1-based), also the first after a
        resume: what a method schedules by the step (a curriculum) is set here, so a resumed run repeats it."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimiser step ``step`` (1-based), before any checkpoint of it: EMA updates belong here."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def validate(self, step: int, folder: Path) -> dict[str, float]: ...

    def export(self, folder: Path) -> None: ...


def _checkpoint_root(cfg: TrainConfig) -> Path:
    return cfg.checkpoint_dir if cfg.checkpoint_dir is not None else cfg.train_dir / "checkpoints"


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
    task: Task, batches: Callable[[int], Iterable[Any]], cfg: TrainConfig, record: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run ``cfg.max_steps`` optimiser steps of ``task``. ``batches(start)`` returns the endless batch stream from
    micro-batch ``start`` on (see :func:`lcm.data.loader.batch_stream`), so a resumed run continues at the same data
    position; a run resumed at its last step only restores the task's state. Returns a summary: ``steps``,
    ``steps_run`` (by this call), ``bad_steps`` (skipped for a non-finite loss or gradient), ``wall_seconds`` and
    the logged ``history`` of the whole run.

    The run owns its folder while it lives (:mod:`lcm.training.run_folder`): another live run on it, a folder that
    holds another run's state, or ``resume="latest"`` with nothing to resume are refused in one line before anything
    is written. ``record`` (the run's settings, JSON-ready) goes to ``run_config.json`` and into every checkpoint; a
    resume from a checkpoint whose record differs (beyond what a resume may change) is refused.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cpu_processes(cfg.cpu),
        log_with=trackers(cfg.report_to) if cfg.write_logs else None,
        project_config=ProjectConfiguration(project_dir=str(cfg.train_dir), logging_dir=str(cfg.train_dir / "logs")),
    )
    owner = contextlib.ExitStack()
    resume, error = None, None
    if accelerator.is_main_process:
        try:
            decide = functools.partial(check_folder_state, cfg.train_dir, _checkpoint_root(cfg), cfg.resume, record)
            resume = owner.enter_context(own_run_folder(cfg.train_dir, " ".join(sys.argv)[:300], decide))
        except ValueError as err:
            error = str(err)
    if accelerator.num_processes > 1:  # every rank acts on rank 0's decision
        from accelerate.utils import broadcast_object_list

        resume, error = broadcast_object_list([resume, error], from_process=0)
    if error is not None:
        owner.close()
        raise ValueError(error)
    with owner:
        return _train(accelerator, task, batches, cfg, resume, record)


def _train(accelerator, task: Task, batches, cfg: TrainConfig, resume: str | None, record) -> dict[str, Any]:
    params = task.trainable_parameters()
    groups = task.parameter_groups() if hasattr(task, "parameter_groups") else [{"params": params}]
    optimizer = make_optimizer(groups, cfg)
    lr_scheduler = make_lr_scheduler(optimizer, cfg)
    wrapped = task.wrap(accelerator.prepare)
    optimizer = accelerator.prepare(optimizer)
    if Compile(cfg.compile).enabled(accelerator.device) and hasattr(task, "compile"):
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

    run = _Run(accelerator, task, optimizer, lr_scheduler, generator, params, wrapped, cfg, record)
    step, elapsed = 0, 0.0
    meta = None
    if resume is not None:
        meta = restore_checkpoint(
            resume,
            _checkpoint_root(cfg),
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
        write_run_record(cfg.train_dir, record)
    if accelerator.is_main_process and cfg.write_logs:
        accelerator.init_trackers("lcm", config=flat_config(cfg))
        (cfg.train_dir / "train_config.json").write_text(json.dumps(flat_config(cfg), indent=2) + "\n")

    first, t0 = step, time.time() - elapsed
    if step < cfg.max_steps:
        run.steps(iter(batches(run.position)), step, t0)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cfg.write_logs:
            history = json.dumps(_strict(run.history), indent=1, allow_nan=False)
            (cfg.train_dir / "train_history.json").write_text(history + "\n")
        if bad := non_finite(task.state_dict()):
            raise ValueError(f"refusing to export: {bad} holds non-finite values (lower --learning-rate)")
        task.export(cfg.out)
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

    def __init__(self, accelerator, task, optimizer, lr_scheduler, generator, params, wrapped, cfg, record):
        self.accelerator, self.task, self.optimizer, self.lr_scheduler = accelerator, task, optimizer, lr_scheduler
        self.generator, self.params, self.wrapped, self.cfg = generator, params, wrapped, cfg
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
            if hasattr(task, "before_optimizer_step"):
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
                if hasattr(task, "log_metrics"):
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
                    metrics = task.validate(step, cfg.train_dir / "validation")
                if metrics:
                    accelerator.log(metrics, step=step)
                images = getattr(task, "validation_images", None)  # the grid just written, [1, H, W, 3] uint8
                if images and cfg.write_logs:
                    log_images(accelerator, images, step)

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
                    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
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
        root = _checkpoint_root(self.cfg)
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
