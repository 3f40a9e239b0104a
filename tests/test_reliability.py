"""The training loop's guards, on a small network (tests/kill_child.py's task): non-finite losses are skipped and
counted, a run of them stops in one line, logs stay strict JSON, corrupt checkpoints are passed over, a checkpoint
from other settings is refused in one line, and the run settings are read back on resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from kill_child import Task
from lcm.config import LoopConfig, OptimConfig
from lcm.data.base import collate_skip_none
from lcm.data.loader import batch_stream
from lcm.training.checkpoint import CorruptCheckpoint, load_training_state
from lcm.training.loop import NonFiniteTraining, train

DATA = [{"pixel_values": x, "caption": ""} for x in torch.randn(40, 4, generator=torch.Generator().manual_seed(1))]


class PoisonedTask(Task):
    """Returns a NaN loss on the optimiser steps in ``poisoned`` (1-based), as an exploding run would."""

    def __init__(self, poisoned=()):
        super().__init__()
        self.poisoned, self.calls = set(poisoned), 0

    def loss(self, batch, generator):
        self.calls += 1
        losses = super().loss(batch, generator)
        return losses * math.nan if self.calls in self.poisoned else losses


def _train(out, task, resume=None, **overrides):
    loop = LoopConfig(**dict(max_steps=8, checkpoint_every=2, validate_every=0, log_every=1, cpu=True) | overrides)
    batches = lambda start: batch_stream(DATA, 2, collate_skip_none, start=start)  # noqa: E731
    return train(task, batches, out, loop, OptimConfig(learning_rate=1e-2), resume)


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path.name} holds a bare {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_non_finite_steps_are_skipped_counted_and_logged_as_null(tmp_path):
    task = PoisonedTask(poisoned={3, 4, 7})
    summary = _train(tmp_path, task)
    assert summary["bad_steps"] == 3
    assert all(torch.isfinite(v).all() for v in task.state_dict().values())
    history = _strict_json(tmp_path / "train" / "train_history.json")
    assert [h["loss"] is None for h in history] == [s in {3, 4, 7} for s in range(1, 9)]
    assert history[-1]["bad_steps"] == 3
    exported = load_file(tmp_path / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values())


def test_a_run_of_non_finite_steps_stops_in_one_line_without_a_bad_checkpoint(tmp_path):
    with pytest.raises(NonFiniteTraining, match=r"^stopped at step 5: 3 optimiser steps in a row") as err:
        _train(tmp_path, PoisonedTask(poisoned={3, 4, 5, 6}), max_bad_steps=3)
    assert "\n" not in str(err.value) and "--learning-rate" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not (tmp_path / "model.safetensors").exists()
    for step in (2, 4):
        state, _ = load_training_state(tmp_path / "train" / "checkpoints" / f"step-{step}")
        assert all(torch.isfinite(v).all() for v in state.values())


def _garble(path):
    data = bytearray(path.read_bytes())
    data[-5000:-904] = bytes(range(256)) * 16  # 4 KiB of tensor data
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-1000])


def _garble_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_garble, _truncate, _garble_header])
def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage, capsys):
    straight = Task()
    _train(tmp_path / "straight", straight, max_steps=6)
    run = tmp_path / "run"
    _train(run, Task(), max_steps=4, keep_checkpoints=3)
    damage(run / "train" / "checkpoints" / "step-4" / "state.safetensors")
    with pytest.raises(CorruptCheckpoint):
        load_training_state(run / "train" / "checkpoints" / "step-4")
    capsys.readouterr()
    resumed = Task()
    _train(run, resumed, max_steps=6, resume="latest")
    out = capsys.readouterr().out
    assert "skipping corrupt checkpoint" in out and "step-4" in out and "at step 2" in out
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_latest_with_nothing_to_resume_is_refused_and_auto_starts(tmp_path):
    with pytest.raises(ValueError, match=r"^--resume latest: nothing to resume in .*--resume auto") as err:
        _train(tmp_path, Task(), max_steps=1, resume="latest")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "train" / "checkpoints").exists()
    assert _train(tmp_path, Task(), max_steps=1, resume="auto")["steps_run"] == 1


def test_a_checkpoint_of_other_settings_is_refused_in_one_line(tmp_path):
    _train(tmp_path, Task(), max_steps=2)

    class Wider(Task):
        def __init__(self):
            super().__init__()
            self.raw.a, self.raw.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
            self.ema.a, self.ema.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    with pytest.raises(ValueError, match="does not fit this run") as err:
        _train(tmp_path, Wider(), max_steps=4, resume="latest")
    assert "\n" not in str(err.value)


def _args(out, *typed):
    from lcm.cli import build_parser

    return build_parser().parse_args(["distill", "--out", str(out), *typed])


def test_resume_reads_the_run_settings_and_refuses_a_changed_flag(tmp_path):
    from lcm.cli.flags import run_config_from
    from lcm.config import RunConfig, override
    from lcm.training.run_folder import RUN_CONFIG

    started = override(RunConfig(model="t"), {"data.batch_size": 3, "student.lora_rank": 8, "data.source": "d"})
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / RUN_CONFIG).write_text(json.dumps(started.to_dict()))

    resumed = run_config_from(_args(tmp_path, "--resume", "latest", "--max-steps", "9"), "distill")
    assert (resumed.data.batch_size, resumed.student.lora_rank, resumed.model, resumed.data.source) == (3, 8, "t", "d")
    assert resumed.loop.max_steps == 9  # how long to run may change
    with pytest.raises(ValueError, match=r"^--lora-rank 4 differs from this run's 8 \(saved in .*run_config.json\)"):
        run_config_from(_args(tmp_path, "--resume", "latest", "--lora-r", "4"), "distill")
    with pytest.raises(ValueError, match="lcm distill run"):
        run_config_from(_args(tmp_path, "--resume", "latest"), "finetune")


def test_config_file_starts_a_run_and_typed_flags_override_it(tmp_path):
    from lcm.cli.flags import run_config_from

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"--batch-size": 5, "solver": "dpm", "loop.seed": 7}))
    cfg = run_config_from(_args(tmp_path / "run", "--config", str(config), "--seed", "2"), "distill")
    assert (cfg.data.batch_size, cfg.method.solver.value, cfg.loop.seed) == (5, "dpm", 2)
    config.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(ValueError, match="unknown setting"):
        run_config_from(_args(tmp_path / "run", "--config", str(config)), "distill")
