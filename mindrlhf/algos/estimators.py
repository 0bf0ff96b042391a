"""The online RL variants of the GRPO stage by their config names: ``grpo.estimator`` -> the
advantages of a rollout, ``grpo.loss_agg`` (with the clip bounds and where the KL goes) -> the
loss of a mini-batch. Each entry is one of the pure functions of this package."""

from __future__ import annotations

from .dapo import token_mean
from .dr_grpo import centred_group_advantages, constant_length_mean
from .grpo import group_advantages, grpo_loss, sequence_mean
from .reinforce_pp import reinforce_pp_advantages
from .rloo import rloo_advantages

# grpo.estimator -> (config, rewards (B,), rollout log-probs, reference log-probs, response mask
# (B, T)) -> advantages, one per sample (B,) or one per token (B, T); NumPy, once per rollout
ESTIMATORS = {
    "grpo": lambda gc, r, lp, ref, m: (
        group_advantages if gc.scales_by_std else centred_group_advantages
    )(r, gc.group_size),
    "rloo": lambda gc, r, lp, ref, m: rloo_advantages(r, gc.group_size),
    "reinforce_pp": lambda gc, r, lp, ref, m: reinforce_pp_advantages(r, lp, ref, m, gc.beta),
}


def _dr_grpo_aggregation(gc):
    max_len = gc.max_new_tokens

    def aggregate(per_token, mask, denom):
        return constant_length_mean(per_token, mask, denom, max_len)

    return aggregate


# grpo.loss_agg -> config -> aggregate(per-token terms, mask, denom) (inside the compiled step)
AGGREGATIONS = {
    "grpo": lambda gc: sequence_mean,
    "dr_grpo": _dr_grpo_aggregation,
    "dapo": lambda gc: token_mean,
}


def policy_loss(gc):
    """The loss of one mini-batch as ``grpo.*`` configures it: (log-probs, rollout log-probs,
    reference log-probs, advantages, response mask, denom) -> (loss, mean kl, clip fraction);
    ``denom`` is the whole mini-batch's token count over the number of ranks (DAPO's token mean).
    REINFORCE++ has its KL in the reward: none in the loss."""
    low, high = gc.clip_bounds
    aggregate = AGGREGATIONS[gc.loss_agg](gc)
    beta = 0.0 if gc.estimator == "reinforce_pp" else gc.beta

    def loss(lp, old_lp, ref_lp, adv, mask, denom):
        return grpo_loss(lp, old_lp, ref_lp, adv, mask, low, beta, high, aggregate, denom)

    return loss
