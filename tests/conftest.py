"""Shared test settings: offline, deterministic, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# Tiny test models are fastest single-threaded; pytest-xdist runs one worker per core.
torch.set_num_threads(1)


def train_tiny_dp(episodes, steps: int = 250, batch: int = 64, default_steps: int = 10):
    """A small Diffusion Policy (DDPM) trained on ``episodes`` with seeds fixed: the reference
    of the alignment tests."""
    from diffalign.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("dp", "ddpm", None, episodes.obs_dim, episodes.act_dim,
                        process_kwargs={"default_steps": default_steps})
    ds = model.make_dataset(episodes)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = model.loss(ds.sample(batch, g), g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class TargetActionCritic(torch.nn.Module):
    """A known reward: Q(s, a) = −(a₀ − target)², at most 0 and differentiable in the
    action (the dummy parameter gives it a device and a parameter list, like a critic)."""

    def __init__(self, target: float = 0.6):
        super().__init__()
        self.target = target
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def q(self, obs, act):
        return -((act[..., 0] - self.target) ** 2) + 0 * self.dummy


def sigkill_after_checkpoint(cmd, env, state, step: int, deadline_s: float = 240) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the group (no clean-up) as soon as
    its training state ``state`` (``train_state/state.json``) records ``step`` or later."""
    import json
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + deadline_s
        while proc.poll() is None and time.time() < deadline:
            if state.exists() and json.loads(state.read_text() or "{}").get("step", 0) >= step:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def killed_and_resumed(cmd, tmp_path, steps: int, kill_at: int = 1000):
    """Run the training command ``cmd(out)`` whole, and again SIGKILLed after its
    ``kill_at`` checkpoint and resumed; returns the resumed run's directory. Checks that the
    kill came before the end (``steps``), that the resume kept the records from before the
    kill (a mark on the first one survives: a run that started afresh, being seeded, would
    write the same bytes but drop it), and that it wrote the whole run's model byte for byte."""
    import json
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(cmd(whole), env=env, check=True, stdout=subprocess.DEVNULL)
    state = killed / "train_state" / "state.json"
    sigkill_after_checkpoint(cmd(killed), env, state, kill_at)
    assert json.loads(state.read_text())["step"] < steps  # killed before the end
    log = killed / "metrics.jsonl"
    lines = log.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "mark": 1})
    log.write_text("\n".join(lines) + "\n")
    subprocess.run(cmd(killed), env=env, check=True, stdout=subprocess.DEVNULL)
    assert json.loads(log.read_text().splitlines()[0]).get("mark") == 1
    assert (killed / "model.safetensors").read_bytes() == \
        (whole / "model.safetensors").read_bytes()
    return killed
