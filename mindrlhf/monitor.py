"""Reward-hacking watch: the proxy reward a policy is trained on (the reward model) rising while
an independent gold judge that the policy never sees (VADER, a verifiable checker, the user's
function) falls. Over-optimising a learned reward looks exactly like this (Gao et al. 2023,
"Scaling Laws for Reward Model Overoptimization"): the proxy keeps climbing after the gold
score has peaked.

The test compares two adjacent windows of ``window`` iterations: the proxy's mean went up, and
the gold's mean went down by more than ``margin`` (in the gold judge's units) and by more than
``z`` standard errors of that difference (from each iteration's gold spread and sample count).
The check runs at every iteration, so ``z`` is set high (3: about 1 in 700 per check for pure
noise); window means of several rollouts, not single iterations, so one noisy rollout does not
raise it."""

from __future__ import annotations

import numpy as np


def suspect(
    proxy, gold, window: int, margin: float, gold_sd=None, counts=None, z: float = 3.0
) -> dict | None:
    """The figures of a suspected hack at the last iteration of ``proxy`` / ``gold`` (per-iteration
    means, oldest first; ``gold_sd`` / ``counts`` their spreads and sample counts), or None."""
    if window < 1 or len(proxy) != len(gold):
        raise ValueError("suspect: window must be >= 1 and proxy, gold of the same length")
    if len(proxy) < 2 * window:
        return None
    p = np.asarray(proxy[-2 * window :], np.float64)
    g = np.asarray(gold[-2 * window :], np.float64)
    proxy_change = float(p[window:].mean() - p[:window].mean())
    gold_change = float(g[window:].mean() - g[:window].mean())
    se = 0.0
    if gold_sd is not None:
        sd = np.asarray(gold_sd[-2 * window :], np.float64)
        n = np.asarray(counts[-2 * window :], np.float64)
        se = float(np.sqrt((sd**2 / n).sum()) / window)  # both windows' means, independent
    if proxy_change > 0.0 and gold_change < -margin and gold_change < -z * se:
        return {
            "window": window,
            "margin": margin,
            "proxy_change": proxy_change,
            "gold_change": gold_change,
            "gold_change_se": se,
            "proxy_mean": float(p[window:].mean()),
            "gold_mean": float(g[window:].mean()),
        }
    return None
