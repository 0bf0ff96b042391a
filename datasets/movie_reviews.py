"""Recipe: movie-review sentences with mean human sentiment ratings (-4..+4).

Source: the VADER paper's ground truth (Hutto & Gilbert, ICWSM 2014), 10,605 sentences, shipped in
the vaderSentiment 3.3.2 sdist (MIT) as additional_resources/hutto_ICWSM_2014.tar.gz.

Tables built here (text only; tokenization is the pipeline's job):
  reviews     id, text, rating, split           every sentence, split by a hash of its id
  sft_<split> prompt, response                  "Review: <first 4 words>" -> " <rest of sentence>"
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

from mindrlhf.data import registry
from mindrlhf.data.schema import DataError

PIN = "vader-sdist"
OUTER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
INNER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
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
            raise DataError(f"{source}: row {n}: expected 3 tab-separated fields (id, rating, text), got {len(parts)}")
        rid, rating, sentence = parts
        try:
            r = float(rating)
        except ValueError:
            raise DataError(f"{source}: row {n}: field 'rating': {rating!r} is not a number") from None
        if not -4.0 <= r <= 4.0:
            raise DataError(f"{source}: row {n}: field 'rating': {r} outside -4..4")
        sentence = " ".join(sentence.replace("''", '"').split())
        if not sentence:
            raise DataError(f"{source}: row {n}: field 'text': empty")
        rows.append({"id": rid.strip(), "text": sentence, "rating": r})
    return rows


def split_of(row_id: str, heldout_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(f"movie_reviews:{row_id}".encode()).digest()[:4], "big")
    return "heldout" if h / 2**32 < heldout_fraction else "train"


def to_sft(text: str) -> tuple[str, str] | None:
    words = text.split()
    if len(words) < MIN_WORDS:
        return None
    return "Review: " + " ".join(words[:PROMPT_WORDS]), " " + " ".join(words[PROMPT_WORDS:])


def build(data_cfg) -> dict[str, pa.Table]:
    raw = registry.read_nested_tar_member(PIN, OUTER, INNER)
    rows = parse(raw, f"{registry.PINS[PIN].spec}:{OUTER}:{INNER}")
    for r in rows:
        r["split"] = split_of(r["id"], data_cfg.heldout_fraction)
    tables = {"reviews": pa.Table.from_pylist(rows)}
    for split in ("train", "heldout"):
        pairs = [p for r in rows if r["split"] == split and (p := to_sft(r["text"]))]
        if split == "train" and data_cfg.limit:
            pairs = pairs[:data_cfg.limit]
        tables[f"sft_{split}"] = pa.table({"prompt": [p for p, _ in pairs], "response": [s for _, s in pairs]})
    return tables


SOURCES = [PIN]
