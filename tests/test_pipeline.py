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


def run_graph_parents() -> dict[str, set[str]]:
    """Task name -> the names of its parents in the newest flow run's graph (graph-v2 endpoint);
    repeated names (online DPO rounds) are numbered in start order: online_dpo#1, #2."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    newest = {"sort": "START_TIME_DESC", "limit": 1}
    fr = httpx.post(f"{api}/flow_runs/filter", json=newest).json()[0]
    graph = httpx.get(f"{api}/flow_runs/{fr['id']}/graph-v2").json()
    nodes = sorted(graph["nodes"], key=lambda n: n[1]["start_time"] or "")
    names, seen = {}, {}
    for node_id, node in nodes:
        base = node["label"].rsplit("-", 1)[0]
        seen[base] = seen.get(base, 0) + 1
        numbered = base in ("online_dpo", "ppo", "evaluate")
        names[node_id] = f"{base}#{seen[base]}" if numbered else base
    return {names[i]: {names[p["id"]] for p in n["parents"]} for i, n in nodes}


def lineage_artifact_svg(key: str) -> str:
    """The SVG inside the newest markdown artifact under ``key``."""
    import base64
    import re

    import httpx
    from prefect.settings import PREFECT_API_URL

    latest = httpx.post(
        f"{PREFECT_API_URL.value()}/artifacts/latest/filter",
        json={"artifacts": {"key": {"any_": [key]}}},
    ).json()
    assert latest, f"no artifact {key}"
    img = re.search(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", latest[0]["data"]).group(1)
    return base64.b64decode(img).decode()


def key(kind, art_id):
    return f"mindrlhf://{kind}/{art_id}"


def materialization_events() -> list[dict]:
    """Every asset materialization event on the server, all pages."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    flt = {
        "filter": {"event": {"prefix": ["prefect.asset.materialization.succeeded"]}},
        "limit": 50,
    }
    r = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=flt)
    events = []
    while True:
        r.raise_for_status()
        page = r.json()
        events += page["events"]
        if not page.get("next_page"):
            return events
        r = httpx.get(page["next_page"])


def named_events(name: str, at_least: int = 0, quiet_s: float = 3.0, timeout: float = 60):
    """Events called ``name`` on the server, oldest first: once there are ``at_least`` and none
    has arrived for ``quiet_s`` (they are delivered asynchronously)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    flt = {"filter": {"event": {"name": [name]}, "order": "ASC"}, "limit": 50}
    last, since, deadline = None, time.time(), time.time() + timeout
    while time.time() < deadline:
        events = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=flt).json()["events"]
        if last is None or len(events) != len(last):
            last, since = events, time.time()
        elif len(events) >= at_least and time.time() - since >= quiet_s:
            return events
        time.sleep(0.5)
    return last


def production(store):
    from mindrlhf.data.store import ArtifactNotFound

    try:
        return store.resolve("tiny-production")
    except ArtifactNotFound:
        return None


def never_stops(tensors: dict, eos: int) -> dict:
    """A GPT-2-layout policy that never ends its answer: the final LayerNorm outputs a constant
    pointing away from EOS's embedding, so EOS has the lowest logit at every step."""
    t = {k: v.copy() for k, v in tensors.items()}
    t["model.norm.weight"][:] = 0.0
    t["model.norm.bias"][:] = -10.0 * t["model.embed_tokens"][eos]
    return t


def settled_events(quiet_s: float = 3.0, timeout: float = 60) -> list[dict]:
    """The events once none has arrived for ``quiet_s`` (they are delivered asynchronously)."""
    deadline, last, since = time.time() + timeout, None, time.time()
    while time.time() < deadline:
        events = materialization_events()
        if last is None or len(events) != len(last):
            last, since = events, time.time()
        elif time.time() - since >= quiet_s:
            return events
        time.sleep(0.5)
    return last


def newest_flow_run_id() -> str:
    import httpx
    from prefect.settings import PREFECT_API_URL

    newest = {"sort": "START_TIME_DESC", "limit": 1}
    return httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/filter", json=newest).json()[0]["id"]


