"""``lcm cache``: VAE latents and text embeddings of a dataset, written once, for ``lcm distill --data CACHE``."""

from __future__ import annotations

import argparse

from lcm.cli.common import check_int
from lcm.cli.flags import add_knob_flags, typed_settings
from lcm.limits import MAX_BATCH

# The data settings of a training run that say what is cached (crops and flips cannot be: --random-crop/flip).
DATA_FLAGS = ("data.source", "data.image_column", "data.caption_column", "data.resolution", "data.num_workers")
DATA_FLAGS += ("data.data_dir", "data.allow_outside_files")


def run_cache(args: argparse.Namespace) -> int:
    from lcm.config.run import DataConfig
    from lcm.data.latent_cache import write_latent_cache
    from lcm.data.sources import parse_data_spec
    from lcm.models.fast import parse_device
    from lcm.models.latent_diffusion import LatentDiffusion
    from lcm.shipped import default_model_path
    from lcm.training.runs import build_dataset

    check_int(args.batch_size, "--batch-size", 1, MAX_BATCH)
    check_int(args.shard_size, "--shard-size", 1, 1 << 20)
    if args.shard_size % args.batch_size:
        raise ValueError(f"--shard-size ({args.shard_size}) must be a multiple of --batch-size ({args.batch_size})")
    data = DataConfig(**{k.removeprefix("data."): v for k, v in typed_settings(args).items()})
    parse_data_spec(data.source)
    device = parse_device(args.device)
    model_path = args.model or str(default_model_path())
    model = LatentDiffusion.from_pretrained(model_path, device=device)
    dataset = build_dataset(data, model)
    if not hasattr(dataset, "__len__"):
        raise ValueError(f"--data {data.source}: WebDataset shards stream without a length; cache a folder or dataset")
    description = {
        "model": str(model_path),
        "data": data.source,
        "image_column": data.image_column,
        "caption_column": data.caption_column,
        "resolution": data.resolution,
    }
    manifest = write_latent_cache(
        model, dataset, args.out, description, args.shard_size, args.batch_size, data.num_workers
    )
    skipped = f", {manifest['skipped']} unreadable skipped" if manifest["skipped"] else ""
    print(f"cached {manifest['samples']} samples in {len(manifest['shards'])} shards{skipped}: {args.out}")
    print(f"train from it with: lcm distill --teacher {model_path} --data {args.out} ...")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="encode a dataset once (VAE latents + text embeddings) so that lcm distill skips both encoders",
        description=(
            "Run the model's VAE encoder and text encoder over --data once and write safetensors shards to --out. "
            "`lcm distill --teacher MODEL --data OUT` then trains from the cache. Each step still draws a fresh "
            "sample of the VAE posterior (its mean and standard deviation are cached). Images are cached with the "
            "data's centre crop and no flips: --random-crop and --random-flip cannot be used with a cache. An "
            "interrupted run resumes when run again with the same flags. WebDataset shards cannot be cached."
        ),
    )
    p.add_argument(
        "--model",
        help="model whose VAE and text encoder to use: the teacher of the distillation "
        "(default: the shipped Fashion teacher)",
    )
    p.add_argument("--out", required=True, help="cache folder (lcm_cache.json and shard-NNNNN.safetensors)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    p.add_argument(
        "--shard-size", type=int, default=1024, help="samples per shard, a multiple of --batch-size (default 1024)"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_knob_flags(p, DATA_FLAGS)
    p.set_defaults(func=run_cache)
