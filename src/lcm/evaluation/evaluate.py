"""``lcm eval``: the paper's table — teacher DDIM / DPM-Solver / DPM-Solver++ and LCMs at 1/2/4/8 steps — for any
teacher and students, with guidance sweeps.

Evaluation scores a *sampling function* ``(prompts, seeds) -> images``, not a model or a trainer: any model folder ×
sampler × steps × guidance gives one row (:func:`evaluate_sampling`). A run writes, under its output folder,

- ``results.json``: one :class:`Record` per method × steps × w (metric values, n_samples, seconds and network
  evaluations per image, model identity, source revision), rewritten after every row, so a rerun reuses the rows
  already finished;
- ``results.md``: a table per w and metric in the paper's layout (methods × steps), then every row in full;
- ``steps.png`` (metrics against steps, one line per method) and, for several w, ``w_sweep.png`` (the distance
  against prompt accuracy or CLIP score as w varies: the guidance trade-off).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch

from lcm.data.captions import CaptionSet
from lcm.evaluation.metrics import METRICS, Evaluator
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler, generate

__all__ = [
    "EMBEDDED",
    "EvalPlan",
    "EvalPrompts",
    "EvalSettings",
    "Method",
    "Record",
    "Row",
    "evaluate_row",
    "evaluate_sampling",
    "fashion_eval_prompts",
    "load_prompts",
    "load_results",
    "nfe_per_image",
    "run_eval",
]

EMBEDDED = "embedded"  # prompts / reference of the embedded Fashion-MNIST default
SCHEMA = "lcm-eval/1"
SampleFn = Callable[[list[str], list[int]], torch.Tensor]  # (prompts, seeds) -> images [N, C, H, W] in [-1, 1]


# ----------------------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class EvalPrompts:
    prompts: list[str]
    labels: torch.Tensor | None  # (N,) the class each prompt asks for, where the source knows it
    seeds: list[int]


def _seeds(n: int, seed: int) -> list[int]:
    """Image i of every row uses the same seed, so rows differ only by their method, steps and w."""
    return list(range(seed * 1_000_000, seed * 1_000_000 + n))


def fashion_eval_prompts(n: int, seed: int = 0) -> EvalPrompts:
    """``n`` prompts cycling through the 10 classes, each a random caption of its class (paraphrases included)."""
    captions = CaptionSet()
    labels = torch.arange(n) % 10
    idx = captions.sample(labels, 0.0, torch.Generator().manual_seed(seed))
    return EvalPrompts([captions.captions[i] for i in idx], labels, _seeds(n, seed))


def _samples(source) -> Iterator[dict | None]:
    from torch.utils.data import IterableDataset

    if isinstance(source, IterableDataset):
        yield from source
    else:
        for i in range(len(source)):
            yield source[i]


def load_prompts(
    source: str, n: int, seed: int = 0, caption_column: str | None = None, split: str = "train"
) -> EvalPrompts:
    """``n`` prompts from ``source``: ``embedded``, a ``.txt`` file (one prompt a line), or an image–caption data set
    (any ``lcm distill --data`` source; its caption column). Shorter sources are cycled."""
    if source == EMBEDDED:
        return fashion_eval_prompts(n, seed)
    if source.endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"--prompts {source}: no such file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from lcm.data.sources import build_source

        data = build_source(source, resolution=32, caption_column=caption_column, split=split, seed=seed)
        prompts = []
        for sample in _samples(data):
            if sample is not None:
                prompts.append(sample["caption"])
            if len(prompts) == n:
                break
    if not prompts:
        raise ValueError(f"--prompts {source}: no prompts found")
    return EvalPrompts([prompts[i % len(prompts)] for i in range(n)], None, _seeds(n, seed))


# -------------------------------------------------------------------------------------------------------- evaluation
def evaluate_sampling(
    sample: SampleFn, prompts: EvalPrompts, evaluator: Evaluator, batch_size: int = 250, progress: bool = False
) -> dict[str, float]:
    """Metrics of the images ``sample`` makes for ``prompts``, plus ``n_samples`` and ``seconds_per_image`` (the
    sampling and decoding only; batches of ``batch_size``)."""
    from tqdm import tqdm

    images, seconds = [], 0.0
    starts = range(0, len(prompts.prompts), batch_size)
    for i in tqdm(starts, desc="images", unit="batch", leave=False, disable=not progress):
        start = time.perf_counter()
        images.append(sample(prompts.prompts[i : i + batch_size], prompts.seeds[i : i + batch_size]).cpu())
        seconds += time.perf_counter() - start
    images = torch.cat(images)
    metrics = evaluator.evaluate(images, prompts.labels, prompts.prompts)
    return {**metrics, "n_samples": len(images), "seconds_per_image": seconds / len(images)}


@dataclass(frozen=True)
class Row:
    method: str  # e.g. "teacher DDIM", "LCM"
    sampler: Sampler
    steps: int
    w: float
    timestep_spacing: str | None = None  # teacher samplers: override the scheduler config's (see generate)


def nfe_per_image(sampler: Sampler, steps: int, w: float) -> int:
    """Network evaluations per image: CFG doubles each teacher step (one batched 2B forward); an LCM takes w as an
    input. DPM-Solver(++) 2M is multistep: one evaluation per step."""
    return steps * (2 if sampler is not Sampler.LCM and w != 0 else 1)


def evaluate_row(
    model: LatentDiffusion, row: Row, prompts: EvalPrompts, evaluator: Evaluator, batch_size: int = 250
) -> dict:
    def sample(p, s):
        return generate(model, p, row.sampler, row.steps, row.w, s, batch_size, timestep_spacing=row.timestep_spacing)

    metrics = evaluate_sampling(sample, prompts, evaluator, batch_size)
    return {
        "method": row.method,
        "sampler": row.sampler.value,
        "steps": row.steps,
        "w": row.w,
        **metrics,
        "nfe_per_image": nfe_per_image(row.sampler, row.steps, row.w),
    }


# ----------------------------------------------------------------------------------------------------- results.json
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


@dataclass(frozen=True)
class EvalSettings:
    """What makes two rows comparable: rows are only reused under equal settings."""

    prompts: str = EMBEDDED
    caption_column: str | None = None
    split: str = "train"  # of --prompts / --reference data sets
    num_samples: int = 2000
    seed: int = 0
    metrics: tuple[str, ...] = ("fd-clf", "kid-clf", "accuracy")
    reference: str = EMBEDDED
    image_column: str | None = None
    reference_samples: int = 10_000  # images read from a reference data set
    teacher_spacing: str = "trailing"  # timestep spacing of the teacher samplers; "config": the teacher's own
    classifier: str | None = None
    inception_weights: str | None = None
    clip_model: str | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "metrics": list(self.metrics)}


def load_results(path: Path) -> tuple[dict, list[Record]]:
    """(settings, records) of a ``results.json``; raises ValueError on another schema or a malformed file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); move it away to start afresh") from None
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    return data["settings"], [Record.from_dict(r) for r in data["records"]]


