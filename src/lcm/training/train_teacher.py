"""``lcm train-teacher``: the embedded default's VAE, latent diffusion UNet and evaluation classifier, or (with
``objective="flow"``) the embedded flow-matching teacher.

Three stages, each a :class:`~lcm.training.loop.Task` of the one training loop (so each resumes from its last
checkpoint, and a finished stage only restores its state), each deterministic given the seed: (1) the AutoencoderKL
on Fashion-MNIST (MSE + a small KL, as SD's VAE without the GAN), after which the latent scaling factor is measured as
1/std of the latents (as SD's 0.18215 was); (2) the ε-prediction UNet on those latents with 10% caption dropout (for
CFG) and EMA weights; (3) a small classifier whose features define the offline metrics. The output is a
diffusers-format folder.

The flow objective trains only the network, an SD3-class MMDiT (``SD3Transformer2DModel``), as rectified flow on the
latents of an existing teacher's VAE (by default the shipped one, whose VAE, text encoder and classifier it reuses, so
both embedded teachers are measured on equal terms): ``z_σ = (1 − σ) z0 + σ ε``, the velocity ``ε − z0`` as target,
σ drawn logit-normal (SD3's training density, m = 0, s = 1), 10% caption dropout, EMA weights.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lcm.config.run import LoopConfig, OptimConfig
from lcm.data.captions import CaptionSet, class_prompts
from lcm.data.fashion_mnist import load_fashion_mnist
from lcm.images import save_grid
from lcm.locations import written
from lcm.maths.ema import ema_update
from lcm.maths.guidance import EMBEDDED_DEFAULT_W
from lcm.maths.schedule import FlowSchedule, NoiseSchedule
from lcm.models.fashion import FashionClassifier, save_classifier, tiny_flow_transformer, tiny_unet, tiny_vae
from lcm.models.text import CachedPromptEmbeddings, MiniLMTextEncoder, write_reference
from lcm.training.checkpoint import module_state, restore_modules
from lcm.training.loop import Task, Validation, train

__all__ = [
    "FLOW_SCHEDULER_CONFIG",
    "TEACHER_SCHEDULER_CONFIG",
    "TeacherTrainConfig",
    "train_flow_teacher",
    "train_teacher",
]

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
# The embedded flow teacher's: SD3's scheduler without a shift (8² latents are far below the 64² that shift 1 suits;
# SD3 shifts by 3 at 128²).
FLOW_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


@dataclass(frozen=True)
class TeacherTrainConfig:
    out: Path  # output model folder
    objective: str = "eps"  # "eps": VAE, ε-prediction UNet, classifier; "flow": an MMDiT on the latents of vae_from
    vae_from: Path | None = None  # flow: the teacher folder whose VAE, text encoder and classifier are reused
    flow_heads: int = 3  # flow: the MMDiT's width is 32·heads
    flow_layers: int = 4  # flow: joint transformer blocks
    flow_lr: float = 3e-4
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
    max_train_images: int | None = None  # use only the first N training and test images (smoke runs)
    checkpoint_every: int = 500
    sample_every: int = 1000  # write a sample grid (DDIM 25 steps) every this many UNet steps
    sample_guidance: float = EMBEDDED_DEFAULT_W  # LCM-convention w of the sample grids

    def __post_init__(self):
        for name in ("vae_steps", "unet_steps", "classifier_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError("--caption-dropout must lie in [0, 1)")
        if self.checkpoint_every < 1 or self.sample_every < 1:
            raise ValueError("--checkpoint-every and --sample-every must be at least 1")
        if self.objective not in ("eps", "flow"):
            raise ValueError(f"--objective must be eps or flow, got {self.objective!r}")
        if self.flow_heads < 1 or self.flow_layers < 1:
            raise ValueError("--flow-heads and --flow-layers must be at least 1")


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def _data_order(n: int, batch: int, seed: int) -> Callable[[int], Iterator[torch.Tensor]]:
    """The loop's ``batches(start)``: sample indices of batches ``start, start + 1, …`` of reshuffled epochs.

    Not :func:`lcm.data.loader.batch_stream`: its epochs are seeded differently, and this is the order the shipped
    teacher was trained on (the images are one in-memory tensor, so indices are all a batch needs).
    """
    if n < batch:
        raise ValueError(f"{n} training images are fewer than one batch of {batch}: raise --max-train-images")

    def batches(start: int) -> Iterator[torch.Tensor]:
        for step in itertools.count(start):
            epoch, i = divmod(step, n // batch)
            yield _permutation(n, seed, epoch)[i * batch : (i + 1) * batch]

    return batches


_STAGE_IDS = {"vae": 1, "unet": 2, "classifier": 3, "flow": 4}


class _Stage(Task):
    """One stage as a loop :class:`~lcm.training.loop.Task`: ``net`` is trained, every module in ``modules`` is
    checkpointed. The model folder is written by :func:`train_teacher`, so ``export`` writes nothing."""

    def __init__(self, net: torch.nn.Module, modules: dict[str, torch.nn.Module]):
        self.net, self.forward, self.modules = net, net, modules

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.net.parameters())

    def wrap(self, prepare) -> list[torch.nn.Module]:
        self.forward = prepare(self.net)
        return [self.forward]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return module_state(self.modules)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        restore_modules(state, self.modules)


def _run_stage(
    cfg: TeacherTrainConfig, name: str, stage: _Stage, data: Callable, steps: int, validate_every: int = 0, **optim
) -> float:
    """Train ``stage`` on the loop for ``steps`` (resuming from ``checkpoints/<name>``); returns its wall time."""
    loop = LoopConfig(
        max_steps=steps,
        seed=cfg.seed,
        noise_seed=cfg.seed * 1000 + _STAGE_IDS[name],
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=1,
        validate_every=validate_every,
        checkpoint_dir=cfg.out / "checkpoints" / name,
        write_logs=False,
        cpu=True,
        label=f"train-teacher {name}",
    )
    return train(stage, data, cfg.out, loop, OptimConfig(lr_schedule="cosine_floor", **optim), "auto")["wall_seconds"]


class _VaeStage(_Stage):
    def __init__(self, cfg: TeacherTrainConfig, images: torch.Tensor):
        vae = tiny_vae()
        super().__init__(vae, {"vae": vae})
        self.cfg, self.images = cfg, images

    def loss(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.images[idx]
        posterior = self.net.encode(x).latent_dist
        recon = self.net.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(recon, x, reduction="none").flatten(1).mean(1)
        return mse + self.cfg.vae_kl_weight * posterior.kl()


def _train_vae(cfg: TeacherTrainConfig, images: torch.Tensor):
    torch.manual_seed(cfg.seed)
    stage = _VaeStage(cfg, images)
    data = _data_order(len(images), cfg.vae_batch, cfg.seed)
    wall = _run_stage(cfg, "vae", stage, data, cfg.vae_steps, learning_rate=cfg.vae_lr, lr_warmup_steps=100)
    return stage.net.eval().requires_grad_(False), wall


@torch.no_grad()
def _encode_all(vae, images: torch.Tensor, batch: int = 1000):
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class _UnetStage(_Stage):
    """ε-prediction on posterior samples of the latents, with an EMA copy (the shipped weights) and sample grids."""

    network_name = "unet"

    def _network(self, cfg: TeacherTrainConfig) -> torch.nn.Module:
        return tiny_unet(cfg.unet_channels)

    def __init__(self, cfg, lat_mean, lat_std, labels, scaling, vae, captions, text):
        unet, ema = self._network(cfg), self._network(cfg)
        ema.load_state_dict(unet.state_dict())
        super().__init__(unet, {self.network_name: unet, "ema": ema.requires_grad_(False)})
        self.cfg, self.ema, self.vae, self.scaling = cfg, ema, vae, scaling
        self.lat_mean, self.lat_std, self.labels, self.captions, self.text = lat_mean, lat_std, labels, captions, text
        self.schedule = NoiseSchedule.from_config(TEACHER_SCHEDULER_CONFIG)

    def loss(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        z0 = self._clean_latents(idx, generator)
        cap = self.captions.sample(self.labels[idx], self.cfg.caption_dropout, generator)
        t = torch.randint(0, self.schedule.num_train_timesteps, (len(idx),), generator=generator)
        eps = torch.randn(z0.shape, generator=generator)
        pred = self.forward(self.schedule.add_noise(z0, eps, t), t, encoder_hidden_states=self.text(cap).hidden_states)
        return F.mse_loss(pred.sample, eps, reduction="none").flatten(1).mean(1)

    def _clean_latents(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.lat_mean[idx], self.lat_std[idx]
        return (mean + std * torch.randn(mean.shape, generator=generator)) * self.scaling

    def after_optimizer_step(self, step: int) -> None:
        # EMA warm-up (as diffusers' EMAModel): the average starts short and lengthens to 1/(1 − decay).
        ema_update(self.ema, self.net, min(self.cfg.ema_decay, step / (9 + step)))

    def validate(self, step: int, folder: Path) -> Validation:
        if step % self.cfg.sample_every == 0:  # the loop also asks at the last step: that grid is final.png
            path = self.cfg.out / "samples" / f"{self.network_name}-step-{step}.png"
            _sample_grid(self.cfg, self.ema, self.vae, self.scaling, path)
        return Validation()


class _FlowStage(_UnetStage):
    """Rectified flow: velocity ``ε − z0`` at ``z_σ = (1 − σ) z0 + σ ε``, σ logit-normal (SD3's m = 0, s = 1)."""

    network_name = "transformer"
    flow = FlowSchedule.from_config(FLOW_SCHEDULER_CONFIG)

    def _network(self, cfg: TeacherTrainConfig) -> torch.nn.Module:
        return tiny_flow_transformer(cfg.flow_heads, cfg.flow_layers)

    def loss(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        z0 = self._clean_latents(idx, generator)
        cap = self.captions.sample(self.labels[idx], self.cfg.caption_dropout, generator)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=generator, dtype=torch.float64))
        t = self.flow.num_train_timesteps * sigma
        eps = torch.randn(z0.shape, generator=generator)
        text = self.text(cap)
        pred = self.forward(
            hidden_states=self.flow.add_noise(z0, eps, t),
            encoder_hidden_states=text.hidden_states,
            pooled_projections=text.pooled_or_mean(),
            timestep=t.float(),
        )
        return F.mse_loss(pred.sample, eps - z0, reduction="none").flatten(1).mean(1)


