"""``lcm train-teacher``: the embedded default's VAE, latent diffusion UNet and evaluation classifier.

Three resumable stages, each deterministic given the seed: (1) the AutoencoderKL on Fashion-MNIST (MSE + a small KL,
as SD's VAE without the GAN), after which the latent scaling factor is measured as 1/std of the latents (as SD's
0.18215 was); (2) the ε-prediction UNet on those latents with 10% caption dropout (for CFG) and EMA weights;
(3) a small classifier whose features define the offline metrics. The output is a diffusers-format folder.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lcm.data.captions import CaptionSet, class_prompts
from lcm.data.fashion_mnist import load_fashion_mnist
from lcm.images import save_grid
from lcm.maths.ema import ema_update
from lcm.maths.schedule import NoiseSchedule
from lcm.models.fashion import FashionClassifier, save_classifier, tiny_unet, tiny_vae
from lcm.models.text import CachedPromptEmbeddings, MiniLMTextEncoder, write_reference
from lcm.training.checkpoint import (
    latest_checkpoint,
    load_training_state,
    module_state,
    restore_modules,
    save_training_state,
)

__all__ = ["TeacherTrainConfig", "train_teacher", "TEACHER_SCHEDULER_CONFIG"]

# Stable Diffusion's training schedule and DDIM settings.
TEACHER_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class TeacherTrainConfig:
    out: Path  # output model folder
    data_dir: Path | None = None  # Fashion-MNIST IDX files (default: Debian package, cache, download)
    seed: int = 0
    vae_steps: int = 1200  # batch vae_batch each
    vae_batch: int = 128
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 6000
    unet_batch: int = 128
    unet_lr: float = 5e-4
    unet_warmup: int = 500
    unet_channels: tuple[int, ...] = (32, 64, 64)
    caption_dropout: float = 0.1  # probability of the empty caption, for classifier-free guidance
    ema_decay: float = 0.999
    classifier_steps: int = 2500
    classifier_batch: int = 128
    max_train_images: int | None = None  # use only the first N training images (smoke runs)
    checkpoint_every: int = 500
    sample_every: int = 1000  # write a sample grid (DDIM 25 steps) every this many UNet steps
    sample_guidance: float = 3.0  # LCM-convention w of the sample grids

    def __post_init__(self):
        for name in ("vae_steps", "unet_steps", "classifier_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError("--caption-dropout must lie in [0, 1)")


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def _batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Indices of batch ``step`` of an endless reshuffled epoch stream: the position is the step, so resuming
    needs no data-loader state."""
    epoch, i = divmod(step, n // batch)
    return _permutation(n, seed, epoch)[i * batch : (i + 1) * batch]


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.9 + 0.1

    return f


_STAGE_IDS = {"vae": 1, "unet": 2, "classifier": 3}


def _run_stage(name, cfg, modules, optimizer, scheduler, steps, step_fn, after_step=None):
    """Shared loop of the three stages: resume, step, checkpoint, progress bar. Returns the stage's wall time."""
    ckpt_root = cfg.out / "checkpoints" / name
    rng = torch.Generator().manual_seed(cfg.seed * 1000 + _STAGE_IDS[name])
    start, elapsed = 0, 0.0
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state, meta = load_training_state(latest, optimizer, rng)
        restore_modules(state, modules)
        start, elapsed = meta["step"], meta.get("elapsed", 0.0)
        if scheduler is not None:  # LambdaLR is a pure function of the step: put it there
            scheduler.last_epoch = start
            for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                group["lr"] = base * fn(start)
    if start >= steps:
        return elapsed
    t0 = time.time() - elapsed
    bar = tqdm(total=steps, initial=start, desc=f"train-teacher {name}", unit="step", dynamic_ncols=True)
    for step in range(start, steps):
        loss = step_fn(step, rng)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step(step)
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == steps:
            save_training_state(
                ckpt_root / f"step-{done}",
                module_state(modules),
                optimizer,
                {"step": done, "elapsed": time.time() - t0},
                rng,
            )
            for old in ckpt_root.glob("step-*"):  # keep the latest only
                if old.name != f"step-{done}":
                    shutil.rmtree(old, ignore_errors=True)
    bar.close()
    return time.time() - t0


def _train_vae(cfg: TeacherTrainConfig, images: torch.Tensor):
    torch.manual_seed(cfg.seed)
    vae = tiny_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, cfg.vae_steps))

    def step_fn(step, rng):
        idx = _batch_indices(len(images), cfg.vae_batch, cfg.seed, step)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(rng)).sample
        loss = F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        return loss.item()

    wall = _run_stage("vae", cfg, {"vae": vae}, opt, sched, cfg.vae_steps, step_fn)
    vae.eval().requires_grad_(False)
    return vae, wall


