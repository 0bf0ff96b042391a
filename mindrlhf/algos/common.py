"""Building blocks every loss uses: per-token log-probabilities and masked reductions."""

from __future__ import annotations

from mindspore import ops


def token_logprobs(logits, labels):
    """log p(labels) under ``logits``: (B, T, V), (B, T) -> (B, T)."""
    logp = ops.log_softmax(logits, -1)
    return ops.gather_elements(logp, -1, labels[..., None].astype(ops.dtype(labels)))[..., 0]


def shifted_logprobs(logits, input_ids):
    """Log-prob of each next token: position t scores input_ids[t+1]. Returns (B, T-1)."""
    return token_logprobs(logits[:, :-1], input_ids[:, 1:])


def softplus(x):
    """log(1 + exp(x)), smooth everywhere (its gradient at 0 is 1/2, as DPO's first step needs:
    there policy and reference agree exactly) and exact to fp32 above 20, where it is x.

    Built from exp and log1p rather than MindSpore's Softplus: its CPU kernel switches between
    two evaluation paths after its first few launches on small tensors, 1 ulp apart, so a loss
    using it differed between a run and its resumed copy."""
    big = x > 20.0
    return ops.where(big, x, ops.log1p(ops.exp(ops.minimum(x, 20.0))))


def masked_sum(x, mask, axis=None):
    return (x * mask).sum() if axis is None else (x * mask).sum(axis)


def masked_mean(x, mask, axis=None, denom=None):
    """Mean over the masked entries; ``denom`` (the whole batch's count over the number of
    data-parallel ranks) makes the all-reduced mean of the ranks' values the whole batch's mean."""
    if axis is None:
        return (x * mask).sum() / (ops.maximum(mask.sum(), 1.0) if denom is None else denom)
    return (x * mask).sum(axis) / ops.maximum(mask.sum(axis), 1.0)


def entropy_from_logits(logits):
    """Per-position entropy of the softmax: (B, T, V) -> (B, T)."""
    logp = ops.log_softmax(logits, -1)
    return -(ops.exp(logp) * logp).sum(-1)
