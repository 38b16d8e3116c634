"""The generic trainer: learning, LR schedule, EMA, clipping, bit-identical resume, logs, DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffalign.train import trainer as trainer_mod
from diffalign.train.checkpoint import CheckpointError, load_model_files
from diffalign.train.distributed import all_reduce_grads, launch_local
from diffalign.train.ema import EMA
from diffalign.train.logging import read_metrics
from diffalign.train.trainer import STATE_DIR, TrainConfig, fit, lr_factor

W_TRUE = torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0], [-1.0, 1.0]])


def regression_loss(model, batch_size, g):
    x = torch.randn(batch_size, 4, generator=g)
    y = x @ W_TRUE + 0.01 * torch.randn(batch_size, 2, generator=g)
    dev = next(model.parameters()).device
    err = model(x.to(dev)) - y.to(dev)
    return {"loss": (err ** 2).mean(), "loss_abs": err.abs().mean()}


def cfg(**kw) -> TrainConfig:
    base = dict(steps=40, batch_size=16, lr=1e-2, warmup_steps=5, log_every=5, ckpt_every=0,
                ema_decay=0.9, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# -------------------------------------------------------------------------- learning, math

def test_loss_decreases_on_toy_regression():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    g = torch.Generator().manual_seed(99)
    before = regression_loss(model, 512, g)["loss"].item()
    res = fit(model, regression_loss, cfg(steps=300, lr=5e-2, schedule="constant",
                                          log_every=50))
    after = regression_loss(res.model, 512, g)["loss"].item()
    assert after < 0.01 * before, (before, after)
    assert res.step == 300 and res.resumed_from == 0
    assert set(res.last_metrics) >= {"train/loss", "train/loss_abs", "train/lr",
                                     "train/grad_norm"}
    # the EMA model trails the raw weights but has learnt too
    assert regression_loss(res.ema_model, 512, g)["loss"].item() < 0.05 * before


def _expected_lr(step_1based: int, c: TrainConfig) -> float:
    """Hand-written schedule: linear warm-up to lr in W steps, then cosine to 0 at steps."""
    i = step_1based - 1  # steps completed before this one
    if i < c.warmup_steps:
        return c.lr * step_1based / c.warmup_steps
    if c.schedule == "constant":
        return c.lr
    return c.lr * 0.5 * (1 + math.cos(math.pi * (i - c.warmup_steps) / (c.steps - c.warmup_steps)))


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedule_warmup_then_decay(tmp_path, schedule):
    c = cfg(steps=20, warmup_steps=4, lr=0.1, schedule=schedule, log_every=1)
    fit(nn.Linear(4, 2), regression_loss, c, tmp_path)
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 21))
    for r in recs:
        assert r["train/lr"] == pytest.approx(_expected_lr(r["step"], c), rel=1e-12, abs=1e-15)
    assert recs[0]["train/lr"] == pytest.approx(0.025)  # 1/4 of the peak
    assert recs[3]["train/lr"] == pytest.approx(0.1)  # peak at the end of warm-up
    if schedule == "cosine":
        assert recs[-1]["train/lr"] < 0.01 * 0.1  # near zero at the end
        assert lr_factor(4 + 8, c) == pytest.approx(0.5)  # half-way through the cosine


def test_ema_update_formula():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.75)
    e0 = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    for k, v in ema.state_dict().items():
        if v.is_floating_point():
            want = 0.75 * e0[k] + 0.25 * model.state_dict()[k]
            torch.testing.assert_close(v, want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, model.state_dict()[k])  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.model.parameters())
    # twice more: e_n = d^n e_0 + (1 - d^n) p for a fixed target p
    ema.update(model)
    ema.update(model)
    w = model[0].weight.detach()
    torch.testing.assert_close(ema.model[0].weight, 0.75**3 * e0["0.weight"]
                               + (1 - 0.75**3) * w, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0)


def test_ema_disabled_returns_model():
    model = nn.Linear(4, 2)
    res = fit(model, regression_loss, cfg(steps=3, ema_decay=0.0))
    assert res.ema_model is model


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_grad_clipping_caps_the_norm(clip):
    def big_loss(model, bs, g):
        x = torch.randn(bs, 4, generator=g)
        return {"loss": 1e3 * model(x).pow(2).mean()}

    norms = []

    def record(model, step):  # gradients are still there after the optimiser step
        norms.append(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters()])).item())

    torch.manual_seed(0)
    res = fit(nn.Linear(4, 2), big_loss, cfg(steps=5, grad_clip=clip, log_every=1, lr=1e-6),
              after_step=record)
    assert res.last_metrics["train/grad_norm"] > 10  # the pre-clip norm is logged
    if clip:
        assert max(norms) <= clip * (1 + 1e-5)
    else:
        assert min(norms) > 10


def test_bf16_autocast_runs_on_cpu():
    res = fit(nn.Linear(4, 2), regression_loss, cfg(steps=3, bf16=True))
    assert math.isfinite(res.last_metrics["train/loss"])
    assert res.model.weight.dtype == torch.float32


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")), ("weight_decay", -1.0),
    ("warmup_steps", -1), ("schedule", "linear"), ("grad_clip", -0.1), ("ema_decay", 1.0),
    ("ema_decay", -0.5), ("log_every", 0), ("ckpt_every", -1), ("seed", -3),
    ("device", "gpu0"),
])
def test_bad_config_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=rf"{field}="):
        TrainConfig(**{field: value})


def test_loss_fn_must_return_loss_key():
    with pytest.raises(TypeError, match="'loss'"):
        fit(nn.Linear(4, 2), lambda m, b, g: {"mse": m(torch.zeros(b, 4)).sum()}, cfg(steps=2))


# -------------------------------------------------------------------------- resume

class Net(nn.Module):
    """Dropout (global RNG), generator noise in the loss, and a target copy in a buffer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
        self.register_buffer("target", torch.zeros(2, 16))

    def forward(self, x):
        return self.body(x)


