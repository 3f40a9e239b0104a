"""Offline metrics of the embedded default (SPEC §6): FD-clf, KID-clf and prompt accuracy.

FD-clf is the Fréchet distance between Gaussians fitted to the *Fashion-MNIST classifier's* 128-d features of
generated and test images. It is not FID (no Inception network is involved) and is never reported as FID.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["FeatureStats", "FashionEvaluator", "frechet_distance", "kid", "prompt_accuracy"]


@dataclass
class FeatureStats:
    mean: torch.Tensor  # (D,) float64
    cov: torch.Tensor  # (D, D) float64
    features: torch.Tensor  # (N, D) float32, kept for KID

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStats:
        f = features.double()
        return cls(f.mean(0), torch.cov(f.T), features.float())


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


class FashionEvaluator:
    """The shipped classifier's view of images: features for FD/KID, logits for prompt accuracy."""

    def __init__(
        self, classifier_dir: str | Path, data_dir: str | Path | None = None, classes: list[int] | None = None
    ):
        from .train_teacher import load_classifier

        self.classifier = load_classifier(classifier_dir)
        self.data_dir, self.classes = data_dir, classes  # classes: compare with the test images of these only
        self._reference: FeatureStats | None = None

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = [], []
        for i in range(0, len(images), batch):
            f = self.classifier.features(images[i : i + batch].float())
            feats.append(f)
            logits.append(self.classifier.head(f))
        return torch.cat(feats), torch.cat(logits)

    def reference(self) -> FeatureStats:
        """Statistics of the 10,000 test images (or of those of ``classes``)."""
        if self._reference is None:
            from .data.fashion_mnist import load_fashion_mnist

            test = load_fashion_mnist("test", self.data_dir)
            images = test.images
            if self.classes is not None:
                images = images[torch.isin(test.labels, torch.tensor(self.classes))]
            self._reference = FeatureStats.of(self.features_and_logits(images)[0])
        return self._reference

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        feats, logits = self.features_and_logits(images)
        ref, gen = self.reference(), FeatureStats.of(feats)
        return {
            "fd_clf": frechet_distance(gen.mean, gen.cov, ref.mean, ref.cov),
            "kid_clf": kid(gen.features, ref.features),
            "prompt_accuracy": prompt_accuracy(logits, labels),
            "n_samples": len(images),
        }
