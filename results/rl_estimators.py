"""The online RL variants of the GRPO stage side by side on the demo: the demo config's
prepare -> SFT (trained once, shared by every run) -> GRPO on reasoning-gym arithmetic, the same
seed, once per variant: today's GRPO, RLOO, REINFORCE++, Dr. GRPO and DAPO (token-level loss,
clip-higher 0.2 / 0.28, dynamic sampling, overlong penalty). Everything else is the demo's
``grpo`` section (40 iterations, 8 prompts x 16 samples, beta 0.02, 6 new tokens).

Reported: the held-out accuracy the GRPO stage measures (``accuracy_grpo``: sampled answers,
``accuracy_greedy_grpo``: greedy, on ``grpo.eval_prompts`` held-out problems; the SFT policy's
figures beside them), the last iteration's rollout reward, KL and response length, and for DAPO
the dynamic-sampling counts.

    .venv/bin/python results/rl_estimators.py [--store /tmp/estimators_store] [--only dapo ...]

Prints JSON and writes results/rl_estimators.json. Stages run as processes through
mindrlhf.launch; a stage whose result (keyed as the pipeline keys it) is already in the store
is not run again, so the SFT trains once."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

VARIANTS = {
    "grpo": {},
    "rloo": {"estimator": "rloo"},
    "reinforce_pp": {"estimator": "reinforce_pp"},
    "dr_grpo": {"loss_agg": "dr_grpo"},
    "dapo": {
        "loss_agg": "dapo",
        "clip_low": 0.2,
        "clip_high": 0.28,
        "dynamic_sampling": True,
        "overlong_buffer": 2,
        "overlong_penalty": 1.0,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", default="/tmp/estimators_store")
    ap.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=str(HERE / "rl_estimators.json"))
    ap.add_argument(
        "--inputs",
        help="JSON of the GRPO inputs (prompts, heldout, sft) a run of this script wrote to "
        "<store>/results-memo/grpo-inputs.json: start there (prepare and SFT not run)",
    )
    args = ap.parse_args()
    os.environ["MINDRLHF_LOG_METRICS"] = "1"
    from mindrlhf.config import load_config
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.keys import stage_key
    from mindrlhf.launch import run_stage

    store = ArtifactStore(args.store)
    memo_dir = Path(args.store) / "results-memo"
    memo_dir.mkdir(parents=True, exist_ok=True)

    def stage(name: str, cfg, inputs: dict) -> dict:
        key = stage_key(name, cfg.to_dict(), inputs)[:16]
        memo = memo_dir / f"{name}-{key}.json"
        if memo.exists():
            res = json.loads(memo.read_text())
            if all(store.is_valid(a) for a in res["outputs"].values() if isinstance(a, str)):
                print(f"[{name}] cached: {key}", flush=True)
                return res
        run_dir = Path(args.store) / "runs" / f"results-{name}-{key}"
        t0 = time.perf_counter()
        res = run_stage(name, cfg, inputs, args.store, run_dir, log=lambda s: None)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        memo.write_text(json.dumps(res))
        print(f"[{name}] done in {res['wall_s']} s", flush=True)
        return res

    def config(variant: dict):
        over = {
            "store": {"root": args.store},
            "pipeline": {"stages": ["prepare", "sft", "grpo"]},
            "grpo": variant,
        }
        return load_config("demo", over)

    base = config({})
    if args.inputs:
        inputs = json.loads(Path(args.inputs).read_text())
    else:
        data = stage("prepare", base, {})["outputs"]
        sft = stage("sft", base, {"train": data["sft_train"], "heldout": data["sft_heldout"]})
        inputs = {
            "prompts": data["prompts_arithmetic_train"],
            "heldout": data["prompts_arithmetic_heldout"],
            "sft": sft["outputs"]["checkpoint"],
        }
        (memo_dir / "grpo-inputs.json").write_text(json.dumps(inputs))
    runs = {}
    for name in args.only:
        res = stage("grpo", config(VARIANTS[name]), inputs)
        m, h = res["metrics"], res["history"]
        runs[name] = {
            "settings": VARIANTS[name],
            "heldout_accuracy_sampled": m["accuracy_grpo"],
            "heldout_accuracy_greedy": m["accuracy_greedy_grpo"],
            "train_prompts_accuracy_sampled": m["train_prompts_accuracy_grpo"],
            "last_rollout_reward": round(h[-1]["reward_mean"], 4),
            "last_kl": round(h[-1]["kl"], 5),
            "last_response_length": round(h[-1]["response_length"], 2),
            "grpo_stage_wall_s": res.get("wall_s"),
            "checkpoint": res["outputs"]["checkpoint"],
        }
        if VARIANTS[name].get("dynamic_sampling"):
            runs[name]["groups_dropped_total"] = sum(x["groups_dropped"] for x in h)
            runs[name]["sampling_tries_total"] = sum(x["sampling_tries"] for x in h)
            runs[name]["groups_unfilled_total"] = sum(x["groups_unfilled"] for x in h)
        sft_m = m
    cfg = base.grpo
    out = {
        "experiment": "rl_estimators",
        "config": "demo (GPT-2 style, 3 layers, d=96, trained from scratch)",
        "task": "reasoning-gym arithmetic (1 digit), reward = the recipe's verifiable score",
        "seed": base.seed,
        "grpo": {
            "iterations": cfg.iterations,
            "prompts_per_iter": cfg.prompts_per_iter,
            "group_size": cfg.group_size,
            "beta": cfg.beta,
            "lr": cfg.lr,
            "max_new_tokens": cfg.max_new_tokens,
            "heldout_problems": cfg.eval_prompts,
        },
        "sft": {
            "checkpoint": inputs["sft"],
            "heldout_accuracy_sampled": sft_m["accuracy_sft"],
            "heldout_accuracy_greedy": sft_m["accuracy_greedy_sft"],
        },
        "runs": runs,
    }
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
