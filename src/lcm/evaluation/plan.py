"""What an evaluation runs: the methods (model × sampler × steps), the guidance weights and the settings, and the
policy that fills in what a user leaves out (:func:`plan_eval`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lcm.data.sources import parse_data_spec
from lcm.evaluation.metrics import METRICS
from lcm.evaluation.prompts import EMBEDDED, data_flag
from lcm.locations import local_path_or_none
from lcm.maths.timesteps import DEFAULT_SPACING, SPACINGS
from lcm.models.formats import read_record, samples_with_tcd
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.lora import LoraSpec, accelerator_of
from lcm.models.text import is_packaged_encoder
from lcm.sample import Sampler
from lcm.shipped import default_model_path, embedded_classifier

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "STATS_SUFFIXES",
    "TEACHER_SAMPLERS",
    "TEACHER_SPACINGS",
    "EvalPlan",
    "EvalSettings",
    "Method",
    "plan_eval",
]

# Teacher samplers by the name a user gives, with the name of their rows.
TEACHER_SAMPLERS = {"ddim": "DDIM", "dpm": "DPM-Solver", "dpmpp": "DPM-Solver++", "heun": "Heun"}
# A flow-matching teacher's: Euler (DDIM's update, the ddim sampler) and Heun
FLOW_TEACHER_SAMPLERS = ("ddim", "heun")
# Timestep spacings of the teacher samplers; "config" keeps the teacher's scheduler config.
TEACHER_SPACINGS = SPACINGS
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
EMBEDDED_METRICS = ("fd-clf", "kid-clf", "accuracy")
MODEL_METRICS = ("fid", "kid", "clip")
NO_REFERENCE = "none"  # CLIP score only: nothing to compare against
STATS_SUFFIXES = (".npz", ".safetensors")  # a --reference of FID statistics, not a data set


@dataclass(frozen=True)
class Method:
    name: str  # "teacher DDIM", "LCM", ...
    model: str
    sampler: Sampler
    steps: tuple[int, ...]
    loras: tuple[LoraSpec, ...] = ()  # stacked on ``model``
    gamma: float | None = None  # TCD's γ of a model sampled with TCD's sampler; None: the model's own

    @property
    def identity(self) -> str:
        """What its rows name as their model: the folder or hub id, with the LoRAs stacked on it."""
        return " + ".join([self.model, *map(str, self.loras)])


@dataclass(frozen=True)
class EvalSettings:
    """What makes two rows comparable: rows are only reused under equal settings."""

    prompts: str = EMBEDDED
    caption_column: str | None = None
    split: str = "train"  # of --prompts / --reference data sets
    num_samples: int = 2000
    seed: int = 0
    metrics: tuple[str, ...] = EMBEDDED_METRICS
    reference: str = EMBEDDED
    image_column: str | None = None
    reference_samples: int = 10_000  # images read from a reference data set
    teacher_spacing: str = DEFAULT_SPACING  # of the teacher samplers; "config": the teacher's own
    classifier: str | None = None
    inception_weights: str | None = None
    clip_model: str | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "metrics": list(self.metrics)}


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


def _distilled(folder: Path | None) -> tuple[str, Sampler]:
    """(its row name, its sampler) of a distilled model, from its record: "LCM" and the LCM sampler, or "TCD" /
    "PCM" and TCD's sampler for TCD and multi-phase PCM models (a hub id: LCM)."""
    record = read_record(folder) if folder is not None else {"consistency": "lcm", "phases": 1}
    if samples_with_tcd(record["consistency"], record["phases"]):
        return record["consistency"].upper(), Sampler.TCD
    return "LCM", Sampler.LCM


def _is_flow(teacher: str) -> bool:
    """A flow-matching teacher folder (or hub id): it keeps its network in ``transformer/``."""
    local = local_path_or_none(teacher, owner_required=True)
    return local is not None and (local / "transformer").is_dir() and not (local / "unet").is_dir()


