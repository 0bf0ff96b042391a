"""`make deploy` registers deployments/prefect.yaml against a real local Prefect server
(started here on 127.0.0.1 with SQLite): both flows, their cron schedules and parameters."""

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow  # launches stage processes, servers or large models

REPO = Path(__file__).resolve().parents[1]


def test_make_deploy_registers_scheduled_deployments(server):
    url, env = server
    r = subprocess.run(
        ["make", "--no-print-directory", "deploy"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**env, "PREFECT_API_URL": url},
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    deps = httpx.post(f"{url}/deployments/filter", json={}).json()
    by_name = {d["name"]: d for d in deps}
    assert set(by_name) == {"nightly-rlhf", "weekly-dpo", "stage-runner", "promote-checkpoint"}
    crons = {n: [s["schedule"]["cron"] for s in d["schedules"]] for n, d in by_name.items()}
    assert crons == {
        "nightly-rlhf": ["0 2 * * *"],
        "weekly-dpo": ["0 4 * * 0"],
        "stage-runner": [],
        "promote-checkpoint": [],
    }
    assert all(s["active"] for d in deps for s in d["schedules"])
    deps = [d for d in deps if d["name"] not in ("stage-runner", "promote-checkpoint")]
    assert by_name["weekly-dpo"]["parameters"] == {
        "config": "demo",
        "overrides": {"dpo": {"beta": 0.1}},
    }
    assert by_name["nightly-rlhf"]["entrypoint"] == "flows/pipeline.py:rlhf_pipeline"
    assert by_name["nightly-rlhf"]["work_pool_name"] == "mindrlhf-local"
    flows = {f["id"]: f["name"] for f in httpx.post(f"{url}/flows/filter", json={}).json()}
    assert {flows[d["flow_id"]] for d in deps} == {"rlhf-pipeline", "dpo-only"}
    # the automation example registers as written and reacts to the watch's event
    prefect = str(Path(sys.executable).parent / "prefect")
    r = subprocess.run(
        [prefect, "automation", "create", "--from-file", "deployments/automations.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**env, "PREFECT_API_URL": url},
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    autos = httpx.post(f"{url}/automations/filter", json={}).json()
    (auto,) = [a for a in autos if a["name"] == "mindrlhf-reward-hacking-pauses-schedule"]
    assert auto["trigger"]["expect"] == ["mindrlhf.reward_hacking.suspected"]
    assert [a["type"] for a in auto["actions"]] == ["pause-deployment"]


def test_stage_runs_on_a_work_pool_through_a_real_worker(server, tmp_path):
    """runner.work_pool: the SFT task submits the stage-runner deployment and a process worker
    on that pool (started here) runs the stage; the flow gets the same checkpoint as a local run."""
    import sys

    import yaml

    from conftest import tiny_overrides
    from mindrlhf.config import load_config

    url, env = server
    env = {**env, "PREFECT_API_URL": url}
    bin_dir = Path(sys.executable).parent
    r = subprocess.run(
        ["make", "--no-print-directory", "deploy"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    worker = subprocess.Popen(
        [str(bin_dir / "prefect"), "worker", "start", "--pool", "mindrlhf-local"],
        cwd=REPO,
        env={**env, "MINDRLHF_REPO": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def config(root, pool):
            over = tiny_overrides(root)
            over["runner"] = {"work_pool": pool}
            base = load_config("demo").to_dict()
            merged = {
                k: (
                    {**base[k], **over[k]}
                    if isinstance(base.get(k), dict) and k in over
                    else over.get(k, base[k])
                )
                for k in base
            }
            p = tmp_path / f"{pool or 'local'}.yaml"
            p.write_text(yaml.safe_dump(merged))
            return p

        out = {}
        for pool in ("", "mindrlhf-local"):
            r = subprocess.run(
                [
                    str(bin_dir / "mindrlhf"),
                    "run",
                    str(config(tmp_path / f"store-{pool or 'local'}", pool)),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                env=env,
                timeout=900,
            )
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            out[pool] = r.stdout
        runs = httpx.post(f"{url}/flow_runs/filter", json={}).json()
        runner_runs = [
            fr for fr in runs if fr.get("deployment_id") and fr["state_type"] == "COMPLETED"
        ]
        assert (
            len(runner_runs) >= 2
        )  # prepare and sft each ran as a stage-runner flow run on the pool
        ck = [
            ln.split()[2]
            for o in out.values()
            for ln in o.splitlines()
            if ln.startswith("SFT checkpoint")
        ]
        assert len(ck) == 2 and ck[0] == ck[1]
    finally:
        worker.terminate()
        worker.wait(timeout=30)
