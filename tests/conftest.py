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