def polyak(model, step):
    with torch.no_grad():
        model.target.mul_(0.9).add_(model.body[3].weight, alpha=0.1)


class Killed(RuntimeError):
    pass


def make_loss(kill_at_call: int | None = None):
    calls = {"n": 0}

    def loss_fn(model, bs, g):
        calls["n"] += 1
        if kill_at_call is not None and calls["n"] == kill_at_call:
            raise Killed(f"simulated kill at call {calls['n']}")
        out = regression_loss(model, bs, g)
        out["loss_reg"] = 1e-3 * (model.target ** 2).mean()
        out["loss"] = out["loss"] + out["loss_reg"]
        return out

    return loss_fn


def resume_cfg(**kw):
    return cfg(steps=30, warmup_steps=4, ckpt_every=7, log_every=1, weight_decay=0.01,
               grad_clip=0.5, ema_decay=0.8, seed=5, **kw)


def fresh_net() -> Net:
    torch.manual_seed(123)
    return Net()


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = fit(fresh_net(), make_loss(), resume_cfg(), out, after_step=polyak)
    return res, out


@pytest.mark.parametrize("kills,resumed", [([18], 14), ([15], 14), ([8], 7), ([4], 0),
                                           ([8, 15], 21)],
                         ids=["between-ckpts", "right-after-ckpt", "just-after-first-ckpt",
                              "before-first-ckpt", "twice"])
def test_resume_is_bit_identical(tmp_path, reference_run, kills, resumed):
    ref, ref_dir = reference_run
    for k in kills:  # the k-th loss call of this process raises
        with pytest.raises(Killed):
            fit(fresh_net(), make_loss(kill_at_call=k), resume_cfg(), tmp_path,
                after_step=polyak)
    res = fit(fresh_net(), make_loss(), resume_cfg(), tmp_path, after_step=polyak)
    assert res.step == 30
    assert res.resumed_from == resumed
    assert res.model is not ref.model
    assert_same_state(res.model, ref.model)  # atol=0 on weights and the target buffer
    assert_same_state(res.ema_model, ref.ema_model)
    # saved final checkpoints equal too
    _, t_ref = load_model_files(ref_dir)
    _, t_res = load_model_files(tmp_path)
    assert all(torch.equal(t_ref[k], t_res[k]) for k in t_ref)
    # metrics: namespaced, every step once, the same values as the uninterrupted run
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 31))
    assert recs == read_metrics(ref_dir)
    assert {"train/loss", "train/loss_abs", "train/loss_reg", "train/lr"} <= set(recs[0])


def test_kill_during_checkpoint_write_keeps_previous_state(tmp_path, reference_run,
                                                           monkeypatch):
    ref, _ = reference_run
    real = trainer_mod.write_json
    n = {"saves": 0}

    def failing_write_json(path, obj, **kw):
        n["saves"] += 1
        if n["saves"] == 2:  # second checkpoint (step 14): tensors written, commit killed
            raise Killed("killed while saving")
        real(path, obj, **kw)

    monkeypatch.setattr(trainer_mod, "write_json", failing_write_json)
    with pytest.raises(Killed):
        fit(fresh_net(), make_loss(), resume_cfg(), tmp_path, after_step=polyak)
    monkeypatch.setattr(trainer_mod, "write_json", real)
    state = json.loads((tmp_path / STATE_DIR / "state.json").read_text())
    assert state["step"] == 7  # the previous state is still the one in force
    res = fit(fresh_net(), make_loss(), resume_cfg(), tmp_path, after_step=polyak)
    assert res.resumed_from == 7
    assert_same_state(res.model, ref.model)
    assert_same_state(res.ema_model, ref.ema_model)
    # the orphan tensor file of the failed save is gone after the next good save
    assert [p.name for p in (tmp_path / STATE_DIR).glob("tensors-*")] == [
        "tensors-000000030.safetensors"]


