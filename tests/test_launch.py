"""The launcher owns its run directory and its process tree: two launches of one stage never
share a run directory at once (the second waits, then both end with the same ids), a killed
launcher's msrun workers stop instead of finishing behind its back, and a host that cannot run a
stage is told so before anything starts."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import free_port, tiny_overrides, tiny_sft_stage_args
from mindrlhf.config import ConfigError, load_config
from mindrlhf.launch import run_stage, stage_processes

pytestmark = pytest.mark.slow  # launches stage processes, servers or large models


@pytest.fixture
def prepared(tiny_chain):
    d = tiny_chain.data
    return tiny_chain.root, {"train": d["sft_train"], "heldout": d["sft_heldout"]}


def test_same_run_dir_twice_at_once_waits_and_agrees(prepared, tmp_path):
    """Two launches of one SFT into one run directory (a schedule overlapping a manual run): one
    waits for the other; neither crashes on the other's checkpoints; one checkpoint id."""
    root, inputs = prepared
    cfg = load_config("demo", tiny_overrides(root, steps=8, ckpt_every=2))
    results, logs, errors = {}, {0: [], 1: []}, []

    def launch(i):
        try:
            results[i] = run_stage(
                "sft", cfg, inputs, root, tmp_path / "shared", log=logs[i].append
            )
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=launch, args=(i,)) for i in (0, 1)]
    threads[0].start()
    time.sleep(1.0)
    threads[1].start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert results[0]["outputs"] == results[1]["outputs"]
    waited = [i for i in (0, 1) if any("is in use by pid" in ln for ln in logs[i])]
    assert waited == [1], "the second launch must wait for the first"


def test_killed_launcher_leaves_no_msrun_workers(prepared, tmp_path):
    """SIGKILL the `mindrlhf stage` process during a 2-worker msrun stage: the workers notice their
    launcher is gone and stop (they used to finish and write outputs nobody waited for, and a rerun
    failed to form its cluster); the rerun in the same run directory then succeeds."""
    root, inputs = prepared
    run_dir = tmp_path / "dp"
    args = [sys.executable, "-m", "mindrlhf.cli"] + tiny_sft_stage_args(
        root,
        inputs,
        {
            "sft.steps": 400,
            "sft.ckpt_every": 50,
            "parallel.worker_num": 2,
            "parallel.local_worker_num": 2,
            "parallel.master_port": free_port(),
        },
        run_dir,
    )
    launcher = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    spec = run_dir / "spec.json"
    deadline = time.time() + 180
    while time.time() < deadline:
        workers = [p for p in stage_processes(spec) if "stage_entry.py" in " ".join(p.cmdline())]
        if len(workers) >= 2 and list(run_dir.glob("msrun_log/worker_1.log")):
            break
        time.sleep(0.5)
    else:
        launcher.kill()
        pytest.fail("the msrun workers did not start")
    time.sleep(3)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 30
    while stage_processes(spec) and time.time() < deadline:
        time.sleep(0.5)
    left = [(p.pid, " ".join(p.cmdline())[:80]) for p in stage_processes(spec)]
    for p in stage_processes(spec):
        p.kill()
    assert not left, f"processes outlived their launcher: {left}"
    assert not (run_dir / "result.json").exists()


def test_sigterm_stops_the_stage_tree(prepared, tmp_path):
    root, inputs = prepared
    run_dir = tmp_path / "term"
    args = [sys.executable, "-m", "mindrlhf.cli"] + tiny_sft_stage_args(
        root, inputs, {"sft.steps": 100000, "sft.ckpt_every": 100000}, run_dir
    )
    launcher = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    spec = run_dir / "spec.json"
    deadline = time.time() + 120
    while not stage_processes(spec) and time.time() < deadline:
        time.sleep(0.3)
    time.sleep(2)
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    assert not stage_processes(spec), "the stage process outlived a terminated launcher"


def test_more_cpu_workers_than_cores_refused_before_start(prepared, tmp_path):
    root, inputs = prepared
    n = 2 * os.cpu_count()  # valid as a config (every batch divides it), impossible on this host
    over = tiny_overrides(root, batch_size=n)
    over.update(
        rm={"batch_size": n},
        dpo={"batch_size": n},
        ppo={"rollout_batch": n, "mini_batch": n},
        grpo={"prompts_per_iter": n, "group_size": 2, "mini_batch": n},
    )
    over["parallel"] = {"worker_num": n, "local_worker_num": n}
    cfg = load_config("demo", over)
    with pytest.raises(
        ConfigError, match=rf"parallel.local_worker_num \({n}\).*{os.cpu_count()} CPU cores"
    ):
        run_stage("sft", cfg, inputs, root, tmp_path / "w64", log=lambda s: None)
    assert not (tmp_path / "w64" / "spec.json").exists()


