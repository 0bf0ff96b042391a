"""Reward-hacking watch: the proxy reward a policy is trained on (the reward model) rising while
an independent gold judge that the policy never sees (VADER, a verifiable checker, the user's
function) falls. Over-optimising a learned reward looks exactly like this (Gao et al. 2023,
"Scaling Laws for Reward Model Overoptimization"): the proxy keeps climbing after the gold
score has peaked.

The watch reads *probes*, not the training rollouts: every few iterations the policy answers the
same fixed held-out prompts greedily and both judges score each answer. Two probes are then
compared prompt by prompt (a paired test), so the prompt-to-prompt spread of the gold score --
large for VADER on one short review, ~0.45 -- cancels, and sampling noise is absent. The latest
probe is compared with the best-gold probe so far (the policy a user would want back), not with
the one just before, so a slow slide is seen as well as a sudden fall. It is suspected when the
proxy went up on average and the gold went down by more than ``margin`` (the gold judge's units)
and by more than ``z`` standard errors of the paired mean difference. The best of several
earlier probes is itself a little lucky, which ``z`` (3 by default) absorbs."""

from __future__ import annotations

import numpy as np


def suspect(probes: list[dict], margin: float, z: float = 3.0) -> dict | None:
    """The figures of a suspected hack at the last of ``probes`` (oldest first; each ``{"step",
    "proxy", "gold"}``, per-prompt scores on the same prompts in the same order), or None."""
    if len(probes) < 2:
        return None
    gold_means = [float(np.mean(p["gold"])) for p in probes[:-1]]
    best = probes[int(np.argmax(gold_means))]
    last = probes[-1]
    g1, g0 = np.asarray(last["gold"], np.float64), np.asarray(best["gold"], np.float64)
    p1, p0 = np.asarray(last["proxy"], np.float64), np.asarray(best["proxy"], np.float64)
    if not (g1.shape == g0.shape == p1.shape == p0.shape) or g1.ndim != 1:
        raise ValueError("suspect: every probe must score the same prompts (equal lengths)")
    d = g1 - g0
    gold_change, proxy_change = float(d.mean()), float((p1 - p0).mean())
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    if proxy_change > 0.0 and gold_change < -margin and gold_change < -z * se:
        return {
            "best_step": int(best["step"]),
            "margin": margin,
            "proxy_change": proxy_change,
            "gold_change": gold_change,
            "gold_change_se": se,
            "proxy_mean": float(p1.mean()),
            "gold_mean": float(g1.mean()),
            "best_gold_mean": float(g0.mean()),
            "prompts": int(len(d)),
        }
    return None
