"""Orchestration overhead, measured in one run: an uncached pipeline (prepare -> sft) under
Prefect with Prefect's share of the wall time (everything that is not the stage processes'
own run time: server start, task bookkeeping, caching, log streaming, asset events), then the
fully cached re-run's wall time.

    python bench/orchestration.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    os.environ["PREFECT_HOME"] = str(tmp / "prefect-home")
    from flows.pipeline import rlhf_pipeline
    from mindrlhf.data.store import ArtifactStore

    over = {
        "store": {"root": str(tmp / "store")},
        "pipeline": {"stages": ["prepare", "sft"]},
        "data": {"limit": 1000, "arithmetic_size": 300},
        "sft": {"steps": args.steps, "ckpt_every": 10, "log_every": 5, "eval_batches": 1},
        "generation": {"max_new_tokens": 4},
    }
    t = time.perf_counter()
    first = rlhf_pipeline("demo", over)
    wall1 = time.perf_counter() - t
    runs = Path(over["store"]["root"]) / "runs"
    stage_s = sum(json.loads(p.read_text())["seconds"] for p in runs.glob("*/result.json"))
    t = time.perf_counter()
    again = rlhf_pipeline("demo", over)
    wall2 = time.perf_counter() - t
    assert set(again["states"].values()) == {"Cached"}, again["states"]
    print(
        json.dumps(
            {
                "bench": "orchestration",
                "stages": list(first["states"]),
                "uncached_wall_s": round(wall1, 2),
                "stage_process_s": round(stage_s, 2),
                "prefect_share_of_uncached": round((wall1 - stage_s) / wall1, 3),
                "cached_rerun_wall_s": round(wall2, 2),
                "cached_states": again["states"],
                "artifacts": len(ArtifactStore(over["store"]["root"]).list()),
            }
        )
    )


if __name__ == "__main__":
    main()
