"""What every source shares: the sample type, skip accounting, caption checks, seeded generators, map-style base.

Bad data never stops training. Every skip is counted by reason in the source's ``.skipped``
(:class:`SkipCounter`); a map-style source returns ``None`` for an unreadable image, which
:func:`collate_skip_none` drops from the batch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from lcm.data.transforms import IMAGE_ERRORS, ImageTransform, open_image

__all__ = ["MapSource", "Sample", "SkipCounter", "collate_skip_none"]

logger = logging.getLogger(__name__)

# Skip reasons, shared by every source so that summaries read the same.
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
NON_TEXT_CAPTION = "non-text caption"
UNREADABLE_CAPTION = "unreadable caption"
MISSING_IMAGE = "missing image"
MISSING_IMAGE_FILE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
INVALID_METADATA = "invalid metadata line"
OUTSIDE_FOLDER = "file outside the data folder"  # metadata naming ../x.png or /etc/hostname
UNREADABLE_SHARD = "unreadable shard"
TRUNCATED_SAMPLE = "truncated sample"  # a WebDataset sample cut off by the end of its shard
TRUNCATED_SHARD = "truncated shard"  # a shard that ends mid-member (its complete samples are still read)
SHARD_REASONS = (UNREADABLE_SHARD, TRUNCATED_SHARD)  # counted apart: a shard is not a sample


class Sample(TypedDict):
    """One training example."""

    pixel_values: torch.Tensor
    caption: str


class SkipCounter:
    """Skipped samples counted by reason; each ``(reason, key)`` pair counts once, however often it is met.

    Safe to share between threads. DataLoader worker *processes* each get their own copy: with ``num_workers > 0``
    merge their counters with :meth:`update` if you collect them, or read the per-batch ``num_skipped``.
    """

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str]] = set()
        self._counts: dict[str, int] = {}
        self._examples: dict[str, list[str]] = {}

    def add(self, reason: str, key: object) -> bool:
        """Record that sample ``key`` was skipped for ``reason``; ``False`` if that was already recorded."""
        item = (reason, str(key))
        with self._lock:
            if item in self._seen:
                return False
            self._seen.add(item)
            first = reason not in self._counts
            self._counts[reason] = self._counts.get(reason, 0) + 1
            examples = self._examples.setdefault(reason, [])
            if len(examples) < self.max_examples:
                examples.append(item[1])
        # One warning per reason: a dataset with thousands of bad rows should not flood the training log.
        log = logger.warning if first else logger.debug
        log("skipping sample %s: %s", item[1], reason)
        return True

    @property
    def total(self) -> int:
        """Number of skipped samples over all reasons."""
        with self._lock:
            return sum(self._counts.values())

    @property
    def counts(self) -> dict[str, int]:
        """A copy of the per-reason counts."""
        with self._lock:
            return dict(self._counts)

    def examples(self, reason: str) -> list[str]:
        """The first few keys skipped for ``reason`` (to find the bad files)."""
        with self._lock:
            return list(self._examples.get(reason, []))

    def update(self, other: SkipCounter) -> None:
        """Merge another counter (e.g. one collected from a DataLoader worker) into this one."""
        with other._lock:
            items = sorted(other._seen)
        for reason, key in items:
            self.add(reason, key)

    def summary(self, examples: int = 0) -> str:
        """One line, most frequent reason first: ``"skipped 3 samples: 2 unreadable image, 1 missing caption"``;
        shards are counted after a semicolon (``"; 1 truncated shard"``). With ``examples`` > 0 each reason names
        up to that many of its keys (files, metadata lines, shard members)."""
        counts = self.counts
        samples = {r: n for r, n in counts.items() if r not in SHARD_REASONS}
        shards = {r: n for r, n in counts.items() if r in SHARD_REASONS}
        total = sum(samples.values())
        noun = "sample" if total == 1 else "samples"
        line = f"skipped {total} {noun}"
        if total:
            line += ": " + self._parts(samples, examples)
        if shards:
            line += "; " + self._parts(shards, examples)
        return line

    def _parts(self, counts: dict[str, int], examples: int) -> str:
        parts = []
        for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            shown = self.examples(reason)[:examples]
            parts.append(f"{n} {reason}" + (f" ({', '.join(shown)}{', …' if n > len(shown) else ''})" if shown else ""))
        return ", ".join(parts)

    def report(self) -> str:
        """:meth:`summary` naming the first three keys of each reason, for the end of a run."""
        return self.summary(examples=3)

    def __repr__(self) -> str:
        return f"SkipCounter({self.summary()!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Locks cannot be pickled, and DataLoader workers started with "spawn" pickle the dataset.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def collate_skip_none(batch: Sequence[Sample | None]) -> dict[str, Any] | None:
    """Collate samples, dropping ``None`` (unreadable) items; ``None`` if nothing is left.

    Returns ``{"pixel_values": [B, C, H, W], "caption": list[str], "num_skipped": int}`` for image samples (any
    tensor field is stacked, any other listed: a latent cache's samples collate the same way); ``B`` may be smaller
    than the loader's batch size when items were dropped.
    """
    kept = [sample for sample in batch if sample is not None]
    if not kept:
        return None
    out: dict[str, Any] = {}
    for key, value in kept[0].items():
        values = [sample[key] for sample in kept]
        out[key] = torch.stack(values) if isinstance(value, torch.Tensor) else values
    out["num_skipped"] = len(batch) - len(kept)
    return out


def check_caption(value: Any) -> tuple[str | list[str] | None, str | None]:
    """``(caption, None)`` for a usable caption (a string or several to choose from), else ``(None, reason)``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, MISSING_CAPTION
    if isinstance(value, str):
        text = value.strip()
        return (text, None) if text else (None, EMPTY_CAPTION)
    if isinstance(value, (list, tuple, np.ndarray)):
        if not all(isinstance(item, str) for item in value):
            return None, NON_TEXT_CAPTION
        texts = [item.strip() for item in value if item.strip()]
        return (texts, None) if texts else (None, EMPTY_CAPTION)
    return None, NON_TEXT_CAPTION


def choose_caption(caption: str | list[str], generator: torch.Generator | None) -> str:
    """``caption`` itself, or one of several drawn with ``generator``."""
    # Several captions per image (COCO style): pick one per visit, as diffusers' training scripts do.
    if isinstance(caption, str):
        return caption
    if len(caption) == 1:
        return caption[0]
    return caption[int(torch.randint(0, len(caption), (1,), generator=generator))]


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seeded_generator(*parts: object) -> torch.Generator:
    """A torch CPU generator seeded with :func:`derived_seed` of ``parts``."""
    return torch.Generator().manual_seed(derived_seed(*parts))


def resolve_caption_column(requested: str | None, available: Iterable[str], source: str) -> str:
    """The caption column to use: ``requested``, else ``"text"``, else ``"caption"``."""
    names = set(available)
    if requested is not None:
        if requested not in names:
            raise ValueError(
                f"{source}: caption column {requested!r} not found; available columns: {listing(names)}. "
                "Pass caption_column= one of those."
            )
        return requested
    for candidate in ("text", "caption"):
        if candidate in names:
            return candidate
    raise ValueError(
        f"{source}: no caption column ('text' or 'caption'); available columns: {listing(names)}. "
        "Pass caption_column= the one that holds the captions."
    )


def listing(names: Iterable[str]) -> str:
    """Sorted, comma-separated names for an error message; ``(none)`` when there are none."""
    return ", ".join(sorted(names)) or "(none)"


class MapSource(Dataset):
    """Base of the map-style sources: valid rows found at construction, images decoded per item."""

    def __init__(self, transform: ImageTransform, seed: int | None) -> None:
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.skipped = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Vary the seeded augmentations per epoch (only matters when ``seed`` is set)."""
        self.epoch = epoch

    def _item_generator(self, index: int) -> torch.Generator | None:
        # With a seed, item i of epoch e is the same crop/flip/caption whichever worker or order loads it.
        return None if self.seed is None else seeded_generator(self.seed, self.epoch, index)

    def _make_sample(
        self, image_source: str | os.PathLike | bytes | None, caption: str | list[str], key: str, index: int
    ) -> Sample | None:
        image = open_image(image_source) if image_source is not None else None
        if image is None:
            self.skipped.add(UNREADABLE_IMAGE, key)
            return None
        generator = self._item_generator(index)
        try:
            pixels = self.transform(image, generator)
        except IMAGE_ERRORS:  # an image mode PIL cannot convert is as unusable as a corrupt file
            self.skipped.add(UNREADABLE_IMAGE, key)
            return None
        return {"pixel_values": pixels, "caption": choose_caption(caption, generator)}
