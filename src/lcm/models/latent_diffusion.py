"""A diffusers-format latent diffusion model behind one interface (teacher, student or LCM alike).

A folder (or hub id) with ``unet/`` (or a flow-matching ``transformer/``), ``vae/``, ``scheduler/`` and a text
encoder — a Stable Diffusion checkpoint, an SD3-class flow model or an embedded Fashion-MNIST teacher, loaded by the
same code; the network is :attr:`LatentDiffusion.unet` whatever its class. The model turns into the callables the
maths expects: :meth:`denoiser` / :meth:`guided_denoiser` for the solvers and teacher samplers,
:meth:`consistency_fn` for LCMs. Every method runs the model's own network; :meth:`LatentDiffusion.with_network`
makes the same model around another one (a student, its EMA target, a wrapped copy), so training, validation and
sampling share one code path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lcm.config.sampling import DEFAULT_GAMMA, DISTILLED_STEPS, TEACHER_STEPS
from lcm.limits import MAX_IMAGE_SIDE
from lcm.locations import hub_unavailable, local_path_or_none
from lcm.maths.consistency import (
    SIGMA_DATA,
    TIMESTEP_SCALING,
    boundary_scalings,
    boundary_scalings_at,
    consistency_function,
)
from lcm.maths.guidance import cached_w_embedding, cfg_combine, default_w
from lcm.maths.parameterization import Denoised, PredictionType, to_denoised
from lcm.maths.schedule import schedule_from_config
from lcm.maths.timesteps import DEFAULT_NUM_SOLVER_STEPS, Sampler
from lcm.models.consistency_step import ConsistencyStep
from lcm.models.formats import (
    LORA_META,
    consistency_scheduler_config,
    guidance_input,
    is_flow_network,
    is_flux_network,
    is_sdxl,
    lora_base,
    read_record,
    safe_weights,
    takes_w,
    w_input_dim,
)
from lcm.models.lora import LoraSpec
from lcm.models.text import (
    EMBEDDED_ENCODER,
    PromptCache,
    TextEmbeddings,
    TextEncoder,
    is_packaged_encoder,
    load_text_encoder,
)
from lcm.models.transformers import randn_in_layout, sample_size, transformer_class, transformer_output

__all__ = ["ConsistencyStep", "LatentDiffusion", "network_device", "network_dtype"]


# diffusers' ``.dtype`` and ``.device`` walk every submodule on each call (its group-offloading check): about 1.5 ms
# for the embedded UNet, more than a compiled call of it. These read the first parameter instead.
def network_dtype(network) -> torch.dtype:
    """The dtype a network computes in: that of its first floating-point parameter."""
    network = getattr(network, "module", network)  # a distributed wrapper
    return next(p.dtype for p in network.parameters() if p.is_floating_point())


def network_device(network) -> torch.device:
    """The device a network's parameters live on."""
    network = getattr(network, "module", network)
    return next(network.parameters()).device


