"""Reliability: file permissions and leftovers, seeding, resume checks, checkpoint validation
on load, and the CLI's exit codes by cause."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffalign.atomic import atomic_path, clean_stale_temps, write_json
from diffalign.cli import main
from diffalign.errors import UserError
from diffalign.train.checkpoint import (
    CHECKSUMS,
    CheckpointError,
    load_model_files,
    save_model,
)
from diffalign.train.trainer import STATE_DIR

TINY_TRAIN = dict(task="nav1d/expert", model="dp", process="ddpm", episodes=4, steps=3,
                  batch_size=8, device="cpu", progress=False)
TINY_CRITIC = dict(task="nav1d/full", episodes=4, steps=3, hidden=16, batch_size=16,
                   device="cpu", progress=False)


def _train_args(out, **kw):
    from diffalign.commands.train import TrainArgs

    return TrainArgs(out=out, **{**TINY_TRAIN, **kw})


def _critic_args(out, **kw):
    from diffalign.commands.critic import CriticArgs

    return CriticArgs(out=out, **{**TINY_CRITIC, **kw})


def _disturb_global_rngs():
    """Advance every global RNG, as earlier work in the same process would."""
    torch.rand(13)
    np.random.rand(7)
    random.random()


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ 1. atomic files

@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_files_get_the_umask_mode(tmp_path, mask, want):
    old = os.umask(mask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_model(tmp_path / "ckpt", torch.nn.Linear(2, 2), {"kind": "linear"})
    finally:
        os.umask(old)
    for p in (tmp_path / "a.json", tmp_path / "ckpt" / "config.json",
              tmp_path / "ckpt" / "model.safetensors"):
        assert _mode(p) == want, (p.name, oct(_mode(p)))


def test_atomic_path_syncs_the_file_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    with atomic_path(tmp_path / "x.txt") as tmp:
        tmp.write_text("hello")
    assert (tmp_path / "x.txt").read_text() == "hello"
    assert events[:2] == ["fsync", "replace"]  # then the directory, best effort
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_stale_temps_are_removed_where_a_checkpoint_is_saved(tmp_path, umask_022):
    d = tmp_path / "ckpt"
    d.mkdir()
    dead = _dead_pid()
    leftovers = [d / f".model.safetensors.tmp-{dead}-ab12cd_z.safetensors",
                 d / ".config.json.k3j4h5g6.json"]  # name of an earlier version
    live = d / f".config.json.tmp-{os.getpid()}-zzzzzzzz.json"  # being written right now
    keep = [live, d / ".hidden", d / "notes.txt", d / ".notes.abcdefgh"]
    for p in leftovers + keep:
        p.write_text("partial")
    save_model(d, torch.nn.Linear(2, 2), {"kind": "linear"})
    names = {p.name for p in d.iterdir()}
    assert not any(p.name in names for p in leftovers)
    assert {p.name for p in keep} <= names
    assert clean_stale_temps(d) == []
    # the name of a temp file that atomic_path makes is the one recognised
    with atomic_path(d / "eval.json") as tmp:
        assert tmp.name.startswith(f".eval.json.tmp-{os.getpid()}-") and tmp.suffix == ".json"
        assert clean_stale_temps(d) == []


def test_train_state_cleans_stale_temps(tmp_path):
    from diffalign.train.trainer import TrainConfig, fit

    state = tmp_path / STATE_DIR
    state.mkdir(parents=True)
    left = state / f".state.json.tmp-{_dead_pid()}-aaaaaaaa.json"
    left.write_text("{")
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=0, progress=False, device="cpu")
    fit(torch.nn.Linear(2, 1), lambda m, b, g: {"loss": m(torch.randn(b, 2, generator=g))
                                               .pow(2).mean()}, cfg, tmp_path)
    assert not left.exists()


# ------------------------------------------------------------------ 2. seeding

def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_same_seed_gives_identical_checkpoints(tmp_path):
    from diffalign.commands.train import train_model

    train_model(_train_args(tmp_path / "a", seed=3))
    _disturb_global_rngs()
    train_model(_train_args(tmp_path / "b", seed=3))
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    train_model(_train_args(tmp_path / "c", seed=4))
    c = _weights(tmp_path / "c")
    assert any(not torch.equal(v, c[k]) for k, v in _weights(tmp_path / "a").items())


def test_critic_same_seed_gives_identical_checkpoints(tmp_path, capsys):
    from diffalign.commands.critic import critic_main

    critic_main(_critic_args(tmp_path / "a", seed=2))
    _disturb_global_rngs()
    critic_main(_critic_args(tmp_path / "b", seed=2))
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


# ------------------------------------------------------------------ 3. resume checks

def test_train_refuses_to_resume_with_other_settings(tmp_path, capsys):
    from diffalign.commands.train import train_model

    out = tmp_path / "run"
    train_model(_train_args(out, steps=2))
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    assert state["settings"]["task"] == "nav1d/expert" and state["settings"]["seed"] == 0
    assert state["settings"]["spec"]["kind"] == "dp"
    for change, named in [(dict(seed=1), "seed 0 -> 1"),
                          (dict(process="fm"), "process 'ddpm' -> 'fm'"),
                          (dict(task="nav1d/full"), "task 'nav1d/expert' -> 'nav1d/full'"),
                          (dict(episodes=5), "episodes 4 -> 5")]:
        with pytest.raises(UserError, match="other settings") as e:
            train_model(_train_args(out, steps=4, **change))
        msg = str(e.value)
        assert named in msg and "new --out" in msg and str(out) in msg and "\n" not in msg
    before = (out / STATE_DIR / "state.json").read_text()
    argv = ["train", "--out", str(out), "--task", "nav1d/expert", "--model", "dp",
            "--episodes", "4", "--steps", "4", "--batch-size", "8", "--device", "cpu",
            "--no-progress"]
    assert main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed 0 -> 1" in err[0]
    assert (out / STATE_DIR / "state.json").read_text() == before  # nothing written
    # the same settings resume, and more steps are allowed
    _, res, _ = train_model(_train_args(out, steps=4))
    assert res.resumed_from == 2 and res.step == 4


def test_critic_refuses_to_resume_with_other_settings(tmp_path, capsys):
    from diffalign.commands.critic import critic_main

    out = tmp_path / "critic"
    critic_main(_critic_args(out, steps=2))
    for change, named in [(dict(expectile=0.8), "expectile 0.7 -> 0.8"),
                          (dict(gamma=0.9), "gamma 0.99 -> 0.9"),
                          (dict(backup_actions=4), "backup_actions 0 -> 4"),
                          (dict(ensemble=2), "ensemble 1 -> 2"),
                          (dict(seed=5), "seed 0 -> 5")]:
        with pytest.raises(UserError, match="other settings") as e:
            critic_main(_critic_args(out, steps=4, **change))
        assert named in str(e.value) and "new --out" in str(e.value)
    argv = ["critic", "--out", str(out), "--task", "nav1d/full", "--episodes", "4",
            "--steps", "4", "--hidden", "16", "--batch-size", "16", "--device", "cpu",
            "--no-progress", "--expectile", "0.9"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expectile 0.7 -> 0.9" in err[0]
    summary = critic_main(_critic_args(out, steps=4))  # same settings: resumes
    assert summary["steps"] == 4


def test_states_without_settings_still_resume(tmp_path):
    from diffalign.commands.train import train_model

    out = tmp_path / "run"
    train_model(_train_args(out, steps=2))
    path = out / STATE_DIR / "state.json"
    state = json.loads(path.read_text())
    del state["settings"]  # as written before settings were recorded
    path.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="changed settings"):  # seed: only the trainer's
        _, res, _ = train_model(_train_args(out, steps=3, seed=9))  # check, which warns
    assert res.resumed_from == 2


# ------------------------------------------------------------------ 4. checkpoints on load

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny control model and a tiny critic, trained once."""
    from diffalign.commands.critic import critic_main
    from diffalign.commands.train import train_model

    root = tmp_path_factory.mktemp("trained")
    train_model(_train_args(root / "model", steps=2))
    critic_main(_critic_args(root / "critic", steps=2))
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(STATE_DIR, "tb"))
    return dst


