"""Export a distilled student in diffusers' formats (docs/design.md §2).

- Full student → a model folder whose ``unet/`` has ``time_cond_proj_dim`` and whose scheduler is ``LCMScheduler``;
  SD 1.x/2.x folders load with ``LatentConsistencyModelPipeline``, SDXL with ``StableDiffusionXLPipeline``; a flow
  student → ``transformer/`` and ``FlowMatchLCMScheduler`` (``StableDiffusion3Pipeline``).
- LoRA → ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights`` (plus ``lcm_lora.json`` naming the
  base model, so ``lcm sample --model`` works on the folder), or, with ``fuse=True``, a full LCM folder with the
  adapters merged into the UNet.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lcm.locations import written
from lcm.maths.consistency import SIGMA_DATA, TIMESTEP_SCALING
from lcm.models.formats import (
    DISTILL_RECORD,
    LORA_META,
    consistency_scheduler_config,
    is_flow_network,
    is_sdxl,
    w_input_dim,
)
from lcm.models.lora import write_lora_file

__all__ = ["export_lcm_folder", "export_lora", "export_model_folder", "local_model_folder", "network_folder"]

# Parts of a model folder that travel with an exported LCM (the UNet and scheduler are replaced).
COMPONENTS = (
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "safety_checker",
    "feature_extractor",
    "image_encoder",
)


def local_model_folder(source: str | Path) -> Path:
    """A local folder for ``source``: itself if it is one, else a snapshot of the hub repository."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))


def network_folder(network) -> str:
    """The subfolder a model folder keeps its network in: ``transformer`` for a flow MMDiT, ``unet`` otherwise."""
    return "transformer" if is_flow_network(network) else "unet"


def _write_model_index(source: Path, out: Path, sdxl: bool, w_conditioned: bool, scheduler: str) -> None:
    index_path = source / "model_index.json"
    if not index_path.is_file():
        return  # a bare folder (the embedded teacher): nothing to describe
    index = json.loads(index_path.read_text())
    if not sdxl and w_conditioned:  # LatentConsistencyModelPipeline always feeds the w-embedding
        index["_class_name"] = "LatentConsistencyModelPipeline"
        index.setdefault("requires_safety_checker", False)
    index["scheduler"] = ["diffusers", scheduler]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _record(provenance: dict, sigma_data: float, timestep_scaling: float) -> str:
    record = {**provenance, "consistency": {"sigma_data": sigma_data, "timestep_scaling": timestep_scaling}}
    return json.dumps(record, indent=2, default=str) + "\n"


def export_lcm_folder(
    source: str | Path,
    unet,
    scheduler_config: dict,
    num_solver_steps: int,
    out: str | Path,
    provenance: dict,
    *,
    sigma_data: float = SIGMA_DATA,
    timestep_scaling: float = TIMESTEP_SCALING,
) -> Path:
    """Write a complete LCM model folder: the source's components, the student ``unet`` (a flow MMDiT included) and
    its consistency scheduler (:func:`~lcm.models.formats.consistency_scheduler_config`).

    The consistency constants go into the record (and ``timestep_scaling`` into the LCMScheduler config, which
    diffusers reads; diffusers fixes sigma_data at 0.5).
    """
    import diffusers

    src, out = local_model_folder(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in COMPONENTS:
        if (src / name).is_dir() and src.resolve() != out.resolve():
            shutil.copytree(src / name, out / name, dirs_exist_ok=True)
    folder = network_folder(unet)
    with written(out / folder):
        unet.save_pretrained(out / folder, safe_serialization=True)
    config = consistency_scheduler_config(scheduler_config, num_solver_steps, timestep_scaling)
    getattr(diffusers, config["_class_name"]).from_config(config).save_config(out / "scheduler")
    _write_model_index(src, out, is_sdxl(unet), w_input_dim(unet) is not None, config["_class_name"])
    (out / DISTILL_RECORD).write_text(_record(provenance, sigma_data, timestep_scaling))
    return out


def export_model_folder(source: str | Path, unet, out: str | Path) -> Path:
    """Write a model folder that samples as ``source`` does (its components, scheduler and model index) with
    ``unet`` in its UNet's place: a fine-tune, or a base with style LoRAs fused in."""
    src, out = local_model_folder(source), Path(out)
    for name in (*COMPONENTS, "scheduler"):
        if (src / name).is_dir() and src.resolve() != out.resolve():
            shutil.copytree(src / name, out / name, dirs_exist_ok=True)
    if (src / "model_index.json").is_file():
        shutil.copy2(src / "model_index.json", out / "model_index.json")
    folder = network_folder(unet)
    with written(out / folder):
        unet.save_pretrained(out / folder, safe_serialization=True)
    return out


def export_lora(
    unet,
    base_model: str | Path,
    num_solver_steps: int,
    out: str | Path,
    provenance: dict,
    *,
    sigma_data: float = SIGMA_DATA,
    timestep_scaling: float = TIMESTEP_SCALING,
) -> Path:
    """Write the LoRA in the ``load_lora_weights`` format of :mod:`lcm.models.lora`, beside ``lcm_lora.json``."""
    out = Path(out)
    write_lora_file(unet, out)
    base = str(Path(base_model).resolve()) if Path(base_model).is_dir() else str(base_model)
    meta = {"base_model": base, "original_inference_steps": num_solver_steps, **provenance}
    (out / LORA_META).write_text(_record(meta, sigma_data, timestep_scaling))
    return out
