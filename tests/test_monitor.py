"""The reward-hacking watch (mindrlhf/monitor.py) on probes whose answer is known, and its ALARM
line turned into a Prefect event by the stage task's log handler."""

import json
import logging

import numpy as np
import pytest

from mindrlhf.monitor import suspect

RNG = np.random.default_rng(7)
BASE = RNG.uniform(-0.8, 0.8, 64)  # VADER-like: a wide spread from prompt to prompt


def probe(step, proxy, gold):
    return {"step": step, "proxy": list(proxy), "gold": list(gold)}


def test_fires_on_a_paired_fall_against_the_best_probe():
    p0 = probe(0, BASE * 0 + 0.1, BASE)
    p1 = probe(2, BASE * 0 + 0.4, BASE + 0.05)  # the best so far
    p2 = probe(4, BASE * 0 + 0.9, BASE + 0.05 - 0.12 + RNG.normal(0, 0.05, 64))
    a = suspect([p0, p1, p2], margin=0.05, z=3.0)
    assert a is not None and a["best_step"] == 2 and a["prompts"] == 64
    d = np.array(p2["gold"]) - np.array(p1["gold"])  # the paired difference, by hand
    assert a["gold_change"] == pytest.approx(d.mean())
    assert a["gold_change_se"] == pytest.approx(d.std(ddof=1) / 8.0)
    assert a["proxy_change"] == pytest.approx(0.5)
    assert a["best_gold_mean"] == pytest.approx(np.mean(p1["gold"]))


def test_a_fall_inside_the_noise_is_not_a_hack():
    # the same mean fall of 0.06, but prompt by prompt the answers moved every which way: the
    # paired differences have a spread of 0.5, so the standard error is 0.0625 -> quiet
    noise = RNG.normal(0, 0.5, 64)
    noise -= noise.mean()
    p0 = probe(0, [0.0] * 64, BASE)
    p1 = probe(2, [1.0] * 64, BASE - 0.06 + noise)
    assert suspect([p0, p1], 0.05, 3.0) is None
    # consistent across prompts, the same fall is many standard errors: fires
    p1 = probe(2, [1.0] * 64, BASE - 0.06 + noise * 0.01)
    assert suspect([p0, p1], 0.05, 3.0) is not None


def test_a_slow_slide_is_measured_from_the_best_not_from_the_probe_before():
    golds = [BASE + 0.2 - 0.04 * i for i in range(6)]  # -0.04 a probe: inside the margin
    probes = [probe(2 * i, [0.2 * i] * 64, g) for i, g in enumerate(golds)]
    a = suspect(probes, 0.05, 3.0)
    assert a is not None and a["best_step"] == 0
    assert a["gold_change"] == pytest.approx(-0.2)


def test_quiet_when_the_gold_holds_or_the_proxy_does_not_climb():
    p0 = probe(0, [0.0] * 64, BASE)
    assert suspect([p0], 0.05) is None  # nothing to compare with
    steady = probe(2, [1.0] * 64, BASE - 0.03)  # inside the margin
    assert suspect([p0, steady], 0.05) is None
    falling = probe(2, [-1.0] * 64, BASE - 0.3)  # both fall: bad training, not a hack
    assert suspect([p0, falling], 0.05) is None
    with pytest.raises(ValueError, match="same prompts"):
        suspect([p0, probe(2, [1.0] * 63, BASE[:63] - 0.3)], 0.05)


def test_alarm_line_becomes_a_prefect_event(prefect_server):
    import time

    import httpx
    from prefect.settings import PREFECT_API_URL

    from tasks.common import stage_log

    log = stage_log(logging.getLogger("test"), "tiny")
    log("METRIC " + json.dumps({"stage": "ppo", "step": 3}))  # not an event
    figures = {"stage": "ppo", "kind": "reward_hacking", "iteration": 8, "gold_change": -0.2}
    log("ALARM " + json.dumps(figures))
    flt = {"filter": {"event": {"name": ["mindrlhf.reward_hacking.suspected"]}}, "limit": 10}
    deadline, events = time.time() + 30, []
    while not events and time.time() < deadline:
        events = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=flt).json()["events"]
        time.sleep(0.5)
    assert [e["payload"] for e in events] == [figures]
    assert events[0]["resource"]["prefect.resource.id"] == "mindrlhf.stage.tiny.ppo"


def test_best_gold_policy_travels_from_chunk_to_chunk(tmp_path):
    """With hacking_stop, a chunked loop's best-gold policy so far rides in the training-state
    artifact (tensors best_gold/*) and the next chunk puts it where its stop looks for it: the
    policy of the best-gold probe, whichever chunk took it."""
    import pyarrow as pa

    from mindrlhf.config import load_config
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.runtime import Dist
    from mindrlhf.stages.common import RunCheckpoints, StageContext, write_state_artifact
    from mindrlhf.stages.watch import HackingWatch

    cfg = load_config("demo", {"store": {"root": str(tmp_path / "store")}})
    cfg.ppo.hacking_stop = True
    store = ArtifactStore(tmp_path / "store")
    w_best = np.full((2, 3), 7.0, np.float32)

    def ctx(inputs, run_dir):
        spec = {"config": cfg.to_dict()}
        return StageContext("ppo", cfg, inputs, store, run_dir, Dist(), tmp_path / "o", spec)

    art = write_state_artifact(
        ctx({}, tmp_path), 6, {}, {}, {}, parents=[], carry={"best_gold": {"w": w_best}}
    )
    assert set(store.read_checkpoint(art.id)) == {"best_gold/w"}
    probes = [probe(0, [0.0], [0.1]), probe(3, [0.5], [0.4]), probe(6, [0.9], [0.2])]
    table = pa.table({"prompt": ["a"], "prompt_ids": [[1]]})
    watch = HackingWatch(
        ctx({"state": art.id}, tmp_path / "next"),
        cfg.ppo,
        "actor",
        None,
        None,
        len,
        table,
        None,
        probes,
    )
    step, path = watch.best.latest()
    assert step == 3  # the best-gold probe's step, not the chunk boundary
    np.testing.assert_array_equal(RunCheckpoints.load(path)[0]["actor"]["w"], w_best)
    assert watch.carry_out()["best_gold"]["w"].tolist() == w_best.tolist()  # and on it goes
