"""Building a training run from user-facing settings: model, data, task, loop. Used by ``lcm distill``,
``lcm finetune`` and ``lcm demo``; nothing here knows argparse.

Before anything is loaded, the run folder is checked: it may not be (or contain) the model or the data it reads,
and a new run refuses a folder that already holds a model or another run (:mod:`lcm.training.run_folder`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import replace
from pathlib import Path

from lcm.config.run import DataConfig, RunConfig
from lcm.data.latent_cache import LatentCache
from lcm.data.loader import batch_stream
from lcm.data.sources import collate_skip_none, open_data, parse_data_spec
from lcm.locations import local_path_or_none
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.training.loop import cpu_processes, train, train_dir
from lcm.training.run_folder import check_folder_state, own_run_folder
from lcm.training.task import DistillTask, FinetuneTask
from lcm.training.tune import TuneTask

__all__ = ["build_dataset", "check_out", "run_training"]

# The flag naming each command's model, and what the model is to it.
MODEL_ROLE = {"distill": ("--teacher", "teacher"), "finetune": ("--model", "LCM"), "tune": ("--model", "base model")}


def build_dataset(cfg: DataConfig, model: LatentDiffusion):
    """A dataset of ``{"pixel_values", "caption"}`` samples at the model's resolution and channel count
    (Fashion-MNIST at its own 32×32×1), or a latent cache written with ``model``'s own encoders."""
    dataset = open_data(
        cfg.source,
        resolution=cfg.resolution or model.latent_shape[-1] * model.vae_scale_factor,
        channels=model.vae.config.in_channels,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        center_crop=not cfg.random_crop,
        random_flip=cfg.random_flip,
        data_dir=cfg.data_dir,
        allow_outside=cfg.allow_outside_files,
    )
    if isinstance(dataset, LatentCache):
        dataset.check_model(model)
    return dataset


def run_training(cfg: RunConfig, out: str | Path, resume: str | None = None) -> dict:
    """Train the run ``cfg`` (LCD of its teacher, or LCF of its LCM) into the run folder ``out`` and export the
    result there; returns the training summary. ``resume``: None (a new run), "latest", "auto" or a checkpoint
    folder (:mod:`lcm.training.run_folder`).

    Defaults that depend on other settings (the learning rate) are filled in here, so the Python API trains exactly
    as the command line does. The run's tree, with the model and data paths resolved, is its record: written to
    ``OUT/train/run_config.json`` and into every checkpoint, and compared on resume.
    """
    cfg = cfg.resolved()
    if cfg.model is None and cfg.command == "finetune":
        raise ValueError("lcm finetune needs --model: the LCM folder to fine-tune")
    model_path = cfg.model or str(_default_teacher())
    cfg = replace(cfg, model=_resolved(model_path))
    flag, what = MODEL_ROLE[cfg.command]
    return _run(model_path, flag, what, cfg, Path(out), resume)


def _default_teacher() -> Path:
    from lcm.shipped import default_model_path

    return default_model_path()


def _resolved(text: str | Path) -> str:
    """A local path as an absolute path (a hub id or a name as it is), for the record a resume is checked against."""
    local = local_path_or_none(os.fspath(text))
    return str(local.resolve()) if local is not None and local.exists() else os.fspath(text)


def check_out(out: Path, inputs: dict[str, tuple[str, str | Path | None]]) -> None:
    """Refuse a run folder that is, or contains, one of the ``inputs`` (``{flag: (what, path)}``): the export and the
    checkpoints would overwrite or bury what the run reads."""
    folder = out.expanduser().resolve()
    for flag, (what, given) in inputs.items():
        local = local_path_or_none(os.fspath(given)) if given is not None else None
        if local is None or not local.exists():
            continue
        path = local.resolve()
        if path == folder or folder in path.parents:
            verb = "is" if path == folder else "contains"
            raise ValueError(f"--out {out} {verb} the {what} ({flag} {given}): choose another --out")


def _check_new_run(out: Path) -> None:
    """A new run writes its model into ``out``: refuse a folder that holds files besides its training state."""
    if out.is_dir() and (others := sorted(p.name for p in out.iterdir() if p.name != "train")):
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise ValueError(
            f"--out {out} already holds files ({shown}): a new run writes its model there; choose a new or empty "
            "folder, or resume the run in it with --resume latest"
        )


def _run(model_path: str | Path, flag: str, what: str, cfg: RunConfig, out: Path, resume: str | None) -> dict:
    from accelerate import PartialState

    parse_data_spec(cfg.data.source)  # fail on a mistyped path before minutes of model loading
    check_out(out, {flag: (what, model_path), "--data": ("data", cfg.data.source)})
    state = PartialState(cpu=cpu_processes(cfg.loop.cpu))
    owner = contextlib.ExitStack()
    folder = train_dir(out)

    def check() -> None:  # refuse now, before minutes of loading
        if check_folder_state(folder, folder / "checkpoints", resume, None) is None:
            _check_new_run(out)

    if state.num_processes > 1:
        check()  # read-only, alike on every rank; rank 0 takes the lock in train
    else:
        owner.enter_context(own_run_folder(folder, " ".join(sys.argv)[:300], check))
    with owner:
        return _build_and_train(model_path, cfg, out, resume, state)


def _build_and_train(model_path, cfg: RunConfig, out: Path, resume: str | None, state) -> dict:
    model = LatentDiffusion.from_pretrained(model_path, device=state.device)
    dataset = build_dataset(cfg.data, model)
    task_class = {"distill": DistillTask, "finetune": FinetuneTask, "tune": TuneTask}[cfg.command]
    provenance = {MODEL_ROLE[cfg.command][1].lower().replace(" ", "_"): cfg.model, "data": cfg.data.source}
    task = task_class(model, cfg.method, cfg.student, cfg.loop.seed, cfg.validation, provenance)
    validation = replace(cfg.validation, prompts=task.validation_prompts, w=task.validation_w)
    record = replace(cfg, validation=validation).to_dict()
    record["data_resolved"] = _resolved(cfg.data.source)

    def batches(start: int):
        return batch_stream(
            dataset,
            cfg.data.batch_size,
            collate_skip_none,
            seed=cfg.loop.seed,
            start=start,
            rank=state.process_index,
            world=state.num_processes,
            num_workers=cfg.data.num_workers,
        )

    summary = train(task, batches, out, cfg.loop, cfg.optim, resume, record)
    skipped = getattr(dataset, "skipped", None)
    if skipped is not None and skipped.total:
        summary["skipped"] = skipped.report()
        print(skipped.report())
    return summary
