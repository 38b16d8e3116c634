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
