"""Where a user's string points: a local path or a Hugging Face Hub id (the one place this is decided), where the
caches live, and how a failed write is reported.

A string is a *local path* when it names something that exists, starts like a path (``.``, ``/``, ``~``), or cannot be a
Hub id. It is a *Hub id* when it has the Hub's form (``name`` or ``owner/name``, letters, digits, ``_ . -``) and nothing
of that name exists here. Models and data sets both go through :func:`is_hub_id`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["cache_dir", "hub_unavailable", "is_hub_id", "local_path_or_none", "written"]

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


def hub_unavailable(repo_id: str, filename: str, repo_type: str = "model") -> str | None:
    """Why the Hub repository ``repo_id`` cannot be used now, or None: it is in the local Hub cache (``filename`` of
    it is), or the Hub answers. Asked before a download, so that an offline machine says so in one line instead of
    retrying and then blaming the repository."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "the Hugging Face Hub is switched off (HF_HUB_OFFLINE is set) and it is not in the local Hub cache"
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=5).close()
    except OSError:
        return (
            f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached (offline?) and it is not in the local cache"
        )
    return None


def cache_dir(*parts: str) -> Path:
    """``$LCM_CACHE/<parts>`` (default ``~/.cache/lcm``): text embeddings, reference statistics, compiled kernels."""
    return Path(os.environ.get("LCM_CACHE", Path.home() / ".cache" / "lcm")).joinpath(*parts)


@contextlib.contextmanager
def written(path: Path, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a failed write of ``path`` in the ``with`` block (a full disk, a quota, a read-only folder) into an
    ``OSError`` whose message is one line naming it; ``cleanup`` (a half-written file or folder) is removed first.

    Tensor files are written by safetensors, whose errors are not ``OSError`` s: they are caught here too.
    """
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        if cleanup is not None:
            if cleanup.is_dir():
                shutil.rmtree(cleanup, ignore_errors=True)
            else:
                cleanup.unlink(missing_ok=True)
        text = str(err)
        if "No space left" in text or "StorageFull" in text or getattr(err, "errno", None) == 28:
            reason = "no space left on the device"
        elif isinstance(err, OSError) and err.strerror:
            reason = err.strerror
        else:
            reason = " ".join(text.split())[:200]
        raise OSError(f"could not write {path}: {reason}") from None
