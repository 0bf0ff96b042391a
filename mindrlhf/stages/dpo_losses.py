"""How each ``dpo.loss`` reads a batch and what it reports: the loss function a training step
differentiates (a small table from the loss's name to its builder, each calling the pure loss in
``mindrlhf/algos/``), the per-row arrays a step feeds it, and the held-out evaluation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..algos.dpo import dpo_loss, preference_accuracy
from ..algos.preference import kto_loss, label_accuracy, orpo_loss, reward_gap, simpo_loss
from ..data.tokenize import pair_batch
from ..data.unpaired import EXAMPLE_COLUMNS
from ..models.head import sequence_logps, sequence_mean_logps

PAIR_COLUMNS = ("chosen_ids", "rejected_ids")
# what each loss's held-out reward_accuracy compares (recorded with the reference-free results)
IMPLICIT_REWARD = {
    "kto": "beta * (log pi - log ref) of each pair's two sides",
    "orpo": "log odds of the per-token mean log-prob",
    "simpo": "beta * per-token mean log-prob",
}


def pair_scores(
    model, table: pa.Table, pad_id: int, batch: int = 32, columns: tuple = PAIR_COLUMNS
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs and response lengths of every row's two ``columns``: (2, N)."""
    from mindspore import Tensor

    model.set_train(False)
    sums, lengths = [], []
    for s in range(0, table.num_rows, batch):
        idx = np.arange(s, min(s + batch, table.num_rows))
        bt = pair_batch(table, idx, pad_id, columns=columns)
        ids = Tensor(bt["input_ids"])
        rm = Tensor(bt["response_mask"])
        lp = sequence_logps(model, ids, Tensor(bt["attention_mask"]), rm).asnumpy()
        sums.append(lp.reshape(2, len(idx)))
        lengths.append(bt["response_mask"][:, 1:].sum(-1).reshape(2, len(idx)))
    if not sums:  # no pairs (an online DPO round whose judge tied them all)
        return np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32)
    return np.concatenate(sums, 1), np.concatenate(lengths, 1)