def _train_unet(cfg, lat_mean, lat_std, labels, scaling, vae, captions, text):
    """The ε-prediction UNet (``objective="eps"``) or the flow MMDiT (``"flow"``) on the same loop and schedule of
    learning rates; returns the EMA network and the stage's wall time."""
    flow = cfg.objective == "flow"
    torch.manual_seed(cfg.seed + (4 if flow else 1))
    stage = (_FlowStage if flow else _UnetStage)(cfg, lat_mean, lat_std, labels, scaling, vae, captions, text)
    data = _data_order(len(labels), cfg.unet_batch, cfg.seed + (4 if flow else 1))
    wall = _run_stage(
        cfg,
        "flow" if flow else "unet",
        stage,
        data,
        cfg.unet_steps,
        learning_rate=cfg.flow_lr if flow else cfg.unet_lr,
        weight_decay=0.01,
        lr_warmup_steps=cfg.unet_warmup,
        validate_every=cfg.sample_every,
    )
    return stage.ema.eval(), wall


@torch.no_grad()
def _sample_grid(cfg, unet, vae, scaling, path, seeds=(0, 1, 2, 3)):
    """10 class prompts (columns) × seeds (rows), DDIM 25 steps (flow: Euler 25 steps) at the configured guidance."""
    from lcm.maths.sampling import randn_per_image, sample_ddim
    from lcm.maths.timesteps import ddim_timesteps, flow_timesteps
    from lcm.models.latent_diffusion import LatentDiffusion

    vae.config.scaling_factor = scaling
    flow = cfg.objective == "flow"
    model = LatentDiffusion(unet.eval(), vae, FLOW_SCHEDULER_CONFIG if flow else TEACHER_SCHEDULER_CONFIG, None)
    encoder = _text_encoder()
    prompts = class_prompts() * len(seeds)
    cond, uncond = encoder.encode(prompts), encoder.encode([""] * len(prompts))
    gens = [torch.Generator().manual_seed(s) for s in seeds for _ in range(10)]
    z = randn_per_image((len(prompts), *model.latent_shape), gens)
    w = torch.full((len(prompts),), cfg.sample_guidance)
    ts = flow_timesteps(25, model.schedule) if flow else ddim_timesteps(25, 1000, "leading", 1)
    latents = sample_ddim(model.guided_denoiser(cond, uncond, w), z, ts, model.schedule)
    rows = [f"{'Euler' if flow else 'DDIM'} 25 steps, seed {s}" for s in seeds]
    save_grid(model.decode(latents), path, scale=2, rows=rows, columns=class_prompts())
    unet.train()


