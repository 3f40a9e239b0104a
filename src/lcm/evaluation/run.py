"""``lcm eval``: the paper's table — teacher DDIM / DPM-Solver / DPM-Solver++ and LCMs at 1/2/4/8 steps — for any
teacher and students, with guidance sweeps.

Evaluation scores a *sampling function* ``(prompts, seeds) -> images``, not a model or a trainer: any model folder ×
sampler × steps × guidance gives one row (:func:`evaluate_sampling`). A run writes, under its output folder,

- ``results.json``: one :class:`~lcm.evaluation.results.Record` per method × steps × w (metric values, n_samples,
  seconds and network evaluations per image, model identity, source revision), rewritten after every row, so a rerun
  reuses the rows already finished;
- ``results.md``: a table per w and metric in the paper's layout (methods × steps), then every row in full;
- ``steps.png`` (metrics against steps, one line per method) and, for several w, ``w_sweep.png`` (the distance
  against prompt accuracy or CLIP score as w varies: the guidance trade-off).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from lcm.data.folder import METADATA_FILE
from lcm.data.sources import DataKind, open_data, parse_data_spec
from lcm.evaluation.metrics import METRICS, Evaluator, Reference, fashion_reference, reference_cache_dir
from lcm.evaluation.plan import STATS_SUFFIXES, EvalPlan, EvalSettings
from lcm.evaluation.prompts import EMBEDDED, EvalPrompts, data_flag, dataset_samples, load_prompts
from lcm.evaluation.report import brief, write_report
from lcm.evaluation.results import Record, model_fingerprint, reusable_records, save_results, source_revision
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler, generate

__all__ = [
    "Row",
    "SampleFn",
    "eval_reference",
    "evaluate_row",
    "evaluate_rows",
    "evaluate_sampling",
    "fill_prompt_cache",
    "nfe_per_image",
    "row_record",
    "run_eval",
]

SampleFn = Callable[[list[str], list[int]], torch.Tensor]  # (prompts, seeds) -> images [N, C, H, W] in [-1, 1]


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
    timestep_spacing: str | None = (
        None  # teacher samplers: None is the one rule (lcm.maths.timesteps.sampler_timesteps)
    )
    gamma: float | None = None  # TCD's γ; None: the model's own (LatentDiffusion.default_gamma)


def nfe_per_image(sampler: Sampler, steps: int, w: float, cfg_free: bool = False) -> int:
    """Network evaluations per image: CFG doubles each teacher step (one batched 2B forward); a distilled model
    (LCM, TCD or PCM sampler) takes w as an input, unless it was distilled CFG-free (``cfg_free``: real guidance).
    DPM-Solver(++) 2M is multistep: one evaluation per step; Heun makes 2N − 1 (its last step is Euler's)."""
    calls = 2 * steps - 1 if sampler is Sampler.HEUN else steps
    guided = (not sampler.for_distilled or cfg_free) and w != 0
    return calls * (2 if guided else 1)


def fill_prompt_cache(model: LatentDiffusion, prompts: EvalPrompts) -> bool:
    """Encode the evaluation's distinct prompts and the empty negative prompt into the model's prompt cache, so
    that no row's clock counts text encoding; ``False`` (nothing cached) when there are more than the cache holds:
    they would be evicted before the next row asks again."""
    distinct = list(dict.fromkeys([*prompts.prompts, ""]))
    if len(distinct) > model.prompt_cache.capacity:
        return False
    model.encode_prompts(distinct, cache=True)
    return True


def evaluate_row(
    model: LatentDiffusion, row: Row, prompts: EvalPrompts, evaluator: Evaluator, batch_size: int = 250
) -> Record:
    """One row's :class:`Record`: metric values, costs per image and the identity of ``model`` (its ``source``).

    The prompts' text embeddings come from the model's prompt cache, filled before the clock starts: rows repeat
    the same prompts, and a row's cost per image is its sampling and decoding.
    """
    cache = fill_prompt_cache(model, prompts)

    def sample(p: list[str], s: list[int]) -> torch.Tensor:
        return generate(
            model,
            p,
            row.sampler,
            row.steps,
            row.w,
            s,
            batch_size,
            timestep_spacing=row.timestep_spacing,
            cache_prompts=cache,
            gamma=model.default_gamma if row.gamma is None else row.gamma,
        )

    values = evaluate_sampling(sample, prompts, evaluator, batch_size)
    return row_record(row, str(model.source), values, cfg_free=model.cfg_free)


def evaluate_rows(
    model: LatentDiffusion,
    rows: Sequence[Row],
    prompts: EvalPrompts,
    evaluator: Evaluator,
    path: Path,
    settings: EvalSettings,
    **about,
) -> list[Record]:
    """The records of ``rows`` sampled from ``model``, kept in ``path`` (a ``results.json``; ``about`` as in
    :func:`~lcm.evaluation.results.save_results`): rows already there for these weights are reused and each new one
    is saved as it finishes, so a rerun resumes. ``settings`` say how ``prompts`` and ``evaluator`` were made."""
    done = {r.key: r for r in reusable_records(path, settings, overwrite=False)}
    source = str(model.source)
    fingerprint = model_fingerprint(source)
    records = []
    for row in rows:
        key = (row.method, source, row.sampler.value, row.steps, row.w)
        if key not in done or done[key].model_fingerprint != fingerprint:
            done[key] = evaluate_row(model, row, prompts, evaluator)
            save_results(path, settings, list(done.values()), **about)
            print(f"{path.parent.name}: {row.method} {row.steps} steps w={row.w:g}: {brief(done[key])}")
        records.append(done[key])
    return records


def row_record(
    row: Row, model: str, values: dict[str, float], fingerprint: str | None = None, cfg_free: bool = False
) -> Record:
    """The :class:`Record` of ``row`` sampled from ``model`` (a folder or hub id) with the ``values`` of
    :func:`evaluate_sampling`: the one schema of every evaluated row (``lcm eval``, ``lcm demo``, the scripts)."""
    from lcm import __version__

    return Record(
        method=row.method,
        model=model,
        model_fingerprint=fingerprint or model_fingerprint(model),
        sampler=row.sampler.value,
        steps=row.steps,
        w=row.w,
        metrics={k: v for k, v in values.items() if k not in ("n_samples", "seconds_per_image")},
        n_samples=int(values["n_samples"]),
        seconds_per_image=values["seconds_per_image"],
        nfe_per_image=nfe_per_image(row.sampler, row.steps, row.w, cfg_free),
        git_commit=source_revision(),
        lcm_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


# ---------------------------------------------------------------------------------------------------------- reference
def eval_reference(settings: EvalSettings, model: LatentDiffusion | None, data_dir: Path | None = None) -> Reference:
    """The reference side of FD/FID/KID: the embedded test split, a statistics file, or up to
    ``reference_samples`` images of a data set (any ``lcm distill --data`` string, or a folder of plain images),
    sized to ``model``'s output."""
    text = settings.reference
    if text == EMBEDDED:
        return fashion_reference(data_dir)
    if text.endswith(STATS_SUFFIXES):
        return Reference(text, stats_file=Path(text))
    if model is None:
        raise ValueError("reference images from a data set need a model to size them (give --teacher or --lcm)")
    with data_flag("--reference"):
        spec = parse_data_spec(text)  # a missing path fails here, before any image is generated
    resolution = model.latent_shape[-1] * model.vae_scale_factor
    channels = model.vae.config.in_channels
    n = settings.reference_samples

    def images():
        with data_flag("--reference"):
            data = open_data(
                spec,
                resolution=resolution,
                channels=channels,
                image_column=settings.image_column,
                split=settings.split,
                data_dir=data_dir,
                captions_required=False,  # images are all a reference needs
            )
        batch, count = [], 0
        for sample in dataset_samples(data):
            batch.append(sample["pixel_values"])
            count += 1
            if len(batch) == 100 or count == n:
                yield torch.stack(batch)
                batch = []
            if count == n:
                return
        if batch:
            yield torch.stack(batch)
        if count == 0:
            raise ValueError(f"--reference {text}: no readable images")

    # Cached statistics are keyed by this name: a local folder's modification time changes when files come or go.
    local = Path(spec.location) if spec.kind in (DataKind.FOLDER, DataKind.WEBDATASET) and spec.location else None
    watched = [f for f in (local, local / METADATA_FILE) if f.exists()] if local is not None else []
    stamp = max(f.stat().st_mtime_ns for f in watched) if watched else "remote"
    name = f"{text} split={settings.split} column={settings.image_column} n={n} {resolution}px {channels}ch"
    return Reference(f"{name} modified={stamp}", images, cache_dir=reference_cache_dir())


# --------------------------------------------------------------------------------------------------------------- runs
def run_eval(plan: EvalPlan, progress: bool = True) -> list[Record]:
    """Evaluate every method × steps × w of ``plan`` not already in ``out/results.json``; write the report."""
    from tqdm import tqdm

    s = plan.settings
    plan.out.mkdir(parents=True, exist_ok=True)
    path = plan.out / "results.json"
    records = reusable_records(path, s, plan.overwrite)
    fingerprints = {m.identity: model_fingerprint(m.model, m.loras) for m in plan.methods}
    done = {r.key: r for r in records if r.model_fingerprint == fingerprints.get(r.model)}
    todo = [
        (m, steps, w)
        for w in plan.ws
        for m in plan.methods
        for steps in m.steps
        if (m.name, m.identity, m.sampler.value, steps, w) not in done
    ]
    order = {model: i for i, model in enumerate(dict.fromkeys(m.identity for m in plan.methods))}
    todo.sort(key=lambda row: order[row[0].identity])  # each model is loaded once
    print(f"{len(done)} rows reused from {path}, {len(todo)} to evaluate" if done else f"{len(todo)} rows to evaluate")
    if todo:
        first = LatentDiffusion.from_pretrained(todo[0][0].model, plan.device, loras=todo[0][0].loras)
        needs_reference = any(METRICS[m][1] != "clip" for m in s.metrics)
        evaluator = Evaluator(
            s.metrics,
            eval_reference(s, first, plan.data_dir) if needs_reference else None,
            classifier_dir=s.classifier,
            inception_weights=s.inception_weights,
            clip_model=s.clip_model,
            device=plan.device,
        )
        prompts = load_prompts(s.prompts, s.num_samples, s.seed, s.caption_column, s.split, plan.data_dir)
        models = {todo[0][0].identity: first}
        cached: dict[str, bool] = {}  # model → whether its prompt cache holds the evaluation's prompts
        for method, steps, w in tqdm(todo, desc="rows", unit="row", disable=not progress):
            if method.identity not in models:
                models.clear()  # one model in memory at a time
                models[method.identity] = LatentDiffusion.from_pretrained(method.model, plan.device, loras=method.loras)
            model = models[method.identity]
            spacing = None if method.sampler.for_distilled else s.teacher_spacing

            def sample(p, seeds, model=model, method=method, steps=steps, w=w, spacing=spacing):
                cache = cached[method.identity]
                return generate(
                    model,
                    p,
                    method.sampler,
                    steps,
                    w,
                    seeds,
                    plan.batch_size,
                    timestep_spacing=spacing,
                    cache_prompts=cache,
                    gamma=model.default_gamma if method.gamma is None else method.gamma,
                )

            if method.identity not in cached:  # not timed: the prompts' text embeddings, the first calls' lazy set-up
                cached[method.identity] = fill_prompt_cache(model, prompts)
                sample(prompts.prompts[:2], prompts.seeds[:2])

            values = evaluate_sampling(sample, prompts, evaluator, plan.batch_size, progress)
            row = Row(method.name, method.sampler, steps, w, spacing, method.gamma)
            record = row_record(row, method.identity, values, fingerprints[method.identity], model.cfg_free)
            done[record.key] = record
            save_results(path, s, list(done.values()))
            tqdm.write(f"{method.name} {steps} steps w={w:g}: " + brief(record))
    wanted = [
        done[(m.name, m.identity, m.sampler.value, st, w)] for w in plan.ws for m in plan.methods for st in m.steps
    ]
    save_results(path, s, list(done.values()))
    write_report(wanted, s, plan.out)
    return wanted
