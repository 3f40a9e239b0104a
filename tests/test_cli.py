import subprocess
import sys

import pytest

from lcm.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "timesteps" in out


def test_timesteps_prints_lcm_schedule(capsys):
    assert main(["timesteps", "--sampler", "lcm", "--steps", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split()[0]) for line in lines[1:]] == [999, 759, 499, 259]


def test_timesteps_reads_a_scheduler_config(tmp_path, capsys):
    config = tmp_path / "scheduler_config.json"
    config.write_text('{"beta_schedule": "linear", "timestep_spacing": "trailing"}')
    assert main(["timesteps", "--sampler", "ddim", "--steps", "2", "--scheduler-config", str(config)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["999", "499"]


def test_bad_input_is_one_clear_line(capsys):
    assert main(["timesteps", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lcm timesteps: error:") and "[1, 50]" in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "lcm.cli", "--help"], capture_output=True, text=True, check=True)
    assert "timesteps" in out.stdout


_DISTILL = ["distill", "--out", "{tmp}/run"]
_FINETUNE = ["finetune", "--out", "{tmp}/run", "--model", "{tmp}"]
_TEACHER = ["train-teacher", "--out", "{tmp}/teacher"]
BAD_VALUES = [  # (command line, the flag the one-line error must name)
    *[
        ([*cmd, flag, value] if value else [*cmd, flag], flag.split("=")[0])
        for cmd in (_DISTILL, _FINETUNE)
        for flag, value in [
            ("--batch-size", "0"),
            ("--checkpoint-every", "0"),
            ("--log-every", "0"),
            ("--max-steps", "0"),
            ("--learning-rate", "0"),
            ("--learning-rate", "nan"),
            ("--learning-rate=-1e-4", ""),
            ("--lr-schedule", "bogus"),
            ("--lr-warmup-steps", "-1"),
            ("--adam-weight-decay", "-0.1"),
            ("--gradient-accumulation-steps", "0"),
            ("--max-grad-norm", "0"),
            ("--max-grad-norm", "inf"),
            ("--seed", "-1"),
            ("--keep-checkpoints", "0"),
            ("--validate-every", "-1"),
            ("--max-bad-steps", "0"),
            ("--num-workers", "-1"),
            ("--resolution", "7"),
            ("--resolution", "0"),
            ("--num-solver-steps", "0"),
            ("--num-solver-steps", "1001"),
            ("--huber-c", "0"),
            ("--huber-c", "nan"),
            ("--ema-decay", "1"),
            ("--ema-decay", "-0.5"),
            ("--lora-rank", "0"),
            ("--lora-alpha", "0"),
            ("--lora-targets", ","),
            ("--validation-w", "-1"),
            ("--data", "{tmp}/missing-folder"),
            ("--config", "{tmp}/missing.json"),
        ]
    ],
    ([*_DISTILL, "--w-min", "-1"], "--w-min"),
    ([*_DISTILL, "--w-lr-scale", "0"], "--w-lr-scale"),
    ([*_DISTILL, "--w-lr-scale", "nan"], "--w-lr-scale"),
    ([*_DISTILL, "--w-max", "inf"], "--w-max"),
    ([*_DISTILL, "--w-min", "5", "--w-max", "2"], "--w-min"),
    ([*_FINETUNE, "--lcf-w", "-2"], "--lcf-w"),
    (["finetune", "--out", "{tmp}/run"], "--model"),
    (["demo", "--max-steps", "0"], "--max-steps"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["demo", "--eval-samples", "0"], "--eval-samples"),
    (["demo", "--seed", "-3"], "--seed"),
    ([*_TEACHER, "--vae-steps", "0"], "--vae-steps"),
    ([*_TEACHER, "--unet-steps", "0"], "--unet-steps"),
    ([*_TEACHER, "--classifier-steps", "-1"], "--classifier-steps"),
    ([*_TEACHER, "--batch-size", "0"], "--batch-size"),
    ([*_TEACHER, "--unet-channels", "32,x"], "--unet-channels"),
    ([*_TEACHER, "--unet-channels", "32,0"], "--unet-channels"),
    ([*_TEACHER, "--max-train-images", "0"], "--max-train-images"),
    ([*_TEACHER, "--checkpoint-every", "0"], "--checkpoint-every"),
    ([*_TEACHER, "--sample-every", "0"], "--sample-every"),
    ([*_TEACHER, "--seed", "-1"], "--seed"),
    (["eval", "--out", "{tmp}/e", "--num-samples", "0"], "--num-samples"),
    (["eval", "--out", "{tmp}/e", "--batch-size", "0"], "--batch-size"),
    (["eval", "--out", "{tmp}/e", "--reference-samples", "0"], "--reference-samples"),
    (["eval", "--out", "{tmp}/e", "--seed", "-1"], "--seed"),
    (["eval", "--out", "{tmp}/e", "--w", "-1"], "--w"),
    (["eval", "--out", "{tmp}/e", "--w", "nan"], "--w"),
    (["eval", "--out", "{tmp}/e", "--sweep-w", "1,x"], "--sweep-w"),
    (["eval", "--out", "{tmp}/e", "--teacher-steps", "0"], "--teacher-steps"),
    (["eval", "--out", "{tmp}/e", "--lcm", "/missing/path"], "--lcm"),
    (["timesteps", "--original-steps", "0"], "--original-steps"),
]


def test_every_bad_value_is_one_line_naming_the_flag_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import time

    from lcm.models.latent_diffusion import LatentDiffusion

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(LatentDiffusion, "from_pretrained", no_loading)
    failures, start = [], time.time()
    for argv, flag in BAD_VALUES:
        argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
        code = main(argv)
        err = capsys.readouterr().err.strip()
        if code != 2 or "\n" in err or not err.startswith(f"lcm {argv[0]}: error:") or flag not in err:
            failures.append((argv, code, err))
    assert not failures, failures
    assert time.time() - start < 60
    assert len(BAD_VALUES) >= 80
