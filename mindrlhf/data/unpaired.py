"""KTO's examples: single completions labelled desirable or undesirable, each beside a
mismatched completion for the KL reference point.

A pair dataset splits into both kinds (its chosen answer desirable, its rejected one
undesirable); a data source of kind ``unpaired`` adds its rows as they are. The reference point
z0 of KTO (Ethayarajh et al. 2024, sec. 4.1; TRL's ``KTOTrainer``) is a KL estimate from
*mismatched* pairs: the log-ratio of policy and reference on completion j given prompt i != j,
so it measures how far the policy moved on completions that do not answer the prompt. TRL pairs
each prompt with the completion next to it in its preparation batch; here each example i gets one
fixed partner drawn as a random derangement of all examples (a seeded permutation, each entry
followed by the next one on its cycle), so the partner of i is never i, the pairing does not
depend on how the data happens to be sorted, and the reference log-probs of the mismatched
sequences are computed once in the reflogp stage. The partner index is stored with them, so the
DPO stage rebuilds exactly the sequences that were scored.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .tokenize import IDS

EXAMPLE_COLUMNS = ("completion_ids", "kl_ids")


def kto_examples(pairs: pa.Table | None, unpaired: pa.Table | None = None) -> pa.Table:
    """completion_ids, prompt_len, desirable, pair: the pairs' chosen answers (desirable), then
    their rejected answers (undesirable), then the unpaired rows -- so rows [0, n) and [n, 2n)
    are the two sides of the n pairs; ``pair`` is the pair a row came from (-1: unpaired)."""
    ids, plen, good, pair = [], [], [], []
    if pairs is not None and pairs.num_rows:
        n = pairs.num_rows
        p = pairs.column("prompt_len").to_pylist()
        ids += pairs.column("chosen_ids").to_pylist() + pairs.column("rejected_ids").to_pylist()
        plen += p + p
        good += [1] * n + [0] * n
        pair += [*range(n), *range(n)]
    if unpaired is not None and unpaired.num_rows:
        ids += unpaired.column("completion_ids").to_pylist()
        plen += unpaired.column("prompt_len").to_pylist()
        good += unpaired.column("desirable").to_pylist()
        pair += [-1] * unpaired.num_rows
    return pa.table(
        {
            "completion_ids": pa.array(ids, IDS),
            "prompt_len": pa.array(plen, pa.int32()),
            "desirable": pa.array(good, pa.int8()),
            "pair": pa.array(pair, pa.int32()),
        }
    )


def kl_partners(n: int, seed: int) -> np.ndarray:
    """partner[i] != i (for n > 1): a random cyclic derangement of range(n)."""
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def with_kl_sequences(examples: pa.Table, partner: np.ndarray) -> pa.Table:
    """``examples`` plus ``kl_ids``: row i's prompt followed by row partner[i]'s completion, cut
    at the longest example (it shares row i's prompt_len, so one batch holds both)."""
    ids = examples.column("completion_ids").to_pylist()
    plen = examples.column("prompt_len").to_pylist()
    cap = max((len(r) for r in ids), default=0)
    kl = [(ids[i][: plen[i]] + ids[j][plen[j] :])[:cap] for i, j in enumerate(partner.tolist())]
    return examples.append_column("kl_ids", pa.array(kl, IDS))
