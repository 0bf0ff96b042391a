"""`make deploy` registers deployments/prefect.yaml against a real local Prefect server
(started here on 127.0.0.1 with SQLite): both flows, their cron schedules and parameters."""
import subprocess
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def test_make_deploy_registers_scheduled_deployments(server):
    url, env = server
    r = subprocess.run(["make", "--no-print-directory", "deploy"], cwd=REPO, capture_output=True, text=True,
                       env={**env, "PREFECT_API_URL": url}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    deps = httpx.post(f"{url}/deployments/filter", json={}).json()
    by_name = {d["name"]: d for d in deps}
    assert set(by_name) == {"nightly-rlhf", "weekly-dpo"}
    crons = {n: [s["schedule"]["cron"] for s in d["schedules"]] for n, d in by_name.items()}
    assert crons == {"nightly-rlhf": ["0 2 * * *"], "weekly-dpo": ["0 4 * * 0"]}
    assert all(s["active"] for d in deps for s in d["schedules"])
    assert by_name["weekly-dpo"]["parameters"] == {"config": "demo", "overrides": {"dpo": {"beta": 0.1}}}
    assert by_name["nightly-rlhf"]["entrypoint"] == "flows/pipeline.py:rlhf_pipeline"
    assert by_name["nightly-rlhf"]["work_pool_name"] == "mindrlhf-local"
    flows = {f["id"]: f["name"] for f in httpx.post(f"{url}/flows/filter", json={}).json()}
    assert {flows[d["flow_id"]] for d in deps} == {"rlhf-pipeline", "dpo-only"}
