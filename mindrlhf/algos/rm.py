"""Reward-model losses: Bradley-Terry on (chosen, rejected) scores read at the last real token."""

from __future__ import annotations

import mindspore as ms
from mindspore import ops

from .common import softplus


def gather_last(values, mask):
    """values (B, T) at each row's last real token (last 1 in ``mask``; any padding side) ->
    (B,)."""
    t = values.shape[1]
    pos = ops.arange(t, dtype=ms.int32)[None, :] * mask.astype(ms.int32)
    idx = pos.argmax(-1).astype(ms.int32)
    return ops.gather_elements(values, 1, idx[:, None])[:, 0]


def bradley_terry_loss(r_chosen, r_rejected):
    """Mean -log sigmoid(r_c - r_r) (as softplus(r_r - r_c), stable); returns (loss, accuracy)."""
    loss = softplus(r_rejected - r_chosen).mean()
    acc = (r_chosen > r_rejected).astype(r_chosen.dtype).mean()
    return loss, acc