def save_results(path: Path, settings: EvalSettings, records: Sequence[Record]) -> None:
    data = {"schema": SCHEMA, "settings": settings.to_dict(), "records": [r.to_dict() for r in records]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # a crash never leaves half a file


def model_fingerprint(model: str) -> str:
    """Sizes and times of a folder's weight files (cheap even for SD checkpoints); a hub id stands for itself."""
    path = Path(model)
    if not path.is_dir():
        return f"hub:{model}"
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.suffix in (".safetensors", ".bin", ".json") and "checkpoints" not in f.relative_to(path).parts:
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


# ------------------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Method:
    name: str  # "teacher DDIM", "LCM", ...
    model: str
    sampler: Sampler
    steps: tuple[int, ...]


@dataclass(frozen=True)
class EvalPlan:
    methods: tuple[Method, ...]
    ws: tuple[float, ...]
    settings: EvalSettings
    out: Path
    batch_size: int = 250
    overwrite: bool = False  # discard a results.json made with other settings
    device: str = "cpu"
    data_dir: Path | None = None  # Fashion-MNIST files


def _settings_check(path: Path, settings: EvalSettings, overwrite: bool) -> list[Record]:
    if not path.is_file():
        return []
    stored, records = load_results(path)
    if stored == settings.to_dict():
        return records
    if overwrite:
        return []
    diff = ", ".join(f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in settings.to_dict().items() if stored.get(k) != v)
    raise ValueError(f"{path} holds rows made with other settings ({diff}); use another --out or --overwrite")


def _reference(plan: EvalPlan, model: LatentDiffusion | None):
    from lcm.evaluation.metrics import Reference, fashion_reference, reference_cache_dir

    s = plan.settings
    spec = s.reference
    if spec == EMBEDDED:
        return fashion_reference(plan.data_dir)
    if spec.endswith((".npz", ".safetensors")) and Path(spec).is_file():
        return Reference(spec, stats_file=Path(spec))
    if model is None:
        raise ValueError("reference images from a data set need a model to size them (give --teacher or --lcm)")
    from lcm.data.sources import build_source

    local = Path(spec)
    resolution = model.unet.config.sample_size * model.vae_scale_factor
    channels = model.vae.config.in_channels
    n = s.reference_samples

    def samples():
        if _is_plain_image_folder(local):
            yield from _plain_images(local, resolution, channels)  # a folder of images, no captions needed
            return
        data = build_source(spec, resolution=resolution, image_column=s.image_column, channels=channels, split=s.split)
        for sample in _samples(data):
            if sample is not None:
                yield sample["pixel_values"]

    def images():
        batch, count = [], 0
        for image in samples():
            batch.append(image)
            count += 1
            if len(batch) == 100 or count == n:
                yield torch.stack(batch)
                batch = []
            if count == n:
                return
        if batch:
            yield torch.stack(batch)
        if count == 0:
            raise ValueError(f"--reference {spec}: no readable images")

    watched = [f for f in (local, local / "metadata.jsonl") if f.exists()]  # changes when files come or go
    stamp = max(f.stat().st_mtime_ns for f in watched) if watched else "remote"
    name = f"{spec} split={s.split} column={s.image_column} n={n} {resolution}px {channels}ch modified={stamp}"
    return Reference(name, images, cache_dir=reference_cache_dir())


def _is_plain_image_folder(path: Path) -> bool:
    """A folder of image files with no captions (no metadata.jsonl) and not a saved data set."""
    from lcm.data.sources import IMAGE_EXTENSIONS

    if not path.is_dir() or any((path / m).is_file() for m in ("metadata.jsonl", "dataset_info.json")):
        return False
    return any(f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS for f in path.rglob("*"))


def _plain_images(folder: Path, resolution: int, channels: int):
    """Every readable image under ``folder`` (sorted), centre-cropped to ``resolution``, in [−1, 1]."""
    from lcm.data.sources import IMAGE_EXTENSIONS, ImageTransform, open_image

    transform = ImageTransform(resolution, channels=channels)
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and (image := open_image(path)) is not None:
            yield transform(image)


def _prompt_source(plan: EvalPlan) -> EvalPrompts:
    s = plan.settings
    return load_prompts(s.prompts, s.num_samples, s.seed, s.caption_column, s.split)


def run_eval(plan: EvalPlan, progress: bool = True) -> list[Record]:
    """Evaluate every method × steps × w of ``plan`` not already in ``out/results.json``; write the report."""
    from tqdm import tqdm

    from lcm import __version__

    s = plan.settings
    plan.out.mkdir(parents=True, exist_ok=True)
    path = plan.out / "results.json"
    records = _settings_check(path, s, plan.overwrite)
    fingerprints = {m.model: model_fingerprint(m.model) for m in plan.methods}
    done = {r.key: r for r in records if r.model_fingerprint == fingerprints.get(r.model)}
    todo = [
        (m, steps, w)
        for w in plan.ws
        for m in plan.methods
        for steps in m.steps
        if (m.name, m.model, m.sampler.value, steps, w) not in done
    ]
    order = {model: i for i, model in enumerate(dict.fromkeys(m.model for m in plan.methods))}
    todo.sort(key=lambda row: order[row[0].model])  # each model is loaded once
    print(f"{len(done)} rows reused from {path}, {len(todo)} to evaluate" if done else f"{len(todo)} rows to evaluate")
    if todo:
        first = LatentDiffusion.from_pretrained(todo[0][0].model, plan.device)
        evaluator = Evaluator(
            s.metrics,
            _reference(plan, first) if any(METRICS[m][1] != "clip" for m in s.metrics) else None,
            classifier_dir=s.classifier,
            inception_weights=s.inception_weights,
            clip_model=s.clip_model,
            device=plan.device,
        )
        prompts = _prompt_source(plan)
        models = {todo[0][0].model: first}
        commit = source_revision()
        warmed: set[str] = set()
        for method, steps, w in tqdm(todo, desc="rows", unit="row", disable=not progress):
            if method.model not in models:
                models.clear()  # one model in memory at a time
                models[method.model] = LatentDiffusion.from_pretrained(method.model, plan.device)
            model = models[method.model]
            spacing = None if method.sampler is Sampler.LCM or s.teacher_spacing == "config" else s.teacher_spacing

            def sample(p, seeds, model=model, method=method, steps=steps, w=w, spacing=spacing):
                return generate(model, p, method.sampler, steps, w, seeds, plan.batch_size, timestep_spacing=spacing)

            if method.model not in warmed:  # the first calls of a model pay for lazy initialisation: not timed
                sample(prompts.prompts[:2], prompts.seeds[:2])
                warmed.add(method.model)

            values = evaluate_sampling(sample, prompts, evaluator, plan.batch_size, progress)
            record = Record(
                method=method.name,
                model=method.model,
                model_fingerprint=fingerprints[method.model],
                sampler=method.sampler.value,
                steps=steps,
                w=w,
                metrics={k: v for k, v in values.items() if k not in ("n_samples", "seconds_per_image")},
                n_samples=int(values["n_samples"]),
                seconds_per_image=values["seconds_per_image"],
                nfe_per_image=nfe_per_image(method.sampler, steps, w),
                git_commit=commit,
                lcm_version=__version__,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            done[record.key] = record
            save_results(path, s, list(done.values()))
            tqdm.write(f"{method.name} {steps} steps w={w:g}: " + _brief(record))
    wanted = [done[(m.name, m.model, m.sampler.value, st, w)] for w in plan.ws for m in plan.methods for st in m.steps]
    save_results(path, s, list(done.values()))
    write_report(wanted, s, plan.out)
    return wanted


# ----------------------------------------------------------------------------------------------------------- report
LABELS = {
    "fd_clf": "FD-clf ↓",
    "kid_clf": "KID-clf ↓",
    "prompt_accuracy": "prompt accuracy ↑",
    "fid": "FID ↓",
    "kid": "KID ↓",
    "clip_score": "CLIP score ↑",
}
_DISTANCES = ("fid", "fd_clf")
_QUALITIES = ("clip_score", "prompt_accuracy")


def _fmt(key: str, value: float) -> str:
    if key.startswith("kid"):  # ~1e-3 in Inception features, hundreds in the classifier's
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}"
    return f"{value:.3f}" if key == "prompt_accuracy" else f"{value:.1f}"


def _brief(r: Record) -> str:
    return ", ".join(f"{LABELS[k][:-2]} {_fmt(k, v)}" for k, v in r.metrics.items())


def _ordered(records: Sequence[Record], attr: str) -> list:
    return list(dict.fromkeys(getattr(r, attr) for r in records))


def markdown_report(records: Sequence[Record], settings: EvalSettings) -> str:
    keys = [METRICS[m][0] for m in settings.metrics]
    ws, methods = _ordered(records, "w"), _ordered(records, "method")
    steps = sorted(set(r.steps for r in records))
    n = records[0].n_samples if records else 0
    lines = [
        "# lcm eval",
        "",
        f"{n} images per row; prompts: {settings.prompts}; reference: {settings.reference}; seed {settings.seed} "
        "(image i has the same prompt and initial noise in every row); teacher timestep spacing: "
        f"{settings.teacher_spacing}. NFE: network evaluations per image (a guided teacher step costs two).",
    ]
    if "fd_clf" in keys or "kid_clf" in keys:
        lines.append(
            "FD-clf and KID-clf are Fréchet and kernel distances in the Fashion-MNIST classifier's features: offline "
            "metrics of the embedded benchmark, not FID."
        )
    by_key = {(r.method, r.steps, r.w): r for r in records}
    for w in ws:
        lines += ["", f"## w = {w:g}"]
        for key in keys:
            lines += ["", f"### {LABELS[key]}", "", "| method | " + " | ".join(f"{s} steps" for s in steps) + " |"]
            lines.append("| --- |" + " ---: |" * len(steps))
            for m in methods:
                cells = [by_key.get((m, s, w)) for s in steps]
                lines.append(f"| {m} | " + " | ".join(_fmt(key, c.metrics[key]) if c else "—" for c in cells) + " |")
    lines += [
        "",
        "## Every row",
        "",
        "| method | steps | w | NFE/image | s/image | " + " | ".join(LABELS[k] for k in keys),
    ]
    lines[-1] += " | model |"
    lines.append("| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(keys) + " --- |")
    for r in records:
        values = " | ".join(_fmt(k, r.metrics[k]) for k in keys)
        lines.append(
            f"| {r.method} | {r.steps} | {r.w:g} | {r.nfe_per_image} | {r.seconds_per_image * 1000:.2f} ms | "
            f"{values} | {r.model} |"
        )
    return "\n".join(lines) + "\n"


def write_report(records: Sequence[Record], settings: EvalSettings, out: Path) -> None:
    from lcm.evaluation.plots import line_panels

    (out / "results.md").write_text(markdown_report(records, settings))
    keys = [METRICS[m][0] for m in settings.metrics]
    ws, methods = _ordered(records, "w"), _ordered(records, "method")
    steps = sorted(set(r.steps for r in records))
    for w in ws:
        panels = []
        for key in keys:
            series = {}
            for m in methods:
                mine = sorted((r for r in records if r.method == m and r.w == w), key=lambda r: r.steps)
                series[m] = ([r.steps for r in mine], [r.metrics[key] for r in mine])
            panels.append((f"{LABELS[key]} (w = {w:g})", series))
        name = "steps.png" if len(ws) == 1 else f"steps_w{w:g}.png"
        positive = [key in _DISTANCES and all(r.metrics[key] > 0 for r in records) for key in keys]
        line_panels(
            panels, out / name, "sampling steps", [LABELS[k] for k in keys], logx=True, logy=positive, xticks=steps
        )
    if len(ws) > 1:
        x_key = next((k for k in _QUALITIES if k in keys), None)
        y_key = next((k for k in _DISTANCES if k in keys), None)
        series, notes = {}, {}
        for m in methods:
            for st in sorted(set(r.steps for r in records if r.method == m)):
                mine = sorted((r for r in records if r.method == m and r.steps == st), key=lambda r: r.w)
                label = f"{m}, {st} steps"
                if x_key and y_key:
                    series[label] = ([r.metrics[x_key] for r in mine], [r.metrics[y_key] for r in mine])
                    notes[label] = [f"w={r.w:g}" for r in mine]
                else:
                    series[label] = ([r.w for r in mine], [r.metrics[keys[0]] for r in mine])
        if x_key and y_key:
            positive = all(y > 0 for _, ys in series.values() for y in ys)
            line_panels(
                [("guidance trade-off", series)],
                out / "w_sweep.png",
                LABELS[x_key],
                LABELS[y_key],
                logy=positive,
                annotate=notes,
                panel_size=(7.0, 5.0),
            )
        else:
            line_panels([("guidance sweep", series)], out / "w_sweep.png", "w", LABELS[keys[0]])
