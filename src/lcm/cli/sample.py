"""``lcm sample``: images from prompts with a teacher or an LCM."""

from __future__ import annotations

import argparse

from lcm.models.fast import DTYPES, Compile
from lcm.sample import Sampler


def run_sample(args: argparse.Namespace) -> int:
    from lcm.images import save_grid
    from lcm.models.fast import Compile, optimize, parse_device, parse_dtype
    from lcm.models.latent_diffusion import LatentDiffusion
    from lcm.sample import Sampler, default_model_path, generate

    if args.lora is None and args.lora_scale != 1.0:
        raise ValueError("--lora-scale needs --lora")
    for flag, value, low in (("--steps", args.steps, 1), ("--num-images", args.num_images, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--batch-size", args.batch_size), ("--scale", args.scale)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(
            f"--guidance is the paper's w and must be >= 0 (diffusers' guidance_scale - 1), got {args.guidance}"
        )
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    model = LatentDiffusion.from_pretrained(
        args.model or default_model_path(), lora=args.lora, lora_scale=args.lora_scale
    )
    optimize(model, device, dtype, Compile(args.compile))
    sampler = Sampler(args.sampler) if args.sampler else (Sampler.LCM if model.is_lcm else Sampler.DDIM)
    steps = args.steps or (4 if sampler is Sampler.LCM else 25)
    w = args.guidance if args.guidance is not None else model.default_w
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    seeds = [args.seed + i for _ in args.prompt for i in range(args.num_images)]
    images = generate(model, prompts, sampler, steps, w, seeds, batch_size=args.batch_size, progress=True)
    path = save_grid(images, args.out, nrow=args.num_images, scale=args.scale)
    print(f"{len(images)} images ({sampler.value}, {steps} steps, w={w}) written to {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate a PNG grid from prompts with a teacher or an LCM",
        description=(
            "Generate images from text prompts. Rows are prompts, columns are --num-images seeds. "
            "Guidance --guidance is the paper's w (diffusers' guidance_scale is w + 1)."
        ),
    )
    p.add_argument("--model", help="diffusers-format model folder or hub id (default: the shipped Fashion teacher)")
    p.add_argument(
        "--lora",
        help="a LoRA file or folder applied to --model's UNet, e.g. an LCM-LoRA (diffusers', kohya's or peft's "
        "naming; .safetensors); it is sampled as an LCM",
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora (default 1)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several rows")
    p.add_argument(
        "--sampler",
        choices=[s.value for s in Sampler],
        help="lcm (LCMs), ddim, dpm (DPM-Solver 2M) or dpmpp (DPM-Solver++ 2M); default lcm for LCMs, else ddim",
    )
    p.add_argument("--steps", type=int, help="sampling steps (default 4 for lcm, 25 otherwise)")
    p.add_argument(
        "--guidance",
        type=float,
        help="guidance weight w (default: the middle of an LCM's distillation range; 3 for the Fashion teacher, "
        "6.5 for other teachers, i.e. diffusers' 7.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    p.add_argument("--num-images", type=int, default=8, help="images per prompt (default 8)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--scale", type=int, default=2, help="pixel upscaling of the saved grid (default 2)")
    p.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    speed = p.add_argument_group("speed")
    speed.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    speed.add_argument(
        "--dtype", choices=list(DTYPES), help="network precision (default: bf16/fp16 on CUDA, fp32 on CPU)"
    )
    speed.add_argument(
        "--compile",
        choices=[c.value for c in Compile],
        default=Compile.AUTO.value,
        help="compile the UNet and VAE decoder (torch.compile; CUDA graphs on GPU). auto (default): on CUDA only; "
        "on the CPU it pays for many images or repeated runs (kernels are cached in $LCM_CACHE/inductor)",
    )
    p.set_defaults(func=run_sample)