def test_resume_with_another_model_fails_clearly(tmp_path):
    fit(nn.Linear(4, 2), regression_loss, cfg(steps=3), tmp_path)
    with pytest.raises(CheckpointError, match="does not match"):
        fit(nn.Sequential(nn.Linear(4, 2)), regression_loss, cfg(steps=6), tmp_path)


def test_resume_finished_run_and_extend(tmp_path):
    fit(nn.Linear(4, 2), regression_loss, cfg(steps=10), tmp_path)
    res = fit(nn.Linear(4, 2), regression_loss, cfg(steps=10), tmp_path)
    assert res.resumed_from == 10 and res.step == 10
    res = fit(nn.Linear(4, 2), regression_loss, cfg(steps=15), tmp_path)
    assert res.resumed_from == 10 and res.step == 15
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 10, 15]


def test_state_files_are_json_or_safetensors_no_pickle(tmp_path, reference_run):
    _, out = reference_run
    files = [p for p in out.rglob("*") if p.is_file() and "tb" not in p.relative_to(out).parts]
    assert files
    for p in files:
        assert p.suffix in {".json", ".safetensors", ".jsonl"}, p
        assert not p.read_bytes().startswith(b"\x80"), f"{p} looks like a pickle"
    names = {p.name for p in (out / STATE_DIR).iterdir()}
    assert names == {"state.json", "tensors-000000030.safetensors"}
    tensors = load_file(str(out / STATE_DIR / "tensors-000000030.safetensors"))
    assert "optim.0.exp_avg" in tensors and "optim.0.exp_avg_sq" in tensors
    assert "model.target" in tensors and "ema.body.0.weight" in tensors
    assert "rng.generator.0" in tensors
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["train"]["steps"] == 30


def test_tensorboard_events_written(reference_run):
    _, out = reference_run
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_save_fn_receives_ema_model(tmp_path):
    got = {}

    def save_fn(d, m):
        got["dir"], got["model"] = d, m
        save_file({"w": m.weight.detach().clone()}, str(d / "custom.safetensors"))

    res = fit(nn.Linear(4, 2), regression_loss, cfg(steps=4), tmp_path, save_fn=save_fn)
    assert got["dir"] == tmp_path and got["model"] is res.ema_model
    assert (tmp_path / "custom.safetensors").is_file()
    assert not (tmp_path / "model.safetensors").exists()


def test_params_subset_only_trains_those(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    frozen = model[0].weight.detach().clone()
    trained = model[1].weight.detach().clone()
    res = fit(model, regression_loss, cfg(steps=5), params=model[1].parameters())
    assert torch.equal(res.model[0].weight, frozen)
    assert not torch.equal(res.model[1].weight, trained)  # the other layer did train


# -------------------------------------------------------------------------- multi-process

def _ddp_worker(rank: int, out: str) -> None:
    torch.manual_seed(100 + rank)  # different local inits: rank 0's must win
    first = {}

    def loss_fn(m, bs, g):
        x = torch.randn(bs, 4, generator=g)
        first.setdefault("x", x)
        return {"loss": ((m(x) - x @ W_TRUE) ** 2).mean()}

    res = fit(nn.Linear(4, 2), loss_fn, cfg(steps=30, lr=0.2, grad_clip=0.0,
                                            schedule="constant", log_every=10), out)
    # gradient averaging by hand: rank r holds r+1; a grad missing on rank 1 counts as 0
    a, b, c = (nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), rank + 1.0)
    b.grad = torch.ones(3) if rank == 0 else None
    all_reduce_grads([a, b, c], world_size=2)
    save_file({"w": res.model.weight.detach().clone(), "b": res.model.bias.detach().clone(),
               "ema": res.ema_model.weight.detach().clone(), "x": first["x"],
               "grad_a": a.grad, "grad_b": b.grad, "c_none": torch.tensor(c.grad is None)},
              str(Path(out) / f"rank{rank}.safetensors"))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_ddp_two_cpu_processes_stay_in_sync(tmp_path, method):
    launch_local(_ddp_worker, 2, str(tmp_path), start_method=method)
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    for k in ("w", "b", "ema"):
        assert torch.equal(r0[k], r1[k]), k  # identical replicas
    assert not torch.equal(r0["x"], r1["x"])  # but different data streams
    for r in (r0, r1):
        assert torch.equal(r["grad_a"], torch.full((3,), 1.5))
        assert torch.equal(r["grad_b"], torch.full((3,), 0.5))
        assert r["c_none"].item()
    recs = read_metrics(tmp_path)  # rank 0 alone logs
    assert [r["step"] for r in recs] == [10, 20, 30]
    assert recs[-1]["train/loss"] < 0.3 * recs[0]["train/loss"]  # it learns
    assert (tmp_path / "model.safetensors").is_file()


