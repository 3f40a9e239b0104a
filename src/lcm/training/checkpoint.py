"""Training state as safetensors + JSON: nothing pickled, every tensor named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["latest_checkpoint", "load_training_state", "module_state", "restore_modules", "save_training_state"]


def module_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """State dicts of named modules as one flat ``{"name.param": tensor}`` dict."""
    return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}


def restore_modules(state: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module]) -> None:
    for name, module in modules.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            value = value.to(device)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    rng: torch.Generator | None = None,
) -> Path:
    """Write model tensors, optimiser state, RNG state and ``meta`` atomically into ``directory``."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if rng is not None:
        tensors["rng.generator"] = rng.get_state()
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)  # a crash mid-write leaves the previous checkpoint intact
    return directory


def load_training_state(
    directory: str | Path,
    optimizer: torch.optim.Optimizer | None = None,
    rng: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore optimiser and RNG states in place; return (model tensors, meta)."""
    directory = Path(directory)
    if not (directory / "state.safetensors").is_file():
        raise ValueError(f"{directory} is not a training checkpoint (no state.safetensors)")
    tensors = load_file(str(directory / "state.safetensors"))
    meta = json.loads((directory / "meta.json").read_text())
    if optimizer is not None and "optimizer" in meta:
        device = optimizer.param_groups[0]["params"][0].device
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"], device))
    torch.set_rng_state(tensors["rng.torch"])
    if rng is not None and "rng.generator" in tensors:
        rng.set_state(tensors["rng.generator"])
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}, meta


def latest_checkpoint(root: str | Path) -> Path | None:
    """The ``step-N`` folder with the largest N under ``root``, if any."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [(int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None
