"""Facts about the file formats the project reads and writes, each decided in one place.

- :func:`w_input_dim`: does a UNet take the guidance embedding (``timestep_cond``), and of what size;
- :func:`is_sdxl`: SDXL's added conditioning (pooled text + time ids);
- the names of the files an export writes, and the ``LCMScheduler`` config of an exported LCM;
- :func:`read_record`: what an export recorded about its distillation (w range, consistency constants), read back
  when the model is loaded, so sampling uses the constants the model was trained with;
- :func:`read_json_object` / :func:`lora_base`: the records beside the weights, refused in one line when malformed;
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "ALLOW_PICKLE_ENV",
    "DISTILL_RECORD",
    "LORA_FILE",
    "LORA_META",
    "TUNE_RECORD",
    "consistency_scheduler_config",
    "flow_lcm_scheduler_config",
    "guidance_input",
    "is_flow_network",
    "is_flux_network",
    "is_sdxl",
    "lcm_scheduler_config",
    "lora_base",
    "read_json_object",
    "read_record",
    "samples_with_tcd",
    "safe_weights",
    "takes_w",
    "w_input_dim",
]

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
LORA_META = "lcm_lora.json"  # beside an exported LoRA: base model, skipping grid, distillation settings
DISTILL_RECORD = "lcm_distill.json"  # in an exported full LCM folder: the distillation settings
TUNE_RECORD = "lcm_tune.json"  # beside what lcm tune exports (a style LoRA or model): the base, data and settings
ALLOW_PICKLE_ENV = "LCM_ALLOW_PICKLE"  # "1": also load pickled weights (.bin / .pt); set by ``lcm --allow-pickle``


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in the file ``path``, or a one-line ``ValueError`` naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as err:
        raise ValueError(f"{path} is not a readable JSON file ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def lora_base(folder: str | Path) -> str:
    """The base model an exported LCM-LoRA folder names in its ``lcm_lora.json`` (which must be a full model: a
    LoRA whose base is a LoRA folder, itself included, is refused)."""
    path = Path(folder) / LORA_META
    base = read_json_object(path).get("base_model")
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{path} names no base_model (the model folder or hub id the LoRA applies to)")
    if (Path(base).expanduser() / LORA_META).is_file():
        raise ValueError(f"{path}: base_model {base} is itself a LoRA folder; it must name a full model")
    return base


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def safe_weights(what: str, load):
    """``load(use_safetensors=...)``, refusing pickled weights (which can run code) unless the user allowed them.

    A failure is one line that says what is wrong with the folder ``what``: weights that are there but unreadable
    (truncated, damaged), no weights at all, or only pickled ones (and how to proceed).
    """
    allowed = os.environ.get(ALLOW_PICKLE_ENV) == "1"
    try:
        return load(use_safetensors=None if allowed else True)
    except (OSError, ValueError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        folder = Path(what)
        if not folder.is_dir():
            raise ValueError(f"{what}: {first}") from None
        files = [p for p in folder.iterdir() if p.is_file()]
        weights = sorted(p.name for p in files if p.suffix == ".safetensors")
        if weights:
            raise ValueError(
                f"{what}: its weights ({', '.join(weights)}) cannot be read, the file is damaged or cut short "
                f"({first[:120]}); export or download it again"
            ) from None
        if not allowed and any(p.suffix in PICKLED for p in files):
            raise ValueError(
                f"{what} has no .safetensors weights; pickled weights can run code when loaded: convert them to "
                "safetensors, or pass lcm --allow-pickle if you trust their source"
            ) from None
        raise ValueError(f"{what} holds no weights file (.safetensors)") from None


def w_input_dim(unet) -> int | None:
    """The size of the UNet's w-embedding input (``time_cond_proj_dim``), or None when it takes no w."""
    unet = getattr(unet, "module", unet)  # a distributed wrapper
    dim = unet.config.get("time_cond_proj_dim")
    return None if dim is None else int(dim)


def is_sdxl(unet) -> bool:
    """SDXL's UNet: conditioned on pooled text embeddings and (size, crop) time ids besides the token states."""
    return getattr(unet, "module", unet).config.get("addition_embed_type") == "text_time"


def is_flow_network(network) -> bool:
    """A flow-matching transformer (SD3's MMDiT, ``SD3Transformer2DModel``): joint text-image attention, called with
    ``hidden_states``, ``encoder_hidden_states``, ``pooled_projections`` and ``timestep`` = 1000·σ."""
    return getattr(network, "module", network).config.get("joint_attention_dim") is not None


def is_flux_network(network) -> bool:
    """Flux's transformer (``FluxTransformer2DModel``): packed 2×2 latent patches with rotary position ids, the
    timestep as σ, a guidance input when it is guidance-distilled."""
    return getattr(network, "module", network).config.get("axes_dims_rope") is not None


