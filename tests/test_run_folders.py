"""A run folder belongs to one run: a reused ``--out`` keeps the finished run whole, a second live run is refused,
``--out`` cannot be the teacher or the data, a resume is checked against the checkpoint itself, ``--resume latest``
with nothing to resume is refused, and a checkpoint's meta must prove its tensors and its step."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lcm.cli import main


def _distill(teacher, data, out, *extra) -> list[str]:
    args = ["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--max-steps", "2"]
    return [*args, "--batch-size", "2", "--checkpoint-every", "1", "--log-every", "1", "--validate-every", "0", *extra]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_line(capsys, start: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(start) and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def finished(tiny_sd, captioned_images, tmp_path_factory):
    """A finished 2-step distillation (checkpoints at steps 1 and 2, the export beside them)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_distill(tiny_sd, captioned_images, out)) == 0
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_a_new_run_in_a_finished_runs_folder_is_refused_and_touches_nothing(
    finished, tiny_sd, captioned_images, tmp_path, capsys
):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_distill(tiny_sd, captioned_images, out, "--batch-size", "3", "--keep-checkpoints", "1")) == 2
    err = _one_line(capsys, "lcm distill: error:")
    assert "holds another run" in err and "--resume latest" in err
    assert _snapshot(out) == before


def test_resume_checks_the_checkpoint_when_run_config_is_gone(finished, tiny_sd, captioned_images, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    (out / "train" / "run_config.json").unlink()
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["distill", "--out", str(out), "--resume", "latest", "--batch-size", "3"]) == 2
    assert "--batch-size 3 differs from this run's 2" in _one_line(capsys, "lcm distill: error:")
    assert _snapshot(out) == before
    # the settings come from the checkpoint: a resume with no flags continues the same run
    assert main(["distill", "--out", str(out), "--resume", "latest", "--max-steps", "3"]) == 0
    assert json.loads((out / "train" / "run_config.json").read_text())["data"]["batch_size"] == 2


def test_a_python_api_resume_with_other_settings_is_refused(finished, tmp_path):
    """The library compares the run's settings with the checkpoint's record, whatever the command line said."""
    from lcm.config import RunConfig, override
    from lcm.training.runs import run_training

    out = _copy(finished, tmp_path)
    saved = json.loads((out / "train" / "run_config.json").read_text())
    (out / "train" / "run_config.json").unlink()
    cfg = RunConfig.from_dict({k: v for k, v in saved.items() if k != "data_resolved"}, "saved")
    run_training(override(cfg, {"loop.max_steps": 3}), out, resume="latest")  # the same settings resume
    with pytest.raises(ValueError, match=r"step-3 was written by a run with other settings: optim.learning_rate"):
        run_training(override(cfg, {"loop.max_steps": 4, "optim.learning_rate": 2e-6}), out, resume="latest")


def test_typing_the_default_teacher_on_resume_is_not_a_change(tmp_path, capsys):
    """A run started without --teacher (the shipped one) resumes with --teacher naming that same folder."""
    from lcm.cli.flags import _where
    from lcm.shipped import default_model_path

    assert _where(str(default_model_path())) == _where(None)
    assert _where(os.path.relpath(default_model_path())) == _where(str(default_model_path()))
    assert _where(str(tmp_path)) != _where(None)


def test_resume_latest_with_nothing_to_resume_is_refused(tmp_path, capsys):
    for out in (tmp_path / "missing", tmp_path):
        assert main(["distill", "--out", str(out), "--resume", "latest", "--max-steps", "1"]) == 2
        assert "nothing to resume" in _one_line(capsys, "lcm distill: error: --resume latest")
    assert not (tmp_path / "missing").exists() and not (tmp_path / "train").exists()


def test_out_may_not_be_or_contain_the_teacher_or_the_data(tiny_sd, captioned_images, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd, teacher)
    data = tmp_path / "work" / "images"
    shutil.copytree(captioned_images, data)
    before = _snapshot(tmp_path)
    cases = [(teacher, "is the teacher"), (tmp_path, "contains the teacher"), (data, "is the data")]
    cases += [(data.parent, "contains the data")]
    for out, message in cases:
        assert main(_distill(teacher, data, out)) == 2
        assert message in _one_line(capsys, f"lcm distill: error: --out {out}")
    assert main(["finetune", "--model", str(teacher), "--data", str(data), "--out", str(teacher)]) == 2
    assert "is the LCM" in _one_line(capsys, "lcm finetune: error:")
    assert _snapshot(tmp_path) == before


def test_a_new_run_into_a_folder_holding_files_is_refused(tiny_sd, captioned_images, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_distill(tiny_sd, captioned_images, out)) == 2
    assert "already holds files (notes.txt)" in _one_line(capsys, "lcm distill: error:")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


_HOLD = """
import sys, time
from pathlib import Path
from lcm.training.run_folder import own_run_folder
with own_run_folder(Path(sys.argv[1]) / "train", "holder for the test"):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_a_live_runs_folder_is_refused_until_the_holder_dies(
    tiny_sd, captioned_images, tmp_path, capsys
):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = _snapshot(out)
        assert main(_distill(tiny_sd, captioned_images, out)) == 2
        err = _one_line(capsys, "lcm distill: error:")
        assert f"is in use by process {holder.pid}" in err and "holder for the test" in err
        assert _snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(_distill(tiny_sd, captioned_images, out)) == 0  # a crashed holder leaves no stale lock


def test_validate_every_zero_writes_no_validation(finished):
    assert not (finished / "train" / "validation").exists()


def _checkpoint(finished: Path, tmp_path: Path) -> Path:
    out = _copy(finished, tmp_path)
    return out / "train" / "checkpoints" / "step-2"


def test_a_meta_without_a_hash_or_with_another_step_is_corrupt(finished, tmp_path):
    from lcm.training.checkpoint import CorruptCheckpoint, verify_checkpoint

    step = _checkpoint(finished, tmp_path)
    meta = json.loads((step / "meta.json").read_text())
    assert verify_checkpoint(step)["step"] == 2
    (step / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    with pytest.raises(CorruptCheckpoint, match="records no SHA-256"):
        verify_checkpoint(step)
    (step / "meta.json").write_text(json.dumps({**meta, "step": 600}))
    with pytest.raises(CorruptCheckpoint, match="records step 600, not the folder's 2"):
        verify_checkpoint(step)


def test_resume_passes_over_a_tampered_checkpoint_without_a_hash(finished, tmp_path, capsys):
    step = _checkpoint(finished, tmp_path)
    out = step.parents[2]
    meta = json.loads((step / "meta.json").read_text())
    (step / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    data = bytearray((step / "state.safetensors").read_bytes())
    data[-100:] = bytes(100)
    (step / "state.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["distill", "--out", str(out), "--resume", "latest"]) == 0
    out_text = capsys.readouterr().out
    assert "skipping corrupt checkpoint" in out_text and "resumed from" in out_text and "at step 1" in out_text
