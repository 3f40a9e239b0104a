"""A training process that SIGKILLs itself at a chosen point; driven by tests/test_kill_resume.py.

``python kill_child.py OUT MODE [PHASE N]``: MODE ``loop`` trains a small network on the shared loop (seconds),
MODE ``distill:TEACHER:DATA`` runs ``lcm distill`` on a tiny teacher. PHASE says where the N-th event of this
process dies: ``mid-step`` (N-th micro-batch drawn), ``after-update`` (after the N-th optimiser update, before its
EMA and checkpoint), ``mid-state`` (N-th checkpoint: tensor file half written), ``before-meta``, ``before-rename``,
``before-prune`` (N-th checkpoint), ``mid-export`` (the export half written); ``hold`` waits at the N-th micro-batch
(after writing ``OUT.holding``) until it is killed. ``RESUME=none`` in the environment starts a new run instead of
``--resume auto``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from lcm.training.loop import Task as LoopTask

MAX_STEPS, EVERY, ACCUMULATION = 12, 2, 2
UNREADABLE = {3, 8, 9}  # stream positions whose batch held no readable image
RESUME = None if os.environ.get("RESUME") == "none" else "auto"


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def hold() -> None:
    import time

    Path(sys.argv[1] + ".holding").write_text(str(os.getpid()))
    time.sleep(600)


def counted(n: int, before=None, after=None):
    """Wrap a function so that its n-th call dies (before or after the real call, or via a custom hook)."""
    calls = [0]

    def wrap(real):
        def inner(*args, **kwargs):
            calls[0] += 1
            hit = calls[0] == n
            if hit and before is not None:
                before(*args, **kwargs)
            result = real(*args, **kwargs)
            if hit and after is not None:
                after(result, *args, **kwargs)
            return result

        return inner

    return wrap


def half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def install(phase: str, n: int, task_class) -> None:
    from accelerate.optimizer import AcceleratedOptimizer

    from lcm.training import checkpoint, loop

    if phase == "mid-step":
        loop._Run.next_batch = counted(n, before=lambda *a, **k: die())(loop._Run.next_batch)
    elif phase == "hold":
        loop._Run.next_batch = counted(n, before=lambda *a, **k: hold())(loop._Run.next_batch)
    elif phase == "after-update":
        AcceleratedOptimizer.step = counted(n, after=lambda *a, **k: die())(AcceleratedOptimizer.step)
    elif phase == "mid-state":
        checkpoint.save_file = counted(n, after=lambda r, t, f, **k: (half(Path(f)), die()))(checkpoint.save_file)
    elif phase == "before-meta":
        checkpoint._sha256 = counted(n, after=lambda *a, **k: die())(checkpoint._sha256)
    elif phase == "before-rename":
        checkpoint._fsync = counted(2 * n, after=lambda *a, **k: die())(checkpoint._fsync)
    elif phase == "before-prune":
        loop.save_training_state = counted(n, after=lambda *a, **k: die())(loop.save_training_state)
    elif phase == "mid-export":

        def cut(result, task, folder):
            files = sorted(p for p in Path(folder).rglob("*.safetensors") if "train" not in p.parts)
            half(files[0])
            die()

        task_class.export = counted(1, after=cut)(task_class.export)
    else:
        raise SystemExit(f"unknown phase {phase}")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Task(LoopTask):
    """A small regression with noise from the loop's generator and an EMA copy, like LCD's moving parts."""

    def __init__(self):
        torch.manual_seed(0)
        self.raw, self.ema = Net(), Net()  # raw: the network itself, whatever Accelerate wraps it in
        self.net = self.raw
        self.ema.load_state_dict(self.raw.state_dict())

    def trainable_parameters(self):
        return list(self.net.parameters())

    def wrap(self, prepare):
        self.net = prepare(self.net)
        return [self.net]

    def loss(self, batch, generator):
        x = batch["pixel_values"]
        noisy = x + 0.1 * torch.randn(x.shape, generator=generator)
        return ((self.net(noisy) - x.flip(1)) ** 2).mean(1)

    def after_optimizer_step(self, step):
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.raw.parameters(), strict=True):
                e.lerp_(p, 0.1)

    def state_dict(self):
        state = {f"net.{k}": v for k, v in self.raw.state_dict().items()}
        return state | {f"ema.{k}": v for k, v in self.ema.state_dict().items()}

    def load_state_dict(self, state):
        self.raw.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        self.ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})

    def export(self, folder):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(folder) / "model.safetensors"))


def run_loop(out: Path, keep: int) -> None:
    from lcm.config import LoopConfig, OptimConfig
    from lcm.data.base import collate_skip_none
    from lcm.data.loader import batch_stream
    from lcm.training.loop import train

    images = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    data = [{"pixel_values": images[i], "caption": ""} for i in range(40)]

    def batches(start):
        for i, batch in enumerate(batch_stream(data, 2, collate_skip_none, seed=0, start=start), start=start):
            yield None if i in UNREADABLE else batch

    loop = LoopConfig(
        max_steps=MAX_STEPS,
        checkpoint_every=EVERY,
        keep_checkpoints=keep,
        gradient_accumulation_steps=ACCUMULATION,
        validate_every=0,
        log_every=1,
        seed=3,
        cpu=True,
    )
    train(Task(), batches, out, loop, OptimConfig(learning_rate=1e-2), RESUME)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    keep = int(os.environ.get("KEEP_CHECKPOINTS", "2"))
    if mode == "loop":
        task_class = Task
    else:
        from lcm.training.task import ConsistencyTask as task_class
    if len(sys.argv) > 3:
        install(sys.argv[3], int(sys.argv[4]), task_class)
    if mode == "loop":
        run_loop(out, keep)
        return
    from lcm.cli import main as cli

    _, teacher, data = mode.split(":", 2)
    if (out / "train" / "run_config.json").is_file():
        sys.exit(cli(["distill", "--out", str(out), "--resume", "auto"]))
    args = ["distill", "--teacher", teacher, "--data", data, "--out", str(out), "--max-steps", str(MAX_STEPS)]
    args += ["--batch-size", "2", "--checkpoint-every", str(EVERY), "--keep-checkpoints", str(keep)]
    args += ["--gradient-accumulation-steps", str(ACCUMULATION), "--validate-every", "0", "--log-every", "1"]
    sys.exit(cli([*args, "--resume", "auto", "--learning-rate", "1e-3", "--seed", "5"]))


if __name__ == "__main__":
    main()
