"""Data-parallel SFT under MindSpore's own launcher: 2 CPU workers under msrun follow the loss
curve of 1 worker with the same global batch, and only rank 0 writes artifacts."""
import json

import numpy as np
import pytest

from mindrlhf.config import ConfigError, load_config
from mindrlhf.data.store import ArtifactStore
from mindrlhf.launch import run_stage
from conftest import free_port, tiny_overrides


def losses(lines):
    return [json.loads(ln[7:])["loss"] for ln in lines if ln.startswith("METRIC") and '"loss"' in ln]


def test_two_workers_match_one(tmp_path):
    root = tmp_path / "store"
    over = tiny_overrides(root, steps=8, batch_size=8, log_every=1, ckpt_every=100)
    cfg1 = load_config("demo", over)
    prep = run_stage("prepare", cfg1, {}, root, root / "runs" / "prepare", log=lambda s: None)["outputs"]
    inputs = {"train": prep["sft_train"], "heldout": prep["sft_heldout"]}
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
    assert (tmp_path / "two" / "msrun_log" / "worker_1.log").exists()


def test_batch_must_divide_workers(tmp_path):
    with pytest.raises(ConfigError, match="worker_num"):
        load_config("demo", {"parallel": {"worker_num": 3, "local_worker_num": 3}})


def test_rm_and_ppo_data_parallel(tmp_path):
    """RM with 2 workers follows the 1-worker curve (per-pair means over equal shards); PPO with
    2 workers runs rollouts per rank, keeps rank 1's rollouts out of the store, and publishes one
    checkpoint."""
    from conftest import tiny_full_overrides

    root = tmp_path / "store"
    over = tiny_full_overrides(root)
    over["rm"].update({"steps": 6, "batch_size": 8, "log_every": 1})
    over["ppo"].update({"iterations": 2, "rollout_batch": 8, "mini_batch": 4})
    cfg1 = load_config("demo", over)
    prep = run_stage("prepare", cfg1, {}, root, root / "runs" / "prepare", log=lambda s: None)["outputs"]
    sft = run_stage("sft", cfg1, {"train": prep["sft_train"], "heldout": prep["sft_heldout"]}, root,
                    root / "runs" / "sft", log=lambda s: None)["outputs"]["checkpoint"]
    rm_in = {"train": prep["pairs_train"], "heldout": prep["pairs_heldout"], "sft": sft}
    one, two = [], []
    rm1 = run_stage("rm", cfg1, rm_in, root, tmp_path / "rm1", log=one.append)
    over["parallel"] = {"worker_num": 2, "local_worker_num": 2, "master_port": free_port()}
    cfg2 = load_config("demo", over)
    run_stage("rm", cfg2, rm_in, root, tmp_path / "rm2", log=two.append)
    np.testing.assert_allclose(losses(two), losses(one), rtol=2e-3)

    before = {a.id for a in ArtifactStore(root).list()}
    over["parallel"]["master_port"] = free_port()
    cfg2 = load_config("demo", over)
    ppo = run_stage("ppo", cfg2, {"prompts": prep["prompts_movie_reviews_train"],
                                  "heldout": prep["prompts_movie_reviews_heldout"], "sft": sft,
                                  "rm": rm1["outputs"]["checkpoint"]}, root, tmp_path / "ppo2", log=lambda s: None)
    store = ArtifactStore(root)
    new = [store.get(i) for i in {a.id for a in store.list()} - before]
    rollouts = [a for a in new if "rollout" in a.name]
    assert len(rollouts) == 2 and all(a.meta["rank"] == 0 for a in rollouts)
    assert sorted(p.name for p in (tmp_path / "ppo2").glob("rollout-*-rank1.arrow")) == \
        ["rollout-0-rank1.arrow", "rollout-1-rank1.arrow"]
    assert ppo["outputs"]["checkpoint"] in {a.id for a in new}