def pair_logps(
    model, table: pa.Table, pad_id: int, batch: int = 32, columns: tuple = PAIR_COLUMNS
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs of every row's chosen and rejected sequence under ``model``."""
    sums, _ = pair_scores(model, table, pad_id, batch, columns)
    return sums[0], sums[1]


def _reference_pair_loss(policy, dc):
    per_row = dc.pack_per_row

    def loss_fn(input_ids, attention_mask, response_mask, ref_chosen, ref_rejected):
        lp = sequence_logps(policy, input_ids, attention_mask, response_mask, per_row)
        k = lp.shape[0] // 2
        loss, rc, rr = dpo_loss(
            lp[:k], lp[k:], ref_chosen, ref_rejected, dc.beta, dc.loss, dc.label_smoothing
        )
        return loss, preference_accuracy(rc, rr), (rc - rr).mean()

    return loss_fn


def _reference_free_loss(policy, dc):
    orpo, lam, beta, gamma = dc.loss == "orpo", dc.orpo_lambda, dc.beta, dc.simpo_gamma
    per_row = dc.pack_per_row

    def loss_fn(input_ids, attention_mask, response_mask):
        lp = sequence_mean_logps(policy, input_ids, attention_mask, response_mask, per_row)
        k = lp.shape[0] // 2
        if orpo:
            loss, rc, rr = orpo_loss(lp[:k], lp[k:], lam)
        else:
            loss, rc, rr = simpo_loss(lp[:k], lp[k:], beta, gamma)
        return loss, preference_accuracy(rc, rr), (rc - rr).mean()

    return loss_fn


def _kto_loss(policy, dc):
    beta, dw, uw, per_row = dc.beta, dc.desirable_weight, dc.undesirable_weight, dc.pack_per_row

    def loss_fn(input_ids, attention_mask, response_mask, ref_logps, ref_kl_logps, desirable):
        # the examples, then their KL sequences. z0 is this batch's estimate (with data
        # parallelism: this rank's shard's; TRL averages it over ranks first)
        lp = sequence_logps(policy, input_ids, attention_mask, response_mask, per_row)
        k = lp.shape[0] // 2
        loss, rewards, _ = kto_loss(
            lp[:k], ref_logps, lp[k:], ref_kl_logps, desirable, beta, dw, uw
        )
        return loss, label_accuracy(rewards, desirable), reward_gap(rewards, desirable)

    return loss_fn


LOSSES = {
    "sigmoid": _reference_pair_loss,
    "ipo": _reference_pair_loss,
    "kto": _kto_loss,
    "orpo": _reference_free_loss,
    "simpo": _reference_free_loss,
}


def make_dpo_loss(policy, dc):
    """``dc.loss`` as ``loss_fn(input_ids, attention_mask, response_mask, *step_columns) ->
    (loss, accuracy, margin)`` over a batch of pairs (or KTO examples and their KL sequences)."""
    return LOSSES[dc.loss](policy, dc)


def step_columns(train: pa.Table, ref: pa.Table | None, dc) -> tuple[tuple, list[np.ndarray]]:
    """Which two sequence columns a batch stacks, and the per-row arrays the loss reads after
    the batch (indexed by the batch's rows)."""
    if dc.loss == "kto":
        desirable = train.column("desirable").to_numpy().astype(np.float32)
        return EXAMPLE_COLUMNS, [
            ref.column("ref_logp").to_numpy(),
            ref.column("ref_kl_logp").to_numpy(),
            desirable,
        ]
    if dc.reference_free:
        return PAIR_COLUMNS, []
    return PAIR_COLUMNS, [
        ref.column("ref_chosen_logp").to_numpy(),
        ref.column("ref_rejected_logp").to_numpy(),
    ]


def _accuracy(a: np.ndarray, b: np.ndarray | float) -> float:
    """Fraction of a > b, ties counting one half."""
    return float(((a > b) + 0.5 * (a == b)).mean())


def evaluate(policy, table, ref: pa.Table | None, pad_id: int, dc) -> dict:
    """Held-out figures of ``dc.loss`` (an empty split: none)."""
    if table.num_rows == 0:
        return {}
    return EVALUATE[dc.loss](policy, table, ref, pad_id, dc)


def _evaluate_reference_pairs(policy, table, ref: pa.Table, pad_id: int, dc) -> dict:
    """Implicit-reward accuracy and margin on held-out pairs, plus the plain likelihood
    preference (log pi(chosen) > log pi(rejected))."""
    c, r = pair_logps(policy, table, pad_id)
    rc = dc.beta * (c - ref.column("ref_chosen_logp").to_numpy())
    rr = dc.beta * (r - ref.column("ref_rejected_logp").to_numpy())
    return {
        "reward_accuracy": _accuracy(rc, rr),
        "reward_margin": float((rc - rr).mean()),
        "likelihood_accuracy": float((c > r).mean()),
    }


def _evaluate_reference_free(policy, table, ref, pad_id: int, dc) -> dict:
    """The loss's own implicit reward (of per-token mean log-probs: SimPO's beta * mean, ORPO's
    log odds) compared on held-out pairs, its margin, the held-out loss, and the summed
    likelihood preference."""
    from mindspore import Tensor

    sums, lengths = pair_scores(policy, table, pad_id)
    mean = sums / np.maximum(lengths, 1.0)
    c, r = Tensor(mean[0].astype(np.float32)), Tensor(mean[1].astype(np.float32))
    if dc.loss == "orpo":
        loss, rc, rr = orpo_loss(c, r, dc.orpo_lambda)
    else:
        loss, rc, rr = simpo_loss(c, r, dc.beta, dc.simpo_gamma)
    rc, rr = rc.asnumpy(), rr.asnumpy()
    return {
        "reward_accuracy": _accuracy(rc, rr),
        "reward_margin": float((rc - rr).mean()),
        "likelihood_accuracy": float((sums[0] > sums[1]).mean()),
        "loss": float(loss.asnumpy()),
    }


def _evaluate_kto(policy, table, ref: pa.Table, pad_id: int, dc) -> dict:
    """Label accuracy (reward beta (log pi - log ref) > 0 for desirable, < 0 for undesirable,
    ties one half) of every held-out example, the KL estimate (mean policy - reference log-ratio
    of the mismatched sequences: KTO's z0 before clamping), and on the examples that came from
    pairs the pair figures DPO reports."""
    lp, kl = pair_logps(policy, table, pad_id, columns=EXAMPLE_COLUMNS)
    rew = dc.beta * (lp - ref.column("ref_logp").to_numpy())
    good = table.column("desirable").to_numpy().astype(bool)
    out = {}
    n = int((table.column("pair").to_numpy() >= 0).sum()) // 2
    if n:
        out = {
            "reward_accuracy": _accuracy(rew[:n], rew[n : 2 * n]),
            "reward_margin": float((rew[:n] - rew[n : 2 * n]).mean()),
            "likelihood_accuracy": float((lp[:n] > lp[n : 2 * n]).mean()),
        }
    out["label_accuracy"] = _accuracy(np.where(good, rew, -rew), 0.0)
    out["kl"] = float((kl - ref.column("ref_kl_logp").to_numpy()).mean())
    return out


EVALUATE = {
    "sigmoid": _evaluate_reference_pairs,
    "ipo": _evaluate_reference_pairs,
    "kto": _evaluate_kto,
    "orpo": _evaluate_reference_free,
    "simpo": _evaluate_reference_free,
}
