"""Evaluating a sampling function on the embedded benchmark: images per (prompt, seed), then offline metrics.

Evaluation takes a *sampler setting* of a model, not a trainer: any folder (teacher, LCM, LCM-LoRA) × sampler ×
steps × guidance gives one row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .data.captions import CaptionSet
from .generate import Sampler, generate
from .metrics import FashionEvaluator
from .teacher import LatentDiffusion

__all__ = ["EvalPrompts", "Row", "evaluate_row", "fashion_eval_prompts"]


@dataclass(frozen=True)
class EvalPrompts:
    prompts: list[str]
    labels: torch.Tensor  # (N,) the class each prompt asks for
    seeds: list[int]


def fashion_eval_prompts(n: int, seed: int = 0) -> EvalPrompts:
    """``n`` prompts cycling through the 10 classes, each a random caption of its class (paraphrases included)."""
    captions = CaptionSet()
    labels = torch.arange(n) % 10
    idx = captions.sample(labels, 0.0, torch.Generator().manual_seed(seed))
    return EvalPrompts([captions.captions[i] for i in idx], labels, list(range(seed * 1_000_000, seed * 1_000_000 + n)))


@dataclass(frozen=True)
class Row:
    method: str  # e.g. "teacher DDIM", "LCM"
    sampler: Sampler
    steps: int
    w: float


def nfe_per_image(row: Row) -> int:
    """Network evaluations per image: CFG doubles each teacher step; the LCM's guidance is in its input."""
    return row.steps * (2 if row.sampler is not Sampler.LCM and row.w != 0 else 1)


def evaluate_row(
    model: LatentDiffusion, row: Row, prompts: EvalPrompts, evaluator: FashionEvaluator, batch_size: int = 250
) -> dict:
    start = time.perf_counter()
    images = generate(model, prompts.prompts, row.sampler, row.steps, row.w, prompts.seeds, batch_size)
    seconds = time.perf_counter() - start
    metrics = evaluator.evaluate(images, prompts.labels)
    return {
        "method": row.method,
        "sampler": row.sampler.value,
        "steps": row.steps,
        "w": row.w,
        **metrics,
        "seconds_per_image": seconds / len(images),
        "nfe_per_image": nfe_per_image(row),
    }
