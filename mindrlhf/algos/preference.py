"""Offline preference losses beside DPO: KTO (Ethayarajh et al. 2024) on unpaired desirable /
undesirable completions, and the reference-free ORPO (Hong et al. 2024) and SimPO (Meng et al.
2024) on pairs. Each returns (loss, chosen / per-example rewards, ...) like ``dpo_loss``."""

from __future__ import annotations

import math

from mindspore import ops

from .common import shifted_logprobs, softplus


def sequence_mean_logps(logits, input_ids, response_mask):
    """Mean log p(token) over each row's response tokens, (1/|y|) log pi(y|x): (B,)."""
    mask = response_mask[:, 1:]
    total = (shifted_logprobs(logits, input_ids) * mask).sum(-1)
    return total / ops.maximum(mask.sum(-1), 1.0)


def kto_loss(
    pi_logps,
    ref_logps,
    pi_kl_logps,
    ref_kl_logps,
    desirable,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
):
    """KTO: mean over examples of lambda_y - v(x, y), with r = log pi(y|x) - log ref(y|x),
    v = lambda_D s(beta (r - z0)) for desirable y and lambda_U s(beta (z0 - r)) for undesirable,
    and the reference point z0 = max(0, mean(pi_kl - ref_kl)) over mismatched (prompt i,
    completion j != i) pairs, detached: it moves the value function's origin, it is not a term to
    optimise. ``desirable`` is 1.0 / 0.0 per example. Returns (loss, beta * r, z0)."""
    z0 = ops.stop_gradient(ops.maximum((pi_kl_logps - ref_kl_logps).mean(), 0.0))
    r = pi_logps - ref_logps
    lam = desirable * desirable_weight + (1.0 - desirable) * undesirable_weight
    v = desirable * desirable_weight * ops.sigmoid(beta * (r - z0)) + (
        1.0 - desirable
    ) * undesirable_weight * ops.sigmoid(beta * (z0 - r))
    return (lam - v).mean(), beta * r, z0


def label_accuracy(rewards, desirable):
    """Fraction of examples whose reward has the sign of their label (> 0 desirable, < 0
    undesirable), ties counting one half."""
    signed = rewards * (2.0 * desirable - 1.0)
    gt = (signed > 0).astype(rewards.dtype)
    eq = (signed == 0).astype(rewards.dtype)
    return (gt + 0.5 * eq).mean()


def reward_gap(rewards, desirable):
    """Mean reward of the desirable examples minus that of the undesirable ones (0 for a kind
    the batch lacks)."""
    good, bad = desirable, 1.0 - desirable
    return (rewards * good).sum() / ops.maximum(good.sum(), 1.0) - (rewards * bad).sum() / (
        ops.maximum(bad.sum(), 1.0)
    )


def expm1(x):
    """e^x - 1 to float32 accuracy near 0: MindSpore's CPU ``ops.expm1`` is exp(x) - 1, which
    returns 0 at x = -1e-8 and is 1% off at -1e-6. Taylor to x^6 (error < 2e-10) for |x| < 0.1."""
    s = ops.minimum(ops.maximum(x, -0.1), 0.1)
    series = s * (
        1.0 + s / 2.0 * (1.0 + s / 3.0 * (1.0 + s / 4.0 * (1.0 + s / 5.0 * (1.0 + s / 6.0))))
    )
    return ops.where(ops.abs(x) < 0.1, series, ops.exp(x) - 1.0)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x)) above
    -log 2, log(1 - exp(x)) below, where 1 - exp(x) >= 1/2 loses nothing. Each branch sees only
    inputs where it is finite, so neither puts a NaN into the other's gradient; x is held just
    below 0 (a probability of exactly 1)."""
    cut = -math.log(2.0)
    near = ops.minimum(x, -1e-7)
    far = ops.minimum(x, cut)
    return ops.where(x > cut, ops.log(-expm1(near)), ops.log1p(-ops.exp(far)))


def orpo_loss(pi_chosen_mean, pi_rejected_mean, lam: float):
    """ORPO on per-token mean log-probs lp (P(y|x) = exp lp, as the paper): the chosen answer's
    NLL -lp_w plus lam * -log s(log odds(y_w) - log odds(y_l)), log odds = lp - log(1 - exp lp).
    No reference model. Returns (loss, log odds of chosen, log odds of rejected)."""
    odds_c = pi_chosen_mean - log1mexp(pi_chosen_mean)
    odds_r = pi_rejected_mean - log1mexp(pi_rejected_mean)
    losses = -pi_chosen_mean + lam * softplus(-(odds_c - odds_r))
    return losses.mean(), odds_c, odds_r


def simpo_loss(pi_chosen_mean, pi_rejected_mean, beta: float, gamma: float):
    """SimPO: -log s(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma) on per-token mean
    log-probs; gamma is the target reward margin. Returns (loss, chosen rewards, rejected)."""
    rc, rr = beta * pi_chosen_mean, beta * pi_rejected_mean
    return softplus(-(rc - rr - gamma)).mean(), rc, rr
