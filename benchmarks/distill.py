"""Distillation speed: LCD samples per second and peak memory, eager / compiled, with and without the latent cache.

    python benchmarks/distill.py                                  # CPU, the embedded teacher, batch 32
    python benchmarks/distill.py --arch sd15 --device cuda --batch-size 12 --mixed-precision bf16   # 512², random

One row per (compile, cache, ``--adversarial`` weight) setting: the full LCD optimiser step as ``lcm distill`` runs
it (batch → latents and text → student, guided teacher and target → Huber loss [→ the discriminator's features and
generator term] → backward → gradient clipping → fused AdamW → EMA [→ the discriminator's step]), timed after
warm-up, median over about ``--steps``, the settings interleaved in blocks of five steps (the first of each
block untimed). Without the cache every step VAE-encodes its
images; with it the step reads the cached posterior (mean, std) and text embeddings, as ``lcm distill --data CACHE``
does. The compile time of the compiled rows is reported apart. ``--arch sd15`` builds an SD-1.5-architecture teacher
with random weights from configs/ (no downloads) and feeds random 77×768 text embeddings in place of CLIP. Prints a
table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from lcm.config import LCDConfig
from lcm.data.captions import class_prompts
from lcm.models.fast import parse_device, use_compile_cache
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.text import TextEmbeddings, TextEncoder
from lcm.shipped import default_model_path
from lcm.training.task import DistillTask

HERE = Path(__file__).resolve().parent


class RandomText(TextEncoder):
    """Fixed random embeddings per prompt (SD-1.5 shapes), standing in for CLIP in a weights-free benchmark."""

    name, hidden_size, max_length = "random", 768, 77

    def __init__(self, device):
        self.device = device

    def encode(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(hash(p) % 2**31)
            out.append(torch.randn(1, self.max_length, self.hidden_size, generator=g))
        return TextEmbeddings(torch.cat(out).to(self.device))


def sd15_teacher(folder: Path, device) -> LatentDiffusion:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((HERE / "configs" / "sd15_unet.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((HERE / "configs" / "sd15_vae.json").read_text()))
    config = dict(DDPMScheduler.from_config(json.loads((HERE / "configs" / "sd15_scheduler.json").read_text())).config)
    unet, vae = (m.to(device).eval().requires_grad_(False) for m in (unet, vae))
    return LatentDiffusion(unet, vae, config, RandomText(device), source=str(folder))


def make_batch(model: LatentDiffusion, batch: int, cached: bool) -> dict:
    """One batch of random images and class captions; cached: their posterior and embeddings instead."""
    side = model.latent_shape[1] * model.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, model.vae.config.in_channels, side, side, generator=g) * 2 - 1
    captions = [class_prompts()[i % 10] for i in range(batch)]
    if not cached:
        return {"pixel_values": pixels, "caption": captions}
    with torch.no_grad():
        dist = model.vae.encode(pixels.to(model.device, model.vae.dtype)).latent_dist
    text = model.encode_prompts(captions)
    return {
        "latent_mean": dist.mean.float() * model.scaling_factor,
        "latent_std": dist.std.float() * model.scaling_factor,
        "hidden_states": text.hidden_states,
        "caption": captions,
    }


class Row:
    """One setting's LCD step: its own teacher, student, target and optimiser (compiling works in place)."""

    def __init__(self, model, args, device, compiled: bool, cached: bool, adversarial: float = 0.0):
        self.compiled, self.cached, self.device, self.adversarial = compiled, cached, device, adversarial
        self.task = DistillTask(model, LCDConfig(w_min=1.0, w_max=5.0, adversarial_weight=adversarial))
        self.params = self.task.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-6, fused=True)
        if compiled:
            use_compile_cache()
            self.task.compile()
        self.batch = make_batch(model, args.batch_size, cached)
        self.generator = torch.Generator().manual_seed(0)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
        self.times: list[float] = []

    def step(self) -> float:
        """One optimiser step as ``lcm distill`` runs it; its seconds (device synchronised)."""
        start = time.perf_counter()
        with self.autocast:
            loss = self.task.loss(self.batch, self.generator).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.task.after_optimizer_step(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def teacher(args, device) -> LatentDiffusion:
    if args.arch == "sd15":
        return sd15_teacher(Path(tempfile.mkdtemp()), device)
    return LatentDiffusion.from_pretrained(default_model_path(), device=device)


def run_rows(args, device) -> list[dict]:
    """Every setting timed step by step in turn (interleaved), so that a machine whose speed drifts affects all
    settings alike; the first step (compilation included) is reported apart."""
    weights = [float(x) for x in args.adversarial.split(",")]
    modes = [mode == "compiled" for mode in args.modes.split(",")]
    caches = [cache == "yes" for cache in args.cache.split(",")]
    settings = [(compiled, cached, lam) for compiled in modes for cached in caches for lam in weights]
    rows = [Row(teacher(args, device), args, device, *setting) for setting in settings]
    first = [row.step() for row in rows]
    for _ in range(args.warmup):
        for row in rows:
            row.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Rounds of a few steps per setting: interleaved, so that drift in the machine's speed hits every setting alike,
    # in blocks, so that each setting runs with its own weights warm in the caches, as a training run does.
    block = 5
    for _ in range(max(1, args.steps // (block - 1))):
        for row in rows:
            row.step()  # the block's first step pays for the caches the other settings evicted: untimed
            row.times += [row.step() for _ in range(block - 1)]
    out = []
    for row, first_s in zip(rows, first, strict=True):
        sec = statistics.median(row.times)
        result = {
            "compiled": row.compiled,
            "cached": row.cached,
            "adversarial_weight": row.adversarial,
            "batch": args.batch_size,
            "step_ms": sec * 1e3,
            "samples_per_s": args.batch_size / sec,
            "first_step_s": first_s,
        }
        print(
            f"compiled={row.compiled!s:5} cached={row.cached!s:5} λ={row.adversarial:g}: "
            f"{result['step_ms']:8.1f} ms/step, "
            f"{result['samples_per_s']:7.1f} samples/s (first step {first_s:.1f} s)",
            flush=True,
        )
        out.append(result)
    return out


def peak_memory_per_setting(args, device) -> list[float]:
    """Peak memory of each setting alone (CUDA: allocated; CPU: not measured, the process's RSS mixes settings)."""
    if device.type != "cuda":
        return []
    peaks = []
    for mode in args.modes.split(","):
        caches = [cache == "yes" for cache in args.cache.split(",")]
        for cached, lam in ((c, float(x)) for c in caches for x in args.adversarial.split(",")):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row = Row(teacher(args, device), args, device, mode == "compiled", cached, lam)
            for _ in range(3):
                row.step()
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
            del row
    return peaks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=["embedded", "sd15"], default="embedded", help="teacher (default: embedded)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (embedded), 12 (sd15)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast (default no)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (default 3)")
    p.add_argument("--modes", default="eager,compiled", help="eager,compiled (default both)")
    p.add_argument("--cache", default="no,yes", help="no,yes: without and with the latent cache (default both)")
    p.add_argument("--adversarial", default="0", help="comma-separated --adversarial-weight values (default 0)")
    p.add_argument("--out", default="benchmarks/results/distill.json", help="JSON output")
    args = p.parse_args(argv)
    if {*args.modes.split(","), *args.cache.split(",")} - {"eager", "compiled", "no", "yes"}:
        p.error("--modes takes eager,compiled and --cache no,yes")
    device = parse_device(args.device)
    args.batch_size = args.batch_size or (12 if args.arch == "sd15" else 32)
    rows = run_rows(args, device)
    for row, peak in zip(rows, peak_memory_per_setting(args, device), strict=False):
        row["peak_gib"] = peak
    base = rows[0]["samples_per_s"]
    lines = [
        "| compiled | latent cache | adversarial λ | ms/step | samples/s | vs the first row | peak memory |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = f"{r['peak_gib']:.2f} GiB" if "peak_gib" in r else "—"
        lines.append(
            f"| {'yes' if r['compiled'] else 'no'} | {'yes' if r['cached'] else 'no'} | {r['adversarial_weight']:g} | "
            f"{r['step_ms']:.1f} | "
            f"{r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f}x | {peak} |"
        )
    print("\n" + "\n".join(lines))
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "mixed_precision": args.mixed_precision,
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
