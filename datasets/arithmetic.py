"""Recipe: arithmetic word problems with a verifiable answer, from reasoning-gym 0.1.25
(Apache-2.0): ``arithmetic/basic_arithmetic`` generates the problems, the dataset's own
``score_answer`` is the reward. The package ``__init__`` imports heavy optional extras, so only
the submodules used are loaded, from the pinned wheel.

Tables:
  sft_<split>     prompt, response      "Calculate 4 - 1. Answer:" -> " 3"
  prompts_<split> prompt, answer        the same prompts with the oracle answer, for GRPO

Problems are split by a hash of their text, so no held-out problem occurs in training.
"""

from __future__ import annotations

from functools import lru_cache

import pyarrow as pa

from mindrlhf.data import registry
from mindrlhf.data.recipes import heldout_split

PIN = "reasoning-gym"
SOURCES = [PIN]
SUFFIX = " Answer:"


@lru_cache(maxsize=1)
def basic_arithmetic():
    return registry.import_from_wheel(PIN, "reasoning_gym.arithmetic.basic_arithmetic")


def generator(size: int, seed: int, max_digits: int):
    ba = basic_arithmetic()
    cfg = ba.BasicArithmeticDatasetConfig(
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=max_digits,
        operators=("+", "-"),
        allow_parentheses=False,
        allow_negation=False,
        seed=seed,
        size=size,
    )
    return ba.BasicArithmeticDataset(cfg)


def build(data_cfg) -> dict[str, pa.Table]:
    ds = generator(
        data_cfg.arithmetic_size,
        seed=data_cfg.arithmetic_seed,
        max_digits=data_cfg.arithmetic_digits,
    )
    rows = {"train": [], "heldout": []}
    for i in range(len(ds)):
        item = ds[i]
        rows[heldout_split("arithmetic", item["question"], data_cfg.heldout_fraction)].append(
            (item["question"] + SUFFIX, " " + item["answer"], item["answer"])
        )
    tables = {}
    for split, rs in rows.items():
        tables[f"sft_{split}"] = pa.table(
            {"prompt": [p for p, _, _ in rs], "response": [r for _, r, _ in rs]}
        )
        tables[f"prompts_{split}"] = pa.table(
            {"prompt": [p for p, _, _ in rs], "answer": [a for _, _, a in rs]}
        )
    return tables


def reward(prompts: list[str], responses: list[str], rows: dict[str, list]) -> list[float]:
    """reasoning-gym's score for each response: 1.0 exact, partial credit if the answer appears
    inside a longer string, else 0. ``rows`` carries the prompt table's columns (``answer``)."""
    ds = generator(1, 0, 1)
    return [
        float(ds.score_answer(r.strip(), {"answer": a})) for r, a in zip(responses, rows["answer"])
    ]