def asset_edges(ready, timeout=60, flow_run: str | None = None) -> dict[str, set[str]]:
    """asset key -> keys of its upstream assets, from the materialization events on the server
    (only those of ``flow_run``: other runs of the session materialize some of the same assets)."""
    deadline = time.time() + timeout
    while True:
        edges = {}
        for e in materialization_events():
            if flow_run and not any(
                x["prefect.resource.id"] == f"prefect.flow-run.{flow_run}" for x in e["related"]
            ):
                continue
            ups = {
                x["prefect.resource.id"]
                for x in e["related"]
                if x.get("prefect.resource.role") == "asset"
            }
            edges.setdefault(e["resource"]["prefect.resource.id"], set()).update(ups)
        if ready(edges) or time.time() > deadline:
            return edges
        time.sleep(1)


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
    over["pipeline"]["stages"].append("evaluate")  # and the promotion gate after them
    over["evaluate"] = {"n_prompts": 12}
    # GRPO's reward-hacking watch on, probing after every iteration (VADER as a stand-in gold
    # judge): its probes ride through the chunked run below, which must still match
    over["grpo"].update(
        gold_reward="movie_reviews",
        hacking_probe_every=1,
        hacking_probe_prompts=8,
        hacking_probe_samples=1,
    )
    s = rlhf_pipeline("demo", over)
    first_run = newest_flow_run_id()
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
    # in iteration order: the metrics artifact lists them by id, and ids are content hashes
    rollouts = sorted(store.get(metrics).parents, key=lambda r: store.get(r).meta["iteration"])
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
    edges = asset_edges(lambda e: len(e) >= 10 and key("checkpoint", ppo) in e, flow_run=first_run)
    assert {key("checkpoint", rm), key("checkpoint", sft)} <= edges[key("checkpoint", ppo)]
    assert key("checkpoint", sft) in edges[key("checkpoint", rm)]
    assert key("dataset", s["datasets"]["sft_train"]) in edges[key("checkpoint", sft)]
    assert key("checkpoint", sft) in edges[key("checkpoint", s["dpo"]["checkpoint"])]
    # upstreams are exact: a recipe's text table has only the package it was read from ...
    reviews, arith = (s["datasets"][f"{r}_sft_train_text"] for r in ("movie_reviews", "arithmetic"))
    assert edges[key("dataset", reviews)] == {"pypi://vaderSentiment/3.3.2"}
    assert edges[key("dataset", arith)] == {"pypi://reasoning-gym/0.1.25"}
    # ... and a stage-level table exactly its own text tables, not its sibling outputs
    assert edges[key("dataset", s["datasets"]["sft_train"])] == {
        key("dataset", reviews),
        key("dataset", arith),
    }
    # ... and what a stage wrote on the way is an asset too: each rollout under its inputs
    assert edges[key("dataset", rollouts[0])] == {
        key("dataset", s["datasets"]["prompts_movie_reviews_train"]),
        key("checkpoint", sft),
        key("checkpoint", rm),
    }

    # the run graph has edges (Prefect's own graph endpoint): each stage after the stages whose
    # outputs it reads, each asset task after its stage, the online DPO rounds in a chain
    parents = run_graph_parents()
    assert {"prepare", "sft", "rm"} <= parents["ppo#1"] and {"prepare", "sft"} <= parents["rm"]
    assert parents["sft"] == {"prepare"} and "reflogp" in parents["dpo"]
    assert "sft" in parents["grpo"]
    assert parents["online_dpo#2"] >= {"online_dpo#1", "rm", "sft"}
    assert parents["ppo-assets"] == {"ppo#1"} and parents["prepare-assets"] == {"prepare"}
    assert {"ppo#1", "prepare"} <= parents["evaluate#1"]  # the gate: candidate, production
    assert {"evaluate#1", "evaluate#2"} <= parents["promote"]
    # the run's lineage picture, under a stable key: every final output and its ancestry in it
    svg = lineage_artifact_svg("lineage-tiny")
    for out in (
        sft,
        rm,
        ppo,
        s["grpo"]["checkpoint"],
        s["dpo"]["checkpoint"],
        s["online_dpo"]["checkpoint"],
    ):
        assert f"@{out[:8]}" in svg
    assert "vaderSentiment==3.3.2" in svg and "tiny-ppo-rollouts" in svg

    # the gate judged the PPO policy against the SFT policy it came from (nothing in production)
    pr = s["promotion"]
    dec = store.read_dataset(pr["decision"]).to_pylist()[0]
    assert (dec["candidate"], dec["incumbent"], dec["metric"]) == (ppo, sft, "judge")
    ev_c, ev_i = (store.read_dataset(e) for e in store.get(pr["decision"]).parents)
    assert ev_c.num_rows == ev_i.num_rows == 12
    assert ev_c.column("prompt").to_pylist() == ev_i.column("prompt").to_pylist()
    for ev in (ev_c, ev_i):  # the judge is VADER on the very answers recorded
        gold = load_recipe("movie_reviews").gold_reward(
            ev.column("prompt").to_pylist(), ev.column("response").to_pylist()
        )
        np.testing.assert_allclose(ev.column("judge").to_numpy(), gold, atol=1e-9)
    assert dec["candidate_mean"] == pytest.approx(float(np.mean(ev_c.column("judge"))))
    assert dec["delta"] == pytest.approx(dec["candidate_mean"] - dec["incumbent_mean"])
    assert dec["promoted"] == (dec["low"] > 0) and dec["low"] <= dec["delta"] <= dec["high"]
    assert (production(store) == ppo) == dec["promoted"]
    decided = named_events("mindrlhf.promotion.decided", at_least=1)
    assert [e["payload"]["candidate"] for e in decided] == [ppo]
    assert float(decided[0]["payload"]["delta"]) == pytest.approx(dec["delta"])

    from datetime import datetime, timezone

    rerun_start = datetime.now(timezone.utc)
    again = rlhf_pipeline("demo", over)
    assert set(again["states"].values()) == {"Cached"}
    # a cached run re-emits nothing (events carry the time they were emitted; the server
    # persists them a few seconds later, hence the longer quiet spell)
    late = [
        e["resource"]["prefect.resource.id"]
        for e in settled_events(quiet_s=8.0)
        if datetime.fromisoformat(e["occurred"].replace("Z", "+00:00")) >= rerun_start
    ]
    assert late == []
    assert len(named_events("mindrlhf.promotion.decided")) == 1  # and decides nothing again
    assert production(store) == (ppo if dec["promoted"] else None)
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

    # PPO and GRPO as chains of one-iteration tasks, each handing its training state to the next:
    # the checkpoints of the single tasks, byte for byte
    one_by_one = {
        **over,
        "pipeline": {"stages": ["prepare", "sft", "rm", "ppo", "grpo"]},
        "ppo": {**over["ppo"], "iterations_per_task": 1},
        "grpo": {**over["grpo"], "iterations_per_task": 1},
    }
    chunked = rlhf_pipeline("demo", one_by_one)
    assert chunked["states"]["ppo_0"] == chunked["states"]["ppo_1"] == "Completed"
    assert chunked["states"]["grpo_0"] == chunked["states"]["grpo_1"] == "Completed"
    assert chunked["ppo"]["checkpoint"] == ppo
    assert chunked["grpo"]["checkpoint"] == s["grpo"]["checkpoint"]
    probes = store.get(s["grpo"]["checkpoint"]).meta["hacking_probes"]
    assert [p[0] for p in probes] == [0, 1, 2]  # before the loop and after each iteration
    state = store.get("tiny-ppo-state-1")
    assert state.meta["kind"] == "training_state" and sft in state.parents
    assert store.get(rollouts[0]).id in state.parents
    assert run_graph_parents()["ppo#2"] >= {"ppo#1"}  # the second chunk after the first
    assert rlhf_pipeline("demo", one_by_one)["states"]["ppo_1"] == "Cached"

    # the gate on policies whose order is known: the tiny PPO policy answers with EOS at once (it
    # writes nothing), an edited copy of it never stops; the judge, a user function, counts what
    # they wrote
    from flows.promote import promote_pipeline

    writer = store.write_checkpoint(
        never_stops(store.read_checkpoint(ppo), tok.eos_id),
        name="tiny-writer",
        parents=[ppo],
        meta={**store.get(ppo).meta, "stage": "edited"},
    ).id
    judge = tmp_path / "judges.py"
    judge.write_text(
        "def written(prompts, completions, **columns):\n"
        "    return [float(len(c.replace('<|endoftext|>', ''))) for c in completions]\n"
    )
    by_length = {**over, "evaluate": {"n_prompts": 12, "judge": f"python:{judge}:written"}}
    store.set_ref("tiny-production", ppo)
    better = promote_pipeline("demo", writer, by_length)["promotion"]
    scores = better["scores"]
    assert scores["production"]["judge_mean"] < scores["candidate"]["judge_mean"]
    assert scores["candidate"]["length_mean"] == 6  # generation.max_new_tokens, every prompt
    assert better["promoted"] and better["incumbent"] == ppo and production(store) == writer
    worse = promote_pipeline("demo", ppo, by_length)
    assert not worse["promotion"]["promoted"] and production(store) == writer
    assert worse["states"]["evaluate_candidate"] == "Cached"  # both evaluated a moment ago
    assert worse["states"]["evaluate_production"] == "Cached"
    unchanged = promote_pipeline("demo", writer, by_length)
    assert "promote" not in unchanged["states"] and production(store) == writer
    decided = named_events("mindrlhf.promotion.decided", at_least=3)
    assert [(e["payload"]["candidate"], e["payload"]["promoted"]) for e in decided[1:]] == [
        (writer, True),
        (ppo, False),
    ]


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
