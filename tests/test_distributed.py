"""Data parallel under MindSpore's own launcher: 2 CPU workers under msrun follow 1 worker with
the same global batch -- SFT and RM loss curves, PPO and GRPO rollouts and final weights -- only
rank 0 writes artifacts, and every worker runs the checkout under test."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, tiny_overrides
from mindrlhf.config import ConfigError, load_config
from mindrlhf.data.store import ArtifactStore
from mindrlhf.launch import run_stage

pytestmark = pytest.mark.slow  # launches stage processes, servers or large models


def losses(lines):
    return [
        json.loads(ln[7:])["loss"] for ln in lines if ln.startswith("METRIC") and '"loss"' in ln
    ]


def test_two_workers_match_one(tiny_chain, tmp_path):
    root = tiny_chain.root
    over = tiny_overrides(root, steps=8, batch_size=8, log_every=1, ckpt_every=100)
    cfg1 = load_config("demo", over)
    inputs = {"train": tiny_chain.data["sft_train"], "heldout": tiny_chain.data["sft_heldout"]}
    one_lines, two_lines = [], []
    run_stage("sft", cfg1, inputs, root, tmp_path / "one", log=one_lines.append)
    before = {a.id for a in ArtifactStore(root).list()}
    over["parallel"] = {"worker_num": 2, "local_worker_num": 2, "master_port": free_port()}
    cfg2 = load_config("demo", over)
    two = run_stage("sft", cfg2, inputs, root, tmp_path / "two", log=two_lines.append)
    assert any(ln.startswith("launch:") and "msrun" in ln for ln in two_lines)
    l1, l2 = np.array(losses(one_lines)), np.array(losses(two_lines))
    assert len(l1) == len(l2) == 8
    assert l2[-1] < l2[0] - 0.5  # it trains
    np.testing.assert_allclose(l2, l1, rtol=2e-3)  # exact in math; float summation order differs
    new = {a.id for a in ArtifactStore(root).list()} - before
    assert new == {two["outputs"]["checkpoint"]}  # one checkpoint: rank 1 wrote nothing
    assert not list((tmp_path / "two").glob("ckpt-*"))  # ckpt_every=100: no working checkpoints
    # both workers ran the checkout under test, not whatever copy the venv's editable install points
    # at
    code = str(Path(__file__).resolve().parents[1] / "mindrlhf")
    for rank in (0, 1):
        assert f"code {code}" in (tmp_path / "two" / "msrun_log" / f"worker_{rank}.log").read_text()


def test_batch_must_divide_workers(tmp_path):
    with pytest.raises(ConfigError, match="worker_num"):
        load_config("demo", {"parallel": {"worker_num": 3, "local_worker_num": 3}})


@pytest.fixture
def dp_chain(tiny_chain):
    """The shared chain's data, SFT and RM, for the data-parallel comparisons."""
    from conftest import tiny_full_overrides

    over = tiny_full_overrides(tiny_chain.root)
    over["rm"].update({"steps": 6, "batch_size": 8, "log_every": 1})
    return tiny_chain.root, over, tiny_chain.data, tiny_chain.sft, tiny_chain.rm


def test_rm_two_workers_follow_one(dp_chain, tmp_path):
    root, over, prep, sft, _ = dp_chain
    rm_in = {"train": prep["pairs_train"], "heldout": prep["pairs_heldout"], "sft": sft}
    one, two = [], []
    run_stage("rm", load_config("demo", over), rm_in, root, tmp_path / "rm1", log=one.append)
    over2 = {
        **over,
        "parallel": {"worker_num": 2, "local_worker_num": 2, "master_port": free_port()},
    }
    run_stage("rm", load_config("demo", over2), rm_in, root, tmp_path / "rm2", log=two.append)
    np.testing.assert_allclose(losses(two), losses(one), rtol=2e-3)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_two_workers_take_the_steps_of_one(dp_chain, tmp_path, stage):
    """PPO and GRPO with 2 msrun workers equal 1 worker: every row samples from its own random
    stream wherever it runs (the same tokens on either rank), the ranks gather the whole rollout
    (whitening and group advantages over all of it, one stored rollout per iteration) and take
    the same global mini-batches, so the rollouts are identical and the final weights equal to
    float precision. A rank that sampled with another rank's stream, whitened its own shard or
    shuffled its own mini-batches ends elsewhere."""
    from mindrlhf.data.store import ArtifactStore

    root, over, prep, sft, rm = dp_chain
    over = {
        **over,
        "ppo": {**over["ppo"], "iterations": 2, "rollout_batch": 8, "mini_batch": 4},
        "grpo": {
            **over["grpo"],
            "iterations": 2,
            "prompts_per_iter": 2,
            "group_size": 4,
            "mini_batch": 4,
        },
    }
    rm = rm if stage == "ppo" else None
    recipe = "movie_reviews" if stage == "ppo" else "arithmetic"
    inputs = {
        "prompts": prep[f"prompts_{recipe}_train"],
        "heldout": prep[f"prompts_{recipe}_heldout"],
        "sft": sft,
    }
    if rm:
        inputs["rm"] = rm
    store = ArtifactStore(root)
    out = {}
    for workers in (1, 2):
        o = {
            **over,
            "parallel": {
                "worker_num": workers,
                "local_worker_num": workers,
                "master_port": free_port(),
            },
        }
        res = run_stage(
            stage,
            load_config("demo", o),
            inputs,
            root,
            tmp_path / f"w{workers}",
            log=lambda s: None,
        )
        ckpt = store.get(res["outputs"]["checkpoint"])
        ids = sorted(
            store.get(res["outputs"]["metrics"]).parents,
            key=lambda i: store.get(i).meta["iteration"],
        )
        rollouts = [store.read_dataset(i) for i in ids]
        out[workers] = (store.read_checkpoint(ckpt.id), rollouts)
    (w1, r1), (w2, r2) = out[1], out[2]
    assert len(r1) == len(r2) == 2 and all(
        t.num_rows == 8 for t in r1 + r2
    )  # whole rollouts, rank 0 wrote them
    for a, b in zip(r1, r2):
        assert a.column("sequence").to_pylist() == b.column("sequence").to_pylist()
    changed = False
    for k, v in w1.items():
        np.testing.assert_allclose(w2[k], v, atol=2e-5, rtol=1e-4, err_msg=k)
        changed |= not np.array_equal(v, store.read_checkpoint(sft)[k])
    assert changed  # the policy moved: equal weights are not two untrained copies
