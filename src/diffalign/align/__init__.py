"""Reward alignment of a foundation diffusion model: RL, DPO, SFT, cascade (DESIGN §4)."""