_ENCODER = None


def _text_encoder():
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = MiniLMTextEncoder()
    return _ENCODER


class _ClassifierStage(_Stage):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        clf = FashionClassifier()
        super().__init__(clf, {"classifier": clf})
        self.images, self.labels = images, labels

    def loss(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.images[idx]
        flip = torch.rand(len(idx), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # garments are left-right symmetric
        return F.cross_entropy(self.forward(x), self.labels[idx], reduction="none")


def _train_classifier(cfg, images, labels):
    torch.manual_seed(cfg.seed + 2)
    stage = _ClassifierStage(images, labels)
    stage.net.train()
    data = _data_order(len(labels), cfg.classifier_batch, cfg.seed + 2)
    wall = _run_stage(
        cfg,
        "classifier",
        stage,
        data,
        cfg.classifier_steps,
        learning_rate=2e-3,
        weight_decay=5e-4,
        lr_warmup_steps=100,
        max_grad_norm=None,
    )
    return stage.net.eval(), wall


@torch.no_grad()
def _accuracy(clf, images, labels, batch=1000):
    correct = sum(
        (clf(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(labels), batch)
    )
    return correct / len(labels)


def train_flow_teacher(cfg: TeacherTrainConfig) -> dict:
    """The flow objective: an MMDiT on the latents of ``cfg.vae_from``'s VAE (default: the shipped teacher), whose
    VAE, text encoder reference and classifier are copied into the folder; returns the report."""
    import shutil

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from lcm.shipped import default_model_path

    source = Path(cfg.vae_from) if cfg.vae_from else default_model_path()
    cfg.out.mkdir(parents=True, exist_ok=True)
    train = load_fashion_mnist("train", cfg.data_dir)
    if cfg.max_train_images is not None:
        train = type(train)(train.images[: cfg.max_train_images], train.labels[: cfg.max_train_images])
    captions = CaptionSet()
    text = CachedPromptEmbeddings(_text_encoder(), captions.captions)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae").eval().requires_grad_(False)
    scaling = float(vae.config.scaling_factor)
    lat_mean, lat_std = _encode_all(vae, train.images)
    network, wall = _train_unet(cfg, lat_mean, lat_std, train.labels, scaling, vae, captions, text)
    with written(cfg.out / "transformer"):
        network.save_pretrained(cfg.out / "transformer", safe_serialization=True)
    for part in ("vae", "text_encoder", "classifier"):
        if source.resolve() != cfg.out.resolve():
            shutil.copytree(source / part, cfg.out / part, dirs_exist_ok=True)
    FlowMatchEulerDiscreteScheduler.from_config(FLOW_SCHEDULER_CONFIG).save_config(cfg.out / "scheduler")
    _sample_grid(cfg, network, vae, scaling, cfg.out / "samples" / "final.png")
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "vae_from": str(source),
        "parameters": sum(p.numel() for p in network.parameters()),
        "wall_seconds": {"transformer": wall},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (cfg.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def train_teacher(cfg: TeacherTrainConfig) -> dict:
    """Run the three stages (resuming any finished part) and write the model folder; returns the stage report."""
    from diffusers import DDIMScheduler

    if cfg.objective == "flow":
        return train_flow_teacher(cfg)

    cfg.out.mkdir(parents=True, exist_ok=True)
    train = load_fashion_mnist("train", cfg.data_dir)
    if cfg.max_train_images is not None:
        train = type(train)(train.images[: cfg.max_train_images], train.labels[: cfg.max_train_images])
    test = load_fashion_mnist("test", cfg.data_dir)
    if cfg.max_train_images is not None:  # a smoke run's test accuracy means nothing: no need to pay for all of it
        test = type(test)(test.images[: cfg.max_train_images], test.labels[: cfg.max_train_images])
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
    with written(cfg.out / "vae"):
        vae.save_pretrained(cfg.out / "vae", safe_serialization=True)

    unet, unet_wall = _train_unet(cfg, lat_mean, lat_std, train.labels, scaling, vae, captions, text)
    with written(cfg.out / "unet"):
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
