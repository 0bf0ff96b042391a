"""REINFORCE++ (Hu 2025): no critic; the KL to the reference is a per-token *reward*
(-beta * (log pi_old - log pi_ref) on every response token, the sequence's reward added on its
last token), returns are summed to go (gamma = 1), and the advantages are normalised over every
token of the whole rollout batch (not per group). The loss then carries no KL term.

All of it runs once per rollout on NumPy arrays of the rollout policy's log-probs: the KL in the
reward is a constant of the loss and sends no gradient into the policy."""

from __future__ import annotations

import numpy as np

from .ppo import kl_penalized_rewards, whiten


def returns_to_go(rewards: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """G_t = sum_{s >= t} r_s over each row's masked tokens (gamma = 1): (B, T) -> (B, T)."""
    r = np.asarray(rewards, np.float64) * mask
    return np.cumsum(r[:, ::-1], 1)[:, ::-1] * mask


def reinforce_pp_advantages(
    rewards: np.ndarray,
    logprobs: np.ndarray,
    ref_logprobs: np.ndarray,
    mask: np.ndarray,
    beta: float,
) -> np.ndarray:
    """Per-token advantages (B, T): returns to go of the KL-penalised token rewards, whitened
    with the mean and (population) std over all masked tokens of the batch; 0 off the mask."""
    mask = np.asarray(mask, np.float64)
    token_rewards, _ = kl_penalized_rewards(
        np.asarray(rewards, np.float64),
        np.asarray(logprobs, np.float64),
        np.asarray(ref_logprobs, np.float64),
        mask,
        beta,
    )
    return whiten(returns_to_go(token_rewards, mask), mask)
