"""DAPO's dynamic sampling for the GRPO stage: groups with no signal (every reward of the group
equal) are dropped and more prompts are sampled until the iteration's batch is full again, for
at most ``max_tries`` extra rounds. Every choice is a function of (seed, iteration, round), so a
resumed or re-run iteration draws exactly the same batch."""

from __future__ import annotations

import numpy as np

from ..algos.dapo import informative_groups
from ..models.generation import Generation
from .rollout import pad_responses


def more_prompts(n: int, count: int, seed: int, it: int, t: int, seen: np.ndarray) -> np.ndarray:
    """``count`` prompt indices for round ``t`` >= 1 of iteration ``it``: a seeded permutation of
    the ``n`` prompts, those not yet drawn this iteration first."""
    order = np.random.default_rng([seed, it, t]).permutation(n)
    fresh = np.isin(order, seen, invert=True)
    return np.concatenate([order[fresh], order[~fresh]])[:count]


def merge_generations(parts: list[Generation], pad_id: int) -> Generation:
    """Rows of several generations as one batch: prompt blocks left-padded to the widest (the
    models' positions count attended tokens only, so left padding changes no log-prob), response
    blocks right-padded to the widest."""
    p = max(g.prompt_len for g in parts)
    n = max(g.responses.shape[1] for g in parts)
    seqs, ams, rms, lps = [], [], [], []
    for g in parts:
        g = pad_responses(g, n, pad_id)
        left = ((0, 0), (p - g.prompt_len, 0))
        seqs.append(np.pad(g.sequences, left, constant_values=pad_id))
        ams.append(np.pad(g.attention_mask, left))
        rms.append(g.response_mask)
        lps.append(g.logprobs)
    lp = None if any(x is None for x in lps) else np.concatenate(lps)
    return Generation(np.concatenate(seqs), np.concatenate(ams), np.concatenate(rms), p, lp)


def take_rows(g: Generation, rows: np.ndarray) -> Generation:
    return Generation(
        g.sequences[rows],
        g.attention_mask[rows],
        g.response_mask[rows],
        g.prompt_len,
        None if g.logprobs is None else g.logprobs[rows],
    )


def fill_batch(draw, pick, n_groups: int, group_size: int, max_tries: int, pad_id: int):
    """``draw(t, prompt_idx) -> (Generation, {column: per-row array})`` samples and scores round
    ``t`` (every rank holds the whole round; column ``score`` is the reward advantages see);
    ``pick(t, seen) -> prompt_idx`` chooses its prompts. Keeps the informative groups, in the
    order drawn, until ``n_groups`` are found or ``max_tries`` extra rounds are spent; a batch
    still short is filled with the uninformative groups, in the order drawn.

    Returns (Generation, columns, counts): counts ``groups_dropped`` (uninformative groups left
    out), ``sampling_tries`` (extra rounds drawn), ``groups_unfilled`` (uninformative groups kept
    for want of others)."""
    kept, spare, seen = [], [], np.zeros(0, np.int64)
    for t in range(max_tries + 1):
        idx = pick(t, seen)
        seen = np.concatenate([seen, idx])
        g, cols = draw(t, idx)
        for j, good in enumerate(informative_groups(cols["score"], group_size)):
            rows = np.arange(j * group_size, (j + 1) * group_size)
            (kept if good else spare).append((g, cols, rows))
        if len(kept) >= n_groups:
            break
    chosen = (kept + spare)[:n_groups]
    unfilled = max(0, n_groups - len(kept))
    g = merge_generations([take_rows(c[0], c[2]) for c in chosen], pad_id)
    cols = {k: np.concatenate([c[1][k][c[2]] for c in chosen]) for k in chosen[0][1]}
    counts = {
        "groups_dropped": len(spare) - unfilled,
        "sampling_tries": t,
        "groups_unfilled": unfilled,
    }
    return g, cols, counts
