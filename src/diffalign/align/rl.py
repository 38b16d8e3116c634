"""RL on the denoising MDP (DDPO-style REINFORCE/PPO) and its pieces (DESIGN §4).

The denoising chain is an MDP: state ``(x_k, k, c)``, action ``x_{k−1}``, reward ``R(x_0)`` at
the end. These are the pure loss functions; shapes: ``(B, K)`` for per-step quantities
(B chains, K recorded transitions), ``(B,)`` for per-chain ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["credit_decreasing", "credit_retrospective", "gaussian_kl_equal_var",
           "group_advantages", "policy_gradient_loss"]


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Rewards normalised within groups of ``group_size`` consecutive samples.

    The samples of one condition (state) form a group; ``(R − mean_group) / (std_group + eps)``
    is the group baseline of DESIGN §4 (and GRPO). ``rewards``: ``(B,)`` with B a multiple of
    ``group_size``. A group of one falls back to the batch statistics.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of "
                         f"{group_size}")
    if group_size == 1:
        return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
    g = rewards.view(-1, group_size)
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def policy_gradient_loss(logp: Tensor, advantages: Tensor, logp_old: Tensor | None = None,
                         clip: float | None = 0.2, credit: Tensor | None = None
                         ) -> dict[str, Tensor]:
    """REINFORCE / PPO loss over the denoising steps.

    ``L = −mean_b Σ_k λ_k · min(ρ_k A_b, clip(ρ_k, 1−ε, 1+ε) A_b)``, ``ρ_k = exp(logp − logp_old)``.
    With ``logp_old=None`` (or ``clip=None``) it is REINFORCE: ``−mean_b Σ_k λ_k logp_k A_b``.

    Args:
        logp: ``(B, K)`` log-probs of the taken transitions under the current policy.
        advantages: ``(B,)``.
        logp_old: ``(B, K)`` log-probs under the policy that sampled (no gradient).
        clip: PPO ratio clip ε; ``None`` disables clipping.
        credit: ``(K,)`` or ``(B, K)`` weights λ_k; default all ones.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, K), got {tuple(logp.shape)}")
    lam = torch.ones_like(logp) if credit is None else credit.to(logp).expand_as(logp)
    adv = advantages.to(logp).view(-1, 1)
    out: dict[str, Tensor] = {}
    if logp_old is None:
        per_step = logp * adv
    else:
        ratio = torch.exp(logp - logp_old.detach())
        per_step = ratio * adv
        if clip is not None:
            per_step = torch.minimum(per_step, ratio.clamp(1 - clip, 1 + clip) * adv)
            out["clip_frac"] = ((ratio - 1).abs() > clip).float().mean().detach()
        out["ratio_mean"] = ratio.mean().detach()
    out["loss"] = -(lam * per_step).sum(1).mean()
    return out


def gaussian_kl_equal_var(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """KL between two Gaussians of equal std: ``Σ ‖μ − μ_ref‖² / (2σ²)`` per sample, ``(B,)``.

    Exact for the transitions of the aligned model and its reference (same noise schedule);
    summed over the steps it bounds the KL between their chains.
    """
    var = (std**2).clamp_min(1e-12)
    return (((mean - mean_ref) ** 2) / (2 * var)).flatten(1).sum(1)


def credit_decreasing(num_steps: int, gamma: float = 0.9, normalize: bool = True) -> Tensor:
    """λ over the recorded steps, first (noisiest) to last: ``γ^k`` with k the steps left.

    The step that produces the clean sample gets ``γ^0 = 1`` and earlier (noisier) steps get
    geometrically less credit. ``normalize`` rescales to mean 1.
    """
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got gamma={gamma}")
    k = torch.arange(num_steps - 1, -1, -1, dtype=torch.float32)
    lam = gamma**k
    return lam * (num_steps / lam.sum()) if normalize else lam


def credit_retrospective(x0_preds: Tensor, x0: Tensor, temperature: float = 1.0,
                         normalize: bool = True) -> Tensor:
    """λ_k from the similarity of each step's x0-prediction to the final sample, ``(B, K)``.

    ``λ_k = exp(−‖x̂0_k − x_0‖² / (D · temperature))``: steps whose prediction already
    resembles the final sample (the decision was taken there) get more credit.
    ``x0_preds``: ``(K, B, H, D)`` as recorded by ``sample(return_chain=True)``.
    """
    d = ((x0_preds - x0.unsqueeze(0)) ** 2).flatten(2).mean(2)  # (K, B)
    lam = torch.exp(-d / temperature).T  # (B, K)
    if normalize:
        lam = lam * (lam.shape[1] / lam.sum(1, keepdim=True).clamp_min(1e-12))
    return lam.detach()
