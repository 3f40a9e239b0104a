"""``lcm sample``: images from prompts (and optionally an init image) with a teacher or an LCM; docs/sampling.md."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lcm.cli.common import add_speed_args, check_int
from lcm.limits import MAX_BATCH, MAX_IMAGE_SIDE, MAX_IMAGES, MAX_SEED
from lcm.models.fast import Compile
from lcm.sample import DEFAULT_GAMMA, DEFAULT_STRENGTH, Sampler


def _check_number(value: float | None, flag: str, low: float, high: float | None = None, open_low=False) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        upper = f" and <= {high:g}" if high is not None else ""
        raise ValueError(f"{flag} must be a number {bound}{upper}, got {value}")


def _vae_scale_factor(model: str | None) -> int | None:
    """The VAE scale factor from the model folder's ``vae/config.json`` (no weights are read); None when the
    folder is not here (a hub id: checked once the model is loaded)."""
    from lcm.models.formats import LORA_META, lora_base
    from lcm.sample import default_sampling_path

    path = Path(model).expanduser() if model else default_sampling_path()
    if (path / LORA_META).is_file():
        return _vae_scale_factor(lora_base(path))  # a malformed record: one line, now
    try:
        config = json.loads((path / "vae" / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_flags(args: argparse.Namespace):
    """Every flag against its range and the others, in one line each, before any model is loaded; returns the
    parsed (device, dtype)."""
    from lcm.models.fast import parse_device, parse_dtype

    if args.lora is None and args.lora_scale != 1.0:
        raise ValueError("--lora-scale needs --lora")
    _check_number(args.lora_scale, "--lora-scale", -math.inf)
    check_int(args.steps, "--steps", 1, 1000)
    check_int(args.num_images, "--num-images", 1, MAX_IMAGES)
    check_int(args.batch_size, "--batch-size", 1, MAX_BATCH)
    check_int(args.scale, "--scale", 1, 64)
    check_int(args.seed, "--seed", 0, MAX_SEED - args.num_images + 1)  # image i's seed is --seed + i
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ValueError(
            f"--guidance is the paper's w and must be >= 0 (diffusers' guidance_scale - 1), got {args.guidance}"
        )
    _check_number(args.gamma, "--gamma", 0.0, 1.0)
    if args.gamma is not None and args.sampler != Sampler.TCD.value:
        raise ValueError("--gamma is the TCD sampler's: add --sampler tcd")
    _check_number(args.negative_guidance, "--negative-guidance", 0.0)
    if args.negative_guidance and args.sampler and not Sampler(args.sampler).for_distilled:
        raise ValueError(
            f"--negative-guidance is for LCMs (lcm, tcd samplers), not --sampler {args.sampler}: a teacher uses "
            "--negative-prompt as the unconditional side of its guidance, weighted by --guidance"
        )
    _check_number(args.strength, "--strength", 0.0, 1.0, open_low=True)
    if args.strength is not None and args.image is None:
        raise ValueError("--strength needs --image (the init image of image-to-image)")
    check_int(args.height, "--height", 1, MAX_IMAGE_SIDE)
    check_int(args.width, "--width", 1, MAX_IMAGE_SIDE)
    factor = _vae_scale_factor(args.model)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and factor is not None and value % factor:
            raise ValueError(f"{flag} must be a multiple of this model's VAE scale factor {factor}, got {value}")
    if args.image is not None:
        from lcm.images import load_image

        load_image(args.image, 3)  # readable (one line if not), before anything is loaded
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    count = len(args.prompt) * args.num_images
    if count > MAX_IMAGES:
        raise ValueError(
            f"{len(args.prompt)} prompts x --num-images {args.num_images} is {count} images; at most {MAX_IMAGES}"
        )
    out = Path(args.out)
    if out.suffix.lower() == ".png" and count > 1:
        raise ValueError(
            f"--out {args.out} names one PNG but {count} images will be made: give a folder (and --grid for a grid)"
        )
    if out.suffix and out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a folder or a .png file, got {args.out}")
    if args.grid and Path(args.grid).suffix.lower() != ".png":
        raise ValueError(f"--grid writes a PNG: give a name ending in .png, got {args.grid}")
    return device, dtype


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def run_sample(args: argparse.Namespace) -> int:
    from lcm.images import load_image, save_image, save_labelled_grid
    from lcm.maths.timesteps import sampler_timesteps
    from lcm.models.fast import optimize
    from lcm.models.latent_diffusion import LatentDiffusion
    from lcm.sample import default_model_path, default_sampling_path, generate, latent_shape

    device, dtype = check_flags(args)
    # A LoRA needs a base model: the shipped teacher; otherwise the shipped LCM.
    model_path = args.model or (default_model_path() if args.lora else default_sampling_path())
    model = LatentDiffusion.from_pretrained(model_path, lora=args.lora, lora_scale=args.lora_scale)
    sampler = Sampler(args.sampler) if args.sampler else (Sampler.LCM if model.is_lcm else Sampler.DDIM)
    negative_guidance = args.negative_guidance or 0.0
    if sampler.for_distilled and not model.is_lcm:
        raise ValueError(
            f"the {sampler.value} sampler needs an LCM (a consistency-distilled model, or --lora with an LCM or TCD "
            "LoRA); use --sampler ddim|dpm|dpmpp"
        )
    if negative_guidance and not sampler.for_distilled:
        raise ValueError(
            f"--negative-guidance is for LCMs; {model_path} is a teacher, whose --negative-prompt is the unconditional "
            "side of its guidance, weighted by --guidance"
        )
    if args.negative_prompt and sampler.for_distilled and not negative_guidance:
        raise ValueError(
            "--negative-prompt does nothing on its own for an LCM (its guidance is distilled in, against the empty "
            "prompt): add --negative-guidance S (a second UNet call per step)"
        )
    w = args.guidance if args.guidance is not None else model.default_w
    if args.negative_prompt and not sampler.for_distilled and w == 0:
        raise ValueError("--negative-prompt needs --guidance w > 0 (w = 0 runs the teacher without guidance)")
    native_h, native_w = (s * model.vae_scale_factor for s in model.latent_shape[1:])
    size = (args.height or native_h, args.width or native_w)
    latent_shape(model, size)  # refuses sizes the VAE cannot make (a hub model's factor is known only now)
    optimize(model, device, dtype, Compile(args.compile))
    steps = args.steps or (4 if sampler.for_distilled else 25)
    gamma = args.gamma if args.gamma is not None else DEFAULT_GAMMA
    strength = args.strength if args.strength is not None else DEFAULT_STRENGTH
    init = None
    if args.image is not None:
        sampler_timesteps(sampler, steps, model.scheduler_config, model.schedule, strength)  # no step left: one line
        init = load_image(args.image, int(model.vae.config.in_channels), size)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    seeds = [args.seed + i for _ in args.prompt for i in range(args.num_images)]
    images = generate(
        model,
        prompts,
        sampler,
        steps,
        w,
        seeds,
        batch_size=args.batch_size,
        progress=True,
        negative_prompt=args.negative_prompt or "",
        gamma=gamma,
        negative_guidance=negative_guidance,
        size=size,
        init_images=init,
        strength=strength,
    )

    settings = {
        "negative_prompt": args.negative_prompt or "",
        "steps": steps,
        "w": w,
        "guidance_scale": w + 1,  # diffusers' convention
        "sampler": sampler.value,
        "gamma": gamma if sampler is Sampler.TCD else None,
        "negative_guidance": negative_guidance if negative_guidance else None,
        "image": str(args.image) if args.image is not None else None,
        "strength": strength if args.image is not None else None,
        "height": size[0],
        "width": size[1],
        "model": str(model_path),
        "lora": str(args.lora) if args.lora is not None else None,
        "lora_scale": args.lora_scale if args.lora is not None else None,
        "software": "lcm",
    }
    out = Path(args.out)
    single = out.suffix.lower() == ".png"
    digits = max(3, len(str(len(images) - 1)))
    for i, (image, prompt, seed) in enumerate(zip(images, prompts, seeds, strict=True)):
        path = out if single else out / f"{i:0{digits}d}-seed{seed}.png"
        save_image(image, path, scale=args.scale, metadata={"prompt": prompt, "seed": seed, **settings})
    what = f"{_plural(len(images), 'image')} ({sampler.value}, {_plural(steps, 'step')}, w={w:g}"
    what += f", gamma={gamma:g}" if sampler is Sampler.TCD else ""
    what += f", negative guidance {negative_guidance:g}" if negative_guidance else ""
    what += f", img2img strength {strength:g}" if args.image is not None else ""
    print(f"{what}) written to {out}")
    if args.grid is not None:
        grid = Path(args.grid) if args.grid else (out.with_name(out.stem + "-grid.png") if single else out / "grid.png")
        columns = [f"seed {args.seed + i}" for i in range(args.num_images)]
        save_labelled_grid(images, grid, rows=args.prompt, columns=columns, scale=args.scale)
        shape = f"{_plural(len(args.prompt), 'row')} of prompts, {_plural(args.num_images, 'column')} of seeds"
        print(f"grid ({shape}) written to {grid}")
    return 0


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
    p.add_argument(
        "--lora",
        help="a LoRA file or folder applied to --model's UNet, e.g. an LCM-LoRA (diffusers', kohya's or peft's "
        "naming; .safetensors); it is sampled as an LCM",
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora (default 1)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument(
        "--negative-prompt",
        help="what to steer away from. Teachers: the unconditional side of classifier-free guidance (instead of the "
        "empty prompt), weighted by --guidance. LCMs: used only with --negative-guidance",
    )
    p.add_argument(
        "--sampler",
        choices=[s.value for s in Sampler],
        help="lcm (multistep consistency sampling) or tcd (TCD's stochastic sampler, --gamma) for LCMs; ddim, dpm "
        "(DPM-Solver 2M) or dpmpp (DPM-Solver++ 2M) for teachers; default lcm for LCMs, else ddim",
    )
    p.add_argument("--steps", type=int, help="sampling steps (default 4 for lcm and tcd, 25 otherwise)")
    p.add_argument(
        "--guidance",
        type=float,
        help="guidance weight w (default: the middle of an LCM's distillation range; 3 for the Fashion teacher, "
        "6.5 for other teachers, i.e. diffusers' 7.5)",
    )
    p.add_argument(
        "--gamma",
        type=float,
        help=f"TCD's stochasticity gamma in [0, 1] (diffusers' eta; default {DEFAULT_GAMMA}): each step goes down to "
        "s = (1 - gamma)·t_next and is re-noised up to t_next; 0 is deterministic. Needs --sampler tcd",
    )
    p.add_argument(
        "--negative-guidance",
        type=float,
        help="LCMs only: S >= 0. Each step also runs the UNet on --negative-prompt (the empty prompt without one) "
        "and uses out(prompt) + S·(out(prompt) - out(negative)): a second UNet call per step (4 steps = 8 network "
        "evaluations per image). Default 0: the plain one-call sampler",
    )
    p.add_argument(
        "--image",
        help="init image (PNG, JPEG, …) for image-to-image, resized (Lanczos) to the output size: --height/--width, "
        "default the model's native size",
    )
    p.add_argument(
        "--strength",
        type=float,
        help=f"img2img strength in (0, 1] (default {DEFAULT_STRENGTH}): how much noise the init image gets; "
        "lcm keeps --steps steps on the first strength·N points of its skipping grid, ddim/dpm/dpmpp/tcd run the "
        "last int(steps·strength) of their steps, as diffusers' img2img pipelines",
    )
    p.add_argument(
        "--height", type=int, help="image height in pixels, a multiple of the VAE's scale factor (default: native)"
    )
    p.add_argument(
        "--width", type=int, help="image width in pixels, a multiple of the VAE's scale factor (default: native)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    p.add_argument("--num-images", type=int, default=8, help="images per prompt (default 8)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument(
        "--scale", type=int, default=1, help="integer nearest-neighbour upscaling of every PNG written (default 1)"
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
    add_speed_args(p, "on the CPU it pays for many images or repeated runs (kernels are cached in $LCM_CACHE/inductor)")
    p.set_defaults(func=run_sample)
