"""Supervised fine-tuning loss: next-token cross-entropy on response tokens only."""

from __future__ import annotations

from .common import masked_mean, shifted_logprobs


def sft_loss(logits, input_ids, loss_mask, denom=None):
    """Mean negative log-likelihood of tokens whose ``loss_mask`` is 1 (the mask is aligned with
    ``input_ids``; position t's target is scored by the logits at t-1).

    ``denom`` replaces the local token count: data-parallel ranks pass (global token count /
    ranks), so the average of their gradients is exactly the global batch's gradient."""
    logp = shifted_logprobs(logits, input_ids)
    if denom is None:
        return -masked_mean(logp, loss_mask[:, 1:])
    return -(logp * loss_mask[:, 1:]).sum() / denom
