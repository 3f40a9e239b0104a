"""Export a distilled student in diffusers' formats (SPEC §2).

- Full student → a model folder whose ``unet/`` has ``time_cond_proj_dim`` and whose scheduler is ``LCMScheduler``;
  SD 1.x/2.x folders load with ``LatentConsistencyModelPipeline``, SDXL with ``StableDiffusionXLPipeline``.
- LoRA → ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights`` (plus ``lcm_lora.json`` naming the
  base model, so ``lcm sample --model`` works on the folder), or, with ``fuse=True``, a full LCM folder with the
  adapters merged into the UNet.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .lora import LORA_FILE, write_lora_file

__all__ = ["LORA_FILE", "LORA_META", "export_lcm_folder", "export_lora", "local_model_folder"]

LORA_META = "lcm_lora.json"
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


def lcm_scheduler_config(teacher_config: dict[str, Any], num_solver_steps: int) -> dict[str, Any]:
    """The teacher's schedule as an ``LCMScheduler`` config whose ``original_inference_steps`` is the skipping grid."""
    from diffusers import LCMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    keep += ("rescale_betas_zero_snr", "clip_sample", "set_alpha_to_one", "steps_offset", "timestep_spacing")
    config = {k: v for k, v in teacher_config.items() if k in keep}
    config["original_inference_steps"] = num_solver_steps
    return {**LCMScheduler.from_config(config).config, "_class_name": "LCMScheduler"}


def _write_model_index(source: Path, out: Path, sdxl: bool, w_conditioned: bool) -> None:
    index_path = source / "model_index.json"
    if not index_path.is_file():
        return  # a bare folder (the embedded teacher): nothing to describe
    index = json.loads(index_path.read_text())
    if not sdxl and w_conditioned:  # LatentConsistencyModelPipeline always feeds the w-embedding
        index["_class_name"] = "LatentConsistencyModelPipeline"
        index.setdefault("requires_safety_checker", False)
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_lcm_folder(
    source: str | Path, unet, scheduler_config: dict, num_solver_steps: int, out: str | Path, provenance: dict
) -> Path:
    """Write a complete LCM model folder: the source's components, the student ``unet`` and an LCMScheduler."""
    from diffusers import LCMScheduler

    src, out = local_model_folder(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in COMPONENTS:
        if (src / name).is_dir() and src.resolve() != out.resolve():
            shutil.copytree(src / name, out / name, dirs_exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    LCMScheduler.from_config(lcm_scheduler_config(scheduler_config, num_solver_steps)).save_config(out / "scheduler")
    sdxl = unet.config.get("addition_embed_type") == "text_time"
    _write_model_index(src, out, sdxl, unet.config.get("time_cond_proj_dim") is not None)
    (out / "lcm_distill.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return out


def export_lora(unet, base_model: str | Path, num_solver_steps: int, out: str | Path, provenance: dict) -> Path:
    """Write the LoRA in diffusers' ``load_lora_weights`` format (see :mod:`lcm.lora`), beside ``lcm_lora.json``."""
    out = Path(out)
    write_lora_file(unet, out)
    base = str(Path(base_model).resolve()) if Path(base_model).is_dir() else str(base_model)
    meta = {"base_model": base, "original_inference_steps": num_solver_steps, **provenance}
    (out / LORA_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out
