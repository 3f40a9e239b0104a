import numpy as np
import pytest
import torch

from lcm.evaluation.metrics import FeatureStats, frechet_distance, kid, prompt_accuracy


def _scipy_fd(mu1, c1, mu2, c2):
    from scipy import linalg

    covmean = linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def test_frechet_distance_equals_scipy_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(_scipy_fd(mu1, c1, mu2, c2), rel=1e-8)


def test_frechet_distance_of_gaussians_closed_form():
    """Isotropic Gaussians: FD = ‖μ1 − μ2‖² + d (s1 − s2)²."""
    d = 5
    fd = frechet_distance(np.ones(d), 4 * np.eye(d), np.zeros(d), 9 * np.eye(d))
    assert fd == pytest.approx(d * 1 + d * (2 - 3) ** 2, rel=1e-10)


def test_a_set_against_itself_is_zero():
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(1))
    s = FeatureStats.of(x)
    assert abs(frechet_distance(s.mean, s.cov, s.mean, s.cov)) < 1e-8
    assert abs(kid(x, x, subset_size=500, subsets=5)) < 1e-2


def test_kid_separates_shifted_sets():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1000, 8, generator=g), torch.randn(1000, 8, generator=g)
    same, shifted = kid(x, y, 500, 10), kid(x, y + 1.0, 500, 10)
    assert abs(same) < 0.05 and shifted > 10 * max(abs(same), 1e-3)


def test_prompt_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert prompt_accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
