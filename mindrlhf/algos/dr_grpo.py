"""Dr. GRPO, "GRPO done right" (Liu et al. 2025): two biases of GRPO removed.

* advantages: r_i - mean(group), NOT divided by the group's std (the std up-weights prompts that
  are nearly always right or nearly always wrong);
* aggregation: each sequence's token sum divided by one constant, the generation budget
  (max_new_tokens), not by the sequence's own length (1/|o_i| favours long wrong answers and
  short right ones), then the mean over sequences."""

from __future__ import annotations

import numpy as np

from .grpo import reward_groups


def centred_group_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """r - mean(group) for consecutive groups of ``group_size`` rows."""
    g = reward_groups(rewards, group_size)
    return (g - g.mean(1, keepdims=True)).reshape(-1).astype(np.float32)


def constant_length_mean(per_token, mask, denom=None, max_len: int = 1):
    """mean over sequences of sum_t(x_t) / max_len (``denom`` unused: rows are equal in number
    on every data-parallel rank, so the mean of the ranks' means is the batch's)."""
    return ((per_token * mask).sum(1) / max_len).mean()
