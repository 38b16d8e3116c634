"""Reward alignment of a foundation diffusion model: RL, DPO, SFT, cascade (docs/design.md §4)."""
