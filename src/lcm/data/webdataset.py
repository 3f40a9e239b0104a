"""WebDataset ``.tar`` shards, read with Python's ``tarfile``: brace patterns, local files, http(s) and ``pipe:``."""

from __future__ import annotations

import http.client
import json
import logging
import os
import posixpath
import random
import re
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lcm.data.base import (
    MISSING_CAPTION,
    MISSING_IMAGE,
    TRUNCATED_SAMPLE,
    TRUNCATED_SHARD,
    UNREADABLE_CAPTION,
    UNREADABLE_IMAGE,
    UNREADABLE_SHARD,
    Sample,
    SkipCounter,
    check_caption,
    choose_caption,
    derived_seed,
    seeded_generator,
)
from lcm.data.transforms import IMAGE_ERRORS, IMAGE_EXTENSIONS, ImageTransform, open_image

__all__ = ["WebDatasetSource", "expand_braces", "group_samples", "is_remote", "shard_path"]

logger = logging.getLogger(__name__)

# What a shard stream raises when it is truncated, missing or cut off mid-download.
_SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, http.client.HTTPException)


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``"s-{000..002}.tar"`` → s-000, s-001, s-002; ``"{a,b}.tar"`` → a.tar, b.tar.

    Numeric ranges keep zero padding and accept a step (``{0..10..5}``); groups nest and multiply left to right.
    ``"::"`` joins several patterns, as in WebDataset URLs.
    """
    if "::" in pattern:
        return [url for part in pattern.split("::") if part for url in expand_braces(part)]
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced '}}' in shard pattern {pattern!r}")
        return [pattern]
    if "}" in pattern[:start]:
        raise ValueError(f"unbalanced '}}' in shard pattern {pattern!r}")
    end = _matching_brace(pattern, start)
    prefix, body, suffix = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    alternatives = _brace_alternatives(body)
    if alternatives is None:  # "{x}" without a comma or range is literal text, as in bash
        alternatives = ["{" + item + "}" for item in expand_braces(body)] if body else ["{}"]
        return [prefix + alt + rest for alt in alternatives for rest in expand_braces(suffix)]
    tails = expand_braces(suffix)
    return [prefix + head + tail for alt in alternatives for head in expand_braces(alt) for tail in tails]


def _matching_brace(pattern: str, start: int) -> int:
    depth = 0
    for index in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[index], 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")


def _brace_alternatives(body: str) -> list[str] | None:
    """The items of a brace group, or ``None`` when it is neither a list nor a range."""
    parts, depth, current = [], 0, []
    for char in body:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current.append(char)
    parts.append("".join(current))
    if len(parts) > 1:
        return parts
    match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)
    return _numeric_range(*match.groups()) if match else None


def _numeric_range(first: str, last: str, step: str | None) -> list[str]:
    lo, hi, stride = int(first), int(last), abs(int(step)) if step else 1
    if stride == 0:
        raise ValueError(f"brace range {{{first}..{last}..{step}}} has a step of 0")
    # Bash pads every item to the widest endpoint when either endpoint has a leading zero.
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (first, last))
    width = max(len(first), len(last)) if padded else 0
    values = range(lo, hi + 1, stride) if lo <= hi else range(lo, hi - 1, -stride)
    return [f"{value:0{width}d}" for value in values]


def is_remote(url: str) -> bool:
    """Whether a shard URL is fetched (http, https) or produced by a command (``pipe:``) rather than a local file."""
    return url.startswith(("http://", "https://", "pipe:"))


def shard_path(url: str) -> Path:
    """The local file a non-remote shard URL names (``file://`` and ``~`` allowed)."""
    return Path(url[len("file://") :] if url.startswith("file://") else url).expanduser()


def _open_shard(url: str) -> tuple[IO[bytes], subprocess.Popen | None]:
    """A byte stream for a shard: a local file, an http(s) download or the stdout of a ``pipe:`` command."""
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=60), None
    if url.startswith("pipe:"):
        # The command comes from the user's own shard spec (WebDataset's convention for s3/gcs/curl).
        process = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE)
        return process.stdout, process
    return open(shard_path(url), "rb"), None


