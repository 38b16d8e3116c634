"""The ``diffalign`` command: dispatch, help, and bad input (clear message, exit 2)."""

import json
import subprocess
import sys

import pytest

from diffalign.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "frobnicate" in capsys.readouterr().err


def test_toy_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "toy"
    rc = main(["toy", "--process", "fm", "--out", str(out), "--train-steps", "50",
               "--n-samples", "200", "--n-paths", "5", "--n-data", "500"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"data.npy", "samples.npy", "paths.png",
                                               "toy.json"}
    assert json.loads((out / "toy.json").read_text())["process"] == "fm"


def test_bad_value_names_it_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["toy", "--out", str(out), "--train-steps", "0"]) == 2
    assert "train_steps=0" in capsys.readouterr().err
    assert not out.exists()


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "diffalign.cli", "--help"],
                         capture_output=True, text=True, check=True)
    assert "toy" in res.stdout


def test_nav1d_optimum_json(capsys):
    assert main(["nav1d", "optimum", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["optimal_return"] > res["random_return"] > 0


def test_align_bad_online_and_dpo_pair_values_exit_2(tmp_path, capsys):
    for d in ("ref", "critic"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
    base = ["align", str(tmp_path / "ref"), "--critic", str(tmp_path / "critic"),
            "--out", str(tmp_path / "out")]
    assert main([*base, "--online", "--online-every", "0"]) == 2
    assert "online_every" in capsys.readouterr().err
    assert main([*base, "--dpo-pairs", "bogus"]) == 2
    assert main([*base, "--sft-proposals", "-3"]) == 2
    assert "sft_proposals=-3" in capsys.readouterr().err
    assert main([*base, "--rl-lr", "0"]) == 2
    assert "rl_lr=0" in capsys.readouterr().err
    assert main([*base, "--rl-group", "0"]) == 2
    assert "rl_group=0" in capsys.readouterr().err
    assert main([*base, "--rollout-conditions", "1.5"]) == 2
    assert "rollout_conditions=1.5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, named", [
    (["run", "nav1d/full", "--out", "x", "--recipe", "max_iters=3"], "max_updates=3"),
    (["run", "nav1d/full", "--out", "x", "--passes", "0"], "passes=0"),
    (["collect", "metaworld/button-press-v3", "--policy", "replay"], "'replay'"),
    (["train", "--out", "x", "--model", "dp", "--action-weight", "10"], "model='dp'"),
    (["train", "--out", "x", "--action-weight", "0"], "action_weight=0"),
    (["run", "nav1d/full", "--out", "x", "--recipe", "planner_action_weight=0"],
     "planner_action_weight=0"),
])
def test_argument_checks_print_one_line_and_exit_2(argv, named, capsys, tmp_path,
                                                   monkeypatch):
    """A command's own argument checks (its __post_init__) reach the user as one line, not
    as the framed box the argument parser draws around a ValueError, and write nothing."""
    from diffalign.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"diffalign {argv[0]}: error: ")
    assert named in err[0]
    assert list(tmp_path.iterdir()) == []
