"""PPO pieces (InstructGPT / MindRLHF loop): KL-penalised token rewards, GAE, whitening,
clipped policy and value losses, KL controllers.

Advantage computation runs once per rollout on NumPy arrays (no gradients flow through it);
the losses are MindSpore functions differentiated by the trainer.
"""

from __future__ import annotations

import numpy as np
from mindspore import ops

from .common import masked_mean

# ---- experience (NumPy, once per rollout) -------------------------------------------------------


def kl_penalized_rewards(
    score: np.ndarray,
    logprobs: np.ndarray,
    ref_logprobs: np.ndarray,
    mask: np.ndarray,
    kl_coef: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token reward: -kl_coef * (log pi - log pi_ref) on every response token, plus the
    sequence score on its last token. Returns (rewards, per-token kl), both (B, T) masked."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = np.maximum(mask.sum(1).astype(int) - 1, 0)
    rewards[np.arange(len(score)), last] += score
    return rewards * mask, kl


def gae(
    rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over right-padded responses (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t with V after the last real token = 0;
    A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = A + V), masked."""
    b, t = rewards.shape
    adv = np.zeros((b, t), dtype=np.float64)
    last = np.zeros(b, dtype=np.float64)
    for i in reversed(range(t)):
        nxt = values[:, i + 1] * mask[:, i + 1] if i + 1 < t else np.zeros(b)
        delta = rewards[:, i] + gamma * nxt - values[:, i]
        last = delta + gamma * lam * last * (mask[:, i + 1] if i + 1 < t else 0.0)
        adv[:, i] = last * mask[:, i]
    returns = (adv + values) * mask
    return adv.astype(np.float32), returns.astype(np.float32)


def whiten(
    x: np.ndarray, mask: np.ndarray, shift_mean: bool = True, eps: float = 1e-8
) -> np.ndarray:
    """(x - mean) / std over the masked entries; ``shift_mean=False`` keeps the mean."""
    n = max(mask.sum(), 1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / n
    out = (x - mean) / np.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return (out * mask).astype(np.float32)


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019: move the coefficient so the observed KL tracks ``target``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        err = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + err * n_steps / self.horizon


# ---- losses (MindSpore) -------------------------------------------------------------------------


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float, denom=None):
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-e, 1+e)) (``denom``: the
    token count to divide by, see masked_mean). Returns (loss, clip fraction, approx kl (mean of
    old - new))."""
    ratio = ops.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ops.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(ops.maximum(unclipped, clipped), mask, denom=denom)
    clipfrac = masked_mean((clipped > unclipped).astype(logprobs.dtype), mask)
    approx_kl = masked_mean(old_logprobs - logprobs, mask)
    return loss, clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, clip_range_value: float, denom=None):
    """0.5 * mean over tokens of max((V - R)^2, (clip(V, V_old +- e) - R)^2).
    Returns (loss, fraction of tokens where the clipped term was used)."""
    clipped = old_values + ops.clamp(values - old_values, -clip_range_value, clip_range_value)
    l1 = (values - returns) ** 2
    l2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(ops.maximum(l1, l2), mask, denom=denom)
    frac = masked_mean((l2 > l1).astype(values.dtype), mask)
    return loss, frac
