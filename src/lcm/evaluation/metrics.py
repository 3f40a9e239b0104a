"""Image metrics behind one interface (docs/design.md §6): an :class:`Evaluator` turns generated images into numbers.

- ``fd-clf`` / ``kid-clf`` / ``accuracy``: the embedded default's offline metrics. FD-clf is the Fréchet distance
  between Gaussians fitted to the *Fashion-MNIST classifier's* 128-d features of generated and reference images; it
  is not FID (no Inception network is involved) and is never reported as FID. Prompt accuracy: how often the
  classifier agrees with the class a prompt asks for.
- ``fid`` / ``kid``: Fréchet and kernel distances in the 2048-d features of the FID Inception-v3 (torchmetrics' and
  torch-fidelity's network, :mod:`lcm.evaluation.inception`), whose weights are downloaded or given as a file.
- ``clip``: the CLIP score (torchmetrics' definition: 100 · mean cosine of image and prompt embeddings) with a
  local or hub CLIP model.

Missing weights raise a ValueError that says how to provide them; no metric ever stands in for another.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lcm.locations import cache_dir

__all__ = [
    "METRICS",
    "Evaluator",
    "FashionEvaluator",
    "FeatureStats",
    "Reference",
    "fashion_reference",
    "frechet_distance",
    "kid",
    "prompt_accuracy",
    "reference_cache_dir",
    "to_uint8_rgb",
]


@dataclass
class FeatureStats:
    mean: torch.Tensor  # (D,) float64
    cov: torch.Tensor  # (D, D) float64
    features: torch.Tensor | None  # (N, D) float32, kept for KID; None for statistics read from mean/cov files

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStats:
        f = features.double()
        return cls(f.mean(0), torch.cov(f.T), features.float())

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"mean": self.mean, "cov": self.cov}
        if self.features is not None:
            tensors["features"] = self.features.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Our ``.safetensors`` (mean, cov[, features]) or a pytorch-fid / clean-fid ``.npz`` (mu, sigma)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"reference statistics {path}: no such file")
        if path.suffix == ".npz":
            import numpy as np

            with np.load(path) as data:
                if not {"mu", "sigma"} <= set(data.files):
                    raise ValueError(f"{path}: an .npz of reference statistics needs arrays 'mu' and 'sigma'")
                return cls(torch.from_numpy(data["mu"]).double(), torch.from_numpy(data["sigma"]).double(), None)
        from safetensors.torch import load_file

        data = load_file(str(path))
        if not {"mean", "cov"} <= data.keys():
            raise ValueError(f"{path}: reference statistics need tensors 'mean' and 'cov'")
        return cls(data["mean"].double(), data["cov"].double(), data.get("features"))


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """‖μ1 − μ2‖² + tr(C1 + C2 − 2 (C1^½ C2 C1^½)^½), via symmetric eigen-decompositions (no complex sqrtm)."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(x, dtype=torch.float64) for x in (mu1, mu2, cov1, cov2))
    s1 = _sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(s1 @ cov2 @ s1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross)


def kid(x: torch.Tensor, y: torch.Tensor, subset_size: int = 1000, subsets: int = 50, seed: int = 0) -> float:
    """Kernel Inception Distance's unbiased MMD² with the cubic polynomial kernel, averaged over subsets."""
    g = torch.Generator().manual_seed(seed)
    x, y = x.double(), y.double()
    d = x.shape[1]
    m = min(subset_size, len(x), len(y))
    total = 0.0
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=g)[:m]]
        b = y[torch.randperm(len(y), generator=g)[:m]]
        kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
        total += float(
            (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return total / subsets


def prompt_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] (grey or RGB) → uint8 RGB ``[B, 3, H, W]``, rounded as an image file would store them."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class ClassifierFeatures:
    """The embedded classifier's 128-d features (FD-clf, KID-clf) and logits (prompt accuracy)."""

    space = "clf"

    def __init__(self, classifier_dir: str | Path):
        from lcm.models.fashion import load_classifier

        self.classifier = load_classifier(classifier_dir)
        weights = Path(classifier_dir) / "model.safetensors"
        self.fingerprint = f"clf:{weights.resolve()}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}"

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1:] != (1, 32, 32):
            raise ValueError(
                f"the Fashion-MNIST classifier scores 1x32x32 images, got {tuple(images.shape[1:])}: use --metrics "
                "fid,kid,clip for other models"
            )
        feats, logits = [], []
        for i in range(0, len(images), batch):
            f = self.classifier.features(images[i : i + batch].float())
            feats.append(f)
            logits.append(self.classifier.head(f))
        return torch.cat(feats), torch.cat(logits)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