@dataclass(eq=False)
class LatentDiffusion:
    unet: Any  # diffusers UNet2DConditionModel, or SD3Transformer2DModel for a flow-matching model
    vae: Any  # diffusers AutoencoderKL
    scheduler_config: dict
    text_encoder: TextEncoder | None
    source: str | None = None  # where it was loaded from (folder or hub id)
    lora_base: str | None = None  # for a loaded LCM-LoRA: its base model (``source`` is the LoRA folder)
    loras: tuple[LoraSpec, ...] = ()  # the LoRAs stacked on the UNet
    accelerator: LoraSpec | None = None  # the LCM-LoRA among them
    # What an exported LCM recorded about its distillation (read back by ``from_pretrained``):
    w_range: tuple[float, float] | None = None  # the guidance weights it was distilled on
    sigma_data: float = SIGMA_DATA  # consistency constants (docs/design.md §2)
    timestep_scaling: float = TIMESTEP_SCALING
    consistency: str = "lcm"  # what it was distilled for: lcm, tcd or pcm (its default sampler)
    phases: int = 1  # PCM's
    cfg_free: bool = False  # distilled CFG-free: sampled with real classifier-free guidance at w
    # An inpainting UNet's extra input, [B, 1 + C, h, w]: the latent-size mask and the masked image's latents, put
    # beside z on the channel axis at every call (:meth:`with_inpaint_condition`); None for a text-to-image UNet.
    inpaint_condition: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.schedule = schedule_from_config(self.scheduler_config)
        if self.schedule.is_flow:
            self.prediction_type = PredictionType.FLOW
        else:
            self.prediction_type = PredictionType.parse(self.scheduler_config.get("prediction_type", "epsilon"))
        self.prompt_cache = PromptCache(self._encode)
        self._step: ConsistencyStep | None = None
        self._step_coefficients: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        with_text_encoder: bool = True,
        loras: Sequence[LoraSpec] = (),
    ) -> LatentDiffusion:
        """Load a model folder or hub id; a folder holding an exported LCM-LoRA loads its base model plus the LoRA.

        ``loras``: LoRA files (or folders) made here or elsewhere (diffusers', kohya's or peft's naming) stacked on
        the UNet, each at its scale (:func:`lcm.models.lora.apply_lora_stack`). When one of them is an LCM-LoRA
        (:func:`lcm.models.lora.accelerator_of`) the model samples as an LCM, on the skipping grid of its
        ``lcm_lora.json`` when it has one, else LCM-LoRA's N = 50.
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        path, loras = str(path), tuple(loras)
        if (Path(path) / LORA_META).is_file():  # an exported LCM-LoRA: its base, the LoRA and any others given
            base = lora_base(path)
            model = cls.from_pretrained(base, device, with_text_encoder, (LoraSpec(path, 1.0, "lcm"), *loras))
            model.source = path
            return model
        if loras:
            model = cls.from_pretrained(path, device, with_text_encoder)
            model._stack_loras(loras)
            model.lora_base = path
            return model
        local = local_path_or_none(path, owner_required=True)
        if local is not None and not local.is_dir():
            raise ValueError(f"no model folder at {path} (and it is not a hub id of the form owner/name)")
        flow = local is not None and (local / "transformer").is_dir() and not (local / "unet").is_dir()
        if local is not None and not flow and not (local / "unet").is_dir():
            raise ValueError(f"{path} is not a diffusers model folder: it has no unet/ or transformer/ subfolder")
        if local is None and (reason := hub_unavailable(path, "unet/config.json")):
            if hub_unavailable(path, "transformer/config.json"):
                raise ValueError(f"{path} is not a local folder, and {reason}: give a local model folder")
            flow = True
        network_class, folder = (transformer_class(path), "transformer") if flow else (UNet2DConditionModel, "unet")
        unet = safe_weights(
            f"{path}/{folder}", lambda **kw: network_class.from_pretrained(path, subfolder=folder, **kw)
        )
        vae = safe_weights(f"{path}/vae", lambda **kw: AutoencoderKL.from_pretrained(path, subfolder="vae", **kw))
        side = sample_size(unet, vae) * 2 ** (len(vae.config.block_out_channels) - 1)
        if not isinstance(side, int) or not 1 <= side <= MAX_IMAGE_SIDE:
            raise ValueError(
                f"{path}: its {folder}/config.json sample_size makes {side}-pixel images; at most {MAX_IMAGE_SIDE} "
                "are supported"
            )
        unet, vae = (m.to(device).eval().requires_grad_(False) for m in (unet, vae))
        scheduler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler"))
        text_encoder = load_text_encoder(path).to(device) if with_text_encoder else None
        model = cls(unet, vae, scheduler_config, text_encoder, source=path)
        if local is not None:
            model._read_record(local)
        return model

    def _stack_loras(self, loras: tuple[LoraSpec, ...]) -> None:
        """Apply ``loras`` to the UNet; an LCM-LoRA among them makes this model an LCM (its grid, its record)."""
        from lcm.models.lora import accelerator_of, apply_lora_stack

        accelerator = accelerator_of(loras, self.is_lcm)
        apply_lora_stack(self.unet, loras)
        self.loras, self.accelerator = loras, accelerator
        if accelerator is None:
            return
        if not self.is_lcm:  # LCM-LoRA's skipping grid is the default N unless the LoRA's record says otherwise
            original = int((accelerator.record or {}).get("original_inference_steps", DEFAULT_NUM_SOLVER_STEPS))
            self.scheduler_config = consistency_scheduler_config(self.scheduler_config, original)
            self.__post_init__()
        self._read_record(accelerator.folder)

    def _read_record(self, folder: Path) -> None:
        """Take the w range and consistency constants an export recorded (docs/design.md §4)."""
        record = read_record(folder)
        if record["w_range"] is not None or record["consistency"] != "lcm":
            self.consistency, self.phases, self.cfg_free = record["consistency"], record["phases"], record["cfg_free"]
        if not self.cfg_free:  # a CFG-free model's w is its teacher's guidance: the family's usual default
            self.w_range = record["w_range"] or self.w_range
        self.sigma_data = float(record["sigma_data"] or self.sigma_data)
        scaling = record["timestep_scaling"] or self.scheduler_config.get("timestep_scaling")
        self.timestep_scaling = float(scaling or self.timestep_scaling)

    # --- properties -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return network_device(self.unet)

    @property
    def is_lcm(self) -> bool:
        """A distilled LCM: its UNet takes the w-embedding, or its scheduler is an LCMScheduler (a flow LCM's:
        FlowMatchLCMScheduler)."""
        scheduler = self.scheduler_config.get("_class_name")
        return w_input_dim(self.unet) is not None or scheduler in ("LCMScheduler", "FlowMatchLCMScheduler")

    @property
    def is_flow(self) -> bool:
        """A flow-matching model (SD3 / Flux class): velocity prediction on a :class:`FlowSchedule`."""
        return self.schedule.is_flow

    @property
    def is_embedded(self) -> bool:
        """The embedded Fashion-MNIST family (MiniLM text encoder), whatever folder it was loaded from."""
        return (
            self.text_encoder is not None
            and self.text_encoder.name == EMBEDDED_ENCODER
            or (self.source is not None and is_packaged_encoder(self.lora_base or self.source))
        )

    @property
    def default_w(self) -> float:
        """The guidance weight used when none is given (one rule: :func:`lcm.maths.guidance.default_w`)."""
        return default_w(self.w_range, self.is_embedded)

    @property
    def latent_channels(self) -> int:
        """C of the latents z: the VAE's, not the UNet's input channels (9 for an inpainting UNet)."""
        return int(self.vae.config.latent_channels)

    @property
    def default_sampler(self) -> Sampler:
        """The sampler this model was made for: LCM for an LCM, TCD's for a TCD or PCM model (deterministic at the
        phase edges for PCM: :attr:`default_gamma`), DDIM for a teacher."""
        if not self.is_lcm:
            return Sampler.DDIM
        return (
            Sampler.TCD if self.consistency == "tcd" or (self.consistency == "pcm" and self.phases > 1) else Sampler.LCM
        )

    @property
    def default_gamma(self) -> float:
        """TCD's γ when none is given: 0 for PCM (deterministic steps at the phase edges), TCD's 0.3 otherwise."""
        return 0.0 if self.consistency == "pcm" else DEFAULT_GAMMA

    @property
    def default_steps(self) -> int:
        """Sampling steps when none are given: a PCM model's phases, a few for other LCMs, the usual for teachers."""
        if self.consistency == "pcm" and self.phases > 1:
            return self.phases
        return DISTILLED_STEPS if self.is_lcm else TEACHER_STEPS

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = sample_size(self.unet, self.vae)
        return (self.latent_channels, size, size)

    def image_seq_len(self, latent_height: int, latent_width: int) -> int:
        """The image tokens of a transformer at this latent size (what a dynamic shift reads): Flux packs 2×2
        patches, SD3 patchifies by its ``patch_size``."""
        patch = 2 if is_flux_network(self.unet) else int(self.unet.config.get("patch_size") or 1)
        return (latent_height // patch) * (latent_width // patch)

    def randn_per_image(self, shape, generators, device=None, dtype=torch.float32) -> torch.Tensor:
        """Standard normal latents drawn in the layout this model's pipeline draws them
        (:func:`lcm.models.transformers.randn_in_layout`: Flux's packed patches, else as they are)."""
        return randn_in_layout(self.unet, shape, generators, device, dtype)

    def w_input(self, w: torch.Tensor) -> torch.Tensor | None:
        """What the network takes for guidance weights ``w`` ``[B]``: a w-conditioned UNet's embedding
        (``timestep_cond``), a guidance-distilled transformer's guidance scale 1 + w (Flux's), else None."""
        if guidance_input(self.unet):
            return (1.0 + w.float()).to(self.device)
        dim = w_input_dim(self.unet)
        return None if dim is None else cached_w_embedding(w.cpu(), dim).to(self.device, network_dtype(self.unet))

    @property
    def is_inpainting(self) -> bool:
        """An inpainting UNet (SD-inpainting's layout): it takes ``[z, mask, masked-image latents]``, 2C + 1
        channels, as its input."""
        unet = getattr(self.unet, "module", self.unet)  # a distributed wrapper
        return int(unet.config.in_channels) == 2 * self.latent_channels + 1

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    # --- text, latents ----------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], cache: bool = False) -> TextEmbeddings:
        """Text embeddings of ``prompts``; with ``cache``, from :attr:`prompt_cache` (each prompt encoded alone, once:
        for training and evaluation, which repeat prompts), else in one batch."""
        return self.prompt_cache(prompts) if cache else self._encode(prompts)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        if self.text_encoder is None:
            raise ValueError("this model was loaded without its text encoder")
        return self.text_encoder.encode(prompts).to(self.device)

    @property
    def shift_factor(self) -> float:
        """The VAE's latent shift (SD3's and Flux's VAEs: z = (x − shift)·scale); 0 for SD's."""
        return float(self.vae.config.get("shift_factor") or 0.0)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [−1, 1] → scaled latents (a posterior sample)."""
        dist = self.vae.encode(images.to(self.device, network_dtype(self.vae))).latent_dist
        return (dist.sample(generator) - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [−1, 1] (float32)."""
        latents = latents.to(network_dtype(self.vae)) / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents).sample.float().clamp(-1, 1)

    def with_network(
        self,
        unet,
        scheduler_config: dict | None = None,
        sigma_data: float | None = None,
        timestep_scaling: float | None = None,
    ) -> LatentDiffusion:
        """This model with ``unet`` in its network's place (a student, its EMA target, a distributed or compiled
        wrapper): the same VAE, text encoder and prompt cache; the scheduler config and consistency constants
        replaced where given (an LCM's ``LCMScheduler`` config makes it sample as an LCM)."""
        view = dataclasses.replace(
            self,
            unet=unet,
            scheduler_config=self.scheduler_config if scheduler_config is None else scheduler_config,
            sigma_data=self.sigma_data if sigma_data is None else sigma_data,
            timestep_scaling=self.timestep_scaling if timestep_scaling is None else timestep_scaling,
        )
        view.prompt_cache = self.prompt_cache
        return view

    def with_inpaint_condition(self, mask: torch.Tensor, masked_latents: torch.Tensor) -> LatentDiffusion:
        """This model with its inpainting UNet's extra input fixed: the latent-size ``mask`` ``[B, 1, h, w]`` (1 =
        repaint) and ``masked_latents`` ``[B, C, h, w]``, the latents of the image with the region to repaint
        blanked out; every network call then sees ``[z, mask, masked_latents]``, as diffusers' inpainting pipeline
        builds it."""
        if not self.is_inpainting:
            raise ValueError("only an inpainting UNet (2C + 1 input channels) takes a mask and a masked image")
        condition = torch.cat([mask, masked_latents], dim=1)
        view = dataclasses.replace(self, inpaint_condition=condition.to(self.device))
        view.prompt_cache = self.prompt_cache
        return view

    # --- the network as the maths sees it -------------------------------------------------------------------
    def unet_output(
        self, z: torch.Tensor, t: torch.Tensor, text: TextEmbeddings, timestep_cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One call of the network at real-valued ``t`` ``[B]`` (it may be wrapped for distributed training)."""
        unet = self.unet
        dtype = network_dtype(unet)
        if is_flow_network(unet):
            return transformer_output(unet, self._network_input(z), t, text, timestep_cond, dtype)
        return unet(
            self._network_input(z).to(dtype),
            t.to(device=z.device, dtype=torch.float32),
            encoder_hidden_states=text.hidden_states.to(dtype),
            timestep_cond=None if timestep_cond is None else timestep_cond.to(dtype),
            added_cond_kwargs=self._added_conditions(text, z, dtype),
        ).sample

    def _network_input(self, z: torch.Tensor) -> torch.Tensor:
        """``z``, or ``[z, mask, masked latents]`` for an inpainting UNet; the condition is repeated to z's batch,
        which classifier-free guidance doubles."""
        if self.inpaint_condition is None:
            return z
        condition = self.inpaint_condition.to(z.dtype)
        return torch.cat([z, condition.repeat(z.shape[0] // condition.shape[0], 1, 1, 1)], dim=1)

    def _added_conditions(self, text: TextEmbeddings, z: torch.Tensor, dtype) -> dict | None:
        """SDXL's micro-conditioning: pooled text embedding and (original size, crop, target size) time ids."""
        if not is_sdxl(self.unet):
            return None
        if text.pooled is None:
            raise ValueError("an SDXL UNet needs pooled text embeddings (use its two text encoders)")
        h, w = z.shape[-2] * self.vae_scale_factor, z.shape[-1] * self.vae_scale_factor
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=z.device, dtype=dtype)  # (height, width) as diffusers
        return {"text_embeds": text.pooled.to(dtype), "time_ids": time_ids.expand(z.shape[0], 6)}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _to_denoised(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> Denoised:
        alpha, sigma = self.schedule.alpha_sigma(t.to(z.device))  # on the device: no host round trip
        return to_denoised(out.to(z.dtype), z, alpha, sigma, self.prediction_type)

    def denoised(self, z: torch.Tensor, t: torch.Tensor, text: TextEmbeddings, w_emb: torch.Tensor | None) -> Denoised:
        """The network's raw prediction (x̂0, ε̂) at per-sample ``t`` ``[B]``, in float32+ (no consistency
        boundary scalings: what TCD's sampler steps with)."""
        return self._to_denoised(self.unet_output(z, t, text, w_emb).float(), z, t)

    def denoiser(self, text: TextEmbeddings):
        """Unguided denoiser ``(z, t) → Denoised`` conditioned on ``text``."""

        def denoise(z: torch.Tensor, t: torch.Tensor) -> Denoised:
            return self._to_denoised(self.unet_output(z, t, text), z, t)

        return denoise

    def guided_denoiser(self, cond: TextEmbeddings, uncond: TextEmbeddings, w: torch.Tensor):
        """Classifier-free guided denoiser, ``cond + w·(cond − uncond)``: ONE batched forward of 2B. A
        guidance-distilled teacher (Flux-dev) is guided by its guidance input instead, one forward of B, as its
        pipeline samples it."""
        if guidance_input(self.unet):
            guidance = self.w_input(w)

            def distilled(z: torch.Tensor, t: torch.Tensor) -> Denoised:
                return self._to_denoised(self.unet_output(z, t, cond, guidance), z, t)

            return distilled
        both = TextEmbeddings.cat([cond, uncond])

        def denoise(z: torch.Tensor, t: torch.Tensor) -> Denoised:
            out_c, out_u = self.unet_output(torch.cat([z, z]), torch.cat([t, t]), both).chunk(2)
            return self._to_denoised(cfg_combine(out_c, out_u, w), z, t)

        return denoise

    def consistency_fn(self, text: TextEmbeddings, w: torch.Tensor | None):
        """The LCM's ``f(z, t) → x̂0``; w is passed when the network takes it (:meth:`w_input`)."""
        if takes_w(self.unet) and w is None:
            raise ValueError("this LCM is guidance-conditioned: give the guidance weight w")
        emb = self.w_input(w) if takes_w(self.unet) else None
        return lambda z, t: self.consistency_output(z, t, text, emb)

    def consistency_output(
        self, z: torch.Tensor, t: torch.Tensor | float, text: TextEmbeddings, w_emb: torch.Tensor | None
    ) -> torch.Tensor:
        """``f(z, w, c, t) = c_skip z + c_out x̂0`` of the network (Eq. 9, Luo et al. 2023), computed in float32+,
        with the model's consistency constants (those its export recorded, or a run's: :meth:`with_network`).

        ``t`` is per sample ``[B]`` (training), or one host float for the whole batch (sampling): then the step is
        :class:`ConsistencyStep`, its coefficients a cached tensor, and a compiled model runs it as one graph.
        """
        if isinstance(t, torch.Tensor):
            x0 = self.denoised(z, t, text, w_emb).x0
            c_skip, c_out = self._boundary(t.to(z.device))
            return consistency_function(z, x0, c_skip, c_out)
        t_batch = torch.full((z.shape[0],), float(t), device=z.device)
        coefficients = self.step_coefficients(float(t), self.sigma_data, self.timestep_scaling, z.device)
        return self.consistency_step(z, t_batch, text.hidden_states, text.pooled, w_emb, coefficients)

    def trajectory_output(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        text: TextEmbeddings,
        w_emb: torch.Tensor | None,
    ) -> torch.Tensor:
        """The trajectory consistency function ``f(z, t → s) = c_skip(t − s)·z + c_out(t − s)·(α_s x̂0 + σ_s ε̂)``
        for per-sample ``t``, ``s ≤ t`` ``[B]`` (TCD's and PCM's target: the point of the trajectory at s, reached
        by the exponential integrator, i.e. DDIM, from the network's prediction at t). ``s = 0`` is the clean end
        (α, σ = 1, 0), so there it is :meth:`consistency_output` exactly; ``s = t`` gives z (the boundary)."""
        x0, eps = self.denoised(z, t, text, w_emb)
        s = s.to(z.device)
        alpha, sigma = (c.to(z.dtype) for c in self.schedule.alpha_sigma_to(s))
        z_s = consistency_function(x0, eps, alpha, sigma)  # α_s x̂0 + σ_s ε̂
        c_skip, c_out = self._boundary(t.to(z.device) - s)
        return consistency_function(z, z_s, c_skip, c_out)

    def boundary_at(self, t: float) -> tuple[float, float]:
        """(c_skip, c_out) of one host-float timestep with this model's constants (:meth:`_boundary`'s rule)."""
        return (0.0, 1.0) if self.is_flow else boundary_scalings_at(t, self.sigma_data, self.timestep_scaling)

    def _boundary(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) per sample. A flow model's x̂0 = z − σ·v̂ is z itself at σ = 0, so its consistency output
        is x̂0 as it stands (c_skip 0, c_out 1): the form ``FlowMatchLCMScheduler`` samples with (docs/design.md §15)."""
        if self.is_flow:
            return torch.zeros_like(t, dtype=torch.float64), torch.ones_like(t, dtype=torch.float64)
        return boundary_scalings(t, self.sigma_data, self.timestep_scaling)

    @property
    def consistency_step(self) -> ConsistencyStep:
        """The sampling step of this model's UNet as one module (what ``--compile on`` compiles on the CPU)."""
        if self._step is None or self._step.unet is not self.unet:
            self._step = ConsistencyStep(self, self.unet)
        return self._step

    def step_coefficients(
        self, t: float, sigma_data: float, timestep_scaling: float, device: torch.device
    ) -> torch.Tensor:
        """``[α_t, σ_t, c_skip, c_out]`` of one host-float timestep as a float32 tensor on ``device``, made once per
        (t, constants, device): the values the float path multiplies with, as they are cast to float32."""
        key = (t, sigma_data, timestep_scaling, device)
        if key not in self._step_coefficients:
            boundary = (0.0, 1.0) if self.is_flow else boundary_scalings_at(t, sigma_data, timestep_scaling)
            values = (*self.schedule.alpha_sigma_at(t), *boundary)
            self._step_coefficients[key] = torch.tensor(values, dtype=torch.float32, device=device)
        return self._step_coefficients[key]
