"""``lcm distill`` (LCD), ``lcm finetune`` (LCF) and ``lcm tune`` (a diffusion model's own loss): their flags are the
knobs of the run-config tree (:mod:`lcm.cli.flags`)."""

from __future__ import annotations

import argparse

from lcm.cli.flags import add_run_flags, run_config_from


def _run(command: str, verb: str):
    def run(args: argparse.Namespace) -> int:
        from lcm.training.runs import run_training

        summary = run_training(run_config_from(args, command), args.out, args.resume)
        print(f"{verb} {summary['steps']} steps in {summary['wall_seconds']:.0f} s; model in {args.out}")
        return 0

    return run


def add_parser(sub) -> None:
    ds = sub.add_parser(
        "distill",
        help="Latent Consistency Distillation of a teacher into a few-step LCM (full UNet or LCM-LoRA)",
        description=(
            "Distil a diffusers-format latent diffusion model (SD 1.x/2.x epsilon or v, SDXL, or the embedded "
            "Fashion teacher) into an LCM by consistency distillation over the guidance-augmented PF-ODE. "
            "Runs on many GPUs with `accelerate launch -m lcm.cli distill ...`. The export lands in --out, the "
            "training state in --out/train; `lcm distill --out RUN --resume latest` continues a run."
        ),
    )
    ds.add_argument("--teacher", help="teacher model folder or hub id (default: the shipped Fashion teacher)")
    add_run_flags(ds, "distill")
    ds.set_defaults(func=_run("distill", "distilled"))

    ft = sub.add_parser(
        "finetune",
        help="Latent Consistency Fine-tuning: adapt an LCM to your image-caption data without a teacher",
        description=(
            "Teacher-free consistency fine-tuning (LCF) of an LCM made by lcm distill: both ends of each skipping "
            "step share one noise sample, the target is an EMA of the student. The LCM's guidance input is held at "
            "--lcf-w during fine-tuning (no teacher means no guided ODE to distil other w from)."
        ),
    )
    ft.add_argument("--model", help="(required) the LCM to fine-tune: a full LCM folder or an LCM-LoRA folder")
    add_run_flags(ft, "finetune")
    ft.set_defaults(func=_run("finetune", "fine-tuned"))

    tu = sub.add_parser(
        "tune",
        help="fine-tune a diffusion model (not an LCM) on your images with its own loss: a style LoRA or a full UNet",
        description=(
            "Fine-tune a diffusers latent diffusion model on image-caption data with its denoising loss (epsilon, v "
            "or sample prediction, as its scheduler says), a fraction of the captions dropped for classifier-free "
            "guidance. A LoRA student (--student lora) exports pytorch_lora_weights.safetensors, a style LoRA that "
            "lcm sample --lora stacks with an LCM-LoRA and lcm merge fuses; a full student exports a model folder."
        ),
    )
    tu.add_argument("--model", help="the model to fine-tune: a folder or hub id (default: the shipped Fashion teacher)")
    add_run_flags(tu, "tune")
    tu.set_defaults(func=_run("tune", "tuned"))
