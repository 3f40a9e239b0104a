"""LoRA files: the LCM-LoRA export and the loading of LoRA files made here or elsewhere.

The one file format written here is peft's key naming under diffusers' ``unet.`` prefix
(``unet.<module path>.lora_A.weight`` / ``.lora_B.weight``), which ``pipe.load_lora_weights`` loads without any key
conversion. The alpha/rank scale is folded into ``lora_B``, so a client that ignores alpha metadata (and assumes
alpha = rank) reads the same model.

Never mix key formats in one file: diffusers decides whether to convert a UNet LoRA state dict by looking at its
*first* key only, so a file whose first key is ``…proj_in.lora_A.weight`` and whose attention keys read
``…to_q.lora.down.weight`` (what ``convert_state_dict_to_diffusers`` makes of a peft state dict) silently loses every
attention adapter.

Files made elsewhere — diffusers' older ``lora.down`` / ``lora_linear_layer`` naming, kohya's
``lora_unet_…lora_down.weight`` + ``.alpha`` naming, peft naming — are read through diffusers' own converters and then
brought to peft naming as a whole before they reach the UNet.

A stack of LoRAs (:class:`LoraSpec`, ``FILE[:SCALE][:ROLE]``) is the LCM-LoRA paper's linear combination: every
adapted weight is W + Σ_i λ_i·ΔW_i (peft adapters active together, each at its scale). At most one of them is the
*accelerator*, the LCM-LoRA that makes the stack a few-step model (:func:`accelerator_of`); the others are style
LoRAs or other fine-tunes of the same base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lcm.locations import written
from lcm.models.formats import LORA_FILE, LORA_META, TUNE_RECORD, is_flow_network, is_sdxl, read_json_object

__all__ = [
    "LoraSpec",
    "accelerator_of",
    "adapted_modules",
    "apply_lora_file",
    "apply_lora_stack",
    "lora_state_dict",
    "read_lora_file",
    "write_lora_file",
]

UNET_PREFIX = "unet."
TRANSFORMER_PREFIX = "transformer."  # a flow MMDiT's adapters, as SD3's and Flux's load_lora_weights name them
ROLES = ("lcm", "style")  # the accelerator (an LCM-LoRA) or anything else stacked with it


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a stack: a file (or a folder holding ``pytorch_lora_weights.safetensors``), its scale λ and its
    role: "lcm" (the accelerator), "style", or None (read from the record beside it: see :func:`accelerator_of`)."""

    path: str
    scale: float = 1.0
    role: str | None = None

    @classmethod
    def parse(cls, text: str, default_scale: float = 1.0) -> LoraSpec:
        """``FILE[:SCALE][:ROLE]`` (``style.safetensors:0.8``, ``lcm-lora:1:lcm``); a path may hold colons."""
        path, scale, role = str(text), None, None
        head, _, tail = path.rpartition(":")
        if head and tail in ROLES:
            path, role = head, tail
        head, _, tail = path.rpartition(":")
        if head:
            try:
                scale = float(tail)
            except ValueError:
                pass  # a colon of the path itself
            else:
                path = head
        scale = default_scale if scale is None else scale
        if not math.isfinite(scale):
            raise ValueError(f"--lora {text}: the scale must be a finite number, got {scale}")
        if not path:
            raise ValueError(f"--lora {text}: no file given")
        return cls(path, scale, role)

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}" + (f":{self.role}" if self.role else "")

    @property
    def folder(self) -> Path:
        """The folder whose records describe this LoRA (itself, or the file's folder)."""
        path = Path(self.path).expanduser()
        return path if path.is_dir() else path.parent

    @property
    def record(self) -> dict | None:
        """The ``lcm_lora.json`` of an LCM-LoRA exported here, or None."""
        meta = self.folder / LORA_META
        return read_json_object(meta) if meta.is_file() else None


def accelerator_of(specs: Sequence[LoraSpec], base_is_lcm: bool) -> LoraSpec | None:
    """The LCM-LoRA of a stack. A LoRA's role is the one it is marked with, else its record's: an ``lcm_lora.json``
    (an LCM-LoRA exported by ``lcm distill``) or an ``lcm_tune.json`` (a style LoRA made by ``lcm tune``). Without a
    marked or recorded LCM-LoRA, the one LoRA of unknown role is taken for it (LCM-LoRA files made elsewhere carry no
    record); several of unknown role on a base that is not an LCM are ambiguous and refused in one line."""
    roles = [spec.role or _recorded_role(spec) for spec in specs]
    marked = [spec for spec, role in zip(specs, roles, strict=True) if role == "lcm"]
    if len(marked) > 1:
        names = ", ".join(s.path for s in marked)
        raise ValueError(f"--lora: {len(marked)} LCM-LoRAs ({names}); stack one accelerator with style LoRAs")
    if marked:
        return marked[0]
    unknown = [spec for spec, role in zip(specs, roles, strict=True) if role is None]
    if len(unknown) == 1:
        return unknown[0]
    if base_is_lcm or not unknown:
        return None
    raise ValueError(
        "--lora: several LoRAs and none is known as the LCM-LoRA (no lcm_lora.json beside it): mark it FILE:SCALE:lcm, "
        "or the others FILE:SCALE:style"
    )


def _recorded_role(spec: LoraSpec) -> str | None:
    if spec.record is not None:
        return "lcm"
    return "style" if (spec.folder / TUNE_RECORD).is_file() else None


def _adapter_name(unet) -> str:
    names = list(getattr(unet, "peft_config", {}) or {})
    if not names:
        raise ValueError("this UNet carries no LoRA adapter")
    return names[0]  # "default" when trained here, "default_0" when loaded by diffusers


