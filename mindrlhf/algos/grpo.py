"""GRPO (Shao et al. 2024): k samples per prompt, group-normalised advantages, no critic,
a KL penalty to the reference added to the loss (the k3 estimator, unbiased and >= 0)."""

from __future__ import annotations

import numpy as np
from mindspore import ops


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-4) -> np.ndarray:
    """(r - mean(group)) / (std(group) + eps) for consecutive groups of ``group_size`` rows."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}")
    g = r.reshape(-1, group_size)
    adv = (g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + eps)
    return adv.reshape(-1).astype(np.float32)


def k3_kl(logprobs, ref_logprobs):
    """Per-token estimate of KL(pi || pi_ref): exp(ref - log pi) - (ref - log pi) - 1."""
    d = ref_logprobs - logprobs
    return ops.exp(d) - d - 1.0


def grpo_loss(
    logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range: float, beta: float
):
    """Clipped surrogate with a sequence-level advantage plus beta * KL, averaged per sequence
    over its tokens and then over sequences. Returns (loss, mean kl, clip fraction)."""
    adv = advantages[:, None]
    ratio = ops.exp(logprobs - old_logprobs)
    unclipped = ratio * adv
    clipped = ops.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * adv
    kl = k3_kl(logprobs, ref_logprobs)
    per_token = -ops.minimum(unclipped, clipped) + beta * kl
    lengths = ops.maximum(mask.sum(1), 1.0)
    loss = ((per_token * mask).sum(1) / lengths).mean()
    kl_mean = ((kl * mask).sum(1) / lengths).mean()
    clipfrac = ((clipped < unclipped).astype(mask.dtype) * mask).sum() / ops.maximum(
        mask.sum(), 1.0
    )
    return loss, kl_mean, clipfrac
