"""What a chunk of an RL loop costs: the demo's PPO from the demo's SFT policy and RM, run as one
stage process and as chains of ``ppo.iterations_per_task`` iterations (each chunk a fresh stage
process that loads the models, compiles its graphs and reads the training state the chunk
before wrote, as the flow runs them), side by side in one run. Prints the wall time of each, the
overhead of one extra chunk, the loop's own time per iteration, and the smallest chunk whose
overhead stays under ``--budget`` of the loop's time; checks that every chain ends with the
same checkpoint as the single process (it must: chunks are exact).

    make demo && .venv/bin/python bench/rl_chunks.py [--iterations 6] [--per 3,1]

The Prefect side of a chunk (one more task run, its cache lookup and asset events) is not in
these figures; bench/orchestration.py puts it at well under a second per task."""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", default="artifacts")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--per", default="3,1", help="chunk sizes to compare with one process")
    ap.add_argument("--budget", type=float, default=0.10)
    args = ap.parse_args()
    from mindrlhf.config import load_config
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.launch import run_stage

    over = {
        "name": "chunkbench",
        "store": {"root": args.store},
        "ppo": {"iterations": args.iterations, "ckpt_every": args.iterations},
    }
    store = ArtifactStore(load_config("demo", over).store.root)
    inputs = {
        "prompts": store.resolve("demo-prompts_movie_reviews_train"),
        "heldout": store.resolve("demo-prompts_movie_reviews_heldout"),
        "sft": store.resolve("demo-sft"),
        "rm": store.resolve("demo-rm"),
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-chunks-"))
    out: dict = {"bench": "rl_chunks", "config": "demo", "iterations": args.iterations}
    runs = {}
    for per in [0] + [int(x) for x in args.per.split(",")]:
        spans = (
            [[s, min(s + per, args.iterations)] for s in range(0, args.iterations, per)]
            if per
            else [[]]
        )
        state, seconds, t0 = None, [], time.perf_counter()
        for k, span in enumerate(spans):
            cfg = load_config("demo", {**over, "ppo": {**over["ppo"], "span": span}})
            ins = {**inputs, **({"state": state} if state else {})}
            r = run_stage(
                "ppo", cfg, ins, cfg.store.root, tmp / f"per{per}-{k}", log=lambda s: None
            )
            seconds.append(r["seconds"])
            state = r["outputs"].get("state")
        runs[per] = {
            "chunks": len(spans),
            "wall_s": round(time.perf_counter() - t0, 2),
            "stage_process_s": [round(s, 2) for s in seconds],
            "checkpoint": r["outputs"]["checkpoint"],
        }
    single = runs[0]
    out["runs"] = {("one process" if p == 0 else f"{p} per task"): v for p, v in runs.items()}
    out["identical_checkpoints"] = all(
        v["checkpoint"] == single["checkpoint"] for v in runs.values()
    )
    extra = [(v["wall_s"] - single["wall_s"]) / (v["chunks"] - 1) for p, v in runs.items() if p]
    per_chunk = max(0.0, sum(extra) / len(extra))
    # one process = one start (load, compile) + the loop + the final evaluation: taking the start
    # as one chunk's overhead, the rest per iteration over-counts the loop by the evaluation, so
    # the chunk size below errs on the large side
    per_iter = (single["wall_s"] - per_chunk) / args.iterations
    out["overhead_per_extra_chunk_s"] = round(per_chunk, 2)
    out["s_per_iteration_upper_bound"] = round(per_iter, 2)
    out["budget"] = args.budget
    out["smallest_chunk_within_budget"] = math.ceil(per_chunk / (args.budget * per_iter))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