def adapted_modules(unet, adapter: str | None = None) -> dict[str, torch.nn.Module]:
    """The modules of ``unet`` that carry a LoRA adapter (named as in ``unet.named_modules()``)."""
    from peft.tuners.lora import LoraLayer

    adapter = adapter or _adapter_name(unet)
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The LoRA of ``unet`` as ``{"<module>.lora_A.weight", "<module>.lora_B.weight"}``, scale folded into ``lora_B``.

    Keys are the module paths of ``unet.named_modules()`` (no prefix); :func:`write_lora_file` adds ``unet.``.
    """
    adapter = _adapter_name(unet)
    state = {}
    for name, module in adapted_modules(unet, adapter).items():
        a = module.lora_A[adapter].weight
        b = module.lora_B[adapter].weight * module.scaling[adapter]
        state[f"{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        state[f"{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    return state


def network_prefix(network) -> str:
    """The key prefix of a network's adapters in a LoRA file: ``transformer.`` for a flow MMDiT, else ``unet.``."""
    return TRANSFORMER_PREFIX if is_flow_network(network) else UNET_PREFIX


def write_lora_file(unet, folder: str | Path) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` in the format ``load_lora_weights`` reads completely."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = network_prefix(unet)
    state = {prefix + k: v for k, v in lora_state_dict(unet).items()}
    path = folder / LORA_FILE
    with written(path, cleanup=path):
        save_file(state, path, metadata={"format": "pt"})
    return path


def read_lora_file(
    path: str | Path, sdxl: bool = False, flow: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """A LoRA file (or a folder holding ``pytorch_lora_weights.safetensors``) in any naming diffusers converts →
    its UNet part in peft naming (keys ``unet.<module>.lora_A.weight``), and per-module alphas where the file has them.
    With ``flow``, a flow MMDiT's part (``transformer.<module>.lora_A.weight``, SD3's loader; no alphas).

    Text-encoder adapters in the file are not applied (the LCM-LoRAs adapt the UNet only): a one-line warning says so.
    """
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise ValueError(f"no LoRA file at {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are read from .safetensors only (pickled weights can run code)")
    pipeline = StableDiffusion3Pipeline if flow else StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    prefix = TRANSFORMER_PREFIX if flow else UNET_PREFIX
    try:
        state, alphas = (pipeline.lora_state_dict(str(path)), None) if flow else pipeline.lora_state_dict(str(path))
    except Exception as err:  # diffusers raises many kinds for a file that is not a LoRA
        raise ValueError(f"{path} is not a LoRA file diffusers can read: {err}") from None
    unet_state = {k: v for k, v in state.items() if k.startswith(prefix)}
    others = sorted({k.split(".", 1)[0] for k in state if not k.startswith(prefix)})
    if others:
        print(f"warning: {path.name}: LoRA weights for {', '.join(others)} are not applied ({prefix[:-1]} only)")
    if not unet_state:
        raise ValueError(f"{path} holds no {prefix[:-1]} LoRA weights")
    if flow:  # SD3's files are in peft naming already
        return unet_state, None
    # Convert every key (not just the first) to peft naming: lora.down / lora_linear_layer.down → lora_A.
    unet_state = convert_unet_state_dict_to_peft(
        {k.replace("lora_linear_layer.", "lora."): v for k, v in unet_state.items()}
    )
    if alphas is not None:
        alphas = {k: float(v) for k, v in alphas.items() if k.startswith(UNET_PREFIX)}
    return unet_state, alphas or None


def apply_lora_file(unet, path: str | Path) -> str:
    """Load the LoRA at ``path`` into ``unet`` as one more adapter (at scale 1; :func:`apply_lora_stack` sets the
    scales), refusing a file whose modules or shapes do not all fit. Returns the adapter's name, diffusers' own
    (``default_0`` for the first, ``default_1`` ...), as ``pipe.load_lora_weights`` would give it."""
    from diffusers.utils.peft_utils import get_adapter_name

    flow, prefix = is_flow_network(unet), network_prefix(unet)
    state, alphas = read_lora_file(path, sdxl=is_sdxl(unet), flow=flow)
    names = {n for n, _ in unet.named_modules()}
    wanted = {k[len(prefix) :].rsplit(".lora_", 1)[0] for k in state if ".lora_" in k}
    if missing := sorted(wanted - names):
        raise ValueError(f"{path}: {len(missing)} LoRA module(s) do not exist in this UNet, e.g. {missing[0]}")
    adapter_name = get_adapter_name(unet)
    try:
        unet.load_lora_adapter(state, network_alphas=alphas, adapter_name=adapter_name, prefix=prefix[:-1])
    except (RuntimeError, ValueError) as err:  # torch's size mismatch: a LoRA of another base model
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} does not fit this UNet (a LoRA for another base model?): {first}") from None
    loaded = adapted_modules(unet, adapter_name)
    if len(loaded) != len(wanted):  # the loader dropped some (a key format it did not recognise)
        raise ValueError(f"{path}: only {len(loaded)} of {len(wanted)} LoRA modules were applied")
    return adapter_name


def apply_lora_stack(unet, specs: Sequence[LoraSpec]) -> list[str]:
    """Load every LoRA of ``specs`` into ``unet`` (frozen), all active at their scales: each adapted weight acts as
    W + Σ_i λ_i·ΔW_i. Returns the adapters' names in the order of ``specs``."""
    names = [apply_lora_file(unet, spec.path) for spec in specs]
    if any(spec.scale != 1.0 for spec in specs) or len(names) > 1:
        unet.set_adapters(names, weights=[spec.scale for spec in specs])
    unet.requires_grad_(False)
    return names
