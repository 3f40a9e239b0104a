"""Where a user's string points: a local path or a Hugging Face Hub id. The one place this is decided.

A string is a *local path* when it names something that exists, starts like a path (``.``, ``/``, ``~``), or cannot be a
Hub id. It is a *Hub id* when it has the Hub's form (``name`` or ``owner/name``, letters, digits, ``_ . -``) and nothing
of that name exists here. Models and data sets both go through :func:`is_hub_id`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["cache_dir", "is_hub_id", "local_path_or_none"]

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_hub_id(text: str, *, owner_required: bool = False) -> bool:
    """True when ``text`` can only mean a Hub repository (models require ``owner/name``: ``owner_required``)."""
    text = str(text).strip()
    if not text or text.startswith((".", "/", "~")) or Path(text).expanduser().exists():
        return False
    if owner_required and text.count("/") != 1:
        return False
    return bool(_HUB_ID.match(text))


def local_path_or_none(text: str, *, owner_required: bool = False) -> Path | None:
    """``Path(text)`` (expanded) unless ``text`` is a Hub id; the path need not exist (callers say what is missing)."""
    return None if is_hub_id(text, owner_required=owner_required) else Path(str(text).strip()).expanduser()


def cache_dir(*parts: str) -> Path:
    """``$LCM_CACHE/<parts>`` (default ``~/.cache/lcm``): text embeddings, reference statistics, compiled kernels."""
    return Path(os.environ.get("LCM_CACHE", Path.home() / ".cache" / "lcm")).joinpath(*parts)
