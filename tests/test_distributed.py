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
    one = run_stage("sft", cfg1, inputs, root, tmp_path / "one", log=one_lines.append)
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
