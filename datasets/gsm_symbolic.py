"""Recipe: grade-school maths word problems with worked answers, from reasoning-gym 0.1.25
(Apache-2.0) ``arithmetic/gsm_symbolic``: GSM8K problems turned into templates whose numbers are
drawn at random, each with a step-by-step solution ending in GSM8K's ``#### <answer>`` line.

Tables:
  sft_<split>     prompt, response   "<question>\\nAnswer:" -> " <worked solution>\\n#### 288"
  prompts_<split> prompt, answer     the same prompts with the oracle answer, for GRPO

The reward reads the final answer the GSM8K way (the number after the last ``####``; failing that,
the last number in the response) and scores it with the dataset's own ``score_answer``: 1.0 when
it equals the oracle, 0.01 for a wrong number, 0 for none.

Problems are split by a hash of their text, so no held-out problem occurs in training. Worked
answers run to ~70 GPT-2 tokens and questions to ~60 (up to ~140 and ~175): give ``data.max_len``
room (e.g. 320) where this recipe is used.
"""

from __future__ import annotations

import re
from functools import lru_cache

import pyarrow as pa

from mindrlhf.data import registry
from mindrlhf.data.recipes import heldout_split

PIN = "reasoning-gym"
SOURCES = [PIN]
MODULE = "reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic"
SUFFIX = "\nAnswer:"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@lru_cache(maxsize=1)
def gsm_module():
    # reasoning_gym.factory and .coaching import each other; coaching must load first
    return registry.import_from_wheel(PIN, MODULE, first=("reasoning_gym.coaching",))


def generator(size: int, seed: int):
    m = gsm_module()
    return m.GSMSymbolicDataset(m.GSMSymbolicDatasetConfig(seed=seed, size=size))


def build(data_cfg) -> dict[str, pa.Table]:
    ds = generator(data_cfg.gsm_size, seed=data_cfg.gsm_seed)
    rows: dict[str, list] = {"train": [], "heldout": []}
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        q = item["question"]
        if q in seen:  # the templates repeat a problem now and then; keep one copy
            continue
        seen.add(q)
        solution = item["metadata"]["answer_cot"].strip()
        split = heldout_split("gsm_symbolic", q, data_cfg.heldout_fraction)
        rows[split].append((q + SUFFIX, " " + solution, item["answer"]))
    tables = {}
    for split, rs in rows.items():
        tables[f"sft_{split}"] = pa.table(
            {"prompt": [p for p, _, _ in rs], "response": [r for _, r, _ in rs]}
        )
        tables[f"prompts_{split}"] = pa.table(
            {"prompt": [p for p, _, _ in rs], "answer": [a for _, _, a in rs]}
        )
    return tables


def final_answer(response: str) -> str | None:
    """The answer a worked solution commits to: after the last '####', else its last number."""
    tail = response.rsplit("####", 1)[1] if "####" in response else response
    nums = NUMBER.findall(tail)
    if not nums:
        return None
    return (nums[0] if "####" in response else nums[-1]).replace(",", "")


def reward(prompts: list[str], responses: list[str], rows: dict[str, list]) -> list[float]:
    """reasoning-gym's gsm_symbolic score of each response's final answer against
    ``rows['answer']``."""
    ds = generator(1, 0)
    return [
        float(ds.score_answer(final_answer(r), {"answer": a}))
        for r, a in zip(responses, rows["answer"])
    ]