class _CutShard(Exception):
    """A shard stream failed mid-way; ``member`` names the member being read when its header had been read."""

    def __init__(self, member: str | None, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.member = member


def _tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each file member; a stream cut off raises :class:`_CutShard` saying where."""
    try:
        # Streaming mode ("r|*"): no seeking, so URLs and pipes work, and gzip-compressed shards too.
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                try:
                    data = handle.read()
                except _SHARD_ERRORS as err:
                    raise _CutShard(member.name, err) from err
                yield member.name, data
            # tarfile ends quietly when a header is missing or cut short; a complete shard has its zero end block.
            if getattr(tar.fileobj, "pos", tar.offset + tarfile.BLOCKSIZE) < tar.offset + tarfile.BLOCKSIZE:
                raise _CutShard(None, EOFError("the shard ends without tar's end-of-archive block"))
    except _SHARD_ERRORS as err:
        raise _CutShard(None, err) from err


def _split_member_name(name: str) -> tuple[str | None, str]:
    """WebDataset naming: ``dir/key.ext1.ext2`` → (``dir/key``, ``ext1.ext2``); ``(None, "")`` for non-samples."""
    name = name[2:] if name.startswith("./") else name
    directory, base = posixpath.split(name)
    dot = base.find(".")
    # No dot ("__meta__"), a hidden file (".x", "._x.jpg" from macOS) or a trailing dot is not part of a sample.
    if dot <= 0 or dot == len(base) - 1:
        return None, ""
    return posixpath.join(directory, base[:dot]), base[dot + 1 :].lower()


def group_samples(members: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive tar members by key: ``(key, {extension: bytes})``, one per sample, the last one included.

    Unlike the grouping that broke diffusers' script on newer ``webdataset`` releases, nothing but real samples
    is ever yielded (no ``__url__``-only dict at the end of a shard).
    """
    key: str | None = None
    sample: dict[str, bytes] = {}
    for name, data in members:
        member_key, extension = _split_member_name(name)
        if member_key is None:
            continue
        # A repeated extension under the same key means two samples that share a name: keep both.
        if sample and (member_key != key or extension in sample):
            yield key, sample
            sample = {}
        key = member_key
        sample[extension] = data
    if sample:
        yield key, sample


class WebDatasetSource(IterableDataset):
    """WebDataset ``.tar`` shards, read with Python's ``tarfile`` (the ``webdataset`` package is not needed).

    ``urls`` is one spec or several: local paths, brace patterns (``"shards/{000..009}.tar"``), ``http(s)://`` URLs
    or ``pipe:COMMAND``; ``"::"`` joins specs. Each sample is the tar members sharing a key; its image is the first
    of ``image_key`` (``;``-separated extensions, default ``jpg;jpeg;png;webp``) and its caption the ``.txt`` member,
    else the ``"caption"`` or ``"text"`` field of a ``.json`` member (``caption_key`` names another extension / field).

    Shards are shuffled per epoch (the same order on every rank, from ``seed`` and :meth:`set_epoch`) and split
    over ``world_size`` ranks × DataLoader workers. With fewer shards than that, every reader streams all shards and
    keeps every n-th sample instead. ``rank`` / ``world_size`` default to ``torch.distributed`` when it is
    initialised. Ranks may get different sample counts: for multi-GPU training count steps and use ``repeat=True``.
    ``shuffle_buffer`` > 0 shuffles samples within a window of that many. Bad samples and unreadable shards are
    skipped and counted in ``.skipped`` (in the reading process: per worker when ``num_workers > 0``).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: ImageTransform,
        *,
        image_key: str | None = None,
        caption_key: str | None = None,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        repeat: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.shards = self._expand(urls)
        self.transform = transform
        self.image_keys = tuple(ext.strip().lower() for ext in (image_key or ";".join(IMAGE_EXTENSIONS)).split(";"))
        self.caption_key = caption_key
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 (0 disables sample shuffling), got {shuffle_buffer}")
        self.shuffle_buffer = shuffle_buffer
        self.repeat = repeat
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        self.epoch = 0
        self.skipped = SkipCounter()

    @staticmethod
    def _expand(urls: str | Sequence[str]) -> list[str]:
        specs = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
        shards = [url for spec in specs for url in expand_braces(os.fspath(spec))]
        if not shards:
            raise ValueError("no WebDataset shards given: pass a .tar path, a brace pattern or a list of URLs")
        missing = [url for url in shards if not is_remote(url) and not shard_path(url).is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(shards)} WebDataset shards do not exist, first: {missing[0]} "
                "(check the path and the brace range)"
            )
        return shards

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards for ``epoch``; call before each epoch (reaches workers unless they are persistent)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Sample]:
        reader, readers = self._reader_index()
        epoch = self.epoch
        while True:
            produced = 0
            for sample in self._shuffled(self._epoch_samples(epoch, reader, readers), epoch, reader):
                produced += 1
                yield sample
            if not self.repeat:
                return
            if not produced:
                raise ValueError(
                    f"a full pass over {len(self.shards)} shards gave reader {reader} of {readers} no usable "
                    f"sample ({self.skipped.summary()}); check the shards and the image/caption keys"
                )
            epoch += 1

    def _reader_index(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def shard_order(self, epoch: int) -> list[str]:
        """The shards in the order epoch ``epoch`` reads them, before they are shared out over the readers.

        A function of ``(seed, epoch)`` only, so every rank and worker agrees and a resumed run replays it.
        """
        shards = list(self.shards)
        if self.shuffle_shards:
            random.Random(derived_seed(self.seed, epoch)).shuffle(shards)
        return shards

    def _epoch_samples(self, epoch: int, reader: int, readers: int) -> Iterator[Sample]:
        shards = self.shard_order(epoch)
        by_shard = len(shards) >= readers
        mine = shards[reader::readers] if by_shard else shards
        generator = seeded_generator(self.seed, epoch, reader)
        position = 0
        for url in mine:
            for key, members in self._shard_samples(url):
                position += 1
                # Too few shards to share out: every reader reads them all and keeps its own n-th samples.
                if not by_shard and (position - 1) % readers != reader:
                    continue
                sample = self._decode(f"{url}#{key}", members, generator)
                if sample is not None:
                    yield sample

    def _shard_samples(self, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        process, completed = None, False
        try:
            stream, process = _open_shard(url)
            with stream:
                yield from self._complete_samples(url, _tar_members(stream))
            completed = True
        except _SHARD_ERRORS as err:
            logger.warning("WebDataset shard %s: %s", url, err)
            self.skipped.add(UNREADABLE_SHARD, url)
        finally:
            if process is not None:
                if not completed:
                    process.kill()  # the consumer stopped early (or the stream failed): don't wait on a full pipe
                if process.wait() != 0 and completed:
                    logger.warning("WebDataset shard %s: command exited with status %s", url, process.returncode)
                    self.skipped.add(UNREADABLE_SHARD, url)

    def _complete_samples(self, url: str, members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict]]:
        """:func:`group_samples` that survives a shard cut off mid-way: the samples read in full before the cut are
        kept, the one the cut falls in is counted as a truncated sample, and the shard as a truncated shard."""
        cuts: list[_CutShard] = []

        def until_cut() -> Iterator[tuple[str, bytes]]:
            try:
                yield from members
            except _CutShard as cut:
                cuts.append(cut)

        for key, sample in group_samples(until_cut()):
            # Only the last group can follow a cut; it lost a member when the cut fell inside it. A cut between
            # headers leaves no trace of a further member, so that group is taken as complete.
            if cuts and cuts[0].member is not None and _split_member_name(cuts[0].member)[0] == key:
                continue
            yield key, sample
        if cuts:
            logger.warning("WebDataset shard %s is cut off: %s", url, cuts[0])
            self.skipped.add(TRUNCATED_SHARD, url)
            cut_key = _split_member_name(cuts[0].member)[0] if cuts[0].member else None
            if cut_key is not None:
                self.skipped.add(TRUNCATED_SAMPLE, f"{url}#{cut_key}")

    def _shuffled(self, samples: Iterator[Sample], epoch: int, reader: int) -> Iterator[Sample]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        rng = random.Random(derived_seed(self.seed, epoch, reader, "buffer"))
        buffer: list[Sample] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, key: str, members: dict[str, bytes], generator: torch.Generator) -> Sample | None:
        caption, reason = self._caption(members)
        if reason is None:
            caption, reason = check_caption(caption)
        if reason is not None:
            self.skipped.add(reason, key)
            return None
        extension = next((ext for ext in self.image_keys if ext in members), None)
        if extension is None:
            self.skipped.add(MISSING_IMAGE, key)
            return None
        image = open_image(members[extension])
        try:
            pixels = self.transform(image, generator) if image is not None else None
        except IMAGE_ERRORS:  # an image mode PIL cannot convert is as unusable as a corrupt file
            pixels = None
        if pixels is None:
            self.skipped.add(UNREADABLE_IMAGE, key)
            return None
        return {"pixel_values": pixels, "caption": choose_caption(caption, generator)}

    def _caption(self, members: dict[str, bytes]) -> tuple[Any, str | None]:
        extension = self.caption_key or "txt"
        if extension in members:
            try:
                return members[extension].decode("utf-8-sig"), None
            except UnicodeDecodeError:
                return None, UNREADABLE_CAPTION
        if "json" not in members:
            return None, MISSING_CAPTION
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, UNREADABLE_CAPTION
        fields = (self.caption_key,) if self.caption_key else ("caption", "text")
        if not isinstance(meta, dict) or not any(field in meta for field in fields):
            return None, MISSING_CAPTION
        return next(meta[field] for field in fields if field in meta), None


def _rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size
