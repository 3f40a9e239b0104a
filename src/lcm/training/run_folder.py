"""A run folder belongs to one run (docs/design.md §9).

- **Ownership**: a live run holds an advisory lock on ``OUT/train/lock`` (``flock``: the kernel releases it when the
  process ends, however it ends, so a crashed run never leaves a stale lock); a second run on the same folder is
  refused in one line naming the holder.
- **New or resumed**: a new run refuses a folder that holds another run's checkpoints or settings; ``resume`` says
  what to continue: ``"latest"`` (the newest intact checkpoint, refused when there is none), ``"auto"`` (that, or a
  new run when the folder holds none) or a checkpoint folder.
- **The record**: what a run was started with (a JSON-ready dict: the command's flags and the resolved settings) is
  written to ``OUT/train/run_config.json`` *and* into every checkpoint's meta, so that a resume is checked against
  the checkpoint it restores even when ``run_config.json`` is gone; settings that only steer how long a run goes and
  how often it writes may change (:data:`RESUME_MAY_CHANGE`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from lcm.config.knobs import leaves
from lcm.config.run import RunConfig
from lcm.training.checkpoint import CorruptCheckpoint, checkpoint_steps, verify_checkpoint

__all__ = [
    "RESUME_MAY_CHANGE",
    "RESUME_MODES",
    "RUN_CONFIG",
    "TRAIN_DIR",
    "check_folder_state",
    "differences",
    "own_run_folder",
    "read_run_record",
    "write_run_record",
]

TRAIN_DIR = "train"  # the training state inside a run folder, kept apart from the exported model
RUN_CONFIG = "run_config.json"  # in OUT/train: everything a run was started with
LOCK_FILE = "lock"  # in OUT/train: held (flock) while a run lives
RESUME_MODES = ("latest", "auto")  # besides a checkpoint folder

# What a resumed run may change (how long it runs, how often it writes, logs and validates, where it reads its files
# from): the knobs of the run-config tree marked so, by dotted path. Everything else changes what it computes.
RESUME_MAY_CHANGE = frozenset(path for path, f, _ in leaves(RunConfig()) if f.metadata["knob"].may_change)
# Entries of a record that say how a run was asked for, not what it computes: the data as typed (its resolved
# form, "data_resolved", is compared instead).
_NOT_COMPARED = frozenset({"data.source"})

T = TypeVar("T")
_HELD: dict[Path, tuple[int, int]] = {}  # lock file → (fd, depth): re-entrant within a process


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"process {info['pid']} on {info['host']}, started {info['started']} ({info['what']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _in_use(train_dir: Path, path: Path) -> ValueError:
    return ValueError(
        f"{train_dir.parent} is in use by {_holder(path)}: wait for that run to end, or choose another --out"
    )


def _held_elsewhere(path: Path) -> bool:
    """Whether another process holds the lock file ``path`` (probed without creating or changing anything)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def own_run_folder(train_dir: Path, what: str, check: Callable[[], T] = lambda: None) -> Iterator[T]:
    """Hold the run folder whose training state is ``train_dir`` for the ``with`` block and yield ``check()``.

    ``check`` decides whether this run may use the folder (raising a one-line ``ValueError`` if not); it runs once
    before anything is created or written, so a refused run changes nothing, and once more under the lock. A folder
    another process holds is refused in one line naming the holder. Re-entrant within a process; ``what``
    describes this run to a refused one.
    """
    path = (train_dir / LOCK_FILE).absolute()
    if path in _HELD:
        fd, depth = _HELD[path]
        decision = check()
        _HELD[path] = (fd, depth + 1)
    else:
        try:
            check()
        except ValueError:
            if _held_elsewhere(path):
                raise _in_use(train_dir, path) from None
            raise
        train_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            decision = check()  # again: the folder may have changed before the lock was ours
        except BlockingIOError:
            os.close(fd)
            raise _in_use(train_dir, path) from None
        except BaseException:
            os.close(fd)
            raise
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": stamp, "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        _HELD[path] = (fd, 1)
    try:
        yield decision
    finally:
        fd, depth = _HELD[path]
        if depth > 1:
            _HELD[path] = (fd, depth - 1)
        else:
            del _HELD[path]
            os.close(fd)  # releases the lock


def _intact(root: Path) -> dict[str, Any] | None:
    """The meta of the newest intact checkpoint under ``root``, if any."""
    for _, path in checkpoint_steps(root):
        try:
            return verify_checkpoint(path)
        except CorruptCheckpoint:
            continue
    return None


def read_run_record(train_dir: Path) -> dict[str, Any] | None:
    """What the run in this folder was started with: ``run_config.json``, or (when that file is gone) the record
    inside its newest intact checkpoint; None for a folder that holds no run."""
    path = train_dir / RUN_CONFIG
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); remove it to resume from the checkpoints") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} does not hold a run configuration; remove it to resume from the checkpoints")
        return record
    meta = _intact(train_dir / "checkpoints")
    record = meta.get("run") if meta else None
    return record if isinstance(record, dict) else None


def write_run_record(train_dir: Path, record: dict[str, Any]) -> None:
    train_dir.mkdir(parents=True, exist_ok=True)
    tmp = train_dir / (RUN_CONFIG + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    tmp.replace(train_dir / RUN_CONFIG)  # never half a file, whenever the process dies


def differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """The settings in which two records differ, as ``"path: saved → current"`` lines (those a resume may change,
    and those that say how a run was asked for, are not compared)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            path = f"{where}.{key}" if where else key
            if path in RESUME_MAY_CHANGE or path in _NOT_COMPARED:
                continue
            if key not in saved or key not in current:
                out.append(f"{path}: {json.dumps(saved.get(key))} → {json.dumps(current.get(key))}")
            else:
                out += differences(saved[key], current[key], path)
        return out
    if saved != current:
        return [f"{where}: {json.dumps(saved)} → {json.dumps(current)}"]
    return []


def check_folder_state(
    train_dir: Path, checkpoint_root: Path, resume: str | None, record: dict[str, Any] | None
) -> str | None:
    """Decide whether this run starts or resumes, before anything is written: returns the ``resume`` to act on
    (None: start a new run), or raises a one-line ``ValueError`` for a folder that holds another run or, with
    ``resume="latest"``, nothing to resume. ``record`` is this run's settings (None: not recorded)."""
    steps = checkpoint_steps(checkpoint_root)
    saved_path = train_dir / RUN_CONFIG
    out = train_dir.parent
    if resume not in (None, "auto"):
        if resume == "latest" and not steps:
            raise ValueError(
                f"--resume latest: nothing to resume in {out} (no checkpoint in {checkpoint_root}); start a new run "
                "without --resume, or use --resume auto to resume when there is a checkpoint and start otherwise"
            )
        return resume
    if steps:
        if resume == "auto":
            return "latest"
        raise ValueError(
            f"{out} holds another run ({len(steps)} checkpoint(s), the newest {steps[0][1].name}): resume it with "
            "--resume latest, or choose another --out"
        )
    if record is not None and saved_path.is_file():
        if differences(read_run_record(train_dir), record):
            raise ValueError(
                f"{out} holds the settings of another run ({saved_path}) that wrote no checkpoint yet: choose "
                "another --out, or remove that folder to start over"
            )
    return None
