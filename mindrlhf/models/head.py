"""A sequence's summed log-probability, with the vocabulary projection only where a loss reads it
and, optionally, several sequences packed into one row.

A preference loss (DPO and its family, KTO, ORPO, SimPO) reads one number of each sequence: the
sum of log p(token) over its response tokens. Computed from the model's logits, the projection --
the largest matmul of a small model's step and its largest tensors: SmolLM2-135M's 49,152-token
vocabulary makes a (16 x 72)-token DPO batch's logits 226 MB, and its log-softmax, slice and
their gradients as much again each -- runs at every position, padding and prompt included.
:func:`sequence_logps` projects only the hidden states of the positions that predict a response
token, gathered into one (M, d) block, and sums each sequence's log-probs with a segment sum.

With ``per_row`` > 1 the batch's sequences (their real tokens only) are laid out ``per_row`` to a
row, rows balanced (:func:`data.packing.balance_rows`), and the decoder runs them as packed rows
(``segments``: a token attends only to earlier tokens of its own sequence, positions restart at
each sequence's first token), so the layers skip the padding too: a DPO batch of 8 movie-review
pairs (16 sequences of 46-65 tokens) is 16 x 64-72 positions padded, 2 x 416-439 packed eight
to a row. Rows may be wider than max_seq_len, and the CPU's fused attention reads each
sequence's own keys only, so a wide row costs no more attention than a narrow one.

Both give the numbers of ``algos.dpo.sequence_logps`` on the full logits to float rounding (the
sums' order differs), and the same gradients (tests/test_head.py). Eagerly only: which positions
count is read on the host, so inside a compiled graph (``decoder.in_graph()``: a compiled
Trainer's step) and for a model without ``logits_from_hidden`` it is the logits path; packing
needs our decoder (the MindFormers backend takes no ``segments``).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..algos.common import token_logprobs
from ..algos.dpo import sequence_logps as logits_sequence_logps
from ..algos.preference import sequence_mean_logps as logits_sequence_mean_logps
from ..data.packing import balance_rows
from . import fused
from .decoder import CausalLM, in_graph


def sequence_logps(model, input_ids, attention_mask, response_mask, per_row: int = 1):
    """Sum of log p(token) over each row's response tokens under ``model``: (B, T) x 3 -> (B,).
    ``response_mask`` is aligned with ``input_ids``: position t is predicted at t - 1."""
    if _logits_path(model):
        logits, _ = model(input_ids, attention_mask)
        return logits_sequence_logps(logits, input_ids, response_mask)
    ids, am, rm = input_ids.asnumpy(), attention_mask.asnumpy(), response_mask.asnumpy()
    if per_row > 1 and isinstance(model, CausalLM):
        # a row may be wider than max_seq_len: positions restart at each sequence
        layout = packed_layout(ids, am, rm, per_row, per_row * model.cfg.max_seq_len)
    else:
        layout = _padded(ids, rm)
    tokens, segments, at, labels, weight, owner = layout
    if segments is not None:
        mask = Tensor((segments > 0).astype(np.int32))
        h, _ = model.model(Tensor(tokens), mask, segments=Tensor(segments))
    elif hasattr(model, "hidden"):  # the MindFormers backend
        h = model.hidden(input_ids, attention_mask)
    else:
        h, _ = model.model(input_ids, attention_mask)
    if not len(at):  # no response token anywhere: every sum is 0, through the graph
        return ops.zeros((len(ids),), h.dtype) + h.sum() * 0.0
    hs = ops.gather(h.reshape(-1, h.shape[-1]), Tensor(at.astype(np.int32)), 0)
    lp = _token_logprobs(model.logits_from_hidden(hs), Tensor(labels.astype(np.int32)))
    lp = lp * Tensor(weight.astype(np.float32))
    return ops.unsorted_segment_sum(lp, Tensor(owner.astype(np.int32)), len(ids))


def sequence_mean_logps(model, input_ids, attention_mask, response_mask, per_row: int = 1):
    """Mean log p(token) over each row's response tokens (ORPO, SimPO): :func:`sequence_logps`
    over the response length (at least 1)."""
    if _logits_path(model):
        logits, _ = model(input_ids, attention_mask)
        return logits_sequence_mean_logps(logits, input_ids, response_mask)
    n = ops.maximum(response_mask[:, 1:].sum(-1), 1.0)
    return sequence_logps(model, input_ids, attention_mask, response_mask, per_row) / n


def _token_logprobs(logits, labels):
    """log p(labels) under (M, V) logits: one fused pass each way on the CPU in float32 (no (M, V)
    log-softmax kept for the backward, models/fused.py), else algos.common's."""
    op = fused.forward_op("token_logprob")
    if op is not None and logits.dtype == ms.float32:
        return op(logits, labels)[0]
    return token_logprobs(logits, labels)


def _logits_path(model) -> bool:
    return in_graph() or not hasattr(model, "logits_from_hidden")


def _padded(ids: np.ndarray, rm: np.ndarray):
    """The batch as it is: the flat positions (row r, column c: r * T + c) whose hidden state
    predicts a response token (the token at c + 1), that token, its weight and its row."""
    rows, cols = np.nonzero(rm[:, 1:])
    return None, None, rows * ids.shape[1] + cols, ids[rows, cols + 1], rm[rows, cols + 1], rows


def packed_layout(ids: np.ndarray, am: np.ndarray, rm: np.ndarray, per_row: int, max_len: int):
    """The batch's sequences ``per_row`` to a row (more rows where a row would exceed
    ``max_len``): tokens and segments (R, W), and :func:`_padded`'s four arrays in them."""
    real = [np.nonzero(m)[0] for m in am]
    rows = max(1, -(-len(real) // per_row))
    while True:
        row, start, width = balance_rows([len(p) for p in real], rows)
        if width <= max_len or rows >= len(real):
            break
        rows += 1
    tokens = np.zeros((rows, width), ids.dtype)
    segments = np.zeros((rows, width), np.int32)
    at, labels, weight, owner = [], [], [], []
    for i, pos in enumerate(real):
        r, c = row[i], start[i]
        tokens[r, c : c + len(pos)] = ids[i, pos]
        segments[r, c : c + len(pos)] = i + 1
        k = np.nonzero(rm[i, pos[1:]])[0]  # the token at pos[k + 1] is predicted at column c + k
        at.append(r * width + c + k)
        labels.append(ids[i, pos[k + 1]])
        weight.append(rm[i, pos[k + 1]])
        owner.append(np.full(len(k), i))
    flat = [np.concatenate(x) if x else np.zeros(0) for x in (at, labels, weight, owner)]
    return (tokens, segments, *flat)
