"""The promotion gate (mindrlhf/promote.py) against an independent bootstrap (scipy's) and on
cases whose answer is known without it."""

import numpy as np
import pytest
from scipy import stats

from mindrlhf.promote import decide, paired_bootstrap


def test_interval_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(3)
    inc = rng.normal(0.0, 1.0, 200)
    cand = inc + rng.normal(0.15, 0.5, 200)
    delta, lo, hi = paired_bootstrap(cand, inc, resamples=20000, confidence=0.9, seed=1)
    ref = stats.bootstrap(
        (cand - inc,),
        np.mean,
        confidence_level=0.9,
        n_resamples=20000,
        method="percentile",
        random_state=2,
    ).confidence_interval
    assert delta == pytest.approx(float(np.mean(cand - inc)), abs=1e-12)
    assert lo == pytest.approx(ref.low, abs=0.004) and hi == pytest.approx(ref.high, abs=0.004)


def test_pairing_is_what_separates_a_small_gain_from_prompt_variance():
    # prompts differ a lot in difficulty (sd 3); the candidate is better by 0.1 on every one of
    # them, give or take 0.05: paired, that is certain; compared as two unpaired samples it is not
    rng = np.random.default_rng(0)
    inc = rng.normal(0.0, 3.0, 64)
    cand = inc + 0.1 + rng.normal(0.0, 0.05, 64)
    d = decide(cand, inc, min_delta=0.0, seed=0)
    assert d["promoted"] and d["winner"] == "candidate" and d["low"] > 0.07
    unpaired = stats.bootstrap(
        (cand, inc), lambda a, b: a.mean() - b.mean(), paired=False, random_state=0
    ).confidence_interval
    assert unpaired.low < 0 < unpaired.high


def test_no_promotion_inside_the_noise_below_min_delta_or_when_worse():
    rng = np.random.default_rng(1)
    inc = rng.normal(0.0, 1.0, 100)
    noisy = inc + rng.normal(0.0, 1.0, 100)
    noisy += 0.05 - (noisy - inc).mean()  # better on average by 0.05, give or take 0.2
    d = decide(noisy, inc)
    assert d["delta"] == pytest.approx(0.05) and d["low"] < 0 and not d["promoted"]
    assert not decide(inc - 0.3, inc)["promoted"]  # worse on every prompt
    gain = inc + 0.1  # exactly 0.1 better everywhere: the interval is the point 0.1
    assert decide(gain, inc, min_delta=0.05)["promoted"]
    d = decide(gain, inc, min_delta=0.2)
    assert not d["promoted"] and d["low"] == pytest.approx(0.1) and d["high"] == pytest.approx(0.1)


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1.0, float("nan")], [1.0, 2.0])
