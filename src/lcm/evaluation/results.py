"""``results.json``: one :class:`Record` per evaluated row, with the settings that make rows comparable, the identity
of each model's weights and the source revision."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lcm.evaluation.plan import EvalSettings

__all__ = [
    "SCHEMA",
    "Record",
    "load_results",
    "model_fingerprint",
    "reusable_records",
    "save_results",
    "source_revision",
]

SCHEMA = "lcm-eval/1"
NOT_THE_MODEL = ("results.json", "wall_seconds.json", "demo_config.json")  # files beside a model, not of it


@dataclass(frozen=True)
class Record:
    """One evaluated row of ``results.json``."""

    method: str
    model: str  # as given: a folder or a hub id
    model_fingerprint: str  # changes when the weights in the folder change
    sampler: str
    steps: int
    w: float
    metrics: dict[str, float]
    n_samples: int
    seconds_per_image: float
    nfe_per_image: int
    git_commit: str | None
    lcm_version: str
    created: str

    @property
    def key(self) -> tuple:
        return (self.method, self.model, self.sampler, self.steps, self.w)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        names = {f.name for f in fields(cls)}
        if missing := names - data.keys():
            raise ValueError(f"a results.json record lacks {sorted(missing)}")
        record = cls(**{k: data[k] for k in names})
        return cls(
            **{
                **asdict(record),
                "steps": int(record.steps),
                "w": float(record.w),
                "metrics": {k: float(v) for k, v in record.metrics.items()},
            }
        )


def load_results(path: Path) -> tuple[dict, list[Record]]:
    """(settings, records) of a ``results.json``; raises ValueError on another schema or a malformed file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); move it away to start afresh") from None
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    return data["settings"], [Record.from_dict(r) for r in data["records"]]


def save_results(path: Path, settings: EvalSettings, records: Sequence[Record], **about) -> None:
    """Write ``results.json``; ``about``: what else made the rows (``lcm demo``'s run-config tree, its training
    time), kept beside them and ignored by :func:`load_results`."""
    data = {"schema": SCHEMA, "settings": settings.to_dict(), "records": [r.to_dict() for r in records], **about}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # a crash never leaves half a file


def reusable_records(path: Path, settings: EvalSettings, overwrite: bool) -> list[Record]:
    """The rows of ``path`` made with ``settings``; rows made with others raise, or are dropped with ``overwrite``."""
    if not path.is_file():
        return []
    stored, records = load_results(path)
    if stored == settings.to_dict():
        return records
    if overwrite:
        return []
    diff = ", ".join(f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in settings.to_dict().items() if stored.get(k) != v)
    raise ValueError(f"{path} holds rows made with other settings ({diff}); use another --out or --overwrite")


def model_fingerprint(model: str, loras: Sequence = ()) -> str:
    """Sizes and times of a folder's weight files (cheap even for SD checkpoints); a hub id stands for itself.
    With ``loras`` (:class:`~lcm.models.lora.LoraSpec`), their files' fingerprints follow the model's."""
    if loras:
        return "+".join(
            [model_fingerprint(model), *(model_fingerprint(spec.path) + f"@{spec.scale:g}" for spec in loras)]
        )
    path = Path(model)
    if path.is_file():  # a LoRA file
        st = path.stat()
        return hashlib.sha256(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    if not path.is_dir():
        return f"hub:{model}"
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        parts = f.relative_to(path).parts
        if parts[0] in ("train", "checkpoints") or (len(parts) == 1 and f.name in NOT_THE_MODEL):
            continue  # training state, and what scripts write beside a run's model
        if f.suffix in (".safetensors", ".bin", ".json"):
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def source_revision() -> str | None:
    """The git commit this package runs from (``-dirty`` with uncommitted changes), when it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
