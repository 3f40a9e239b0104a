"""A one-off cache of VAE latents and text embeddings, so that distillation spends no time on encoders.

``lcm cache`` runs a model's VAE encoder and text encoder over a dataset once and writes safetensors shards; passing
the cache folder as ``--data`` then trains from it (docs/design.md §8). What is stored, per sample:

- the VAE posterior's mean and standard deviation, already multiplied by the VAE's scaling factor, so each draw
  ``z0 = mean + std·ε`` is a fresh posterior sample, as the uncached path draws one per step;
- the text embeddings of its caption (hidden states, and SDXL's pooled embedding), stored once per distinct caption of
  a shard and referenced by index.

Augmentation policy: images are cached as the data source gives them with its crop (centre by default) and without
flips; random crops and flips cannot be cached and are refused with a cache. A cache records which model made it (a
fingerprint of the VAE encoder's weights and of the text encoder's empty-prompt embedding) and training refuses one
made by another model. Shards are written to a temporary name and renamed, and the manifest is rewritten after each
shard, so an interrupted ``lcm cache`` resumes at the first missing shard.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lcm.data.base import collate_skip_none
from lcm.locations import written

__all__ = ["CACHE_MANIFEST", "LatentCache", "is_latent_cache", "model_fingerprint", "write_latent_cache"]

CACHE_MANIFEST = "lcm_cache.json"
FORMAT = 1


def is_latent_cache(path: str | os.PathLike) -> bool:
    return (Path(path) / CACHE_MANIFEST).is_file()


def model_fingerprint(model) -> dict[str, Any]:
    """What must match between the model a cache was written with and the one training from it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.vae.encoder.state_dict().items()) + sorted(
        model.vae.quant_conv.state_dict().items() if model.vae.quant_conv is not None else []
    ):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    empty = model.encode_prompts([""])
    text = hashlib.sha256(empty.hidden_states.float().cpu().numpy().round(5).tobytes()).hexdigest()[:16]
    return {
        "vae_encoder": digest.hexdigest()[:16],
        "text_encoder": f"{model.text_encoder.name}:{text}",
        "scaling_factor": model.scaling_factor,
        **({"shift_factor": model.shift_factor} if model.shift_factor else {}),  # SD3's and Flux's VAEs
        "latent_shape": list(model.latent_shape),
    }


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / CACHE_MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / CACHE_MANIFEST} is not a readable latent-cache manifest ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder}: latent cache format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / (CACHE_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(folder / CACHE_MANIFEST)


def _batches_from(dataset: Dataset, batch_size: int, start_sample: int, num_workers: int) -> Iterator[dict]:
    indices = range(start_sample, len(dataset))
    subset = torch.utils.data.Subset(dataset, indices)
    yield from DataLoader(subset, batch_size=batch_size, collate_fn=collate_skip_none, num_workers=num_workers)


@torch.no_grad()
def write_latent_cache(
    model,
    dataset: Dataset,
    out: str | os.PathLike,
    description: dict[str, Any],
    shard_size: int = 1024,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every sample of the map-style ``dataset`` with ``model`` into ``out``; returns the manifest.

    ``shard_size`` must be a multiple of ``batch_size`` (a shard is a whole number of batches, so that a resumed
    run restarts at a batch boundary). ``description`` (model and data settings) is recorded and must be the same
    when resuming.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    if shard_size < 1 or batch_size < 1 or shard_size % batch_size:
        raise ValueError(f"--shard-size ({shard_size}) must be a positive multiple of --batch-size ({batch_size})")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(model)
    base = {"format": FORMAT, "fingerprint": fingerprint, "description": description, "shard_size": shard_size}
    if is_latent_cache(folder):
        manifest = _read_manifest(folder)
        old = {k: manifest.get(k) for k in base}
        if old != json.loads(json.dumps(base)):
            raise ValueError(f"{folder} holds a cache of another model or data; give an empty --out")
    else:
        manifest = {**base, "shards": [], "samples": 0, "skipped": 0, "complete": False}
    if manifest["complete"]:
        return manifest

    done_samples = len(manifest["shards"]) * shard_size  # dataset positions consumed by the finished shards
    bar = tqdm(total=len(dataset), initial=done_samples, desc="cache", unit="img", disable=not progress)
    pending: list[dict[str, torch.Tensor | list[str]]] = []
    pending_inputs = 0

    def flush() -> None:
        nonlocal pending, pending_inputs
        if not pending_inputs:
            return
        shard = len(manifest["shards"])
        tensors, captions = _pack(pending)
        tmp = folder / (_shard_name(shard) + ".tmp")
        with written(folder / _shard_name(shard), cleanup=tmp):
            save_file(tensors, str(tmp), metadata={"captions": json.dumps(captions)})
        tmp.replace(folder / _shard_name(shard))
        count = int(tensors["text_index"].shape[0])
        manifest["shards"].append({"file": _shard_name(shard), "samples": count})
        manifest["samples"] += count
        manifest["skipped"] += pending_inputs - count
        _write_manifest(folder, manifest)
        pending, pending_inputs = [], 0

    position = done_samples
    for batch in _batches_from(dataset, batch_size, done_samples, num_workers):
        inputs = min(batch_size, len(dataset) - position)  # dataset items behind this batch, unreadable ones included
        if batch is not None:
            pending.append(_encode(model, batch))
        pending_inputs += inputs
        position += inputs
        bar.update(inputs)
        if pending_inputs >= shard_size:
            flush()
    flush()
    bar.close()
    manifest["complete"] = True
    _write_manifest(folder, manifest)
    return manifest


def _encode(model, batch: dict) -> dict[str, Any]:
    dist = model.vae.encode(batch["pixel_values"].to(model.device, model.vae.dtype)).latent_dist
    scale = model.scaling_factor
    captions = list(batch["caption"])
    distinct = list(dict.fromkeys(captions))
    text = model.encode_prompts(distinct)
    return {
        "mean": ((dist.mean.float() - model.shift_factor) * scale).cpu(),
        "std": (dist.std.float() * scale).cpu(),
        "captions": captions,
        "distinct": distinct,
        "hidden_states": text.hidden_states.cpu(),
        "pooled": None if text.pooled is None else text.pooled.cpu(),
    }


def _pack(parts: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One shard's tensors: per sample mean/std/text index, per distinct caption of the shard its embeddings."""
    table: dict[str, int] = {}
    hidden, pooled, index = [], [], []
    for part in parts:
        for j, caption in enumerate(part["distinct"]):
            if caption not in table:
                table[caption] = len(table)
                hidden.append(part["hidden_states"][j])
                if part["pooled"] is not None:
                    pooled.append(part["pooled"][j])
        index += [table[c] for c in part["captions"]]
    tensors = {
        "mean": torch.cat([p["mean"] for p in parts]).contiguous(),
        "std": torch.cat([p["std"] for p in parts]).contiguous(),
        "text_index": torch.tensor(index, dtype=torch.int64),
        "hidden_states": torch.stack(hidden).contiguous(),
    }
    if pooled:
        tensors["pooled"] = torch.stack(pooled).contiguous()
    return tensors, list(table)


class LatentCache(Dataset):
    """A finished cache as a map-style dataset of ``{"latent_mean", "latent_std", "hidden_states", ["pooled"],
    "caption"}`` samples. Shards are memory-mapped; nothing is read until a sample is asked for."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        if not self.manifest.get("complete"):
            raise ValueError(f"{self.folder}: the cache is incomplete; run lcm cache again with the same flags")
        counts = [int(s["samples"]) for s in self.manifest["shards"]]
        self.starts = torch.tensor([0, *counts]).cumsum(0).tolist()
        self._open: dict[int, tuple[Any, list[str], torch.Tensor]] = {}
        self.skipped = None  # the unreadable images were skipped (and counted) when the cache was written
        for k, count in enumerate(counts):  # every shard whole and as the manifest says, before training starts
            if len(self._shard(k)[2]) != count:
                raise ValueError(self._damaged(k, f"{len(self._shard(k)[2])} samples, the manifest says {count}"))

    def __len__(self) -> int:
        return self.starts[-1]

    def check_model(self, model) -> None:
        """Refuse a cache written with another VAE or text encoder than ``model``'s."""
        recorded, actual = self.manifest["fingerprint"], model_fingerprint(model)
        for key, value in actual.items():
            if recorded.get(key) != value:
                raise ValueError(
                    f"{self.folder} was cached with another model ({key}: {recorded.get(key)} here, {value} for "
                    f"{model.source}); run lcm cache with this model"
                )

    def _damaged(self, k: int, reason: str) -> str:
        name = self.manifest["shards"][k]["file"]
        return (
            f"latent cache {self.folder}: shard {name} is damaged ({reason}); delete the folder and run lcm cache again"
        )

    def _shard(self, k: int):
        if k not in self._open:
            from safetensors import SafetensorError, safe_open

            try:
                handle = safe_open(str(self.folder / self.manifest["shards"][k]["file"]), framework="pt")
                captions = json.loads(handle.metadata()["captions"])
                self._open[k] = (handle, captions, handle.get_tensor("text_index"))
            except (OSError, SafetensorError, KeyError, TypeError, ValueError) as err:
                raise ValueError(self._damaged(k, " ".join(str(err).split())[:160] or type(err).__name__)) from None
        return self._open[k]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        handle, captions, text_index = self._shard(k)
        j = i - self.starts[k]
        t = int(text_index[j])
        sample = {
            "latent_mean": handle.get_slice("mean")[j],
            "latent_std": handle.get_slice("std")[j],
            "hidden_states": handle.get_slice("hidden_states")[t],
            "caption": captions[t],
        }
        if "pooled" in handle.keys():
            sample["pooled"] = handle.get_slice("pooled")[t]
        return sample

    def __getstate__(self):  # DataLoader workers open their own memory maps
        return {**self.__dict__, "_open": {}}
