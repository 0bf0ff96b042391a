"""SFT throughput with 1 worker vs 2 data-parallel workers under msrun, same global batch,
measured in one run on this machine. Prints JSON with samples/s of the training loop and the
whole-stage wall time (msrun start-up included) for both, and their ratios.

    python bench/parallel.py [--steps 30] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mindrlhf.config import load_config
from mindrlhf.launch import run_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    over = {
        "store": {"root": str(root)},
        "data": {"limit": 2000, "arithmetic_size": 500},
        "sft": {
            "steps": args.steps,
            "batch_size": args.batch,
            "ckpt_every": 10**6,
            "log_every": 10,
            "eval_batches": 1,
        },
        "generation": {"max_new_tokens": 4},
    }
    cfg = load_config("demo", over)
    d = run_stage("prepare", cfg, {}, root, root / "runs" / "prepare", log=lambda s: None)[
        "outputs"
    ]
    inputs = {"train": d["sft_train"], "heldout": d["sft_heldout"]}
    out = {
        "bench": "data_parallel_sft",
        "model": f"{cfg.model.family} {cfg.model.n_layers}x{cfg.model.d_model}",
        "global_batch": args.batch,
        "steps": args.steps,
    }
    for workers in (1, 2):
        over["parallel"] = {"worker_num": workers, "local_worker_num": workers, "master_port": 8140}
        c = load_config("demo", over)
        t = time.perf_counter()
        res = run_stage(
            "sft", c, inputs, root, root / "runs" / f"sft-{workers}", log=lambda s: None
        )
        out[f"workers_{workers}"] = {
            "train_samples_per_s": round(res["metrics"]["train_samples_per_s"], 2),
            "stage_wall_s": round(time.perf_counter() - t, 1),
            "final_loss": round(res["metrics"]["train_loss_last"], 4),
        }
    w1, w2 = out["workers_1"], out["workers_2"]
    out["train_throughput_ratio_2_vs_1"] = round(
        w2["train_samples_per_s"] / w1["train_samples_per_s"], 3
    )
    out["stage_wall_ratio_2_vs_1"] = round(w1["stage_wall_s"] / w2["stage_wall_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
