"""The Prefect flow: a re-run with unchanged inputs is all Cached; one SFT hyperparameter change
re-runs SFT only; the launcher builds msrun commands for more than one worker."""

import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides
from mindrlhf.config import ParallelConfig
from mindrlhf.launch import stage_command

pytestmark = pytest.mark.slow  # launches stage processes, servers or large models


def test_cached_rerun_and_selective_invalidation(prefect_server, tmp_path):
    from flows.pipeline import rlhf_pipeline

    over = tiny_overrides(tmp_path / "store")
    first = rlhf_pipeline("demo", over)
    assert first["states"] == {"prepare": "Completed", "sft": "Completed"}
    again = rlhf_pipeline("demo", over)  # (how fast: bench/orchestration.py)
    assert again["states"] == {"prepare": "Cached", "sft": "Cached"}
    assert again["sft"]["checkpoint"] == first["sft"]["checkpoint"]

    # a flipped byte in the cached SFT checkpoint: the cache refuses it and SFT is rebuilt,
    # deterministically, to the same id; prepare stays cached
    from mindrlhf.data.store import ArtifactStore

    store = ArtifactStore(over["store"]["root"])
    f = store.get(first["sft"]["checkpoint"]).path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01
    f.write_bytes(bytes(data))
    assert not store.is_valid(first["sft"]["checkpoint"])
    healed = rlhf_pipeline("demo", over)
    assert healed["states"] == {"prepare": "Cached", "sft": "Completed"}
    assert healed["sft"]["checkpoint"] == first["sft"]["checkpoint"]
    assert store.is_valid(first["sft"]["checkpoint"])
    over["sft"]["lr"] = 0.005
    changed = rlhf_pipeline("demo", over)
    assert changed["states"] == {"prepare": "Cached", "sft": "Completed"}
    assert changed["sft"]["checkpoint"] != first["sft"]["checkpoint"]


