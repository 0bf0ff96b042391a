"""RLOO, REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics"): k samples per prompt,
each baselined by the mean reward of the other k - 1 samples of its group; no critic, no std."""

from __future__ import annotations

import numpy as np

from .grpo import reward_groups


def rloo_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """A_i = r_i - (sum_j r_j - r_i) / (k - 1) over consecutive groups of ``group_size`` rows
    (= k / (k - 1) * (r_i - mean(group)))."""
    if group_size < 2:
        raise ValueError(f"RLOO needs groups of >= 2 samples, got {group_size}")
    g = reward_groups(rewards, group_size)
    others = (g.sum(1, keepdims=True) - g) / (group_size - 1)
    return (g - others).reshape(-1).astype(np.float32)