def _methods(
    teacher: str,
    teacher_samplers: Sequence[str] | None,
    teacher_steps: Sequence[int],
    lcms: Sequence[tuple[str, str | None]],
    lcm_steps: Sequence[int],
    loras: Sequence[LoraSpec] = (),
    gamma: float | None = None,
) -> tuple[Method, ...]:
    flow = _is_flow(teacher)
    known = FLOW_TEACHER_SAMPLERS if flow else tuple(x for x in TEACHER_SAMPLERS if x not in FLOW_TEACHER_SAMPLERS[1:])
    if teacher_samplers is None:
        teacher_samplers = known
    if bad := [x for x in teacher_samplers if x not in TEACHER_SAMPLERS]:
        raise ValueError(f"--teacher-samplers: unknown sampler(s) {bad}; choose from {', '.join(known)}")
    if bad := [x for x in teacher_samplers if x not in known]:
        family = "a flow-matching teacher" if flow else "a teacher that is not flow-matching"
        raise ValueError(f"--teacher-samplers: {bad} is not for {family}; choose from {', '.join(known)}")
    names = {**TEACHER_SAMPLERS, **({"ddim": "Euler"} if flow else {})}
    for flag, steps in (("--teacher-steps", teacher_steps), ("--lcm-steps", lcm_steps)):
        if any(s < 1 for s in steps):
            raise ValueError(f"{flag}: steps must be at least 1, got {list(steps)}")
    methods = [Method(f"teacher {names[x]}", teacher, Sampler(x), tuple(teacher_steps)) for x in teacher_samplers]
    for folder, name in lcms:
        path = local_path_or_none(folder, owner_required=True)
        if path is not None and not path.exists():
            raise ValueError(f"--lcm {folder}: no such folder")
        kind, sampler = _distilled(path)
        label = name or (kind if len(lcms) == 1 else f"{kind} ({Path(folder).name})")
        if sampler is Sampler.TCD and gamma is not None:  # its rows are named by the γ, so they never mix
            methods.append(Method(f"{label} γ {gamma:g}", folder, sampler, tuple(lcm_steps), gamma=gamma))
        else:
            methods.append(Method(label, folder, sampler, tuple(lcm_steps)))
    if gamma is not None and not any(m.gamma is not None for m in methods):
        raise ValueError("--gamma is TCD's sampler's: give an --lcm that samples with it (TCD, multi-phase PCM)")
    if loras:  # the stack on the teacher: an LCM with an LCM-LoRA among them, else sampled as the teacher
        if accelerator_of(loras, base_is_lcm=False) is not None:
            methods.append(Method("LoRA stack", teacher, Sampler.LCM, tuple(lcm_steps), tuple(loras)))
        else:
            methods += [
                Method(f"teacher {names[x]} + LoRA", teacher, Sampler(x), tuple(teacher_steps), tuple(loras))
                for x in teacher_samplers
            ]
    if not methods:
        raise ValueError("nothing to evaluate: give --lcm and/or --teacher-samplers")
    if len({m.name for m in methods}) != len(methods):
        raise ValueError("two methods share a name; name each LCM with --lcm PATH=NAME")
    return tuple(methods)


