"""The flow-matching transformers as the maths sees them (docs/design.md §15): one call of SD3's MMDiT or of Flux's
transformer on latents ``[B, C, h, w]``, exactly as their diffusers pipelines call them, and what else differs from
a UNet (Flux's packed 2×2 patches, its noise layout, a config without a sample size)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lcm.models.formats import guidance_input, is_flux_network
from lcm.models.text import TextEmbeddings

__all__ = ["flux_pack", "flux_unpack", "randn_in_layout", "sample_size", "transformer_class", "transformer_output"]

SUPPORTED = ("SD3Transformer2DModel", "FluxTransformer2DModel")


def flux_pack(z: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → Flux's 2×2 patches ``[B, h/2·w/2, 4C]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def flux_unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flux's 2×2 patches ``[B, h/2·w/2, 4C]`` → ``[B, C, h, w]``."""
    b, _, c4 = packed.shape
    return packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def transformer_output(network, z, t, text: TextEmbeddings, w_input, dtype) -> torch.Tensor:
    """The velocity at ``t`` = 1000·σ (``[B]``) of SD3's MMDiT (pooled input: :meth:`TextEmbeddings.pooled_or_mean`;
    it takes no w) or of Flux's transformer: the latents packed with their (0, row, column) position ids, zero ids
    for the text tokens, the timestep as σ, and for a guidance-distilled model its guidance ``w_input`` = 1 + w."""
    pooled = text.pooled_or_mean().to(dtype)
    if not is_flux_network(network):
        if w_input is not None:
            raise ValueError("a flow-matching transformer takes no w-embedding: distil it at one guidance weight")
        timestep = t.to(device=z.device, dtype=torch.float32)
        states = text.hidden_states.to(dtype)
        return network(hidden_states=z.to(dtype), encoder_hidden_states=states, pooled_projections=pooled,
                       timestep=timestep).sample  # fmt: skip
    if guidance_input(network) and w_input is None:
        raise ValueError("this Flux transformer is guidance-distilled: it needs the guidance weight w")
    _, _, h, w = z.shape
    img_ids = torch.zeros(h // 2, w // 2, 3, device=z.device)
    img_ids[..., 1] += torch.arange(h // 2, device=z.device)[:, None]
    img_ids[..., 2] += torch.arange(w // 2, device=z.device)[None, :]
    out = network(
        hidden_states=flux_pack(z).to(dtype),
        encoder_hidden_states=text.hidden_states.to(dtype),
        pooled_projections=pooled,
        timestep=t.to(device=z.device, dtype=dtype) / 1000,
        img_ids=img_ids.reshape(-1, 3).to(dtype),
        txt_ids=torch.zeros(text.hidden_states.shape[1], 3, device=z.device, dtype=dtype),
        guidance=None if w_input is None else w_input.to(device=z.device, dtype=torch.float32),
    ).sample
    return flux_unpack(out, h, w)


def randn_in_layout(network, shape, generators: Sequence[torch.Generator], device=None, dtype=torch.float32):
    """Standard normal latents ``[B, C, h, w]``, image i from ``generators[i]``, drawn in the layout the network's
    pipeline draws them: Flux's scheduler steps see packed latents ``[1, h/2·w/2, 4C]``, so a re-noising drawn there
    is unpacked here; every other network draws ``[1, C, h, w]``."""
    from lcm.maths.sampling import randn_per_image

    if not is_flux_network(network):
        return randn_per_image(shape, generators, device or "cpu", dtype)
    b, c, h, w = shape
    return flux_unpack(randn_per_image((b, (h // 2) * (w // 2), 4 * c), generators, device or "cpu", dtype), h, w)


def sample_size(network, vae) -> int:
    """The native latent side: the network config's ``sample_size``, or for a network without one (Flux's
    transformer) the VAE's image size over its scale factor (Flux: 1024 / 8 = 128, its pipeline's default)."""
    size = getattr(network, "module", network).config.get("sample_size")
    if size is None:
        return int(vae.config.sample_size) // 2 ** (len(vae.config.block_out_channels) - 1)
    return max(size) if isinstance(size, list | tuple) else size


def transformer_class(path: str):
    """The diffusers class of a model folder's (or hub id's) ``transformer/``: SD3's MMDiT or Flux's."""
    import diffusers

    name = diffusers.SD3Transformer2DModel.load_config(path, subfolder="transformer").get("_class_name")
    if name not in SUPPORTED:
        raise ValueError(f"{path}/transformer is a {name}; {' and '.join(SUPPORTED)} are supported")
    return getattr(diffusers, name)