class InceptionFeatures:
    """2048-d pool features of the FID Inception-v3 (uint8 RGB input, resized to 299² inside)."""

    space = "inception"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        from lcm.evaluation.inception import INCEPTION_URL, load_fid_inception

        self.model = load_fid_inception(weights).to(device)
        self.device = device
        self.fingerprint = f"inception:{Path(weights).name if weights else INCEPTION_URL}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
        x = to_uint8_rgb(images)
        return torch.cat([self.model(x[i : i + batch].to(self.device)).cpu() for i in range(0, len(x), batch)])


class ClipScorer:
    """CLIP score as torchmetrics defines it: ``max(mean_i 100 · cos(E_img(x_i), E_txt(p_i)), 0)``.

    Computed here with transformers' ``CLIPModel`` (a hub id or a local folder with a ``CLIPProcessor``):
    torchmetrics' own ``CLIPScore`` breaks on transformers 5, whose feature getters return model outputs.
    Prompts longer than the text encoder's context are truncated, as in torchmetrics.
    """

    def __init__(self, model: str, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(model)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"the CLIP score needs a CLIP model and {model!r} could not be loaded ({first}); pass --clip-model "
                "with a hub id (online) or a local folder holding a transformers CLIPModel and CLIPProcessor"
            ) from None
        self.device = device

    @torch.no_grad()
    def cosines(self, images: torch.Tensor, prompts: Sequence[str], batch: int = 64) -> torch.Tensor:
        """(N,) cosine similarity of each image with its prompt."""
        x = to_uint8_rgb(images)
        max_length = self.model.config.text_config.max_position_embeddings
        out = []
        for i in range(0, len(x), batch):
            inputs = self.processor(
                text=list(prompts[i : i + batch]),
                images=list(x[i : i + batch]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(self.device)
            result = self.model(**inputs)
            img = torch.nn.functional.normalize(result.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(result.text_embeds.float(), dim=-1)
            out.append((img * txt).sum(-1).cpu())
        return torch.cat(out)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        if len(prompts) != len(images):
            raise ValueError(f"the CLIP score needs one prompt per image, got {len(prompts)} for {len(images)}")
        return max(float(100 * self.cosines(images, prompts).double().mean()), 0.0)


@dataclass
class Reference:
    """Where the reference side of FD/KID comes from: images, or precomputed statistics of one feature space.

    ``images`` yields batches in [−1, 1]; statistics computed from them are cached in ``cache_dir`` under a key made
    of ``name`` and the feature extractor's identity.
    """

    name: str
    images: Callable[[], Iterable[torch.Tensor]] | None = None
    stats_file: Path | None = None  # statistics of the Inception space (FID), e.g. a pytorch-fid .npz
    cache_dir: Path | None = None


def reference_cache_dir() -> Path:
    """Where reference statistics are cached: ``$LCM_CACHE/reference`` (default ``~/.cache/lcm``)."""
    return cache_dir("reference")


def fashion_reference(data_dir: str | Path | None = None, classes: Sequence[int] | None = None) -> Reference:
    """The 10,000 Fashion-MNIST test images (or those of ``classes``)."""

    def images():
        from lcm.data.fashion_mnist import load_fashion_mnist

        test = load_fashion_mnist("test", data_dir)
        keep = torch.isin(test.labels, torch.tensor(list(classes))) if classes is not None else slice(None)
        yield test.images[keep]

    name = "fashion-mnist test" + (f" classes {sorted(classes)}" if classes is not None else "")
    return Reference(name, images, cache_dir=reference_cache_dir())


# CLI name -> (result key, what it needs)
METRICS = {
    "fd-clf": ("fd_clf", "clf"),
    "kid-clf": ("kid_clf", "clf"),
    "accuracy": ("prompt_accuracy", "clf"),
    "fid": ("fid", "inception"),
    "kid": ("kid", "inception"),
    "clip": ("clip_score", "clip"),
}


class Evaluator:
    """Scores a set of generated images with the requested ``metrics`` (names of :data:`METRICS`).

    Every network a metric needs is loaded here, so that missing weights fail before any image is generated.
    """

    def __init__(
        self,
        metrics: Sequence[str],
        reference: Reference | None = None,
        *,
        classifier_dir: str | Path | None = None,
        inception_weights: str | Path | None = None,
        clip_model: str | None = None,
        device: str | torch.device = "cpu",
    ):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
        self.metrics = list(dict.fromkeys(metrics))
        needs = {METRICS[m][1] for m in self.metrics}
        self.reference = reference
        if needs - {"clip"} and reference is None:
            raise ValueError(f"{', '.join(self.metrics)}: distances need reference images or statistics")
        self.extractors: dict[str, ClassifierFeatures | InceptionFeatures] = {}
        if "clf" in needs:
            if classifier_dir is None:
                raise ValueError("fd-clf, kid-clf and accuracy need the Fashion-MNIST classifier (--classifier)")
            self.extractors["clf"] = ClassifierFeatures(classifier_dir)
        if "inception" in needs:
            self.extractors["inception"] = InceptionFeatures(inception_weights, device)
        self.clip = ClipScorer(clip_model or "openai/clip-vit-large-patch14", device) if "clip" in needs else None
        self._stats: dict[str, FeatureStats] = {}

    @property
    def classifier(self):
        return self.extractors["clf"].classifier

    def reference_stats(self, space: str) -> FeatureStats:
        if space in self._stats:
            return self._stats[space]
        ref, extractor = self.reference, self.extractors[space]
        key = hashlib.sha256(f"{ref.name}|{extractor.fingerprint}".encode()).hexdigest()[:16]
        cached = ref.cache_dir / f"{space}-{key}.safetensors" if ref.cache_dir else None
        if space == "inception" and ref.stats_file is not None:
            stats = FeatureStats.load(ref.stats_file)
        elif cached is not None and cached.is_file():
            stats = FeatureStats.load(cached)
        elif ref.images is None:
            raise ValueError(f"the {space} metrics need reference images; {ref.name} gives statistics only")
        else:
            stats = FeatureStats.of(torch.cat([extractor(batch) for batch in ref.images()]))
            if cached is not None:
                stats.save(cached)
        self._stats[space] = stats
        return stats

    def evaluate(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, prompts: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Metric values of ``images`` (``[N, C, H, W]`` in [−1, 1]); ``labels``: the class each prompt asks for."""
        out: dict[str, float] = {}
        features: dict[str, torch.Tensor] = {}
        logits = None
        if "clf" in self.extractors:
            features["clf"], logits = self.extractors["clf"].features_and_logits(images)
        if "inception" in self.extractors:
            features["inception"] = self.extractors["inception"](images)
        for name in self.metrics:
            key, space = METRICS[name]
            if name in ("fd-clf", "fid"):
                gen, ref = FeatureStats.of(features[space]), self.reference_stats(space)
                out[key] = frechet_distance(gen.mean, gen.cov, ref.mean, ref.cov)
            elif name in ("kid-clf", "kid"):
                ref = self.reference_stats(space)
                if ref.features is None:
                    raise ValueError(f"{name} needs reference features; {self.reference.name} holds mean/cov only")
                out[key] = kid(features[space], ref.features)
            elif name == "accuracy":
                if labels is None:
                    raise ValueError("prompt accuracy needs the class of each prompt (the embedded prompts have it)")
                out[key] = prompt_accuracy(logits, labels)
            else:
                if prompts is None:
                    raise ValueError("the CLIP score needs the prompts of the images")
                out[key] = self.clip(images, prompts)
        return out


def FashionEvaluator(  # noqa: N802 - reads as the class it builds
    classifier_dir: str | Path, data_dir: str | Path | None = None, classes: Sequence[int] | None = None
) -> Evaluator:
    """The embedded default's offline metrics against the Fashion-MNIST test split (or its ``classes``)."""
    return Evaluator(
        ["fd-clf", "kid-clf", "accuracy"], fashion_reference(data_dir, classes), classifier_dir=classifier_dir
    )