def _metrics_and_reference(
    prompts: str, metrics: Sequence[str] | None, reference: str | None
) -> tuple[tuple[str, ...], str]:
    if metrics is None:
        metrics = EMBEDDED_METRICS if prompts == EMBEDDED else MODEL_METRICS
    metrics = tuple(metrics)
    if not metrics:
        raise ValueError(f"--metrics: give one or more of {', '.join(METRICS)}")
    if bad := [m for m in metrics if m not in METRICS]:
        raise ValueError(f"--metrics: unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
    if "accuracy" in metrics and prompts != EMBEDDED:
        raise ValueError("--metrics accuracy needs --prompts embedded (only those prompts name a class)")
    if reference:
        return metrics, reference
    if prompts == EMBEDDED or not prompts.endswith(".txt"):
        return metrics, prompts  # the embedded test split, or the prompts' own data set
    if all(METRICS[m][1] == "clip" for m in metrics):
        return metrics, NO_REFERENCE
    raise ValueError("--reference is required: reference images (a data set) or FID statistics (.npz/.safetensors)")


def plan_eval(
    *,
    out: Path,
    teacher: str | None = None,
    teacher_samplers: Sequence[str] | None = None,
    teacher_steps: Sequence[int] = (1, 2, 4, 8, 25, 50),
    lcms: Sequence[tuple[str, str | None]] = (),
    lcm_steps: Sequence[int] = (1, 2, 4, 8),
    loras: Sequence[LoraSpec] = (),
    teacher_spacing: str = DEFAULT_SPACING,
    ws: Sequence[float] | None = None,
    num_samples: int = EvalSettings.num_samples,
    seed: int = EvalSettings.seed,
    batch_size: int = 250,
    prompts: str | None = None,
    caption_column: str | None = None,
    reference: str | None = None,
    image_column: str | None = None,
    split: str = EvalSettings.split,
    reference_samples: int = EvalSettings.reference_samples,
    metrics: Sequence[str] | None = None,
    classifier: str | None = None,
    inception_weights: str | None = None,
    clip_model: str | None = None,
    data_dir: Path | None = None,
    device: str | None = None,
    overwrite: bool = False,
    gamma: float | None = None,
) -> EvalPlan:
    """The evaluation of ``teacher`` (default: the shipped one), the LCMs ``lcms`` ((folder or hub id, row name
    or None)) and a stack of ``loras`` on the teacher, with every default filled in (docs/design.md §6). ``gamma``
    samples the LCMs that sample with TCD's sampler at that γ instead of their own.

    The embedded Fashion teacher defaults to its captions as prompts, FD-clf / KID-clf / prompt accuracy in its own
    classifier's features and the test split as reference; other teachers need ``prompts`` and default to FID / KID
    against the prompts' data set (or ``reference``) and the CLIP score. ``ws`` defaults to the teacher's w.
    """
    teacher = teacher or str(default_model_path())
    methods = _methods(teacher, teacher_samplers, teacher_steps, lcms, lcm_steps, loras, gamma)
    if teacher_spacing not in TEACHER_SPACINGS:
        raise ValueError(
            f"--teacher-spacing: unknown spacing {teacher_spacing!r}; choose from {', '.join(TEACHER_SPACINGS)}"
        )
    if ws is not None and (not ws or any(w < 0 for w in ws)):
        raise ValueError(f"--w: give one or more guidance weights w >= 0, got {list(ws)}")
    if num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2 (a covariance needs two images), got {num_samples}")

    embedded_teacher = Path(teacher, "classifier", "model.safetensors").is_file() or is_packaged_encoder(teacher)
    if classifier is None and embedded_teacher:
        classifier = str(embedded_classifier(teacher))
    prompts = prompts or (EMBEDDED if embedded_teacher else None)
    if prompts is None:
        raise ValueError("--prompts is required for this teacher: a .txt file (a prompt a line) or a data set")
    metrics, reference = _metrics_and_reference(prompts, metrics, reference)
    # Data strings are checked now, so that a mistyped path fails before any model is loaded.
    if prompts != EMBEDDED and not prompts.endswith(".txt"):
        with data_flag("--prompts"):
            parse_data_spec(prompts)
    if reference not in (EMBEDDED, NO_REFERENCE, prompts) and not reference.endswith(STATS_SUFFIXES):
        with data_flag("--reference"):
            parse_data_spec(reference)
    if ws is None:
        ws = (LatentDiffusion.from_pretrained(teacher, with_text_encoder=False).default_w,)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = EvalSettings(
        prompts=prompts,
        caption_column=caption_column,
        num_samples=num_samples,
        seed=seed,
        metrics=metrics,
        reference=reference,
        reference_samples=reference_samples,
        split=split,
        image_column=image_column,
        teacher_spacing=teacher_spacing,
        classifier=classifier if any(METRICS[m][1] == "clf" for m in metrics) else None,
        inception_weights=inception_weights,
        clip_model=(clip_model or DEFAULT_CLIP_MODEL) if "clip" in metrics else None,
    )
    return EvalPlan(
        methods=methods,
        ws=tuple(float(w) for w in ws),
        settings=settings,
        out=Path(out),
        batch_size=batch_size,
        overwrite=overwrite,
        device=device,
        data_dir=data_dir,
    )
