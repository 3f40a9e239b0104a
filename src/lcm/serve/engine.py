"""The model behind ``lcm serve``: one generation at a time, through the library's own sampling functions.

An LCM is sampled with :attr:`Sampler.LCM` (or :attr:`Sampler.TCD` when a request asks, at its ``gamma``; its
``negative_guidance`` steers away from the negative prompt); any other folder (a teacher) with DDIM at the requested
steps on the one spacing rule's trailing timesteps (:func:`lcm.maths.timesteps.sampler_timesteps`), so that even
one step starts from pure noise at t = T − 1, the negative prompt being the unconditional side of its guidance.
Generation is :func:`lcm.sample.generate` itself, with prompt embeddings from the model's prompt cache: typing
re-sends the same prompt with every slider move, and encoding one costs about as much as a UNet step of the embedded
model on a CPU.
"""

from __future__ import annotations

import atexit
import io
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import lcm.sample as library
import lcm.shipped
from lcm.config.sampling import DISTILLED_STEPS
from lcm.maths.timesteps import sampler_timesteps
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.lora import LoraSpec
from lcm.sample import Sampler, generate
from lcm.serve.protocol import Request, RequestError

__all__ = ["BackgroundCompile", "Engine", "Result", "encode_png", "load_engine", "serve_model_path"]


def serve_model_path() -> Path:
    """The model ``lcm serve`` shows without ``--model``: :func:`lcm.shipped.default_sampling_path`."""
    return lcm.shipped.default_sampling_path()  # read at call time: a test points ASSETS elsewhere


@dataclass(frozen=True)
class Result:
    """One answered request: PNG bytes per image and the server-side time it took."""

    request: Request
    pngs: list[bytes]
    ms: float  # embeddings + sampling + decode + PNG encoding, under the lock
    sampler: Sampler
    compile: str = "off"  # Engine.compile_status() when it was made


def encode_png(images: torch.Tensor) -> list[bytes]:
    """``[B, C, H, W]`` in [−1, 1] → one PNG per image (greyscale for one channel)."""
    from PIL import Image

    from lcm.images import to_uint8

    out = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


