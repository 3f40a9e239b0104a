"""The ``lcm`` command line. Arguments are parsed and validated here, and nowhere below."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__

# Stable Diffusion 1.x/2.x's training schedule, used where no scheduler config is given.
STABLE_DIFFUSION_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import demo_config_from, run_demo

    cfg = demo_config_from(
        Path(args.out),
        args.quick,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        solver=args.solver,
        eval_samples=args.eval_samples,
        seed=args.seed,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        teacher=Path(args.teacher) if args.teacher else None,
    )
    run_demo(cfg)
    return 0


def _cmd_timesteps(args: argparse.Namespace) -> int:
    from .schedule import NoiseSchedule
    from .timesteps import ddim_timesteps, dpm_solver_timesteps, lcm_timesteps

    config = json.loads(args.scheduler_config.read()) if args.scheduler_config else STABLE_DIFFUSION_SCHEDULE
    schedule = NoiseSchedule.from_config(config)
    num_train = schedule.num_train_timesteps
    if args.sampler == "lcm":
        ts = lcm_timesteps(args.steps, args.original_steps, num_train)
    elif args.sampler == "ddim":
        ts = ddim_timesteps(
            args.steps, num_train, config.get("timestep_spacing", "leading"), config.get("steps_offset", 0)
        )
    else:
        ts = dpm_solver_timesteps(
            args.steps, schedule, config.get("timestep_spacing", "linspace"), config.get("steps_offset", 0)
        )
    alpha, sigma = schedule.alpha_sigma(ts)
    print(f"{'t':>4}  {'alpha_t':>8}  {'sigma_t':>8}")
    for t, a, s in zip(ts.tolist(), alpha.tolist(), sigma.tolist(), strict=True):
        print(f"{t:>4d}  {a:8.6f}  {s:8.6f}")
    return 0


def _cmd_train_teacher(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .train_teacher import TeacherTrainConfig, train_teacher

    cfg = TeacherTrainConfig(
        out=Path(args.out),
        data_dir=Path(args.data_dir) if args.data_dir else None,
        seed=args.seed,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        classifier_steps=args.classifier_steps,
        unet_batch=args.batch_size,
        unet_channels=tuple(int(c) for c in args.unet_channels.split(",")),
        max_train_images=args.max_train_images,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
    )
    report = train_teacher(cfg)
    print(json.dumps({k: report[k] for k in ("scaling_factor", "vae_test_mse", "classifier_test_accuracy")}))
    print(f"teacher written to {cfg.out} (sample grids in {cfg.out / 'samples'})")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .generate import Sampler, default_guidance, default_model_path, generate
    from .images import save_grid
    from .teacher import LatentDiffusion

    if args.lora is None and args.lora_scale != 1.0:
        raise ValueError("--lora-scale needs --lora")
    model = LatentDiffusion.from_pretrained(
        args.model or default_model_path(), lora=args.lora, lora_scale=args.lora_scale
    )
    sampler = Sampler(args.sampler) if args.sampler else (Sampler.LCM if model.is_lcm else Sampler.DDIM)
    steps = args.steps or (4 if sampler is Sampler.LCM else 25)
    w = args.guidance if args.guidance is not None else default_guidance(model)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    seeds = [args.seed + i for _ in args.prompt for i in range(args.num_images)]
    images = generate(model, prompts, sampler, steps, w, seeds, batch_size=args.batch_size, progress=True)
    path = save_grid(images, args.out, nrow=args.num_images, scale=args.scale)
    print(f"{len(images)} images ({sampler.value}, {steps} steps, w={w}) written to {path}")
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{flag}: steps must be at least 1, got {text!r}")
    return values


def _float_list(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"{flag}: give one or more guidance weights w >= 0, got {text!r}")
    return values


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluate import EMBEDDED, EvalPlan, EvalSettings, Method
    from .generate import Sampler, default_guidance, default_model_path
    from .metrics import METRICS
    from .teacher import LatentDiffusion

    teacher = args.teacher or str(default_model_path())
    samplers = [x for x in args.teacher_samplers.split(",") if x.strip()]
    if bad := [x for x in samplers if x not in ("ddim", "dpm", "dpmpp")]:
        raise ValueError(f"--teacher-samplers: unknown sampler(s) {bad}; choose from ddim, dpm, dpmpp")
    names = {"ddim": "DDIM", "dpm": "DPM-Solver", "dpmpp": "DPM-Solver++"}
    teacher_steps = _int_list(args.teacher_steps, "--teacher-steps")
    methods = [Method(f"teacher {names[x]}", teacher, Sampler(x), teacher_steps) for x in samplers]
    lcm_steps = _int_list(args.lcm_steps, "--lcm-steps")
    for spec in args.lcm or []:
        folder, _, name = spec.partition("=")
        if not Path(folder).exists() and "/" not in folder:
            raise ValueError(f"--lcm {folder}: no such folder")
        label = name or ("LCM" if len(args.lcm) == 1 else f"LCM ({Path(folder).name})")
        methods.append(Method(label, folder, Sampler.LCM, lcm_steps))
    if not methods:
        raise ValueError("nothing to evaluate: give --lcm and/or --teacher-samplers")
    if len({m.name for m in methods}) != len(methods):
        raise ValueError("two methods share a name; name each LCM with --lcm PATH=NAME")

    classifier = args.classifier
    embedded_teacher = Path(teacher, "classifier", "model.safetensors").is_file()
    if classifier is None and embedded_teacher:
        classifier = str(Path(teacher) / "classifier")
    prompts = args.prompts or (EMBEDDED if embedded_teacher else None)
    if prompts is None:
        raise ValueError("--prompts is required for this teacher: a .txt file (a prompt a line) or a data set")
    if args.metrics:
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    else:
        metrics = ("fd-clf", "kid-clf", "accuracy") if prompts == EMBEDDED else ("fid", "kid", "clip")
    if bad := [m for m in metrics if m not in METRICS]:
        raise ValueError(f"--metrics: unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
    if "accuracy" in metrics and prompts != EMBEDDED:
        raise ValueError("--metrics accuracy needs --prompts embedded (only those prompts name a class)")
    if args.reference:
        reference = args.reference
    elif prompts == EMBEDDED or not prompts.endswith(".txt"):
        reference = prompts  # the embedded test split, or the prompts' own data set
    elif all(METRICS[m][1] == "clip" for m in metrics):
        reference = "none"
    else:
        raise ValueError("--reference is required: reference images (a data set) or FID statistics (.npz/.safetensors)")
    if args.sweep_w:
        ws = _float_list(args.sweep_w, "--sweep-w")
    elif args.w is not None:
        ws = _float_list(str(args.w), "--w")
    else:
        ws = (default_guidance(LatentDiffusion.from_pretrained(teacher, with_text_encoder=False)),)  # teacher's w
    if args.num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2 (a covariance needs two images), got {args.num_samples}")
    settings = EvalSettings(
        prompts=prompts,
        caption_column=args.caption_column,
        num_samples=args.num_samples,
        seed=args.seed,
        metrics=metrics,
        reference=reference,
        reference_samples=args.reference_samples,
        split=args.split,
        image_column=args.image_column,
        teacher_spacing=args.teacher_spacing,
        classifier=classifier if any(METRICS[m][1] == "clf" for m in metrics) else None,
        inception_weights=args.inception_weights,
        clip_model=(args.clip_model or "openai/clip-vit-large-patch14") if "clip" in metrics else None,
    )
    plan = EvalPlan(
        methods=tuple(methods),
        ws=ws,
        settings=settings,
        out=Path(args.out),
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        device=args.device or ("cuda" if _cuda() else "cpu"),
        data_dir=Path(args.data_dir) if args.data_dir else None,
    )
    from .evaluate import run_eval

    run_eval(plan)
    print(f"\ntable: {plan.out / 'results.md'}\nrows: {plan.out / 'results.json'}\nplots: {plan.out}/*.png")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _add_consistency_args(p: argparse.ArgumentParser, title: str):
    """Flags LCD and LCF share: student kind, skipping grid, distance, target, LoRA."""
    g = p.add_argument_group(title)
    g.add_argument("--student", choices=["full", "lora"], default="full", help="full UNet (+w-embedding) or LoRA")
    g.add_argument("--num-solver-steps", type=int, default=50, help="N of the skipping grid; k = 1000 // N (50)")
    g.add_argument("--loss", choices=["l2", "huber"], default="huber", help="consistency distance (default huber)")
    g.add_argument("--huber-c", type=float, default=0.001, help="pseudo-Huber c (default 0.001)")
    g.add_argument("--ema-decay", type=float, default=0.95, help="target EMA decay mu, full student (default 0.95)")
    g.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (default 64)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: = rank, i.e. scale 1)")
    g.add_argument("--lora-targets", help="comma-separated module names to adapt (default: LCM-LoRA's list)")
    g.add_argument("--fuse-lora", action="store_true", help="export the LoRA merged into a full LCM folder")
    return g


def _add_training_args(p: argparse.ArgumentParser, lr_help: str, steps: int) -> None:
    """Flags of the shared training loop (distill and finetune)."""
    g = p.add_argument_group("training loop")
    g.add_argument("--out", required=True, help="run folder: checkpoints/, logs/ (TensorBoard), validation/, export")
    g.add_argument("--max-steps", type=int, default=steps, help=f"optimiser steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=32, help="samples per device per micro-batch (default 32)")
    g.add_argument("--learning-rate", type=float, help=f"AdamW learning rate ({lr_help})")
    g.add_argument("--lr-schedule", default="constant", help="constant, constant_with_warmup, linear, cosine, …")
    g.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    g.add_argument("--adam-weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes AdamW8bit (GPU, saves memory)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step (default 1)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1)")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast (VAE stays fp32)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for UNet activation memory")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, noise, t and w draws (default 0)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default 2)")
    g.add_argument("--validate-every", type=int, default=500, help="steps between validation grids (default 500)")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines (default 10)")
    g.add_argument("--resume", help="'latest' or a checkpoint folder: continue exactly where it stopped")
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default="fashion-mnist",
        help="fashion-mnist[:classes], an image folder with metadata.jsonl, a datasets name or saved folder, "
        "or WebDataset shards (path, brace pattern or URL) (default fashion-mnist)",
    )
    d.add_argument("--image-column", help="image column of a datasets dataset (default image)")
    d.add_argument("--caption-column", help="caption column / metadata key (default text)")
    d.add_argument("--resolution", type=int, help="training resolution (default: the model's native size)")
    d.add_argument("--random-crop", action="store_true", help="random instead of centre crop")
    d.add_argument("--random-flip", action="store_true", help="random horizontal flips")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    d.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian package or download)")
    v = p.add_argument_group("validation")
    v.add_argument("--validation-prompt", action="append", help="prompt of the validation grid (repeatable)")
    v.add_argument("--validation-w", type=float, default=None, help="guidance w of the validation grid")


def _loop_config(args: argparse.Namespace, default_lr: float):
    from pathlib import Path

    from .trainer import TrainConfig

    return TrainConfig(
        out=Path(args.out),
        max_steps=args.max_steps,
        learning_rate=args.learning_rate if args.learning_rate is not None else default_lr,
        lr_schedule=args.lr_schedule,
        lr_warmup_steps=args.lr_warmup_steps,
        adam_weight_decay=args.adam_weight_decay,
        use_8bit_adam=args.use_8bit_adam,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        validate_every=args.validate_every,
        log_every=args.log_every,
        resume=args.resume,
    )


def _data_config(args: argparse.Namespace):
    from pathlib import Path

    from .run_distill import DataConfig

    return DataConfig(
        source=args.data,
        image_column=args.image_column,
        caption_column=args.caption_column,
        resolution=args.resolution,
        center_crop=not args.random_crop,
        random_flip=args.random_flip,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        data_dir=Path(args.data_dir) if args.data_dir else None,
    )


def _validation_prompts(args: argparse.Namespace, model_is_embedded: bool) -> tuple[str, ...]:
    if args.validation_prompt:
        return tuple(args.validation_prompt)
    if model_is_embedded:
        from .data.captions import class_prompts

        return tuple(class_prompts())
    return ("a photo of an astronaut riding a horse", "a cosy cabin in a snowy forest, golden hour")


def _lora_settings(args: argparse.Namespace):
    from .tasks import LoraSettings

    targets = tuple(args.lora_targets.split(",")) if args.lora_targets else None
    return LoraSettings(
        rank=args.lora_rank, alpha=args.lora_alpha, fuse=args.fuse_lora, **({"targets": targets} if targets else {})
    )


def _cmd_distill(args: argparse.Namespace) -> int:
    from .distill import LCDConfig
    from .generate import default_model_path
    from .run_distill import run_distillation
    from .student import StudentKind

    teacher = args.teacher or str(default_model_path())
    lcd = LCDConfig(
        num_solver_steps=args.num_solver_steps,
        solver=args.solver,
        w_min=args.w_min,
        w_max=args.w_max,
        loss=args.loss,
        huber_c=args.huber_c,
        ema_decay=args.ema_decay,
    )
    summary = run_distillation(
        teacher,
        _data_config(args),
        lcd,
        _loop_config(args, 1e-4 if args.student == "lora" else 1e-6),
        student=StudentKind(args.student),
        lora=_lora_settings(args),
        gradient_checkpointing=args.gradient_checkpointing,
        validation_prompts=_validation_prompts(args, args.teacher is None),
        validation_w=args.validation_w if args.validation_w is not None else (args.w_min + args.w_max) / 2,
    )
    print(f"distilled {summary['steps']} steps in {summary['wall_seconds']:.0f} s; model in {args.out}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import LCFConfig
    from .run_distill import run_finetune
    from .student import StudentKind

    lcf = LCFConfig(
        num_solver_steps=args.num_solver_steps,
        w=args.lcf_w,
        loss=args.loss,
        huber_c=args.huber_c,
        ema_decay=args.ema_decay,
    )
    summary = run_finetune(
        args.model,
        _data_config(args),
        lcf,
        _loop_config(args, 1e-4 if args.student == "lora" else 1e-5),
        student=StudentKind(args.student),
        lora=_lora_settings(args),
        gradient_checkpointing=args.gradient_checkpointing,
        validation_prompts=_validation_prompts(args, args.data.startswith("fashion-mnist")),
    )
    print(f"fine-tuned {summary['steps']} steps in {summary['wall_seconds']:.0f} s; model in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcm",
        description="Latent Consistency Models: distil a latent diffusion model into a 1-4 step generator.",
    )
    parser.add_argument("--version", action="version", version=f"lcm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="distil the shipped Fashion-MNIST teacher on the CPU and compare the LCM with it",
        description=(
            "Distil the shipped Fashion-MNIST teacher into an LCM (full UNet, LCD), then write a grid (rows: teacher "
            "DDIM at 1/2/4/8 steps, LCM at 1/2/4/8 steps) and a table of FD-clf, KID-clf and prompt accuracy. "
            "Rerunning resumes an interrupted distillation."
        ),
    )
    demo.add_argument("--out", default="lcm-demo", help="output folder (default lcm-demo)")
    demo.add_argument("--quick", action="store_true", help="a minute-long smoke run (20 steps, 100 images per row)")
    demo.add_argument("--max-steps", type=int, help="LCD steps (default 1500)")
    demo.add_argument("--batch-size", type=int, help="LCD batch size (default 32)")
    demo.add_argument("--solver", choices=["ddim", "dpm", "dpmpp"], help="ODE solver of distillation (default ddim)")
    demo.add_argument("--eval-samples", type=int, help="images per table row (default 1000)")
    demo.add_argument("--seed", type=int, help="seed of distillation and evaluation (default 0)")
    demo.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian package or download)")
    demo.add_argument("--teacher", help="a Fashion teacher folder from lcm train-teacher (default: the shipped one)")
    demo.set_defaults(func=_cmd_demo)

    tt = sub.add_parser(
        "train-teacher",
        help="train the embedded Fashion-MNIST teacher (VAE, UNet, evaluation classifier)",
        description=(
            "Train the embedded default: an AutoencoderKL, an epsilon-prediction UNet2DConditionModel conditioned on "
            "MiniLM token states, and the classifier behind the offline metrics. Writes a diffusers-format folder. "
            "Rerunning the same command resumes from the last checkpoint of each stage."
        ),
    )
    tt.add_argument("--out", required=True, help="output model folder (checkpoints go to OUT/checkpoints)")
    tt.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files (default: Debian package or download)")
    tt.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give equal weights (default 0)")
    tt.add_argument("--vae-steps", type=int, default=1200, help="VAE optimisation steps, batch 128 (default 1200)")
    tt.add_argument("--unet-steps", type=int, default=6000, help="UNet optimisation steps (default 6000)")
    tt.add_argument("--classifier-steps", type=int, default=2500, help="classifier steps, batch 128 (default 2500)")
    tt.add_argument("--batch-size", type=int, default=128, help="UNet batch size (default 128)")
    tt.add_argument("--unet-channels", default="32,64,64", help="UNet block widths (default 32,64,64)")
    tt.add_argument("--max-train-images", type=int, help="train on the first N images only (for smoke runs)")
    tt.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    tt.add_argument("--sample-every", type=int, default=1000, help="UNet steps between sample grids (default 1000)")
    tt.set_defaults(func=_cmd_train_teacher)

    sp = sub.add_parser(
        "sample",
        help="generate a PNG grid from prompts with a teacher or an LCM",
        description=(
            "Generate images from text prompts. Rows are prompts, columns are --num-images seeds. "
            "Guidance --guidance is the paper's w (diffusers' guidance_scale is w + 1)."
        ),
    )
    sp.add_argument("--model", help="diffusers-format model folder or hub id (default: the shipped Fashion teacher)")
    sp.add_argument(
        "--lora",
        help="a LoRA file or folder applied to --model's UNet, e.g. an LCM-LoRA (diffusers', kohya's or peft's "
        "naming; .safetensors); it is sampled as an LCM",
    )
    sp.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora (default 1)")
    sp.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several rows")
    sp.add_argument(
        "--sampler",
        choices=["lcm", "ddim", "dpm", "dpmpp"],
        help="lcm (LCMs), ddim, dpm (DPM-Solver 2M) or dpmpp (DPM-Solver++ 2M); default lcm for LCMs, else ddim",
    )
    sp.add_argument("--steps", type=int, help="sampling steps (default 4 for lcm, 25 otherwise)")
    sp.add_argument(
        "--guidance",
        type=float,
        help="guidance weight w (default: the middle of an LCM's distillation range; 3 for the Fashion teacher, "
        "6.5 for other teachers, i.e. diffusers' 7.5)",
    )
    sp.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    sp.add_argument("--num-images", type=int, default=8, help="images per prompt (default 8)")
    sp.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    sp.add_argument("--scale", type=int, default=2, help="pixel upscaling of the saved grid (default 2)")
    sp.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    sp.set_defaults(func=_cmd_sample)

    ds = sub.add_parser(
        "distill",
        help="Latent Consistency Distillation of a teacher into a few-step LCM (full UNet or LCM-LoRA)",
        description=(
            "Distil a diffusers-format latent diffusion model (SD 1.x/2.x epsilon or v, SDXL, or the embedded "
            "Fashion teacher) into an LCM by consistency distillation over the guidance-augmented PF-ODE. "
            "Runs on many GPUs with `accelerate launch -m lcm.cli distill ...`. The export lands in --out."
        ),
    )
    ds.add_argument("--teacher", help="teacher model folder or hub id (default: the shipped Fashion teacher)")
    m = _add_consistency_args(ds, "LCD")
    m.add_argument("--solver", choices=["ddim", "dpm", "dpmpp"], default="ddim", help="ODE solver of the teacher")
    m.add_argument("--w-min", type=float, default=2.0, help="smallest guidance w drawn (paper's w; default 2)")
    m.add_argument("--w-max", type=float, default=14.0, help="largest guidance w drawn (default 14)")
    _add_training_args(ds, lr_help="default 1e-6 for a full student, 1e-4 for LoRA, as diffusers' scripts", steps=1000)
    ds.set_defaults(func=_cmd_distill)

    ft = sub.add_parser(
        "finetune",
        help="Latent Consistency Fine-tuning: adapt an LCM to your image-caption data without a teacher",
        description=(
            "Teacher-free consistency fine-tuning (LCF) of an LCM made by lcm distill: both ends of each skipping "
            "step share one noise sample, the target is an EMA of the student. The LCM's guidance input is held at "
            "--lcf-w during fine-tuning (no teacher means no guided ODE to distil other w from)."
        ),
    )
    ft.add_argument("--model", required=True, help="the LCM to fine-tune: a full LCM folder or an LCM-LoRA folder")
    f = _add_consistency_args(ft, "LCF")
    f.add_argument("--lcf-w", type=float, default=3.0, help="guidance w fed to the LCM while fine-tuning (default 3)")
    _add_training_args(ft, lr_help="default 1e-5 for a full student, 1e-4 for LoRA", steps=1000)
    ft.set_defaults(func=_cmd_finetune)

    ev = sub.add_parser(
        "eval",
        help="the paper's table: teacher DDIM / DPM-Solver / DPM-Solver++ and LCMs at 1-8 steps, w sweeps, plots",
        description=(
            "Evaluate a teacher's DDIM, DPM-Solver and DPM-Solver++ sampling and one or more LCMs (full or LoRA) at "
            "each number of steps, with the same prompts and per-image seeds in every row. On the embedded default "
            "the metrics are FD-clf, KID-clf (the shipped classifier's features, not FID) and prompt accuracy; for "
            "other models FID/KID (FID Inception-v3) and CLIP score. Writes results.json (rerunning reuses finished "
            "rows), results.md (the paper's layout) and PNG plots to --out."
        ),
    )
    ev.add_argument("--teacher", help="teacher folder or hub id (default: the shipped Fashion teacher)")
    ev.add_argument(
        "--lcm", action="append", metavar="PATH[=NAME]", help="an LCM or LCM-LoRA folder to evaluate; repeatable"
    )
    ev.add_argument(
        "--teacher-samplers", default="ddim,dpm,dpmpp", help="teacher samplers, comma-separated; '' for none"
    )
    ev.add_argument("--teacher-steps", default="1,2,4,8,25,50", help="teacher steps (default 1,2,4,8,25,50)")
    ev.add_argument("--lcm-steps", default="1,2,4,8", help="LCM steps (default 1,2,4,8)")
    ev.add_argument(
        "--teacher-spacing",
        choices=["trailing", "leading", "linspace", "config"],
        default="trailing",
        help="timesteps of the teacher samplers: trailing (default; every schedule starts at t = T-1, so 1-2 step "
        "rows are meaningful), leading, linspace, or config (the teacher's scheduler config)",
    )
    ev.add_argument(
        "--w", type=float, help="guidance w of every row (default: 3 for the Fashion teacher, 6.5 for others)"
    )
    ev.add_argument("--sweep-w", help="comma-separated w values: every row at each w, plus the trade-off plot")
    ev.add_argument("--num-samples", type=int, default=2000, help="images per row (default 2000)")
    ev.add_argument("--seed", type=int, default=0, help="prompt and noise seed; image i uses seed*1e6 + i (default 0)")
    ev.add_argument("--batch-size", type=int, default=250, help="images per sampling batch (default 250)")
    ev.add_argument(
        "--prompts",
        help="'embedded' (Fashion captions, the default for the Fashion teacher), a .txt file with a prompt a line, "
        "or an image-caption data set as for lcm distill --data",
    )
    ev.add_argument("--caption-column", help="caption column of a --prompts data set")
    ev.add_argument(
        "--reference",
        help="reference of FD/FID/KID: 'embedded' (Fashion test split), a data set of images (default: --prompts "
        "when it is one), or FID statistics (.npz with mu/sigma, .safetensors with mean/cov)",
    )
    ev.add_argument("--image-column", help="image column of a --reference data set")
    ev.add_argument("--split", default="train", help="split of --prompts / --reference data sets (default train)")
    ev.add_argument(
        "--reference-samples", type=int, default=10_000, help="images read from a --reference data set (10000)"
    )
    ev.add_argument(
        "--metrics",
        help="comma-separated from fd-clf, kid-clf, accuracy, fid, kid, clip (default: fd-clf,kid-clf,accuracy on "
        "the embedded default, else fid,kid,clip)",
    )
    ev.add_argument("--classifier", help="Fashion classifier folder for fd-clf/kid-clf/accuracy (default: teacher's)")
    ev.add_argument(
        "--inception-weights",
        help="FID Inception-v3 weights file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); "
        "default: download it",
    )
    ev.add_argument(
        "--clip-model", help="CLIP model id or folder for --metrics clip (default openai/clip-vit-large-patch14)"
    )
    ev.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian package or download)")
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--out", default="lcm-eval", help="output folder (default lcm-eval)")
    ev.add_argument("--overwrite", action="store_true", help="discard rows of an earlier run with other settings")
    ev.set_defaults(func=_cmd_eval)

    ts = sub.add_parser(
        "timesteps",
        help="print a sampler's timesteps with their alpha_t and sigma_t",
        description="Print the timesteps a sampler visits, exactly as the installed diffusers scheduler would.",
    )
    ts.add_argument("--sampler", choices=["lcm", "ddim", "dpm", "dpmpp"], default="lcm", help="sampler (default lcm)")
    ts.add_argument("--steps", type=int, default=4, help="number of sampling steps (default 4)")
    ts.add_argument(
        "--original-steps",
        type=int,
        default=50,
        help="LCM only: N, the number of skipping-grid timesteps the LCM was distilled on (default 50)",
    )
    ts.add_argument(
        "--scheduler-config",
        type=argparse.FileType("r"),
        help="a diffusers scheduler_config.json (default: Stable Diffusion's scaled-linear schedule)",
    )
    ts.set_defaults(func=_cmd_timesteps)
    return parser


def _quiet_library_progress() -> None:
    """transformers draws a bar for every local weight load; ours (training, sampling) are the ones that matter."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_library_progress()
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad input, missing files: one line the user can act on
        print(f"lcm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
