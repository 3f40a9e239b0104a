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
