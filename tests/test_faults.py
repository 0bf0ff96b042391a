"""Numerical faults stop a stage with a clear error and keep the last good checkpoint; a stage
killed at random points (in checkpoint writes, in Arrow writes, mid-rollout) never leaves a
half artifact, and the rerun ends with the ids of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import tiny_full_overrides, tiny_overrides
from mindrlhf.config import load_config
from mindrlhf.data.store import ArtifactStore
from mindrlhf.launch import StageFailed, run_stage, stage_command
from mindrlhf.stages.common import KILL_AFTER_CKPT

pytestmark = pytest.mark.slow  # launches stage processes, servers or large models


@pytest.fixture
def prepared(tiny_chain):
    return tiny_chain.root, tiny_chain.data, tiny_chain.sft


def test_exploding_loss_stops_with_last_good_checkpoint(prepared, tmp_path):
    root, out, _ = prepared
    cfg = load_config("demo", tiny_overrides(root, lr=1e9, steps=20, ckpt_every=1, grad_clip=0.0))
    before = {a.id for a in ArtifactStore(root).list()}
    lines = []
    with pytest.raises(StageFailed) as e:
        run_stage(
            "sft",
            cfg,
            {"train": out["sft_train"], "heldout": out["sft_heldout"]},
            root,
            tmp_path,
            log=lines.append,
        )
    assert e.value.returncode == 3
    assert any("numerical error" in ln and "last good checkpoint" in ln for ln in lines)
    steps = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("ckpt-*"))
    assert steps, "a good checkpoint was written before the fault"
    weights = load_file(str(tmp_path / f"ckpt-{steps[-1]}" / "model.safetensors"))
    assert all(np.isfinite(w).all() for w in weights.values())
    assert {
        a.id for a in ArtifactStore(root).list()
    } == before  # no final artifact from a failed run


def ppo_inputs(out, sft, rm):
    return {
        "prompts": out["prompts_movie_reviews_train"],
        "heldout": out["prompts_movie_reviews_heldout"],
        "sft": sft,
        "rm": rm,
    }


def kill_at_random(cmd, after_s: float) -> int:
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    time.sleep(after_s)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait()


def visible_artifacts_are_whole(store: ArtifactStore) -> int:
    n = 0
    for p in store.objects.iterdir():
        assert store.is_valid(p.name), f"half artifact visible: {p}"
        n += 1
    return n


def test_kill9_at_random_points_then_rerun_matches_clean(prepared, tiny_chain, tmp_path):
    """PPO writes working checkpoints, rollout datasets and a final checkpoint: SIGKILL it at
    random moments, check the store after each kill, then let it finish."""
    root, out, sft = prepared
    over = tiny_full_overrides(root)
    over["ppo"].update({"iterations": 4, "ckpt_every": 1})
    cfg = load_config("demo", over)
    rm = tiny_chain.rm
    clean = run_stage(
        "ppo", cfg, ppo_inputs(out, sft, rm), root, tmp_path / "clean", log=lambda s: None
    )

    run_dir = tmp_path / "crashy"
    run_dir.mkdir()
    spec = run_dir / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "config": cfg.to_dict(),
                "inputs": ppo_inputs(out, sft, rm),
                "store_root": str(root),
                "run_dir": str(run_dir),
            }
        )
    )
    cmd = stage_command("ppo", spec, run_dir / "result.json", cfg.parallel, run_dir)
    store = ArtifactStore(root)
    rnd = random.Random(7)
    kills = 0
    for _ in range(4):
        rc = kill_at_random(cmd, rnd.uniform(3.0, 9.0))
        kills += rc == -signal.SIGKILL
        visible_artifacts_are_whole(store)
        for ck in run_dir.glob("ckpt-*"):  # working checkpoints are whole too
            state = json.loads((ck / "state.json").read_text())
            assert state["step"] == int(ck.name.split("-")[1])
            for stem in ("actor", "critic", "actor_optim", "critic_optim"):
                assert load_file(str(ck / f"{stem}.safetensors"))
        if rc == 0:
            break
    assert kills >= 1
    if not (run_dir / "result.json").exists():  # and one kill certainly after a checkpoint
        proc = subprocess.run(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, KILL_AFTER_CKPT: "2"},
        )
        assert proc.returncode in (-signal.SIGKILL, 0)
        visible_artifacts_are_whole(store)
    lines = []
    final = run_stage("ppo", cfg, ppo_inputs(out, sft, rm), root, run_dir, log=lines.append)
    assert final["outputs"] == clean["outputs"]  # same checkpoint and metrics ids as the clean run
    assert any("resuming from step" in ln for ln in lines), (
        "the final run must resume, not start over"
    )
    assert visible_artifacts_are_whole(store) > 0
