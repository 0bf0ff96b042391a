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
    """log(1 + exp(x)) as max(x, 0) + log1p(exp(-|x|)): stable for large |x|, and built from
    kernels that give the same bits on every call. MindSpore 2.9's CPU Softplus kernel (and
    LogSigmoid) switches between two evaluation paths after its first few launches on small
    tensors, 1 ulp apart, so a loss using it differed between a run and its resumed copy."""
    return ops.relu(x) + ops.log1p(ops.exp(-ops.abs(x)))


def masked_sum(x, mask, axis=None):
    return (x * mask).sum() if axis is None else (x * mask).sum(axis)


def masked_mean(x, mask, axis=None):
    if axis is None:
        return (x * mask).sum() / ops.maximum(mask.sum(), 1.0)
    return (x * mask).sum(axis) / ops.maximum(mask.sum(axis), 1.0)


def entropy_from_logits(logits):
    """Per-position entropy of the softmax: (B, T, V) -> (B, T)."""
    logp = ops.log_softmax(logits, -1)
    return -(ops.exp(logp) * logp).sum(-1)
