"""``lcm merge``: LoRAs fused into a base model's UNet, written as a diffusers folder that loads without them.

The fused UNet's weights are W + Σ_i λ_i·ΔW_i over the stack (:mod:`lcm.models.lora`), as the stack computes it
when sampled with its adapters. With an LCM-LoRA in the stack (or an LCM as the base) the folder is an LCM: an
``LCMScheduler`` on the accelerator's skipping grid and a record carrying its w range and consistency constants,
so that ``lcm sample``, ``lcm eval`` and diffusers' pipelines sample it as the stack; otherwise the base's scheduler
is kept. A model card names the base and every LoRA (scale, role, SHA-256).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from lcm.models.export import export_lcm_folder, export_model_folder
from lcm.models.formats import LORA_FILE
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.lora import LoraSpec

__all__ = ["merge_loras"]


def _file(spec: LoraSpec) -> Path:
    path = Path(spec.path).expanduser()
    return path / LORA_FILE if path.is_dir() else path


def _provenance(base: str, loras: Sequence[LoraSpec], accelerator: LoraSpec | None) -> dict:
    listed = [
        {
            "path": spec.path,
            "scale": spec.scale,
            "role": "lcm" if spec is accelerator else "style",
            "sha256": hashlib.sha256(_file(spec).read_bytes()).hexdigest(),
        }
        for spec in loras
    ]
    record = (accelerator.record or {}) if accelerator is not None else {}
    distilled = {k: record[k] for k in ("lcd", "lcf") if k in record}  # the accelerator's w range
    return {"merged": {"base_model": base, "loras": listed}, **distilled}


def _card(base: str, provenance: dict, lcm: bool, num_solver_steps: int | None) -> str:
    rows = "\n".join(
        f"| `{item['path']}` | {item['scale']:g} | {item['role']} | `{item['sha256'][:16]}…` |"
        for item in provenance["merged"]["loras"]
    )
    how = (
        f"an LCM: `LCMScheduler` on the LCM-LoRA's skipping grid (N = {num_solver_steps}); sample it in 1-8 steps "
        "(`lcm sample --model FOLDER`, or diffusers' pipeline with the scheduler it names)"
        if lcm
        else "the base model's scheduler: sample it as the base"
    )
    return f"""# Merged model

The UNet of `{base}` with these LoRAs fused into its weights (W + Σ scale·ΔW, the linear combination of the
LCM-LoRA paper), written by `lcm merge`:

| LoRA | scale | role | SHA-256 |
| --- | ---: | --- | --- |
{rows}

Scheduler: {how}. Text-encoder adapters in the LoRA files, if any, are not merged (the UNet only).
"""


def merge_loras(base: str | Path, loras: Sequence[LoraSpec], out: str | Path) -> Path:
    """Write ``out``: ``base`` with ``loras`` fused into its UNet (see the module docstring); returns ``out``."""
    base, out = str(base), Path(out)
    if not loras:
        raise ValueError("lcm merge needs one or more --lora")
    model = LatentDiffusion.from_pretrained(base, with_text_encoder=False, loras=loras)
    unet = model.unet
    unet.fuse_lora(adapter_names=list(unet.peft_config))
    unet.unload_lora()
    provenance = _provenance(model.lora_base or base, model.loras, model.accelerator)
    source = model.lora_base or base
    if model.is_lcm:
        steps = int(model.scheduler_config["original_inference_steps"])
        export_lcm_folder(
            source, unet, model.scheduler_config, steps, out, provenance,
            sigma_data=model.sigma_data, timestep_scaling=model.timestep_scaling,
        )  # fmt: skip
    else:
        steps = None
        export_model_folder(source, unet, out)
        (out / "lcm_merge.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (out / "README.md").write_text(_card(source, provenance, model.is_lcm, steps))
    return out
