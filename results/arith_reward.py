"""The answer-extraction rule of results/grpo_smollm2.py, as a user reward function
(``grpo.reward: python:results/arith_reward.py:first_integer``): the first integer in the
response is the answer; 1.0 if it equals the oracle answer, else 0.0. No partial credit.

reasoning-gym's own ``score_answer`` (the ``arithmetic`` recipe's reward) gives partial credit
when the answer appears inside a longer string ("73" for 7): a first GRPO run on it learned to
emit digit strings that collect that credit, and its accuracy collapsed (results/README.md)."""

from __future__ import annotations

import re

FIRST_INT = re.compile(r"-?\d+")


def first_integer(prompts, completions, answer, **columns) -> list[float]:
    out = []
    for text, want in zip(completions, answer):
        m = FIRST_INT.search(text)
        out.append(1.0 if m is not None and int(m.group()) == int(str(want).strip()) else 0.0)
    return out
