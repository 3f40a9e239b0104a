"""Captions for Fashion-MNIST: templates × class names × synonyms. The unconditional caption is ""."""

from __future__ import annotations

import torch

__all__ = ["CLASS_PHRASES", "TEMPLATES", "CaptionSet", "class_prompts"]

# Index = Fashion-MNIST label. The first phrase of each class is its canonical prompt.
CLASS_PHRASES: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee", "top", "short-sleeved shirt"),
    ("pair of trousers", "trousers", "pants", "jeans"),
    ("pullover", "sweater", "jumper", "knitted sweater"),
    ("dress", "summer dress", "gown", "frock"),
    ("coat", "jacket", "overcoat", "winter coat"),
    ("sandal", "sandals", "flip-flop", "summer sandal"),
    ("shirt", "button-up shirt", "blouse", "long-sleeved shirt"),
    ("sneaker", "running shoe", "trainer", "sports shoe"),
    ("bag", "handbag", "purse", "tote bag"),
    ("ankle boot", "boot", "leather boot", "short boot"),
)
TEMPLATES: tuple[str, ...] = (
    "{}",
    "a {}",
    "a photo of a {}",
    "a picture of a {}",
    "a black and white photo of a {}",
    "a product photo of a {}",
    "an image of a {}",
    "a grayscale {}",
)


def class_prompts() -> list[str]:
    """One canonical prompt per class, in label order ("a photo of a t-shirt", …)."""
    return [f"a photo of a {phrases[0]}" for phrases in CLASS_PHRASES]


class CaptionSet:
    """Every caption of every class, and a sampler of (caption index) per label with caption dropout."""

    def __init__(self) -> None:
        self.captions: list[str] = [""]  # index 0: unconditional
        self.by_class: list[list[int]] = []
        for phrases in CLASS_PHRASES:
            indices = []
            for phrase in phrases:
                for template in TEMPLATES:
                    indices.append(len(self.captions))
                    self.captions.append(template.format(phrase))
            self.by_class.append(indices)
        self._table = torch.tensor(self.by_class)  # (10, captions per class)

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, labels: torch.Tensor, drop_prob: float = 0.0, generator: torch.Generator | None = None):
        """A random caption index per label ``[B]``; with probability ``drop_prob`` the empty caption (index 0)."""
        col = torch.randint(0, self._table.shape[1], labels.shape, generator=generator)
        idx = self._table[labels, col]
        if drop_prob > 0:
            drop = torch.rand(labels.shape, generator=generator) < drop_prob
            idx = torch.where(drop, torch.zeros_like(idx), idx)
        return idx