def test_config_records_the_weights_checksum(trained):
    cfg = json.loads((trained / "model" / "config.json").read_text())
    from diffalign.train.checkpoint import sha256_file

    assert cfg[CHECKSUMS] == {"model.safetensors": sha256_file(trained / "model" /
                                                                "model.safetensors")}
    config, _ = load_model_files(trained / "model")
    assert CHECKSUMS not in config  # not part of what the loaders see


def test_wrong_kind_is_refused_naming_both(trained):
    from diffalign.models.base import ControlModel
    from diffalign.models.critic import load_critic

    with pytest.raises(CheckpointError, match=r"holds a 'iql_critic' checkpoint, not a 'dp'"):
        load_model_files(trained / "critic", kind="dp")
    with pytest.raises(CheckpointError, match=r"'iql_critic'.*not a 'diffuser' or 'dp'"):
        load_model_files(trained / "critic", kind={"dp", "diffuser"})
    with pytest.raises(CheckpointError, match="critic"):
        ControlModel.load(trained / "critic")
    with pytest.raises(CheckpointError, match="'dp'"):
        load_critic(trained / "model")


def test_flipped_byte_is_refused_naming_the_file(trained, tmp_path, capsys):
    from diffalign.models.base import ControlModel

    d = _copy(trained / "model", tmp_path / "m")
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01  # in the last tensor's data: safetensors itself still parses it
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*SHA-256") as e:
        ControlModel.load(d)
    assert str(w) in str(e.value) and "\n" not in str(e.value)
    assert main(["evaluate", str(d), "--episodes", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(w) in err[0] and "SHA-256" in err[0]


def test_checkpoints_without_checksum_still_load(trained, tmp_path):
    from diffalign.models.base import ControlModel
    from diffalign.models.critic import load_critic

    for name in ("model", "critic"):
        d = _copy(trained / name, tmp_path / name)
        cfg = json.loads((d / "config.json").read_text())
        del cfg[CHECKSUMS]
        (d / "config.json").write_text(json.dumps(cfg))
    ControlModel.load(tmp_path / "model")
    load_critic(tmp_path / "critic")


def test_non_float32_weights_are_refused(trained, tmp_path):
    from diffalign.models.base import ControlModel

    d = _copy(trained / "model", tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    save_file({k: (v.double() if v.is_floating_point() else v) for k, v in tensors.items()},
              str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    del cfg[CHECKSUMS]  # (a file converted elsewhere)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"are not float32 \(e\.g\. '.+' is float64\)"):
        ControlModel.load(d)
    config, t = load_model_files(d, float_dtype=None)  # a caller may take any dtype
    assert next(iter(t.values())).dtype == torch.float64


def test_corrupted_train_state_is_refused(tmp_path):
    from diffalign.commands.train import train_model

    out = tmp_path / "run"
    train_model(_train_args(out, steps=2))
    (f,) = (out / STATE_DIR).glob("tensors-*.safetensors")
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{f.name}.*SHA-256"):
        train_model(_train_args(out, steps=3))


def test_adapter_with_missing_tensors_is_refused(tmp_path):
    pytest.importorskip("peft")
    from diffalign.align.lora import ADAPTER_WEIGHTS, add_lora, load_adapter, save_adapter
    from diffalign.nets import build_backbone

    def net():
        torch.manual_seed(0)
        return build_backbone("mlp", x_dim=3, horizon=8, width=32, depth=2)

    save_adapter(add_lora(net(), r=2), tmp_path)
    load_adapter(net(), tmp_path)  # complete: loads
    w = tmp_path / ADAPTER_WEIGHTS
    tensors = load_file(str(w))
    dropped = sorted(tensors)[:2]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(w))
    with pytest.raises(CheckpointError, match=rf"2 of {len(tensors)} LoRA tensors are missing"):
        load_adapter(net(), tmp_path)


# ------------------------------------------------------------------ 5. exit codes by cause

def _patch_train_main(monkeypatch, exc: BaseException):
    import diffalign.commands.train as train_cmd

    def boom(args):
        raise exc

    monkeypatch.setattr(train_cmd, "train_main", boom)


def test_internal_error_propagates_with_its_traceback(tmp_path, monkeypatch):
    _patch_train_main(monkeypatch, KeyError("internal"))
    with pytest.raises(KeyError, match="internal"):
        main(["train", "--out", str(tmp_path / "x")])
    _patch_train_main(monkeypatch, ValueError("a shape mismatch deep inside"))
    with pytest.raises(ValueError, match="shape mismatch"):
        main(["train", "--out", str(tmp_path / "x")])


def test_internal_error_exits_1_with_a_traceback_from_the_console(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import diffalign.commands.train as t
        from diffalign.cli import main

        def boom(args):
            raise KeyError("internal")

        t.train_main = boom
        sys.exit(main(["train", "--out", {str(tmp_path / "x")!r}]))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr and "KeyError" in res.stderr


@pytest.mark.parametrize("exc", [UserError("bad thing\nover two lines"),
                                 CheckpointError("corrupted checkpoint file /x/y"),
                                 FileNotFoundError("no such file: /x"),
                                 FileExistsError("exists: /x"),
                                 IsADirectoryError("is a directory: /x"),
                                 NotADirectoryError("not a directory: /x")],
                         ids=lambda e: type(e).__name__)
def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, exc):
    _patch_train_main(monkeypatch, exc)
    assert main(["train", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffalign train: error: ")
    assert " ".join(str(exc).split()) in err[0]


def test_argument_validation_still_exits_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), "--episodes", "0"]) == 2
    assert "episodes=0" in capsys.readouterr().err  # (tyro reports it, in a box)
    # bad values the command finds while building (unknown task, sizes that do not fit)
    assert main(["train", "--out", str(tmp_path / "x"), "--task", "nav1d/medium"]) == 2
    assert "medium" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "y"), "--task", "nav1d/expert",
                 "--episodes", "4", "--horizon", "10", "--no-progress"]) == 2
    assert "horizon=10" in capsys.readouterr().err
    assert main(["critic", "--out", str(tmp_path / "z"), "--task", "frob/x"]) == 2
    assert "frob/x" in capsys.readouterr().err
