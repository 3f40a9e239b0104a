"""``lcm sample``: images from prompts (and optionally an init image) with a teacher or an LCM; docs/sampling.md.
The sampling flags are the knobs of :class:`lcm.config.sampling.SampleConfig`."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from lcm.cli.common import add_lora_flags, add_speed_args, lora_specs
from lcm.cli.flags import add_section_flags, typed_settings
from lcm.config.sampling import SampleConfig, default_steps
from lcm.limits import MAX_IMAGES
from lcm.maths.timesteps import Sampler
from lcm.models.fast import Compile


def _vae_scale_factor(model: str | None) -> int | None:
    """The VAE scale factor from the model folder's ``vae/config.json`` (no weights are read); None when the
    folder is not here (a hub id: checked once the model is loaded)."""
    from lcm.models.formats import LORA_META, lora_base
    from lcm.shipped import default_sampling_path

    path = Path(model).expanduser() if model else default_sampling_path()
    if (path / LORA_META).is_file():
        return _vae_scale_factor(lora_base(path))  # a malformed record: one line, now
    try:
        config = json.loads((path / "vae" / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _made_for_tcd(model: str | None, sampler: Sampler | None) -> bool:
    """Whether the model's own sampler may be TCD's (a TCD or PCM export, from its record; a hub id: maybe)."""
    from lcm.models.formats import read_record, samples_with_tcd
    from lcm.shipped import default_sampling_path

    if sampler is not None:
        return False
    path = Path(model).expanduser() if model else default_sampling_path()
    if not path.is_dir():
        return True  # known once loaded
    record = read_record(path)
    return samples_with_tcd(record["consistency"], record["phases"])


def _settings(args: argparse.Namespace) -> SampleConfig:
    """The sampling settings, each against its range and the others, before any model is loaded."""
    typed = typed_settings(args)
    cfg = SampleConfig(**{k.removeprefix("sample."): v for k, v in typed.items()})
    if "sample.gamma" in typed and cfg.sampler is not Sampler.TCD and not _made_for_tcd(args.model, cfg.sampler):
        raise ValueError("--gamma is the TCD sampler's: add --sampler tcd")
    if cfg.negative_guidance and cfg.sampler and not cfg.sampler.for_distilled:
        raise ValueError(
            f"--negative-guidance is for LCMs (lcm, tcd samplers), not --sampler {cfg.sampler.value}: a teacher uses "
            "--negative-prompt as the unconditional side of its guidance, weighted by --guidance"
        )
    if "sample.strength" in typed and args.image is None:
        raise ValueError("--strength needs --image (the init image of image-to-image)")
    if args.mask is not None and args.image is None:
        raise ValueError("--mask needs --image (the init image whose white mask region is repainted)")
    if args.mask is not None and "sample.strength" not in typed:
        cfg = replace(cfg, strength=1.0)  # inpainting's usual default: the masked region from pure noise
    factor = _vae_scale_factor(args.model)
    for flag, value in (("--height", cfg.height), ("--width", cfg.width)):
        if value is not None and factor is not None and value % factor:
            raise ValueError(f"{flag} must be a multiple of this model's VAE scale factor {factor}, got {value}")
    if (count := len(args.prompt) * cfg.num_images) > MAX_IMAGES:
        raise ValueError(
            f"{len(args.prompt)} prompts x --num-images {cfg.num_images} is {count} images; at most {MAX_IMAGES}"
        )
    return cfg


def check_flags(args: argparse.Namespace):
    """Every flag against its range and the others, in one line each, before any model is loaded; returns the
    sampling settings and the parsed (device, dtype)."""
    from lcm.models.fast import parse_device, parse_dtype

    lora_specs(args)
    cfg = _settings(args)
    if args.image is not None:
        from lcm.images import load_image

        load_image(args.image, 3)  # readable (one line if not), before anything is loaded
    if args.mask is not None:
        from lcm.images import load_mask

        load_mask(args.mask)
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    out, count = Path(args.out), len(args.prompt) * cfg.num_images
    if out.suffix.lower() == ".png" and count > 1:
        raise ValueError(
            f"--out {args.out} names one PNG but {count} images will be made: give a folder (and --grid for a grid)"
        )
    if out.suffix and out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a folder or a .png file, got {args.out}")
    if args.grid and Path(args.grid).suffix.lower() != ".png":
        raise ValueError(f"--grid writes a PNG: give a name ending in .png, got {args.grid}")
    return cfg, device, dtype


def _for_model(cfg: SampleConfig, model, args: argparse.Namespace) -> SampleConfig:
    """The settings with the model's defaults filled in, and refused where the model cannot run them."""
    sampler = cfg.sampler or model.default_sampler
    if "sample.gamma" in typed_settings(args) and sampler is not Sampler.TCD:
        raise ValueError(f"--gamma is the TCD sampler's; this model samples with {sampler.value}: add --sampler tcd")
    if sampler.for_distilled and not model.is_lcm:
        raise ValueError(
            f"the {sampler.value} sampler needs an LCM (a consistency-distilled model, or --lora with an LCM or TCD "
            "LoRA); use --sampler ddim|dpm|dpmpp"
        )
    if cfg.negative_guidance and not sampler.for_distilled:
        raise ValueError(
            "--negative-guidance is for LCMs; this model is a teacher, whose --negative-prompt is the unconditional "
            "side of its guidance, weighted by --guidance"
        )
    if args.negative_prompt and sampler.for_distilled and not cfg.negative_guidance:
        raise ValueError(
            "--negative-prompt does nothing on its own for an LCM (its guidance is distilled in, against the empty "
            "prompt): add --negative-guidance S (a second UNet call per step)"
        )
    w = cfg.guidance if cfg.guidance is not None else model.default_w
    if args.negative_prompt and not sampler.for_distilled and w == 0:
        raise ValueError("--negative-prompt needs --guidance w > 0 (w = 0 runs the teacher without guidance)")
    native_h, native_w = (s * model.vae_scale_factor for s in model.latent_shape[1:])
    steps = cfg.steps or (model.default_steps if sampler is model.default_sampler else default_steps(sampler))
    gamma = cfg.gamma if "sample.gamma" in typed_settings(args) else model.default_gamma
    return replace(
        cfg, sampler=sampler, steps=steps, guidance=w, gamma=gamma, height=cfg.height or native_h,
        width=cfg.width or native_w,
    )  # fmt: skip