def _nan_at(calls_with_nan, seen=None):
    """regression_loss, made NaN at the given loss calls (1-based); ``seen`` collects the
    weight the model had at each call."""
    calls = {"n": 0}

    def loss_fn(model, bs, g):
        calls["n"] += 1
        if seen is not None:
            seen.append(model.weight.detach().clone())
        out = regression_loss(model, bs, g)
        if calls["n"] in calls_with_nan:
            out["loss"] = out["loss"] * float("nan")
        return out

    return loss_fn


def test_nan_loss_rolls_back_to_the_last_good_state_at_half_the_lr(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "SNAPSHOT_EVERY", 3)
    seen: list[torch.Tensor] = []
    c = cfg(steps=12, lr=1e-2, warmup_steps=0, schedule="constant", log_every=1, ckpt_every=5)
    with pytest.warns(UserWarning, match=r"loss is nan at step 8; went back to the weights "
                                         r"of step 6 and halved the learning rate"):
        res = fit(nn.Linear(4, 2), _nan_at({8}, seen), c, tmp_path)
    assert res.step == 12  # the failed step is done again: all 12 updates happen
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert torch.equal(seen[8], seen[6])  # call 9 starts from the copy made at step 6
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all(math.isfinite(r["train/loss"]) for r in recs)
    assert [r["train/lr"] for r in recs] == [1e-2] * 7 + [5e-3] * 5
    state = json.loads((tmp_path / STATE_DIR / "state.json").read_text())
    assert state["step"] == 12 and state["nan_restarts"] == 1


def test_nan_loss_twice_stops_with_training_diverged(tmp_path):
    from diffalign.errors import TrainingDiverged, UserError

    c = cfg(steps=20, ckpt_every=4, log_every=10)
    with pytest.warns(UserWarning, match="halved"), \
            pytest.raises(TrainingDiverged, match="loss is nan at step 7 after a restart at "
                                                  "half the learning rate") as e:
        fit(nn.Linear(4, 2), _nan_at(set(range(7, 100))), c, tmp_path)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    state = json.loads((tmp_path / STATE_DIR / "state.json").read_text())
    assert state["step"] == 4  # the last good state on disk is kept
    # a NaN at the very first step: no good state to go back to
    with pytest.raises(TrainingDiverged, match="no earlier step"):
        fit(nn.Linear(4, 2), _nan_at({1}), cfg(steps=5), tmp_path / "c")


def test_nan_restart_count_survives_resume(tmp_path):
    from diffalign.errors import TrainingDiverged

    c = cfg(steps=10, ckpt_every=5, log_every=5)
    with pytest.warns(UserWarning, match="halved"):
        fit(nn.Linear(4, 2), _nan_at({3}), c, tmp_path)
    with pytest.raises(TrainingDiverged, match="after a restart"):
        fit(nn.Linear(4, 2), _nan_at({1}), cfg(steps=15, ckpt_every=5, log_every=5), tmp_path)


def test_without_tensorboard_writes_jsonl_and_warns_once(tmp_path, monkeypatch):
    import sys

    from diffalign.train import logging as tlog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(tlog, "_warned_no_tb", False)
    with pytest.warns(UserWarning, match="tensorboard"):
        fit(nn.Linear(4, 2), regression_loss, cfg(steps=5), tmp_path / "a")
    assert not (tmp_path / "a" / "tb").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "a")] == [5]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(nn.Linear(4, 2), regression_loss, cfg(steps=5), tmp_path / "b")


def test_adam_is_fused_on_cpu_and_updates_like_the_plain_one():
    from diffalign.train.trainer import adam

    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    fused = adam(a, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    assert isinstance(adam(a, lr=1e-2), torch.optim.Adam)
    assert not isinstance(adam(a, lr=1e-2), torch.optim.AdamW)
    for _ in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        fused.step()
        plain.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_train_sigkilled_after_a_checkpoint_resumes_to_the_same_model(tmp_path):
    """`diffalign train` killed by SIGKILL (no clean-up) after its step-1000 checkpoint and
    run again writes the same model, byte for byte, as a run never killed."""
    import json
    import sys

    from conftest import killed_and_resumed

    def cmd(out):
        return [sys.executable, "-m", "diffalign.cli", "train", "--task", "nav1d/full",
                "--episodes", "100", "--model", "dp", "--process", "ddim", "--steps", "1150",
                "--seed", "0", "--no-progress", "--out", str(out)]

    killed = killed_and_resumed(cmd, tmp_path, steps=1150)
    steps = [json.loads(line)["step"] for line in
             (killed / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert steps == sorted(set(steps))  # the resumed run logged no step twice
