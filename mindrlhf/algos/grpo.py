"""GRPO (Shao et al. 2024): k samples per prompt, group-normalised advantages, no critic,
a KL penalty to the reference added to the loss (the k3 estimator, unbiased and >= 0).

The loss here is shared by the variants ``grpo.estimator`` / ``grpo.loss_agg`` choose: RLOO
(:mod:`.rloo`), REINFORCE++ (:mod:`.reinforce_pp`), Dr. GRPO (:mod:`.dr_grpo`), DAPO
(:mod:`.dapo`)."""

from __future__ import annotations

import numpy as np
from mindspore import ops


def reward_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Consecutive groups of ``group_size`` rewards as the rows of a float64 array; the group
    baselines (GRPO's, RLOO's, Dr. GRPO's) all start here."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}")
    return r.reshape(-1, group_size)


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-4) -> np.ndarray:
    """(r - mean(group)) / (std(group) + eps) for consecutive groups of ``group_size`` rows."""
    g = reward_groups(rewards, group_size)
    adv = (g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + eps)
    return adv.reshape(-1).astype(np.float32)


def k3_kl(logprobs, ref_logprobs):
    """Per-token estimate of KL(pi || pi_ref): exp(ref - log pi) - (ref - log pi) - 1."""
    d = ref_logprobs - logprobs
    return ops.exp(d) - d - 1.0


def sequence_mean(per_token, mask, denom=None):
    """GRPO's aggregation: each sequence's mean over its own tokens, then the mean over sequences
    (``denom`` unused: every data-parallel rank holds as many rows)."""
    lengths = ops.maximum(mask.sum(1), 1.0)
    return ((per_token * mask).sum(1) / lengths).mean()


def grpo_loss(
    logprobs,
    old_logprobs,
    ref_logprobs,
    advantages,
    mask,
    clip_range: float,
    beta: float,
    clip_high: float | None = None,
    aggregate=sequence_mean,
    denom=None,
):
    """Clipped surrogate plus beta * KL, token terms aggregated by ``aggregate(per_token, mask,
    denom)`` (default: per sequence over its tokens, then over sequences). ``advantages``: one
    per sequence (B,) or one per token (B, T). The ratio is clamped to [1 - clip_range,
    1 + clip_high] (``clip_high`` None: clip_range; DAPO's clip-higher sets it above).
    Returns (loss, mean kl, clip fraction)."""
    adv = advantages[:, None] if advantages.ndim == 1 else advantages  # a shape: graph constant
    high = clip_range if clip_high is None else clip_high
    ratio = ops.exp(logprobs - old_logprobs)
    unclipped = ratio * adv
    clipped = ops.clamp(ratio, 1.0 - clip_range, 1.0 + high) * adv
    kl = k3_kl(logprobs, ref_logprobs)
    per_token = -ops.minimum(unclipped, clipped) + beta * kl
    lengths = ops.maximum(mask.sum(1), 1.0)
    loss = aggregate(per_token, mask, denom)
    kl_mean = ((kl * mask).sum(1) / lengths).mean()
    clipfrac = ((clipped < unclipped).astype(mask.dtype) * mask).sum() / ops.maximum(
        mask.sum(), 1.0
    )
    return loss, kl_mean, clipfrac
