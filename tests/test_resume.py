"""Every stage that resumes, killed with SIGKILL right after a working checkpoint, resumes from
that step and ends with the artifact ids of an uninterrupted run: weights, optimizer moments,
the learning-rate warm-up position, the logging window and the history all come back. The
intervals are chosen to bite: warm-up longer than the kill point, checkpoints every 3 steps
and log lines every 2, so a restarted window or warm-up changes the manifest."""

import signal

import pytest

from conftest import tiny_full_overrides
from mindrlhf.config import load_config
from mindrlhf.launch import StageFailed, run_stage
from mindrlhf.stages.common import KILL_AFTER_CKPT

pytestmark = pytest.mark.slow  # launches stage processes, servers or large models

KILL_AT = 3


@pytest.fixture
def chain(tiny_chain):
    root = tiny_chain.root
    over = tiny_full_overrides(root)
    common = {"warmup_steps": 4, "ckpt_every": KILL_AT}
    over["sft"].update(steps=7, log_every=2, **common)
    over["rm"].update(steps=7, log_every=2, **common)
    over["dpo"].update(steps=7, log_every=2, **common)
    over["ppo"].update(iterations=4, **common)
    over["grpo"].update(iterations=4, **common)
    over["online_dpo"].update(steps_per_round=5)
    return root, load_config("demo", over), tiny_chain.inputs


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "grpo", "online_dpo"])
def test_kill_after_checkpoint_then_resume_gives_identical_ids(chain, tmp_path, stage):
    root, cfg, inputs = chain
    clean = run_stage(stage, cfg, inputs[stage], root, tmp_path / "clean", log=lambda s: None)

    crash = tmp_path / "crash"
    with pytest.raises(StageFailed) as e:
        run_stage(
            stage,
            cfg,
            inputs[stage],
            root,
            crash,
            log=lambda s: None,
            env={KILL_AFTER_CKPT: str(KILL_AT)},
        )
    assert e.value.returncode == -signal.SIGKILL
    assert "killed by SIGKILL" in str(e.value) and "peak RSS" in str(e.value)
    assert (crash / f"ckpt-{KILL_AT}").is_dir() and not (crash / "result.json").exists()

    lines = []
    resumed = run_stage(stage, cfg, inputs[stage], root, crash, log=lines.append)
    assert any(f"resuming from step {KILL_AT}" in ln for ln in lines), "the rerun did not resume"
    assert resumed["outputs"] == clean["outputs"]
    # done: the outputs are in the store, the working checkpoints (optimizer state) are not kept
    for run in (tmp_path / "clean", crash):
        assert (run / "result.json").exists()
        left = [p.name for p in run.rglob("*") if "ckpt-" in p.name]
        assert not left, f"{run} keeps {left} after the stage finished"
    assert any("dropped" in ln and "working checkpoint" in ln for ln in lines)
