"""Bad input a careless user or a hostile file gives the command line: values of the wrong type in ``--config`` and
``run_config.json``, sizes past every bound, malformed model folders and records, damaged weights and caches, a
metadata file naming files outside its folder, and a full disk. Each is one line naming what to fix (or, for bad
data, a skipped and counted sample); none is a traceback or a silent acceptance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from lcm.cli import main
from lcm.shipped import default_model_path


def _one_line(capsys, command: str, *expected: str) -> str:
    """The error of a failed command: the last line of stderr, a line of its own (a progress bar may precede it)."""
    full = capsys.readouterr().err.strip()
    err = full.splitlines()[-1] if full else ""
    assert err.startswith(f"lcm {command}: error:"), full  # (an exception would have reached pytest)
    for text in expected:
        assert text in err, (text, err)
    return err


CONFIG_VALUES = [
    ({"batch_size": "eight"}, '--batch-size must be an integer, got "eight"'),
    ({"w_min": None}, "--w-min must be a number, got null"),
    ({"max_steps": 1e30}, "--max-steps must be an integer, got 1e+30"),
    ({"max_steps": 10**30}, "--max-steps must be between 1 and 100000000"),
    ({"validation_prompt": "abc"}, '--validation-prompt must be a list of strings, got "abc"'),
    ({"student": "half"}, '--student must be one of "full", "lora", got "half"'),
    ({"gradient_checkpointing": "yes"}, '--gradient-checkpointing must be true or false, got "yes"'),
    ({"solver": 3}, "--solver must be one of"),
]


@pytest.mark.parametrize(("values", "message"), CONFIG_VALUES)
def test_config_values_are_checked_against_the_flags_types(tmp_path, capsys, values, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(values))
    assert main(["distill", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    _one_line(capsys, "distill", message)
    assert not (tmp_path / "run").exists()


def test_a_run_config_with_a_value_of_the_wrong_type_is_named_on_resume(tmp_path, capsys):
    train = tmp_path / "run" / "train"
    train.mkdir(parents=True)
    (train / "run_config.json").write_text(json.dumps({"command": "distill", "data": {"batch_size": "eight"}}))
    assert main(["distill", "--out", str(tmp_path / "run"), "--resume", "latest"]) == 2
    _one_line(capsys, "distill", "run_config.json: data: --batch-size must be an integer")


BOUNDS = [
    (["sample", "--prompt", "x", "--num-images", "1000000000"], "--num-images must be between 1 and 1000000"),
    (["sample", "--prompt", "x", "--height", "40000"], "--height must be between 1 and 8192"),
    (["sample", "--prompt", "x", "--width", "0"], "--width must be between 1 and 8192"),
    (["sample", "--prompt", "x", "--seed", "-5"], "--seed must be between 0 and"),
    (["sample", "--prompt", "x", "--seed", "4294967295", "--num-images", "2"], "--seed must be between 0 and"),
    (["sample", "--prompt", "x", "--batch-size", "100000000"], "--batch-size must be between 1 and 65536"),
    (["distill", "--out", "{tmp}/r", "--resolution", "100000"], "--resolution must be between 8 and 8192"),
    (["distill", "--out", "{tmp}/r", "--num-workers", "100000"], "--num-workers must be between 0 and 256"),
    (["distill", "--out", "{tmp}/r", "--max-steps", "1" + "0" * 30], "--max-steps must be between 1 and 100000000"),
    (["distill", "--out", "{tmp}/r", "--batch-size", "100000000"], "--batch-size must be between 1 and 65536"),
    (["finetune", "--model", "{tmp}", "--out", "{tmp}/r", "--num-workers", "100000"], "--num-workers"),
    (["cache", "--out", "{tmp}/c", "--resolution", "100000"], "--resolution"),
    (["cache", "--out", "{tmp}/c", "--num-workers", "100000"], "--num-workers"),
    (["eval", "--out", "{tmp}/e", "--num-samples", "1000000000"], "--num-samples must be between 2 and"),
    (["demo", "--out", "{tmp}/d", "--max-steps", "1" + "0" * 12], "--max-steps must be between 1 and 100000000"),
    (["train-teacher", "--out", "{tmp}/t", "--unet-steps", "1" + "0" * 12], "--unet-steps must be between"),
]


def test_sizes_past_their_bound_are_refused_in_one_line_naming_the_bound(tmp_path, capsys, monkeypatch):
    from lcm.models.latent_diffusion import LatentDiffusion

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(LatentDiffusion, "from_pretrained", no_loading)
    for argv, message in BOUNDS:
        argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
        assert main(argv) == 2, argv
        _one_line(capsys, argv[0], message)


def test_timesteps_scheduler_configs_of_the_wrong_shape(tmp_path, capsys):
    cases = [("[1, 2]", "--scheduler-config must hold a JSON object"), ("{nope", "--scheduler-config: not a JSON")]
    cases += [('{"beta_start": [1]}', "scheduler config: float()"), ('{"num_train_timesteps": 1e9}', "must lie in")]
    for text, message in cases:
        config = tmp_path / f"{uuid.uuid4().hex}.json"
        config.write_text(text)
        assert main(["timesteps", "--scheduler-config", str(config)]) == 2
        _one_line(capsys, "timesteps", message)


# --- malformed and damaged model folders --------------------------------------------------------------------------


def test_malformed_model_folders_are_refused_in_one_line(tiny_sd, tmp_path, capsys):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "lcm_lora.json").write_text(json.dumps({"base_model": str(lora)}))
    assert main(["sample", "--model", str(lora), "--prompt", "x", "--out", str(tmp_path / "s")]) == 2
    _one_line(capsys, "sample", "is itself a LoRA folder")
    (lora / "lcm_lora.json").write_text("[1, 2]")
    assert main(["sample", "--model", str(lora), "--prompt", "x", "--out", str(tmp_path / "s")]) == 2
    _one_line(capsys, "sample", "lcm_lora.json must hold a JSON object")

    huge = tmp_path / "huge"
    shutil.copytree(tiny_sd, huge)
    config = json.loads((huge / "unet" / "config.json").read_text())
    (huge / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 100000}))
    assert main(["sample", "--model", str(huge), "--prompt", "x", "--out", str(tmp_path / "s")]) == 2
    _one_line(capsys, "sample", "sample_size makes", "at most 8192")

    long = tmp_path / "long"
    shutil.copytree(default_model_path(), long, ignore=shutil.ignore_patterns("classifier", "*.png"))
    (long / "text_encoder" / "lcm_text_encoder.json").write_text(json.dumps({"kind": "minilm", "max_length": 10**9}))
    assert main(["sample", "--model", str(long), "--prompt", "x", "--out", str(tmp_path / "s")]) == 2
    _one_line(capsys, "sample", "prompts of 1000000000 tokens asked for", "512 positions")


def test_damaged_or_missing_weights_are_not_blamed_on_pickles(tiny_sd, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["sample", "--model", str(model), "--prompt", "x", "--out", str(tmp_path / "s")]) == 2
    err = _one_line(capsys, "sample", "cannot be read, the file is damaged or cut short")
    assert "pickle" not in err
    weights.unlink()
    assert main(["sample", "--model", str(model), "--prompt", "x", "--out", str(tmp_path / "s")]) == 2
    assert "pickle" not in _one_line(capsys, "sample", "holds no weights file")
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    assert main(["sample", "--model", str(model), "--prompt", "x", "--out", str(tmp_path / "s")]) == 2
    _one_line(capsys, "sample", "pickled weights can run code", "--allow-pickle")


def test_an_offline_hub_id_says_the_hub_cannot_be_reached(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["sample", "--model", "nobody-here/no-such-model", "--prompt", "x", "--out", str(tmp_path)]) == 2
    _one_line(capsys, "sample", "not a local folder", "HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert main(["sample", "--model", "nobody-here/no-such-model", "--prompt", "x", "--out", str(tmp_path)]) == 2
    _one_line(capsys, "sample", "(http://127.0.0.1:9) cannot be reached")


# --- data ------------------------------------------------------------------------------------------------------


def test_a_truncated_latent_cache_shard_is_one_line_before_training(tiny_sd, captioned_images, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["cache", "--model", str(tiny_sd), "--data", str(captioned_images), "--out", str(cache),
                 "--batch-size", "4", "--shard-size", "4"]) == 0  # fmt: skip
    shard = cache / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    capsys.readouterr()
    argv = ["distill", "--teacher", str(tiny_sd), "--data", str(cache), "--out", str(tmp_path / "run")]
    assert main([*argv, "--max-steps", "1", "--batch-size", "2"]) == 2
    _one_line(capsys, "distill", "shard-00001.safetensors is damaged", "run lcm cache again")


def test_metadata_naming_files_outside_the_folder_is_skipped_unless_allowed(captioned_images, tmp_path):
    from lcm.data.sources import open_data

    folder = tmp_path / "data"
    shutil.copytree(captioned_images, folder)
    outside = tmp_path / "secret.png"
    shutil.copy(folder / "0.png", outside)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines += [json.dumps({"file_name": name, "text": "x"}) for name in ("../secret.png", str(outside), "/etc/hostname")]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    data = open_data(str(folder), resolution=64)
    assert len(data) == 8 and data.skipped.counts == {"file outside the data folder": 3}
    allowed = open_data(str(folder), resolution=64, allow_outside=True)
    assert len(allowed) == 11  # all three kept (/etc/hostname is then skipped as an unreadable image on load)


# --- a full disk --------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A small tmpfs (root only; skipped where a file system cannot be mounted); ``fill(free)`` leaves ``free``
    bytes of it."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")

    def fill(free: int) -> None:
        filler = mount / "filler"
        filler.unlink(missing_ok=True)
        stat = os.statvfs(mount)
        filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))

    yield mount, fill
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_during_a_checkpoint_or_the_export_is_one_line_naming_the_path(
    tiny_sd, captioned_images, small_disk, capsys
):
    disk, fill = small_disk
    argv = ["distill", "--teacher", str(tiny_sd), "--data", str(captioned_images), "--out", str(disk / "run")]
    argv += ["--max-steps", "2", "--batch-size", "2", "--validate-every", "0", "--checkpoint-every", "1"]
    fill(1 << 20)  # the run's logs fit; its first checkpoint (student, target and Adam's moments: 13 MB) does not
    assert main(argv) == 2
    _one_line(capsys, "distill", "could not write", "step-1", "no space left on the device")
    assert not list((disk / "run" / "train" / "checkpoints").glob("*.tmp"))  # the half-written one is gone

    from lcm.models.export import export_lcm_folder
    from lcm.models.latent_diffusion import LatentDiffusion

    model = LatentDiffusion.from_pretrained(tiny_sd, with_text_encoder=False)
    shutil.rmtree(disk / "run")
    unet = (tiny_sd / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    fill(sum(p.stat().st_size for p in tiny_sd.rglob("*") if p.is_file()) - unet // 2)  # all but half the UNet
    with pytest.raises(OSError, match=r"^could not write .*unet: no space left on the device$"):
        export_lcm_folder(tiny_sd, model.unet, model.scheduler_config, 50, disk / "export", {})