class BackgroundCompile:
    """The CPU's compiled networks, built by another process while this one serves eagerly: ``command`` (an
    ``lcm sample --compile on`` run of the same model and LoRAs) puts the AOT packages in the shared cache, and the
    engine's forwards, made with ``build=False``, switch to them as they appear (:mod:`lcm.models.aot`)."""

    def __init__(self, command: list[str]):
        self.command = command
        self.log = tempfile.TemporaryFile()  # the builder's output, read back if it fails
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        atexit.register(self.stop)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def failed(self) -> bool:
        return self.process.poll() not in (None, 0)

    def last_line(self) -> str:
        """The builder's last line of output (why it failed)."""
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1][:200] if lines else f"exit status {self.process.returncode}"

    def stop(self) -> None:
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Engine:
    """A loaded model that answers :class:`Request`s, one at a time (``lock``), with cached prompt embeddings."""

    def __init__(self, model: LatentDiffusion, compile: str = "off"):
        self.model = model
        self.sampler = model.default_sampler
        self.lock = threading.Lock()  # the network is never run by two threads at once
        self.generations = 0
        self.compile = compile  # "off" or "on", as asked
        self.background: BackgroundCompile | None = None

    def compile_status(self) -> str:
        """ "off"; "building" (eager while another process compiles); "on" (compiled networks run); "failed"
        (eager: the build failed)."""
        from lcm.models.fast import compiled_forwards

        if self.compile == "off":
            return "off"
        if self.background is None or compiled_forwards(self.model):
            return "on"
        return "failed" if self.background.failed else "building"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the model makes (and to which uploads are resized)."""
        side = self.model.latent_shape[1] * self.model.vae_scale_factor
        return (int(self.model.vae.config.out_channels), side, side)

    @property
    def defaults(self) -> dict[str, Any]:
        # real time: an LCM's few steps (a PCM model's phases), for a teacher too (its 1-4 step images show what LCMs
        # are for); TCD's γ as the model was made for (0 for PCM)
        steps = self.model.default_steps if self.model.is_lcm else DISTILLED_STEPS
        return {"steps": steps, "w": float(self.model.default_w), "gamma": self.model.default_gamma}

    @property
    def samplers(self) -> tuple[Sampler, ...]:
        """What a request may ask for: LCM and TCD for an LCM, DDIM for a teacher."""
        return (Sampler.LCM, Sampler.TCD) if self.model.is_lcm else (Sampler.DDIM,)

    def sampler_for(self, req: Request) -> Sampler:
        """The sampler of ``req`` (the model's default when it names none), or a one-line :class:`RequestError` for a
        request this model cannot run (a sampler or negative guidance it lacks, an img2img or inpainting strength
        leaving no step)."""
        sampler = self.sampler if req.sampler is None else Sampler(req.sampler)
        if sampler not in self.samplers:
            kind = "an LCM" if self.model.is_lcm else "a teacher"
            names = ", ".join(s.value for s in self.samplers)
            raise RequestError(f"sampler {sampler.value} is not available: this model is {kind} ({names})")
        if req.negative_guidance and not sampler.for_distilled:
            raise RequestError(
                "negative_guidance is for LCMs; a teacher's negative_prompt is the unconditional side of its "
                "guidance, weighted by w"
            )
        try:  # a strength that leaves no step, or (LCM img2img) fewer grid points than steps
            if req.mask is not None:
                library.inpaint_timesteps(self.model, sampler, req.steps, req.strength)
            elif req.image is not None:
                sampler_timesteps(sampler, req.steps, self.model.scheduler_config, self.model.schedule, req.strength)
        except ValueError as err:
            raise RequestError(str(err)) from None
        return sampler

    def info(self) -> dict[str, Any]:
        """What a client needs to draw its controls: model, samplers, image size, defaults, device."""
        unet = self.model.unet
        return {
            "model": str(self.model.source),
            "lora_base": self.model.lora_base,
            "loras": [str(spec) for spec in self.model.loras],
            "is_lcm": self.model.is_lcm,
            "sampler": self.sampler.value,
            "samplers": [s.value for s in self.samplers],
            "image_size": list(self.image_shape[1:]),
            "channels": self.image_shape[0],
            "device": str(self.model.device),
            "dtype": str(unet.dtype).removeprefix("torch."),
            "img2img": True,
            "inpaint": True,
            "defaults": self.defaults,
            "compile": self.compile_status(),
            "compile_error": self.background.last_line() if self.compile_status() == "failed" else None,
        }

    def run(self, req: Request) -> Result:
        """Generate ``req``'s images as PNGs through :func:`lcm.sample.generate` (image i from seed ``req.seed + i``,
        prompts from the model's prompt cache; img2img with ``req.image``, inpainting with ``req.mask`` too); blocks
        while another generation holds the lock."""
        sampler = self.sampler_for(req)
        gamma = self.model.default_gamma if req.gamma is None else req.gamma
        options = {"gamma": gamma, "negative_guidance": req.negative_guidance} if sampler.for_distilled else {}
        with self.lock, torch.inference_mode():
            start = time.perf_counter()
            images = generate(
                self.model,
                [req.prompt] * req.batch,
                sampler,
                req.steps,
                req.w,
                [req.seed + i for i in range(req.batch)],
                batch_size=req.batch,
                negative_prompt=req.negative_prompt,
                init_images=req.image,
                strength=req.strength,
                mask=req.mask,
                cache_prompts=True,
                **options,
            )
            pngs = encode_png(images)
            self.generations += 1
            ms = (time.perf_counter() - start) * 1e3
        return Result(replace(req, gamma=gamma), pngs, ms, sampler, self.compile_status())  # the γ it ran with

    def warm_up(self) -> float:
        """One generation at the defaults, so the first client does not pay for lazy initialisation; its ms. An
        inpainting model warms up on a blank image with all of it to repaint."""
        d, image, mask = self.defaults, None, None
        if self.model.is_inpainting:
            image, mask = torch.zeros((1, *self.image_shape)), torch.ones((1, 1, *self.image_shape[1:]))
        request = Request(None, "", "", d["steps"], d["w"], 0, 1, image=image, mask=mask, strength=1.0)
        return self.run(request).ms


def load_engine(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    compile: Any = "off",
    loras: Sequence[LoraSpec] = (),
) -> Engine:
    """Load and place a model folder (or hub id), optionally with a stack of LoRAs, and warm it up.

    Compiled on the CPU, it answers at once: the packages the AOT cache holds are used from the first request, and
    the missing ones are built by a :class:`BackgroundCompile` while the eager networks serve."""
    from lcm.models.fast import DTYPES, Compile, compiled_forwards, optimize

    model = LatentDiffusion.from_pretrained(path, loras=loras)
    wanted = Compile(compile).enabled(device)
    in_background = wanted and device.type == "cpu"
    optimize(model, device, dtype, Compile(compile), build=not in_background)
    engine = Engine(model, "on" if wanted else "off")
    engine.warm_up()  # picks up the packages already in the cache
    if in_background and compiled_forwards(model) < 2:  # an LCM's step or a teacher's UNet, and the decoder
        name = next(k for k, v in DTYPES.items() if v == dtype)
        command = [sys.executable, "-m", "lcm.cli", "sample", "--model", str(path)]
        command += [x for spec in loras for x in ("--lora", str(spec))]
        command += ["--prompt", "a", "--num-images", "1", "--steps", str(engine.defaults["steps"])]
        command += ["--compile", "on", "--device", "cpu", "--dtype", name]
        command += ["--out", str(Path(tempfile.mkdtemp(prefix="lcm-compile-")) / "warm-up.png")]
        engine.background = BackgroundCompile(command)
    return engine