def run_sample(args: argparse.Namespace) -> int:
    from lcm.images import load_image, load_mask
    from lcm.maths.timesteps import sampler_timesteps
    from lcm.models.fast import optimize
    from lcm.models.latent_diffusion import LatentDiffusion
    from lcm.sample import generate, inpaint_timesteps, latent_shape
    from lcm.shipped import default_model_path, default_sampling_path

    cfg, device, dtype = check_flags(args)
    # A LoRA needs a base model: the shipped teacher; otherwise the shipped LCM.
    loras = lora_specs(args)
    model_path = args.model or (default_model_path() if loras else default_sampling_path())
    model = LatentDiffusion.from_pretrained(model_path, loras=loras)
    cfg = _for_model(cfg, model, args)
    size = (cfg.height, cfg.width)
    latent_shape(model, size)  # refuses sizes the VAE cannot make (a hub model's factor is known only now)
    optimize(model, device, dtype, Compile(args.compile))
    init = mask = None
    if args.image is not None:  # a strength that leaves no step: one line, before any image is drawn
        if args.mask is not None:
            inpaint_timesteps(model, cfg.sampler, cfg.steps, cfg.strength)
            mask = load_mask(args.mask, size)
        else:
            sampler_timesteps(cfg.sampler, cfg.steps, model.scheduler_config, model.schedule, cfg.strength)
        init = load_image(args.image, int(model.vae.config.in_channels), size)
    prompts = [p for p in args.prompt for _ in range(cfg.num_images)]
    seeds = [cfg.seed + i for _ in args.prompt for i in range(cfg.num_images)]
    options = {"gamma": cfg.gamma, "negative_guidance": cfg.negative_guidance, "strength": cfg.strength}
    images = generate(
        model, prompts, cfg.sampler, cfg.steps, cfg.guidance, seeds, batch_size=cfg.batch_size, progress=True,
        negative_prompt=args.negative_prompt or "", size=size, init_images=init, mask=mask, **options,
    )  # fmt: skip
    _write(images, prompts, seeds, cfg, args, str(model_path))
    return 0


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _write(images, prompts: list[str], seeds: list[int], cfg: SampleConfig, args, model_path: str) -> None:
    """One PNG per image, the settings in its text chunks; with --grid a labelled grid too."""
    from lcm.images import save_image, save_labelled_grid

    tcd, img2img, w = cfg.sampler is Sampler.TCD, args.image is not None, cfg.guidance
    inpaint = args.mask is not None
    settings = {
        "negative_prompt": args.negative_prompt or "",
        "steps": cfg.steps,
        "w": w,
        "guidance_scale": w + 1,  # diffusers' convention
        "sampler": cfg.sampler.value,
        "gamma": cfg.gamma if tcd else None,
        "negative_guidance": cfg.negative_guidance or None,
        "image": str(args.image) if img2img else None,
        "mask": str(args.mask) if inpaint else None,
        "strength": cfg.strength if img2img else None,
        "height": cfg.height,
        "width": cfg.width,
        "model": model_path,
        "lora": " ".join(str(spec) for spec in lora_specs(args)) or None,
        "software": "lcm",
    }
    out = Path(args.out)
    single = out.suffix.lower() == ".png"
    digits = max(3, len(str(len(images) - 1)))
    for i, (image, prompt, seed) in enumerate(zip(images, prompts, seeds, strict=True)):
        path = out if single else out / f"{i:0{digits}d}-seed{seed}.png"
        save_image(image, path, scale=cfg.scale, metadata={"prompt": prompt, "seed": seed, **settings})
    what = f"{_plural(len(images), 'image')} ({cfg.sampler.value}, {_plural(cfg.steps, 'step')}, w={w:g}"
    what += f", gamma={cfg.gamma:g}" if tcd else ""
    what += f", negative guidance {cfg.negative_guidance:g}" if cfg.negative_guidance else ""
    what += f", {'inpainting' if inpaint else 'img2img'} strength {cfg.strength:g}" if img2img else ""
    print(f"{what}) written to {out}")
    if args.grid is not None:
        grid = Path(args.grid) if args.grid else (out.with_name(out.stem + "-grid.png") if single else out / "grid.png")
        columns = [f"seed {cfg.seed + i}" for i in range(cfg.num_images)]
        save_labelled_grid(images, grid, rows=args.prompt, columns=columns, scale=cfg.scale)
        shape = f"{_plural(len(args.prompt), 'row')} of prompts, {_plural(cfg.num_images, 'column')} of seeds"
        print(f"grid ({shape}) written to {grid}")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate PNGs from prompts (and an init image) with a teacher or an LCM",
        description=(
            "Generate images from text prompts, one PNG per image (prompt, seed and every setting in its PNG text "
            "metadata), with --grid also a labelled grid (rows: prompts, columns: seeds). Image i of a prompt uses "
            "seed --seed + i. --guidance is the paper's w (diffusers' guidance_scale is w + 1). "
            "See docs/sampling.md."
        ),
    )
    p.add_argument(
        "--model",
        help="diffusers-format model folder or hub id (default: the shipped embedded LCM; with --lora, the shipped "
        "Fashion teacher)",
    )
    add_lora_flags(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument(
        "--negative-prompt",
        help="what to steer away from. Teachers: the unconditional side of classifier-free guidance (instead of the "
        "empty prompt), weighted by --guidance. LCMs: used only with --negative-guidance",
    )
    p.add_argument(
        "--image",
        help="init image (PNG, JPEG, …) for image-to-image, resized (Lanczos) to the output size: --height/--width, "
        "default the model's native size",
    )
    p.add_argument(
        "--mask",
        help="inpainting: a mask image for --image (white = repaint, black = keep; read as greyscale, binarised at "
        "50%%, resized like --image), as diffusers' inpainting pipelines. --strength defaults to 1 here (the masked "
        "region from pure noise). Text-to-image models keep the black region by blending after every step; "
        "inpainting models (9-channel UNets) take the mask as input and need it",
    )
    p.add_argument(
        "--out",
        default="samples",
        help="folder for the PNGs, named INDEX-seedSEED.png (default samples); or a FILE.png when one image is made",
    )
    p.add_argument(
        "--grid",
        nargs="?",
        const="",
        help="also write a grid with prompts and seeds as labels: to GRID if given, else OUT/grid.png "
        "(FILE-grid.png beside a FILE.png)",
    )
    add_section_flags(p, SampleConfig, "sample.", "sampling")
    add_speed_args(p, "on the CPU it pays for many images or repeated runs (kernels are cached in $LCM_CACHE/inductor)")
    p.set_defaults(func=run_sample)
