"""The promotion gate: does a candidate policy beat the one in production by more than noise?

Both policies answer the same held-out prompts (the evaluate stage), so the comparison is paired:
the statistic is the mean per-prompt difference candidate - incumbent and its uncertainty a paired
bootstrap (prompts resampled with replacement, percentile interval). The candidate is promoted
only when the whole interval clears ``min_delta``: a better mean inside the noise moves nothing.
Pure functions of the scores; the promote stage and the flow do the reading and the writing."""

from __future__ import annotations

import numpy as np


def production_ref(name: str) -> str:
    """The store ref naming the policy a config's deployment serves."""
    return f"{name}-production"


def paired_bootstrap(
    candidate, incumbent, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean difference, interval low, interval high) of candidate - incumbent over paired
    scores, the interval the ``confidence`` percentile interval of ``resamples`` bootstrap means."""
    c = np.asarray(candidate, np.float64)
    i = np.asarray(incumbent, np.float64)
    if c.ndim != 1 or c.shape != i.shape or len(c) == 0:
        raise ValueError(
            f"paired scores need two equal-length 1-D arrays, got {c.shape} and {i.shape}"
        )
    if not (np.isfinite(c).all() and np.isfinite(i).all()):
        raise ValueError("paired scores must be finite")
    d = c - i
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(d.mean()), float(lo), float(hi)


def decide(
    candidate,
    incumbent,
    min_delta: float = 0.0,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """The gate's decision with its figures: promote when the interval's low end > min_delta."""
    delta, lo, hi = paired_bootstrap(candidate, incumbent, resamples, confidence, seed)
    promoted = lo > min_delta
    return {
        "candidate_mean": float(np.mean(candidate)),
        "incumbent_mean": float(np.mean(incumbent)),
        "delta": delta,
        "low": lo,
        "high": hi,
        "confidence": confidence,
        "min_delta": min_delta,
        "n": len(candidate),
        "promoted": bool(promoted),
        "winner": "candidate" if promoted else "incumbent",
        "reason": (
            f"candidate better by {delta:.4g} ({confidence:.0%} interval [{lo:.4g}, {hi:.4g}] "
            f"above {min_delta:g})"
            if promoted
            else f"difference {delta:.4g}, {confidence:.0%} interval [{lo:.4g}, {hi:.4g}] does "
            f"not clear {min_delta:g}: production kept"
        ),
    }
