"""Where and how fast a loaded model runs: device, precision, compiled UNet and VAE decoder.

The defaults are the fastest correct ones per device: CUDA when present; half precision (bf16 where supported, else
fp16) on CUDA and float32 on the CPU; compiled networks on CUDA (``torch.compile`` with fixed shapes, CUDA graphs,
channels-last), eager on the CPU unless asked (a one-off compile of under a minute per shape pays only for many
images). The VAE stays in float32 in fp16 where its config asks for it (SD's VAE overflows in fp16; bf16 does not).

Compiled on the CPU means AOTInductor packages of the UNet's forward and the VAE's decode, one per input shape
(:mod:`lcm.models.aot`): no guards and no Python inside a call. Compilation is paid once per architecture and shape:
packages live in ``$LCM_CACHE/aot`` (weights not included, so every model of an architecture shares them) and
Inductor's CUDA caches in ``$LCM_CACHE/inductor``; a second process starts from them instead of compiling again.
"""

from __future__ import annotations

import os

import torch

from lcm.config.run import Compile
from lcm.locations import cache_dir
from lcm.models.aot import compile_forward
from lcm.models.latent_diffusion import network_device, network_dtype

__all__ = [
    "DTYPES",
    "Compile",
    "compiled_forwards",
    "cpu_compiler",
    "default_device",
    "default_dtype",
    "optimize",
    "parse_device",
    "parse_dtype",
    "use_compile_cache",
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(name: str | None) -> torch.device:
    """``None`` → the default device; refuse one that is not there in one line."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r} (cpu, cuda, cuda:1, …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU half precision is slower than float32 for these networks


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def cpu_compiler() -> str | None:
    """The C++ compiler Inductor builds CPU kernels with, or ``None`` where there is none (then nothing compiles)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:
        return None


def use_compile_cache() -> None:
    """Inductor's kernel and graph caches in ``$LCM_CACHE/inductor``, unless ``TORCHINDUCTOR_CACHE_DIR`` names another
    folder. Inductor writes its default folder (under /tmp) into the environment the first time anything asks for
    it, as loading a diffusers model does: that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given is None or os.path.abspath(given) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir("inductor"))


def _place(network, device: torch.device, dtype: torch.dtype) -> None:
    """``network.to(device, dtype)`` unless it is there already (diffusers' ``.to`` warns on every dtype cast)."""
    if (network_device(network), network_dtype(network)) != (device, dtype):
        network.to(device=device, dtype=dtype)


def optimize(model, device: torch.device, dtype: torch.dtype, compile: Compile = Compile.AUTO, build: bool = True):
    """Move ``model`` (a :class:`~lcm.models.latent_diffusion.LatentDiffusion`) to ``device`` / ``dtype`` and compile
    its UNet and VAE decoder in place; returns the model. Outputs equal the eager model's to the dtype's precision.

    ``build=False`` (CPU): compile nothing here, but run the packages another process puts in the cache as soon as
    they are there (:class:`~lcm.models.aot.FixedShapeForward`)."""
    # diffusers' rule: only fp16 overflows in SD's VAE; bf16 has float32's range
    upcast_vae = bool(model.vae.config.get("force_upcast", False)) and dtype == torch.float16
    _place(model.unet, device, dtype)
    _place(model.vae, device, torch.float32 if upcast_vae else dtype)
    if model.text_encoder is not None:
        model.text_encoder.to(device)
    if device.type == "cuda":
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    if not Compile(compile).enabled(device):
        return model
    if device.type == "cuda":  # CUDA graphs: a batch-1 call is launch-bound
        use_compile_cache()
        model.unet.compile(dynamic=False, mode="reduce-overhead")
        model.vae.decoder.compile(dynamic=False, mode="reduce-overhead")
        model.vae.post_quant_conv.compile(dynamic=False, mode="reduce-overhead")
    else:  # CPU: AOTInductor packages, no guards and no Python per call (lcm.models.aot)
        compile_forward(model.unet, "forward", "unet", build)  # the teacher samplers' call
        compile_forward(model.consistency_step, "forward", "lcm-step", build)  # an LCM's: UNet and boundary as one
        compile_forward(model.vae, "decode", "vae-decode", build)
    return model


def compiled_forwards(model) -> int:
    """How many (network, input signature) pairs of ``model`` run AOT-compiled packages now (CPU)."""
    from lcm.models.aot import FixedShapeForward

    forwards = (model.unet.forward, model.consistency_step.forward, model.vae.decode)
    return sum(f.compiled for f in forwards if isinstance(f, FixedShapeForward))
