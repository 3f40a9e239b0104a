"""Training state as safetensors + JSON: nothing pickled, every tensor named, every file hashed.

A checkpoint is a ``step-N`` folder holding ``state.safetensors`` and ``meta.json``; the meta records the SHA-256 of
the tensor file and the step N, so a checkpoint damaged after it was written (a bad disk, a partial copy, an edited
meta) is recognised on resume and the newest intact one is used instead. A folder is written as ``step-N.tmp`` and
renamed when complete, so a process killed mid-write leaves the previous checkpoint as the newest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lcm.locations import written

__all__ = [
    "CorruptCheckpoint",
    "checkpoint_steps",
    "latest_checkpoint",
    "load_training_state",
    "module_state",
    "non_finite",
    "restore_checkpoint",
    "restore_modules",
    "save_training_state",
    "verify_checkpoint",
]

STATE_FILE, META_FILE = "state.safetensors", "meta.json"


class CorruptCheckpoint(ValueError):
    """A checkpoint folder whose files are missing, unreadable or not the ones its meta recorded."""


def module_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """State dicts of named modules as one flat ``{"name.param": tensor}`` dict."""
    return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}


def restore_modules(state: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module]) -> None:
    for name, module in modules.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, if any."""
    for name, value in tensors.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            value = value.to(device)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    # The rename below must not reach the disk before the data it publishes (power loss, not only a kill).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_training_state(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    rng: torch.Generator | None = None,
) -> Path:
    """Write model tensors, optimiser state, RNG state and ``meta`` (plus the tensor file's SHA-256) atomically into
    ``directory``."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if rng is not None:
        tensors["rng.generator"] = rng.get_state()
    with written(tmp / STATE_FILE, cleanup=tmp):
        save_file(tensors, str(tmp / STATE_FILE))
        _fsync(tmp / STATE_FILE)
        meta["sha256"] = {STATE_FILE: _sha256(tmp / STATE_FILE)}  # read back: hashes what is on disk
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False))
        _fsync(tmp / META_FILE)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)  # a crash mid-write leaves the previous checkpoint intact
    return directory


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The meta of an intact checkpoint; :class:`CorruptCheckpoint` saying what is wrong otherwise.

    Intact: the meta is a JSON object recording the step (the N of a ``step-N`` folder) and the SHA-256 of the tensor
    file, and the file on disk has that hash. A meta without a hash proves nothing about the tensors beside it.
    """
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise CorruptCheckpoint(f"{directory} is not a training checkpoint (no {STATE_FILE})")
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CorruptCheckpoint(f"{directory}: unreadable {META_FILE} ({type(err).__name__})") from None
    step = meta.get("step") if isinstance(meta, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise CorruptCheckpoint(f"{directory}: {META_FILE} records no step")
    named = directory.name[5:] if directory.name.startswith("step-") else None
    if named is not None and named.isdigit() and int(named) != step:
        raise CorruptCheckpoint(f"{directory}: {META_FILE} records step {step}, not the folder's {named}")
    expected = meta.get("sha256")
    expected = expected.get(STATE_FILE) if isinstance(expected, dict) else None
    if not isinstance(expected, str):
        raise CorruptCheckpoint(f"{directory}: {META_FILE} records no SHA-256 of {STATE_FILE}")
    if _sha256(directory / STATE_FILE) != expected:
        raise CorruptCheckpoint(f"{directory}: {STATE_FILE} does not match the SHA-256 its meta recorded")
    return meta


def load_training_state(
    directory: str | Path,
    optimizer: torch.optim.Optimizer | None = None,
    rng: torch.Generator | None = None,
    check: Callable[[Path, dict[str, Any]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify the checkpoint, restore optimiser and RNG states in place; return (model tensors, meta).

    Raises :class:`CorruptCheckpoint` (before changing anything) for a damaged checkpoint, and ``ValueError`` for
    one that does not fit ``optimizer`` (a run with other settings). ``check(directory, meta)`` may refuse the
    checkpoint (raising) after it is verified and before anything is restored.
    """
    directory = Path(directory)
    meta = verify_checkpoint(directory)
    if check is not None:
        check(directory, meta)
    try:
        tensors = load_file(str(directory / STATE_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptCheckpoint(f"{directory}: unreadable {STATE_FILE} ({str(err).splitlines()[0]})") from None
    if bad := non_finite(tensors):
        raise CorruptCheckpoint(f"{directory}: tensor {bad} holds non-finite values")
    if optimizer is not None and "optimizer" in meta:
        device = optimizer.param_groups[0]["params"][0].device
        try:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"], device))
        except (KeyError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"checkpoint {directory} does not fit this run's optimiser ({_first_line(err)}): "
                "resume with the settings the run was started with"
            ) from None
    torch.set_rng_state(tensors["rng.torch"])
    if rng is not None and "rng.generator" in tensors:
        rng.set_state(tensors["rng.generator"])
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}, meta


def checkpoint_steps(root: str | Path) -> list[tuple[int, Path]]:
    """``(N, folder)`` of every complete ``step-N`` folder under ``root``, newest first (``.tmp`` ones ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(p.name[5:]), p) for p in root.glob("step-*") if p.name[5:].isdigit() and p.is_dir()]
    return sorted(found, reverse=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The ``step-N`` folder with the largest N under ``root``, if any (not verified)."""
    steps = checkpoint_steps(root)
    return steps[0][1] if steps else None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # torch's load_state_dict puts a heading first and the offending tensor on the next line
    return (lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0] if lines else repr(err))[:300]


def restore_checkpoint(
    resume: str,
    root: Path,
    optimizer: torch.optim.Optimizer,
    rng: torch.Generator,
    load_task: Callable[[dict[str, torch.Tensor]], None],
    report: Callable[[str], None] = print,
    check: Callable[[Path, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load the checkpoint ``resume`` names (``"latest"`` under ``root``, or a folder) into ``load_task``, the
    optimiser and ``rng``; return its meta.

    ``latest`` takes the newest intact checkpoint, reporting (one line each) the corrupt ones it passes over; a
    checkpoint that does not fit the task (other LoRA rank, other student) is a ``ValueError`` in one line, and so
    is one that ``check(folder, meta)`` refuses (see :func:`load_training_state`).
    """
    if resume == "latest":
        candidates = [path for _, path in checkpoint_steps(root)]
        if not candidates:
            raise ValueError(f"--resume latest: no checkpoint in {root}")
    else:
        path = Path(resume)
        if not path.is_dir():
            raise ValueError(f"--resume {resume}: no such checkpoint folder (or use --resume latest)")
        candidates = [path]
    for path in candidates:
        try:
            state, meta = load_training_state(path, optimizer, rng, check)
        except CorruptCheckpoint as err:
            if resume != "latest":
                raise
            report(f"skipping corrupt checkpoint: {err}")
            continue
        try:
            load_task(state)
        except (KeyError, RuntimeError, ValueError) as err:
            raise ValueError(
                f"checkpoint {path} does not fit this run ({_first_line(err)}); resume with the run's own settings"
            ) from None
        report(f"resumed from {path} at step {meta['step']}")
        return meta
    raise ValueError(f"--resume latest: every checkpoint in {root} is corrupt; remove them to start again")