@torch.no_grad()
def _encode_all(vae, images: torch.Tensor, batch: int = 1000):
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def _train_unet(cfg, lat_mean, lat_std, labels, scaling, vae, captions, text):
    torch.manual_seed(cfg.seed + 1)
    unet = tiny_unet(cfg.unet_channels)
    ema = tiny_unet(cfg.unet_channels)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.unet_warmup, cfg.unet_steps))
    schedule = NoiseSchedule.from_config(TEACHER_SCHEDULER_CONFIG)
    alphas_cumprod = schedule.alphas_cumprod.float()

    def step_fn(step, rng):
        idx = _batch_indices(len(labels), cfg.unet_batch, cfg.seed + 1, step)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=rng)) * scaling
        cap = captions.sample(labels[idx], cfg.caption_dropout, rng)
        t = torch.randint(0, 1000, (len(idx),), generator=rng)
        eps = torch.randn(z0.shape, generator=rng)
        a = alphas_cumprod[t].sqrt()[:, None, None, None]
        s = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
        pred = unet(a * z0 + s * eps, t, encoder_hidden_states=text(cap).hidden_states).sample
        loss = F.mse_loss(pred, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        return loss.item()

    def after_step(step):
        # EMA warm-up (as diffusers' EMAModel): the average starts short and lengthens to 1/(1 − decay).
        ema_update(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if (step + 1) % cfg.sample_every == 0:
            _sample_grid(cfg, ema, vae, scaling, cfg.out / "samples" / f"unet-step-{step + 1}.png")

    wall = _run_stage("unet", cfg, {"unet": unet, "ema": ema}, opt, sched, cfg.unet_steps, step_fn, after_step)
    return ema.eval(), wall


@torch.no_grad()
def _sample_grid(cfg, unet, vae, scaling, path, seeds=(0, 1, 2, 3)):
    """10 class prompts (columns) × seeds (rows), DDIM 25 steps at the configured guidance."""
    from lcm.maths.sampling import randn_per_image, sample_ddim
    from lcm.maths.timesteps import ddim_timesteps
    from lcm.models.latent_diffusion import LatentDiffusion

    vae.config.scaling_factor = scaling
    model = LatentDiffusion(unet.eval(), vae, TEACHER_SCHEDULER_CONFIG, None)
    encoder = _text_encoder()
    prompts = class_prompts() * len(seeds)
    cond, uncond = encoder.encode(prompts), encoder.encode([""] * len(prompts))
    gens = [torch.Generator().manual_seed(s) for s in seeds for _ in range(10)]
    z = randn_per_image((len(prompts), *model.latent_shape), gens)
    w = torch.full((len(prompts),), cfg.sample_guidance)
    ts = ddim_timesteps(25, 1000, "leading", 1)
    latents = sample_ddim(model.guided_denoiser(cond, uncond, w), z, ts, model.schedule)
    save_grid(model.decode(latents), path, nrow=10, scale=2)
    unet.train()


_ENCODER = None


def _text_encoder():
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = MiniLMTextEncoder()
    return _ENCODER


def _train_classifier(cfg, images, labels):
    torch.manual_seed(cfg.seed + 2)
    clf = FashionClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, cfg.classifier_steps))

    def step_fn(step, rng):
        idx = _batch_indices(len(labels), cfg.classifier_batch, cfg.seed + 2, step)
        x = images[idx]
        flip = torch.rand(len(idx), generator=rng) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # garments are left-right symmetric
        loss = F.cross_entropy(clf(x), labels[idx])
        loss.backward()
        return loss.item()

    clf.train()
    wall = _run_stage("classifier", cfg, {"classifier": clf}, opt, sched, cfg.classifier_steps, step_fn)
    return clf.eval(), wall


@torch.no_grad()
def _accuracy(clf, images, labels, batch=1000):
    correct = sum(
        (clf(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(labels), batch)
    )
    return correct / len(labels)


def train_teacher(cfg: TeacherTrainConfig) -> dict:
    """Run the three stages (resuming any finished part) and write the model folder; returns the stage report."""
    from diffusers import DDIMScheduler

    cfg.out.mkdir(parents=True, exist_ok=True)
    train = load_fashion_mnist("train", cfg.data_dir)
    if cfg.max_train_images is not None:
        train = type(train)(train.images[: cfg.max_train_images], train.labels[: cfg.max_train_images])
    test = load_fashion_mnist("test", cfg.data_dir)
    captions = CaptionSet()
    text = CachedPromptEmbeddings(_text_encoder(), captions.captions)

    vae, vae_wall = _train_vae(cfg, train.images)
    lat_mean, lat_std = _encode_all(vae, train.images)
    gen = torch.Generator().manual_seed(cfg.seed)
    sample = lat_mean[:10000] + lat_std[:10000] * torch.randn(lat_mean[:10000].shape, generator=gen)
    scaling = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        recon = vae.decode(_encode_all(vae, test.images[:2000])[0]).sample.clamp(-1, 1)
    vae_mse = F.mse_loss(recon, test.images[:2000]).item()
    vae.save_pretrained(cfg.out / "vae", safe_serialization=True)

    unet, unet_wall = _train_unet(cfg, lat_mean, lat_std, train.labels, scaling, vae, captions, text)
    unet.save_pretrained(cfg.out / "unet", safe_serialization=True)
    DDIMScheduler.from_config(TEACHER_SCHEDULER_CONFIG).save_config(cfg.out / "scheduler")
    write_reference(cfg.out)
    _sample_grid(cfg, unet, vae, scaling, cfg.out / "samples" / "final.png")

    clf, clf_wall = _train_classifier(cfg, train.images, train.labels)
    acc = _accuracy(clf, test.images, test.labels)
    save_classifier(clf, cfg.out / "classifier", {"test_accuracy": acc, "feature_dim": clf.feature_dim})

    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "scaling_factor": scaling,
        "vae_test_mse": vae_mse,
        "classifier_test_accuracy": acc,
        "wall_seconds": {"vae": vae_wall, "unet": unet_wall, "classifier": clf_wall},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (cfg.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
