"""Soak: one pipeline config launched 4 times at once, with one stage process killed with SIGKILL
at a random moment, for 3 rounds (the store wiped between rounds, so every round trains again).

    .venv/bin/python tests/soak.py [--rounds 3] [--runs 4] [--bound-s 1200]

Checks, printed as JSON: every run ends within the bound (no hang) and exits 0; one artifact id
per stage across all runs and rounds (no forked ids); `mindrlhf verify` finds the store clean
after each round; no process of a stage, msrun or the watchdog is left running. Exits 1 if any
check fails. Not part of `make test` (about 10 minutes); `make soak` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import tiny_full_overrides  # noqa: E402
from mindrlhf.config import load_config  # noqa: E402

STAGE_MARKERS = ("mindrlhf.stages.", "stage_entry.py", "mindrlhf.watchdog", "msrun")
SUMMARY_ID = re.compile(r"^(SFT|RM|PPO|GRPO|DPO):? checkpoint ([0-9a-f]{16})", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_procs(root: Path) -> list:
    """Processes of this soak's stages: their command names its store; a stage's watchdog
    (``mindrlhf.watchdog <launcher> <t> <stage pid>``) is ours if its stage is, or is gone."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        args = p.info["cmdline"] or []
        cmd = " ".join(args)
        if not any(m in cmd for m in STAGE_MARKERS):
            continue
        if "mindrlhf.watchdog" in cmd:
            try:
                stage = " ".join(psutil.Process(int(args[-1])).cmdline())
            except (psutil.Error, ValueError, IndexError):
                stage = str(root)  # its stage is gone and it is still here: an orphan
            if str(root) in stage:
                out.append(p)
        elif str(root) in cmd:
            out.append(p)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--bound-s", type=float, default=1200.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="mindrlhf-soak-"))
    root = work / "store"
    over = tiny_full_overrides(root)
    over["pipeline"]["stages"] = ["prepare", "sft", "rm", "dpo"]
    over["sft"].update(steps=30, ckpt_every=5)
    over["rm"].update(steps=12, ckpt_every=3)
    over["dpo"].update(steps=12, ckpt_every=3)
    cfg_path = work / "soak.yaml"
    cfg_path.write_text(yaml.safe_dump(load_config("demo", over).to_dict()))

    home, port = work / "prefect", free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    report: dict = {"rounds": [], "config": str(cfg_path)}
    ok = True
    try:
        for _ in range(120):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        ids_seen: dict[str, set] = {}
        for r in range(args.rounds):
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.time()
            runs = []
            for i in range(args.runs):
                log = open(work / f"round{r}-run{i}.log", "w")
                runs.append(
                    (
                        subprocess.Popen(
                            [str(BIN / "mindrlhf"), "run", str(cfg_path)],
                            env=env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            cwd=REPO,
                        ),
                        log,
                    )
                )
                time.sleep(rnd.uniform(0.0, 2.0))
            killed = None
            kill_at = t0 + rnd.uniform(5.0, 25.0)  # a run takes ~35-65 s: land inside it
            while time.time() < kill_at and any(p.poll() is None for p, _ in runs):
                time.sleep(0.2)
            victims = [
                p for p in stage_procs(root) if "mindrlhf.watchdog" not in " ".join(p.cmdline())
            ]
            if victims:
                v = rnd.choice(victims)
                killed = " ".join(v.cmdline())[:120]
                v.send_signal(signal.SIGKILL)
            ends = []
            for p, log in runs:
                left = max(1.0, args.bound_s - (time.time() - t0))
                try:
                    rc = p.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    p.kill()
                    rc = "hung"
                log.close()
                ends.append({"rc": rc, "s": round(time.time() - t0, 1)})
            ids = {}
            for i in range(args.runs):
                text = (work / f"round{r}-run{i}.log").read_text(errors="replace")
                for stage, art in SUMMARY_ID.findall(text):
                    ids.setdefault(stage, set()).add(art)
                    ids_seen.setdefault(stage, set()).add(art)
            verify = subprocess.run(
                [str(BIN / "mindrlhf"), "verify", "--store", str(root)],
                capture_output=True,
                text=True,
            )
            time.sleep(3)  # watchdogs notice within a second
            orphans = [" ".join(p.cmdline())[:120] for p in stage_procs(root)]
            rec = {
                "round": r,
                "killed": killed,
                "runs": ends,
                "ids": {k: sorted(v) for k, v in ids.items()},
                "verify": verify.stdout.strip().splitlines()[-1]
                if verify.stdout.strip()
                else verify.stderr,
                "verify_rc": verify.returncode,
                "orphans": orphans,
            }
            rec["ok"] = (
                all(e["rc"] == 0 for e in ends)
                and all(len(v) == 1 for v in ids.values())
                and set(ids) == {"SFT", "RM", "DPO"}
                and verify.returncode == 0
                and not orphans
            )
            ok &= rec["ok"]
            report["rounds"].append(rec)
            print(json.dumps(rec), flush=True)
        report["one_id_per_stage_across_rounds"] = all(len(v) == 1 for v in ids_seen.values())
        ok &= report["one_id_per_stage_across_rounds"]
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    report["ok"] = ok
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
