"""The reward-hacking watch (mindrlhf/monitor.py) on curves whose answer is known, and its ALARM
line turned into a Prefect event by the stage task's log handler."""

import json
import logging

import numpy as np
import pytest

from mindrlhf.monitor import suspect


def test_fires_when_the_proxy_climbs_while_the_gold_falls():
    proxy = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.1]
    gold = [0.30, 0.32, 0.31, 0.33, 0.25, 0.20, 0.15, 0.10]
    a = suspect(proxy, gold, window=4, margin=0.05)
    assert a is not None
    assert a["proxy_change"] == pytest.approx(np.mean(proxy[4:]) - np.mean(proxy[:4]))
    assert a["gold_change"] == pytest.approx(np.mean(gold[4:]) - np.mean(gold[:4]))
    # only the last 2 x window iterations count: an early dip long gone does not
    assert suspect([5.0, -5.0] + proxy, [9.0, -9.0] + gold, 4, 0.05) == a


def test_a_fall_inside_the_noise_of_the_rollouts_is_not_a_hack():
    proxy = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.1]
    gold = [0.30, 0.32, 0.31, 0.33, 0.20, 0.18, 0.19, 0.17]  # down 0.13 on average
    n = [32] * 8
    # 32 samples an iteration with a spread of 0.2: the difference of the two window means has a
    # standard error of sqrt(8 * 0.2**2 / 32) / 4 = 0.025, so 0.13 is 5 of them
    a = suspect(proxy, gold, 4, 0.05, [0.2] * 8, n, z=3.0)
    assert a is not None and a["gold_change_se"] == pytest.approx(0.025)
    # a spread of 0.45 (VADER on short reviews): se 0.056, the fall is 2.3 of them -> quiet
    assert suspect(proxy, gold, 4, 0.05, [0.45] * 8, n, z=3.0) is None


def test_quiet_when_the_gold_holds_or_the_proxy_does_not_climb():
    proxy = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.1]
    steady = [0.30, 0.32, 0.31, 0.33, 0.29, 0.31, 0.30, 0.28]  # noise inside the margin
    assert suspect(proxy, steady, 4, 0.05) is None
    falling = [0.30, 0.32, 0.31, 0.33, 0.25, 0.20, 0.15, 0.10]
    assert suspect(proxy[::-1], falling, 4, 0.05) is None  # both fall: bad training, not a hack
    assert suspect(proxy[:7], falling[:7], 4, 0.05) is None  # not two windows yet
    with pytest.raises(ValueError):
        suspect([1.0], [1.0, 2.0], 1, 0.0)


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
