"""Sampling speed: lcm against diffusers' ``LatentConsistencyModelPipeline``, same weights, inputs and generators.

    python benchmarks/sampling.py                         # CPU, the embedded LCM (a w-conditioned copy of the teacher)
    python benchmarks/sampling.py --model lcm-demo/lcm    # any LCM folder
    python benchmarks/sampling.py --arch sd15 --device cuda --dtype fp16   # SD-1.5 architecture, random weights, 512²

Rows: end-to-end latency (prompt embeddings given to both sides, as repeated prompts are served from a cache; noise,
every UNet call and the VAE decode included) for 1/2/4 steps at batch 1 and 16, medians of ``--repeats`` runs after
warm-up, the implementations interleaved run by run. ``ours`` runs eager and compiled (the compile time is reported
apart); ``bare`` is the UNet calls and the decode alone, so ``overhead = ours / bare − 1`` is what the sampler adds. On
CUDA the FLOP count of one UNet call and one decode gives the model FLOP utilisation against ``--peak-tflops``. Prints a
table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lcm.maths.guidance import guidance_scale_from_w
from lcm.models.export import export_lcm_folder
from lcm.models.fast import Compile, optimize, parse_device, parse_dtype
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import full_student
from lcm.models.text import TextEmbeddings
from lcm.sample import Sampler, sample_latents
from lcm.shipped import default_model_path

HERE = Path(__file__).resolve().parent


def embedded_lcm(folder: Path) -> Path:
    """The shipped teacher as a w-conditioned LCM folder (timing does not depend on distillation)."""
    teacher = LatentDiffusion.from_pretrained(default_model_path(), with_text_encoder=False)
    student = full_student(teacher.unet).eval()
    return export_lcm_folder(default_model_path(), student, teacher.scheduler_config, 50, folder, {"benchmark": True})


def sd15_lcm(folder: Path, resolution: int) -> Path:
    """A random-weight SD-1.5-architecture LCM folder (UNet with w input, VAE, LCMScheduler) from configs/."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet_cfg = json.loads((HERE / "configs" / "sd15_unet.json").read_text())
    vae_cfg = json.loads((HERE / "configs" / "sd15_vae.json").read_text())
    unet_cfg["sample_size"] = resolution // 8
    UNet2DConditionModel.from_config({**unet_cfg, "time_cond_proj_dim": 256}).save_pretrained(folder / "unet")
    AutoencoderKL.from_config(vae_cfg).save_pretrained(folder / "vae")
    LCMScheduler.from_config(json.loads((HERE / "configs" / "sd15_scheduler.json").read_text())).save_config(
        folder / "scheduler"
    )
    return folder


def text_for(model: LatentDiffusion, batch: int, device, dtype, context: tuple[int, int] | None) -> TextEmbeddings:
    if context is None:  # the model's own text encoder
        return model.encode_prompts(["a photo of a sneaker"] * batch)
    g = torch.Generator().manual_seed(1)
    return TextEmbeddings(torch.randn(batch, *context, generator=g).to(device, dtype))