@pytest.mark.parametrize(
    "over, words",
    [
        ({"sft": {"batch_size": 100000}}, ["stage sft needs at least", "GB", "this host has"]),
        ({"model": {"d_model": 100000, "n_heads": 4}}, ["stage sft needs at least", "weights"]),
    ],
)
def test_impossible_memory_refused_with_numbers(prepared, tmp_path, over, words):
    root, inputs = prepared
    o = tiny_overrides(root)
    for k, v in over.items():
        o.setdefault(k, {}).update(v)
    cfg = load_config("demo", o)
    with pytest.raises(ConfigError) as e:
        run_stage("sft", cfg, inputs, root, tmp_path / "mem", log=lambda s: None)
    for w in words:
        assert w in str(e.value)


def test_memory_estimate_is_a_lower_bound_of_what_sft_used(prepared, tmp_path):
    """The refusal must never refuse a stage that could run: the estimate stays below the
    measured peak of a real run."""
    from mindrlhf.preflight import estimate_memory

    root, inputs = prepared
    cfg = load_config("demo", tiny_overrides(root))
    res = run_stage("sft", cfg, inputs, root, tmp_path / "est", log=lambda s: None)
    assert estimate_memory(cfg, "sft").total < res["peak_rss_mb"] * 2**20
    assert res["peak_rss_mb"] > 100


def test_the_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    """A run killed while it held its run directory (kill -9, OOM) leaves its owner in the lock
    file; the next run takes the directory at once, without waiting or a message."""
    import json

    from mindrlhf.launch import run_dir_lock

    code = (
        "import sys, time\nfrom mindrlhf.launch import run_dir_lock\n"
        "with run_dir_lock(sys.argv[1], log=lambda s: None):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    assert json.loads((tmp_path / "lock").read_text())["pid"] == holder.pid
    holder.kill()
    holder.wait()
    said, t0 = [], time.time()
    with run_dir_lock(tmp_path, log=said.append, poll_s=1.0):
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    assert time.time() - t0 < 5 and said == []


def test_stage_start_sweeps_what_a_killed_checkpoint_write_left(tmp_path):
    """.tmp-ckpt-* (a checkpoint being written: ENOSPC, kill -9) and .trash-* (one being dropped)
    are removed when a stage opens its run directory; finished checkpoints stay."""
    from mindrlhf.stages.common import RunCheckpoints

    ckpts = RunCheckpoints(tmp_path, key="k")
    ckpts.save(3, {"model": {"w": np.ones(2, np.float32)}}, {})
    for junk in (".tmp-ckpt-6-1a2b3c4d", ".trash-ckpt-1-5e6f7a8b"):
        (tmp_path / junk).mkdir()
        (tmp_path / junk / "model.safetensors").write_bytes(b"half")
    again = RunCheckpoints(tmp_path, key="k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-3"]
    assert again.latest() == (3, tmp_path / "ckpt-3")


def test_a_finished_run_drops_its_working_checkpoints_and_keeps_the_rest(tmp_path):
    """Once a stage has finished its outputs are in the store: the launcher drops the run's
    working checkpoints (the run's own and a nested set such as the hacking watch's best-gold
    policy), leaving no hidden remnant; the result, spec and rollout index stay."""
    from mindrlhf.launch import drop_working_checkpoints
    from mindrlhf.stages.common import RunCheckpoints

    w = {"model": {"w": np.ones(256, np.float32)}}
    for step in (3, 6):
        RunCheckpoints(tmp_path, key="k").save(step, w, {})
    RunCheckpoints(tmp_path / "best-gold", key="k", keep=1).save(3, w, {})
    for name in ("result.json", "spec.json", "experience.json"):
        (tmp_path / name).write_text("{}")
    dropped = drop_working_checkpoints(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p, _ in dropped) == [
        "best-gold/ckpt-3",
        "ckpt-3",
        "ckpt-6",
    ]
    assert all(size > 1024 for _, size in dropped)  # each holds its 1 KiB tensor
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ["best-gold", "experience.json", "result.json", "spec.json"]
