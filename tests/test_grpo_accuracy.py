"""GRPO's accuracy figures (held-out greedy accuracy mid-run, before/after) answer the prompts in
batches of the rollout's row count, so compiled decoding meets the shape the rollouts compiled;
the last batch is filled up with its last prompt and only real rows are counted."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from conftest import tiny_model_cfg
from mindrlhf.config import load_config
from mindrlhf.models.decoder import CausalLM
from mindrlhf.stages.grpo import accuracy


def test_accuracy_answers_in_rollout_sized_batches_and_counts_only_real_rows():
    cfg = load_config("demo", {"grpo": {"prompts_per_iter": 2, "group_size": 2, "mini_batch": 4}})
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19], [20]]
    table = pa.table({"prompt_ids": prompts, "good": [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0]})
    batches = []

    def reward_fn(g, rows):  # a reward read from the row: which rows were answered, and counted
        assert g.sequences.shape[0] == len(rows["good"])
        batches.append((g.sequences[:, : g.prompt_len], list(rows["good"])))
        return np.asarray(rows["good"], np.float32)

    tok = SimpleNamespace(eos_id=96, pad_id=0)
    mean, acc = accuracy(SimpleNamespace(cfg=cfg), CausalLM(tiny_model_cfg()), table, reward_fn,
                         tok, 5, True, 0)  # fmt: skip
    # rows 0..4 only: 2.5 / 5 and 2 of 5 at 1.0 (the fill-up copies of row 4 would make it 4.5 / 8)
    assert (mean, acc) == (0.5, 0.4)
    assert [len(good) for _, good in batches] == [4, 4]  # 2 prompts x 2 samples a rollout
    assert batches[1][1] == [1.0] * 4  # row 4 and three copies of it; rows 5, 6 not answered
    last = batches[1][0]
    assert (last == last[0]).all() and list(last[0][last[0] != 0]) == [15, 16]