def test_cache_never_serves_what_is_gone(prefect_server, tmp_path):
    """A cached result is served only while every artifact it names is present and verified,
    whatever happened to the cache index: the store wiped (the index went with it, and its
    generation counter used to restart at 0 and match the old key), the index corrupt, or another
    store put at the same path."""
    import shutil

    from flows.pipeline import rlhf_pipeline
    from mindrlhf.data.store import ArtifactStore

    root = tmp_path / "store"
    over = tiny_overrides(root)
    first = rlhf_pipeline("demo", over)
    sft = first["sft"]["checkpoint"]
    assert rlhf_pipeline("demo", over)["states"] == {"prepare": "Cached", "sft": "Cached"}

    shutil.rmtree(root)  # everything gone, index included
    wiped = rlhf_pipeline("demo", over)
    assert wiped["states"] == {"prepare": "Completed", "sft": "Completed"}
    assert wiped["sft"]["checkpoint"] == sft and ArtifactStore(root).is_valid(sft)

    train = ArtifactStore(root).get(wiped["datasets"]["sft_train"]).path / "data.arrow"
    data = bytearray(train.read_bytes())  # a dataset output (not a checkpoint) corrupted
    data[len(data) // 2] ^= 0x01
    train.write_bytes(bytes(data))
    healed = rlhf_pipeline("demo", over)
    assert healed["states"] == {"prepare": "Completed", "sft": "Cached"}  # rebuilt to the same ids
    assert ArtifactStore(root).is_valid(wiped["datasets"]["sft_train"])

    for idx in (root / "cache").glob("*.json"):  # unreadable index: rebuilt past, not a crash
        idx.write_text("{not json")
    again = rlhf_pipeline("demo", over)
    assert again["sft"]["checkpoint"] == sft and ArtifactStore(root).is_valid(sft)

    other = tmp_path / "other"  # another store, with the same contents, swapped in at the same path
    shutil.copytree(root, other)
    shutil.rmtree(root)
    ArtifactStore(root)
    assert rlhf_pipeline("demo", over)["states"]["sft"] == "Completed"
    shutil.rmtree(root)
    shutil.move(other, root)
    ArtifactStore(root).remove(ArtifactStore(root).get(sft).id)  # ... minus its SFT checkpoint
    healed = rlhf_pipeline("demo", over)
    assert healed["states"]["sft"] == "Completed" and ArtifactStore(root).is_valid(sft)


def test_unanswering_prefect_api_fails_fast(tmp_path, monkeypatch, capsys):
    """A PREFECT_API_URL that accepts connections and never answers used to hang `mindrlhf run`
    in silence; now it is refused with the address in a bounded time."""
    import socket
    import threading

    from mindrlhf.cli import main

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []
    threading.Thread(
        target=lambda: [held.append(srv.accept()) for _ in range(8)], daemon=True
    ).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    t = time.time()
    assert main(["run", "demo", "--set", f"store.root={tmp_path}"]) == 1
    assert time.time() - t < 30
    err = capsys.readouterr().err
    assert url in err and "did not answer" in err
    srv.close()


def key(kind, art_id):
    return f"mindrlhf://{kind}/{art_id}"


def asset_edges(ready, timeout=60) -> dict[str, set[str]]:
    """asset key -> keys of its upstream assets, from the materialization events on the server."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    deadline, edges = time.time() + timeout, {}
    while time.time() < deadline:
        r = httpx.post(
            f"{PREFECT_API_URL.value()}/events/filter",
            json={
                "filter": {"event": {"prefix": ["prefect.asset.materialization.succeeded"]}},
                "limit": 50,
            },
        )
        edges = {}
        while True:
            r.raise_for_status()
            page = r.json()
            for e in page["events"]:
                ups = {
                    x["prefect.resource.id"]
                    for x in e["related"]
                    if x.get("prefect.resource.role") == "asset"
                }
                edges.setdefault(e["resource"]["prefect.resource.id"], set()).update(ups)
            if not page.get("next_page"):
                break
            r = httpx.get(page["next_page"])
        if ready(edges):
            return edges
        time.sleep(1)
    return edges


def test_msrun_command():
    p = ParallelConfig(
        worker_num=4, local_worker_num=2, master_addr="10.0.0.1", master_port=9000, node_rank=1
    )
    cmd = stage_command("sft", Path("s.json"), Path("o.json"), p, Path("/runs/x"))
    assert Path(cmd[0]).name == "msrun"
    for flag in (
        "--worker_num=4",
        "--local_worker_num=2",
        "--master_addr=10.0.0.1",
        "--master_port=9000",
        "--node_rank=1",
        "--log_dir=/runs/x/msrun_log",
        "--join=True",
    ):
        assert flag in cmd
    assert cmd[-6].endswith("mindrlhf/stage_entry.py") and cmd[-5:] == [
        "sft",
        "--spec",
        "s.json",
        "--out",
        "o.json",
    ]
    single = stage_command("sft", Path("s.json"), Path("o.json"), ParallelConfig(), Path("/r"))
    assert single[1:3] == ["-m", "mindrlhf.stages.sft"]


def test_full_chain_lineage_and_cache(prefect_server, tmp_path):
    """prepare -> sft -> rm -> ppo / grpo / dpo / online DPO through Prefect; the manifests link
    every checkpoint to its inputs; a second run is entirely Cached."""
    from conftest import tiny_full_overrides
    from flows.pipeline import rlhf_pipeline
    from mindrlhf.data.store import ArtifactStore

    over = tiny_full_overrides(tmp_path / "store")
    s = rlhf_pipeline("demo", over)
    assert set(s["states"].values()) == {"Completed"}
    store = ArtifactStore(tmp_path / "store")
    sft, rm, ppo = s["sft"]["checkpoint"], s["rm"]["checkpoint"], s["ppo"]["checkpoint"]
    assert (
        sft in store.get(rm).parents
        and rm in store.get(ppo).parents
        and sft in store.get(ppo).parents
    )
    assert sft in store.get(s["dpo"]["checkpoint"]).parents
    assert sft in store.get(s["grpo"]["checkpoint"]).parents
    chain = [a.id for a in store.lineage(ppo)]
    assert s["datasets"]["sft_train"] in chain and s["datasets"]["pairs_train"] in chain
    # online DPO: each round's pairs sit between two checkpoints
    pairs = s["online_dpo"]["pair_datasets"]
    final = store.get(s["online_dpo"]["checkpoint"])
    assert pairs[-1] in final.parents and len(set(pairs)) == 2
    assert len(s["online_dpo"]["heldout_score_by_round"]) == 3
    # PPO rollouts are versioned datasets linked from the metrics artifact
    metrics = store.get(s["ppo"]["checkpoint"]).parents[-1]
    rollouts = store.get(metrics).parents
    assert rollouts and all(store.get(r).name.startswith("tiny-ppo-rollout-") for r in rollouts)
    assert store.read_dataset(rollouts[0]).column_names[:4] == [
        "sequence",
        "attention_mask",
        "response_mask",
        "prompt_len",
    ]
    # the VADER gold judge scored every rollout sample: recompute it from the stored tokens
    from mindrlhf.data.recipes import load_recipe
    from mindrlhf.data.tokenizer import load_tokenizer

    tok, ro = load_tokenizer("gpt2_bpe"), store.read_dataset(rollouts[-1]).to_pylist()
    texts = [
        (
            tok.decode(
                [t for t, m in zip(r["sequence"][: r["prompt_len"]], r["attention_mask"]) if m]
            ),
            tok.decode(
                [t for t, m in zip(r["sequence"][r["prompt_len"] :], r["response_mask"]) if m]
            ),
        )
        for r in ro
    ]
    gold = load_recipe("movie_reviews").gold_reward([p for p, _ in texts], [r for _, r in texts])
    assert all(p.startswith("Review:") for p, _ in texts)
    np.testing.assert_allclose([r["gold"] for r in ro], gold, atol=1e-6)
    assert -1 <= s["ppo"]["heldout_gold_sft"] <= 1 and -1 <= s["ppo"]["heldout_gold_ppo"] <= 1
    # the same lineage as Prefect assets, read back from the server's API
    edges = asset_edges(lambda e: len(e) >= 10 and key("checkpoint", ppo) in e)
    assert {key("checkpoint", rm), key("checkpoint", sft)} <= edges[key("checkpoint", ppo)]
    assert key("checkpoint", sft) in edges[key("checkpoint", rm)]
    assert key("dataset", s["datasets"]["sft_train"]) in edges[key("checkpoint", sft)]
    assert "pypi://vaderSentiment/3.3.2" in edges[key("dataset", s["datasets"]["sft_train"])]
    assert key("checkpoint", sft) in edges[key("checkpoint", s["dpo"]["checkpoint"])]

    again = rlhf_pipeline("demo", over)
    assert set(again["states"].values()) == {"Cached"}
    # a metrics dataset (an RL stage's second output) corrupted: that stage alone is rebuilt
    metrics = store.get(s["grpo"]["checkpoint"]).parents[-1]
    plot = store.get(metrics).path / "plot.png"
    plot.write_bytes(plot.read_bytes()[:-1] + b"\0")
    healed = rlhf_pipeline("demo", over)
    assert healed["states"]["grpo"] == "Completed" and store.is_valid(metrics)
    assert {k for k, v in healed["states"].items() if v != "Cached"} == {"grpo"}
    over["dpo"]["beta"] = 0.5  # only DPO re-runs; its reference log-probs stay cached
    changed = rlhf_pipeline("demo", over)
    assert changed["states"]["reflogp"] == "Cached" and changed["states"]["dpo"] == "Completed"
    assert changed["states"]["ppo"] == "Cached" and changed["states"]["online_dpo_0"] == "Completed"


def test_killed_stage_is_retried_by_prefect_and_resumes(prefect_server, tmp_path):
    """SIGKILL the SFT process mid-run inside a flow: Prefect retries the task, the retry resumes
    from the last working checkpoint, and the checkpoint equals an uninterrupted run's."""
    import os
    import signal
    import threading

    import httpx
    import psutil
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import rlhf_pipeline

    clean = rlhf_pipeline("demo", tiny_overrides(tmp_path / "clean", steps=12, ckpt_every=3))
    over = tiny_overrides(tmp_path / "crash", steps=12, ckpt_every=3)
    result = {}
    t = threading.Thread(target=lambda: result.update(rlhf_pipeline("demo", over)))
    t.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and t.is_alive():
        if list((tmp_path / "crash" / "runs").glob("sft-*/ckpt-6")):
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "mindrlhf.stages.sft" in cmd and str(tmp_path / "crash") in cmd:
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed = p.info["pid"]
        time.sleep(0.05)
    t.join(timeout=600)
    assert killed, "the stage finished before it could be killed"
    assert result["states"]["sft"] == "Completed"
    assert result["sft"]["checkpoint"] == clean["sft"]["checkpoint"]
    runs = httpx.post(
        f"{PREFECT_API_URL.value()}/task_runs/filter",
        json={"task_runs": {"name": {"like_": "sft-"}}},
    ).json()
    assert max(r["run_count"] for r in runs) >= 2  # the retry really happened in Prefect