def diffusers_pipeline(folder: Path, device, dtype):
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device, dtype)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    vae.to(device, dtype)  # as torch_dtype gives it; its LCM pipeline never upcasts (ours does in fp16: more work)
    scheduler = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe = LatentConsistencyModelPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bare_inputs(model: LatentDiffusion, batch: int, w: float, device, dtype):
    from lcm.maths.guidance import w_embedding

    z = torch.randn((batch, *model.latent_shape), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    t = torch.full((batch,), 999.0, device=device)
    w_emb = w_embedding(torch.full((batch,), w), model.unet.config.time_cond_proj_dim).to(device, dtype)
    return z, t, w_emb


def bench_functions(model, pipe, batch: int, w: float, device, dtype, context, with_diffusers: bool) -> dict:
    """``steps → images`` callables: ours, the bare network calls, and diffusers' pipeline."""
    text = text_for(model, batch, device, dtype, context)
    seeds = list(range(batch))
    z, t, w_emb = bare_inputs(model, batch, w, device, dtype)

    def ours(steps: int):
        return model.decode(sample_latents(model, text, text, Sampler.LCM, steps, w, seeds))

    def bare(steps: int):
        for _ in range(steps):
            model.unet_output(z, t, text, w_emb)
        return model.decode(z)

    def diffusers(steps: int):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(
            prompt_embeds=text.hidden_states,
            num_inference_steps=steps,
            guidance_scale=guidance_scale_from_w(w),
            generator=gens,
            output_type="pt",
        ).images

    return {"ours": ours, "bare": bare, **({"diffusers": diffusers} if with_diffusers else {})}


def flops(model: LatentDiffusion, batch: int, w: float, device, dtype, context) -> tuple[float, float]:
    """FLOPs of one UNet call and one VAE decode at these shapes (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    text = text_for(model, batch, device, dtype, context)
    z, t, w_emb = bare_inputs(model, batch, w, device, dtype)
    with FlopCounterMode(display=False) as unet_count:
        model.unet_output(z, t, text, w_emb)
    with FlopCounterMode(display=False) as vae_count:
        model.decode(z)
    return float(unet_count.get_total_flops()), float(vae_count.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="an LCM folder (default: the embedded LCM, or --arch sd15)")
    p.add_argument("--arch", choices=["embedded", "sd15"], default="embedded", help="model without --model")
    p.add_argument("--resolution", type=int, default=512, help="sd15 image size (default 512)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp32 on CPU, bf16/fp16 on CUDA")
    p.add_argument("--steps", default="1,2,4", help="steps (default 1,2,4)")
    p.add_argument("--batch-sizes", default="1,16", help="batch sizes (default 1,16)")
    p.add_argument("--w", type=float, default=3.0, help="guidance w (default 3)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per row (default 20)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense half-precision peak for MFU (H100: 989)")
    p.add_argument("--out", default="benchmarks/results/sampling.json", help="JSON output")
    args = p.parse_args(argv)

    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    steps_list = [int(s) for s in args.steps.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="lcm-bench-"))
    if args.model:
        folder = Path(args.model)
    elif args.arch == "sd15":
        folder = sd15_lcm(tmp / "sd15", args.resolution)
    else:
        folder = embedded_lcm(tmp / "embedded")
    context = (77, 768) if args.arch == "sd15" and not args.model else None

    ours = LatentDiffusion.from_pretrained(folder, with_text_encoder=context is None)
    optimize(ours, device, dtype, Compile.OFF)
    pipe = diffusers_pipeline(folder, device, dtype)
    rows = []

    def one_call(fn, steps: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        models = {"eager": ours}
        if not args.no_compile:
            models["compiled"] = optimize(
                LatentDiffusion.from_pretrained(folder, with_text_encoder=context is None), device, dtype, Compile.ON
            )
        for batch in batches:
            fns = {}  # (mode, impl) → callable
            for label, model in models.items():
                named = bench_functions(model, pipe, batch, args.w, device, dtype, context, label == "eager")
                fns.update({(label, name): fn for name, fn in named.items()})
            for steps in steps_list:
                first = {key: one_call(fn, steps) for key, fn in fns.items()}  # warm-up; compiles on first use
                # Interleaved: every repeat times each implementation once, so that a machine whose speed drifts
                # (other work, frequency) affects all of them alike and the ratios stay side by side.
                times = {key: [] for key in fns}
                for _ in range(args.repeats):
                    for key, fn in fns.items():
                        times[key].append(one_call(fn, steps))
                for (label, name), ts in times.items():
                    ms = statistics.median(ts) * 1e3
                    row = {"mode": label, "impl": name, "steps": steps, "batch": batch, "ms": ms}
                    rows.append({**row, "first_s": first[label, name]})
                    print(f"{label:>8} {name:>9} steps {steps} batch {batch:>2}: {ms:8.2f} ms", flush=True)
            if device.type == "cuda":
                unet_flops, vae_flops = flops(ours, batch, args.w, device, dtype, context)
                rows.append({"mode": "flops", "batch": batch, "unet_flops": unet_flops, "vae_flops": vae_flops})

    summary = summarise(rows, steps_list, batches, args.peak_tflops)
    print("\n" + summary["table"])
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "model": str(args.model or args.arch),
        "torch": torch.__version__,
        "rows": rows,
        "ratios": summary["ratios"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")
    return 0


def summarise(rows: list[dict], steps_list, batches, peak_tflops: float) -> dict:
    def ms(mode, impl, steps, batch):
        for r in rows:
            if (r.get("mode"), r.get("impl"), r.get("steps"), r.get("batch")) == (mode, impl, steps, batch):
                return r["ms"]
        return None

    lines = [
        "| steps | batch | diffusers | lcm eager | lcm compiled | bare compiled | speed-up vs diffusers | overhead |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratios = []
    for batch in batches:
        for steps in steps_list:
            ref, eager = ms("eager", "diffusers", steps, batch), ms("eager", "ours", steps, batch)
            comp, bare = ms("compiled", "ours", steps, batch), ms("compiled", "bare", steps, batch)
            best = comp or eager
            bare = bare or ms("eager", "bare", steps, batch)
            ratio = ref / best
            overhead = best / bare - 1
            ratios.append({"steps": steps, "batch": batch, "speedup": ratio, "overhead": overhead})

            def f(x):
                return "—" if x is None else f"{x:.1f} ms"

            lines.append(
                f"| {steps} | {batch} | {f(ref)} | {f(eager)} | {f(comp)} | {f(bare)} | {ratio:.2f}x | "
                f"{overhead * 100:+.1f}% |"
            )
    for r in rows:
        if r.get("mode") == "flops":
            for steps in steps_list:
                best = ms("compiled", "ours", steps, r["batch"]) or ms("eager", "ours", steps, r["batch"])
                total = steps * r["unet_flops"] + r["vae_flops"]
                mfu = total / (best / 1e3) / (peak_tflops * 1e12)
                ratios.append({"steps": steps, "batch": r["batch"], "tflop": total / 1e12, "mfu": mfu})
    return {"table": "\n".join(lines), "ratios": ratios}


if __name__ == "__main__":
    sys.exit(main())
