"""The prompts of an evaluation and the seed of each image: the embedded Fashion captions, a ``.txt`` file, or the
captions of any data set :func:`lcm.data.sources.open_data` reads."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset

from lcm.data.captions import CaptionSet
from lcm.data.sources import open_data

__all__ = [
    "EMBEDDED",
    "EvalPrompts",
    "data_flag",
    "dataset_samples",
    "eval_seeds",
    "fashion_eval_prompts",
    "load_prompts",
]

# Prompts and reference of the embedded default: Fashion captions and the Fashion-MNIST test split. Not a data set
# string: the test split and its class labels are what the classifier metrics need.
EMBEDDED = "embedded"


@dataclass(frozen=True)
class EvalPrompts:
    prompts: list[str]
    labels: torch.Tensor | None  # (N,) the class each prompt asks for, where the source knows it
    seeds: list[int]


def eval_seeds(n: int, seed: int) -> list[int]:
    """Image i of every row uses the same seed, so rows differ only by their method, steps and w."""
    return list(range(seed * 1_000_000, seed * 1_000_000 + n))


def fashion_eval_prompts(n: int, seed: int = 0, classes: Sequence[int] | None = None) -> EvalPrompts:
    """``n`` prompts cycling through the 10 classes (or ``classes``), each a random caption of its class (paraphrases
    included)."""
    captions = CaptionSet()
    labels = torch.arange(n) % 10 if classes is None else torch.tensor(list(classes))[torch.arange(n) % len(classes)]
    idx = captions.sample(labels, 0.0, torch.Generator().manual_seed(seed))
    return EvalPrompts([captions.captions[i] for i in idx], labels, eval_seeds(n, seed))


def dataset_samples(data: Dataset) -> Iterator[dict]:
    """The readable samples of a map-style or iterable data set, in order (skipped items, ``None``, left out)."""
    items = iter(data) if isinstance(data, IterableDataset) else (data[i] for i in range(len(data)))
    return (sample for sample in items if sample is not None)


@contextmanager
def data_flag(flag: str) -> Iterator[None]:
    """Errors of the data layer name the flag that gave the data string (``--prompts``, ``--reference``), not
    ``--data``."""
    try:
        yield
    except ValueError as err:
        message = str(err)
        if message.startswith("--data "):
            raise ValueError(flag + message[len("--data") :]) from None
        raise


def load_prompts(
    source: str,
    n: int,
    seed: int = 0,
    caption_column: str | None = None,
    split: str = "train",
    data_dir: Path | None = None,
) -> EvalPrompts:
    """``n`` prompts from ``source``: ``embedded``, a ``.txt`` file (one prompt a line), or an image–caption data set
    (any ``lcm distill --data`` string; its caption column). Shorter sources are cycled."""
    if source == EMBEDDED:
        return fashion_eval_prompts(n, seed)
    if source.endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"--prompts {source}: no such file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        # Only the captions are used: a small resolution keeps decoding the images cheap.
        with data_flag("--prompts"):
            data = open_data(
                source, resolution=32, caption_column=caption_column, split=split, seed=seed, data_dir=data_dir
            )
        prompts = []
        for sample in dataset_samples(data):
            prompts.append(sample["caption"])
            if len(prompts) == n:
                break
    if not prompts:
        raise ValueError(f"--prompts {source}: no prompts found")
    return EvalPrompts([prompts[i % len(prompts)] for i in range(n)], None, eval_seeds(n, seed))
