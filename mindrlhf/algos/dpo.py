"""DPO (Rafailov et al. 2023) and its IPO (Azar et al. 2023) and conservative / label-smoothed
(Mitchell 2023) variants, on summed response log-probs of policy and reference."""

from __future__ import annotations

from .common import shifted_logprobs, softplus


def sequence_logps(logits, input_ids, response_mask):
    """Sum of log p(token) over the response tokens of each row: (B, T, V), (B, T), (B, T) -> (B,).
    ``response_mask`` is aligned with ``input_ids``; position t is scored by logits at t-1."""
    return (shifted_logprobs(logits, input_ids) * response_mask[:, 1:]).sum(-1)


def dpo_loss(
    pi_chosen,
    pi_rejected,
    ref_chosen,
    ref_rejected,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
):
    """Returns (loss, chosen_rewards, rejected_rewards), rewards being beta * (log pi - log ref).

    sigmoid: -(1 - e) log s(beta h) - e log s(-beta h), h = (pi_c - ref_c) - (pi_r - ref_r)
    ipo:     (h - 1 / (2 beta))^2
    """
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = (1.0 - label_smoothing) * softplus(-beta * h) + label_smoothing * softplus(
            beta * h
        )
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    chosen_rewards = beta * (pi_chosen - ref_chosen)
    rejected_rewards = beta * (pi_rejected - ref_rejected)
    return losses.mean(), chosen_rewards, rejected_rewards


def preference_accuracy(chosen_rewards, rejected_rewards):
    """Fraction of pairs whose chosen reward is higher, ties counting one half."""
    gt = (chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype)
    eq = (chosen_rewards == rejected_rewards).astype(chosen_rewards.dtype)
    return (gt + 0.5 * eq).mean()
