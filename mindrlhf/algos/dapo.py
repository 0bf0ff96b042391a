"""DAPO (Yu et al. 2025), the pieces that are not the clipped surrogate itself (its "clip-higher",
ratio clamped to [1 - clip_low, 1 + clip_high], is :func:`mindrlhf.algos.grpo.grpo_loss`'s
``clip_high``):

* token-level loss: the mean over every token of the batch, so a long response weighs by its
  length rather than each response equally;
* dynamic sampling: groups whose rewards are all equal have zero advantage and give no gradient;
  they are dropped and more prompts sampled (the stage's loop: mindrlhf/stages/dynamic_sampling.py);
* soft overlong punishment: a length-dependent penalty added to the reward near the budget."""

from __future__ import annotations

import numpy as np
from mindspore import ops


def token_mean(per_token, mask, denom=None):
    """sum over every masked token / ``denom`` (the whole mini-batch's token count over the number
    of data-parallel ranks, so the ranks' mean is the batch's token mean), or / this batch's own
    token count."""
    total = (per_token * mask).sum()
    return total / (ops.maximum(mask.sum(), 1.0) if denom is None else denom)


def informative_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """One bool per consecutive group of ``group_size`` rows: False when every reward of the group
    is the same (a group baseline -- GRPO's, RLOO's, Dr. GRPO's -- gives it zero advantages)."""
    g = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    return g.max(1) > g.min(1)


def overlong_penalty(lengths: np.ndarray, max_len: int, buffer: int, factor: float) -> np.ndarray:
    """DAPO's soft overlong punishment of a response of L tokens, L_max = ``max_len``,
    L_cache = ``buffer``: 0 for L <= L_max - L_cache, ((L_max - L_cache) - L) / L_cache * factor
    inside the buffer, -factor beyond L_max. ``buffer`` 0: no penalty."""
    length = np.asarray(lengths, dtype=np.float64)
    if buffer <= 0:
        return np.zeros(length.shape, np.float32)
    start = max_len - buffer
    inside = (start - length) / buffer * factor
    out = np.where(length <= start, 0.0, np.where(length <= max_len, inside, -factor))
    return out.astype(np.float32)
