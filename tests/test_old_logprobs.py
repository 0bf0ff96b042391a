"""ppo.old_logprobs / grpo.old_logprobs: sampling -- the policy's log-probs of its own rollout
read off the sampler instead of a forward pass over it. The generator's side is in
test_generation.py, GRPO's (gather, dynamic sampling, resume, two workers) in
test_rl_estimators.py; here PPO's stage and the config's refusal."""

import numpy as np
import pytest

from conftest import assert_config_rejects, assert_rollout_logprobs_of, tiny_full_overrides
from mindrlhf.config import load_config


@pytest.mark.slow
def test_ppo_rollouts_carry_the_sampling_policys_logprobs(tiny_chain, tmp_path):
    """A tiny PPO stage with ppo.old_logprobs: sampling runs; its first rollout's stored
    log-probs are those the SFT actor that sampled it gives in a forward pass over the stored
    sequences (the ratio of its first update starts at 1)."""
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.launch import run_stage

    over = tiny_full_overrides(tiny_chain.root)
    over["ppo"].update(old_logprobs="sampling", iterations=1)
    cfg = load_config("demo", over)
    res = run_stage(
        "ppo", cfg, tiny_chain.inputs["ppo"], tiny_chain.root, tmp_path / "ppo", log=lambda s: None
    )
    store = ArtifactStore(tiny_chain.root)
    (first,) = [
        i
        for i in store.get(res["outputs"]["metrics"]).parents
        if store.get(i).name.startswith("tiny-ppo-rollout-")
    ]
    assert_rollout_logprobs_of(store, first, tiny_chain.sft, cfg)
    assert all(np.isfinite(v) for v in res["history"][0].values() if isinstance(v, float))


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_sampled_logprobs_need_our_generator(tmp_path, stage):
    assert_config_rejects(
        tmp_path,
        f"model:\n  backend: mindformers\n  family: llama\ngeneration:\n  engine: mindformers\n"
        f"device_target: Ascend\n{stage}:\n  old_logprobs: sampling\n",
        f"{stage}.old_logprobs: sampling reads the log-probs off our sampler",
    )


def test_old_logprobs_takes_two_values(tmp_path):
    assert_config_rejects(tmp_path, "grpo:\n  old_logprobs: decode\n", "grpo.old_logprobs")