def guidance_input(network) -> bool:
    """A guidance-distilled transformer (Flux-dev's ``guidance_embeds``): w enters as the guidance scale 1 + w, one
    call, no classifier-free guidance."""
    return is_flux_network(network) and bool(getattr(network, "module", network).config.get("guidance_embeds"))


def takes_w(network) -> bool:
    """The network takes the guidance weight as an input: a w-conditioned UNet's embedding, or Flux's guidance."""
    return w_input_dim(network) is not None or guidance_input(network)


def flow_lcm_scheduler_config(teacher_config: dict[str, Any]) -> dict[str, Any]:
    """A flow teacher's schedule as a ``FlowMatchLCMScheduler`` config (its shift and dynamic-shift settings kept):
    what an exported flow LCM samples with in diffusers."""
    from diffusers import FlowMatchLCMScheduler

    keep = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift")
    keep += ("base_image_seq_len", "max_image_seq_len", "time_shift_type")
    config = {k: v for k, v in teacher_config.items() if k in keep}
    return {**FlowMatchLCMScheduler.from_config(config).config, "_class_name": "FlowMatchLCMScheduler"}


def consistency_scheduler_config(
    teacher_config: dict[str, Any], num_solver_steps: int, timestep_scaling: float | None = None
) -> dict[str, Any]:
    """The scheduler config a distilled model samples with in diffusers: ``FlowMatchLCMScheduler`` for a flow
    teacher's schedule, ``LCMScheduler`` (:func:`lcm_scheduler_config`) otherwise."""
    if str(teacher_config.get("_class_name", "")).startswith("FlowMatch"):
        return flow_lcm_scheduler_config(teacher_config)
    return lcm_scheduler_config(teacher_config, num_solver_steps, timestep_scaling)


def lcm_scheduler_config(
    teacher_config: dict[str, Any], num_solver_steps: int, timestep_scaling: float | None = None
) -> dict[str, Any]:
    """The teacher's schedule as an ``LCMScheduler`` config whose ``original_inference_steps`` is the skipping grid
    (and whose ``timestep_scaling`` is the one distilled with, when given)."""
    from diffusers import LCMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    keep += ("rescale_betas_zero_snr", "clip_sample", "set_alpha_to_one", "steps_offset", "timestep_spacing")
    keep += ("timestep_scaling",)
    config = {k: v for k, v in teacher_config.items() if k in keep}
    config["original_inference_steps"] = num_solver_steps
    if timestep_scaling is not None:
        config["timestep_scaling"] = float(timestep_scaling)
    return {**LCMScheduler.from_config(config).config, "_class_name": "LCMScheduler"}


def samples_with_tcd(consistency: str, phases: int) -> bool:
    """Whether a model distilled with ``--method consistency`` (and PCM's ``phases``) samples with TCD's sampler:
    TCD models, and PCM models of more than one phase (deterministic at the edges); the rest with the LCM's."""
    return consistency == "tcd" or (consistency == "pcm" and phases > 1)


def read_record(folder: str | Path) -> dict[str, Any]:
    """The distillation / fine-tuning record of an exported model folder (empty for any other folder).

    Returns ``{"w_range": (low, high) | None, "sigma_data": float | None, "timestep_scaling": float | None,
    "consistency": "lcm" | "tcd" | "pcm", "phases": int, "cfg_free": bool}``. The w range is the LCD range, or LCF's
    single w for a model last fine-tuned without a teacher; ``consistency`` and ``phases`` say which sampler the model
    was trained for, ``cfg_free`` that it samples with real classifier-free guidance at w.
    """
    folder = Path(folder)
    for name in (DISTILL_RECORD, LORA_META):
        if (folder / name).is_file():
            record = read_json_object(folder / name)
            break
    else:
        return {
            "w_range": None,
            "sigma_data": None,
            "timestep_scaling": None,
            "consistency": "lcm",
            "phases": 1,
            "cfg_free": False,
        }
    lcd, lcf = record.get("lcd") or {}, record.get("lcf") or {}
    settings = record.get("consistency") or lcf or lcd
    if lcf and lcf.get("w") is not None:
        w_range = (float(lcf["w"]), float(lcf["w"]))
    elif "w_min" in lcd and "w_max" in lcd:
        w_range = (float(lcd["w_min"]), float(lcd["w_max"]))
    else:
        w_range = None
    return {
        "w_range": w_range,
        "sigma_data": settings.get("sigma_data"),
        "timestep_scaling": settings.get("timestep_scaling"),
        "consistency": str(lcd.get("consistency", "lcm")),
        "phases": int(lcd.get("phases", 1)),
        "cfg_free": bool(lcd.get("cfg_free", False)),
    }
