"""DPO and PPO on the real SmolLM2-135M-Instruct with the movie-review data: do they make its
reviews more positive by a judge they never trained on?

The chain is the pipeline's own stages (processes through mindrlhf.launch, cached in the store):
prepare (movie reviews only) -> import of the pinned GGUF -> SFT on review sentences -> an RM on
pairs of sentences whose mean human ratings differ (Hutto & Gilbert 2014) -> PPO against that RM;
and reference log-probs -> DPO on the same pairs, from the same SFT. Then the evaluate stage has
the SFT, the DPO and the PPO policies answer the same ``--prompts`` held-out review openings,
sampled at temperature 1 with the same random streams, and scores each answer by the RM, by VADER
(the gold judge: a lexicon scorer of the finished review, never optimised) and by its log-ratio
to the SFT policy (its mean over sampled answers is the KL). Differences policy - SFT are paired
per prompt; their 95% intervals are paired bootstraps (mindrlhf/promote.py).

    .venv/bin/python results/movie_smollm2.py [--dpo-steps 40] [--ppo-iterations 16]

Prints JSON (also results/movie_smollm2.json) and writes results/movie_smollm2.png: DPO's
training-batch preference accuracy and PPO's rollout VADER / RM means against each stage's wall
clock (left), and the held-out VADER of the three policies with their intervals (right)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", default="artifacts")
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--rm-steps", type=int, default=40)
    ap.add_argument("--dpo-steps", type=int, default=40)
    ap.add_argument("--ppo-iterations", type=int, default=12, help="0: no PPO")
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--prompts", type=int, default=160, help="held-out prompts evaluated")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    os.environ["MINDRLHF_LOG_METRICS"] = "1"
    import numpy as np

    from mindrlhf.config import load_config
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.keys import stage_key
    from mindrlhf.launch import run_stage
    from mindrlhf.promote import paired_bootstrap

    over = {
        "name": "movie-smollm2",
        "store": {"root": args.store},
        "pipeline": {"stages": ["prepare", "sft", "rm", "ppo", "dpo", "evaluate"]},
        "data": {
            "recipes": ["movie_reviews"],
            "max_prompt_len": 16,
            "max_len": 64,
            "limit": 2000,
            "pairs": args.pairs,
            "pair_margin": 2.0,
        },
        "sft": {"steps": args.sft_steps, "batch_size": 8, "lr": 2e-5, "ckpt_every": 20},
        "rm": {"steps": args.rm_steps, "batch_size": 8, "lr": 1e-5, "ckpt_every": 20},
        "ppo": {
            "iterations": args.ppo_iterations,
            "rollout_batch": 16,
            "mini_batch": 8,
            "ppo_epochs": 1,
            "lr": 2e-6,
            "critic_lr": 1e-5,
            "kl_coef": 0.05,
            "ckpt_every": 4,
            "eval_prompts": 32,
            "hacking_probe_every": 4,
            "hacking_probe_prompts": 32,
            "hacking_probe_samples": 1,
        },
        "dpo": {
            "steps": args.dpo_steps,
            "batch_size": 8,
            "lr": 5e-6,
            "beta": 0.1,
            "ckpt_every": 20,
            "log_every": 4,
        },
        "generation": {"max_new_tokens": args.max_new_tokens},
        "evaluate": {
            "prompts": "movie_reviews",
            "judge": "movie_reviews",
            "n_prompts": args.prompts,
            "greedy": False,
        },
    }
    cfg = load_config("smollm2-135m", over)
    store = ArtifactStore(cfg.store.root)
    marks: list[tuple[float, dict]] = []

    def log(line: str) -> None:
        if line.startswith("METRIC "):
            marks.append((time.perf_counter(), json.loads(line[len("METRIC ") :])))

    walls: dict[str, float] = {}
    curves: dict[str, list] = {}

    def stage(name: str, inputs: dict, label: str | None = None) -> dict:
        key = stage_key(name, cfg.to_dict(), inputs)[:16]
        run_dir = Path(cfg.store.root) / "runs" / f"results-{name}-{key}"
        done, saved = run_dir / "result.json", run_dir / "curve.json"
        if done.exists():  # a stage this script already ran (same key): its result, not a rerun
            res = json.loads(done.read_text())
            walls[label or name] = round(res["seconds"], 1)  # the stage process's own time
            if saved.exists():
                curves[label or name] = json.loads(saved.read_text())
            else:  # ran before curves were kept: its logged history, steps spread over its time
                h = [x for x in res.get("history", []) if "step" in x]
                last = max((x["step"] for x in h), default=1) or 1
                curves[label or name] = [(x["step"] / last * res["seconds"], x) for x in h]
            return res
        marks.clear()
        t0 = time.perf_counter()
        res = run_stage(name, cfg, inputs, cfg.store.root, run_dir, log=log)
        walls[label or name] = round(time.perf_counter() - t0, 1)
        curves[label or name] = [(round(t - t0, 1), m) for t, m in marks]
        saved.write_text(json.dumps(curves[label or name]))
        return res

    t_start = time.perf_counter()
    d = stage("prepare", {})["outputs"]
    imported = stage("import_weights", {})["outputs"]["checkpoint"]
    sft = stage("sft", {"train": d["sft_train"], "heldout": d["sft_heldout"], "init": imported})
    sft_ckpt = sft["outputs"]["checkpoint"]
    pairs = {"train": d["pairs_train"], "heldout": d["pairs_heldout"]}
    rm = stage("rm", {**pairs, "sft": sft_ckpt})
    rm_ckpt = rm["outputs"]["checkpoint"]
    ref = stage("reflogp", {**pairs, "model": sft_ckpt})
    dpo = stage(
        "dpo",
        {
            **pairs,
            "sft": sft_ckpt,
            "ref_train": ref["outputs"]["train"],
            "ref_heldout": ref["outputs"]["heldout"],
        },
    )
    policies = {"sft": sft_ckpt, "dpo": dpo["outputs"]["checkpoint"]}
    ppo = None
    if args.ppo_iterations:  # 0: DPO only
        ppo = stage(
            "ppo",
            {
                "prompts": d["prompts_movie_reviews_train"],
                "heldout": d["prompts_movie_reviews_heldout"],
                "sft": sft_ckpt,
                "rm": rm_ckpt,
            },
        )
        policies["ppo"] = ppo["outputs"]["checkpoint"]
    scores = {}
    for name, ckpt in policies.items():
        res = stage(
            "evaluate",
            {
                "policy": ckpt,
                "prompts": d["prompts_movie_reviews_heldout"],
                "sft": sft_ckpt,
                "rm": rm_ckpt,
            },
            f"evaluate_{name}",
        )
        scores[name] = store.read_dataset(res["outputs"]["scores"]).to_pydict()
    total = time.perf_counter() - t_start
    n = len(scores["sft"]["judge"])
    assert all(s["prompt"] == scores["sft"]["prompt"] for s in scores.values())

    def interval(x, y=None) -> dict:
        x = np.asarray(x, np.float64)
        y = np.zeros_like(x) if y is None else np.asarray(y, np.float64)
        mean, lo, hi = paired_bootstrap(x, y, resamples=4000)
        return {"mean": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)]}

    held = {}
    for name, s in scores.items():
        held[name] = {
            "vader": interval(s["judge"]),
            "rm": interval(s["rm"]),
            "kl_to_sft": interval(s["logratio"]),
            "length": round(float(np.mean(s["length"])), 2),
        }
        if name != "sft":
            held[name]["vader_minus_sft"] = interval(s["judge"], scores["sft"]["judge"])
            held[name]["rm_minus_sft"] = interval(s["rm"], scores["sft"]["rm"])
    dm, pm = dpo["metrics"], (ppo["metrics"] if ppo else {})
    examples = [
        {k: scores[k]["response"][i] for k in policies} | {"prompt": scores["sft"]["prompt"][i]}
        for i in range(4)
    ]
    out = {
        "experiment": "movie_smollm2",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
        "data": "vaderSentiment 3.3.2 movie-review sentences with mean human ratings",
        "settings": {k: over[k] for k in ("data", "sft", "rm", "ppo", "dpo", "generation")},
        "heldout_prompts": n,
        "sampling": "temperature 1, same seeds for every policy",
        "heldout": held,
        "dpo_preference_accuracy": {
            "heldout_pairs": store.read_dataset(d["pairs_heldout"]).num_rows,
            "implicit_reward_sft": dm["heldout_reward_accuracy_sft"],
            "implicit_reward_dpo": dm["heldout_reward_accuracy_dpo"],
            "likelihood_sft": dm["heldout_likelihood_accuracy_sft"],
            "likelihood_dpo": dm["heldout_likelihood_accuracy_dpo"],
        },
        "rm_heldout_accuracy": {
            "sft_init": rm["metrics"]["heldout_accuracy_before"],
            "trained": rm["metrics"]["heldout_accuracy"],
        },
        "ppo_stage_metrics": {
            k: pm[k] for k in sorted(pm) if k.startswith("heldout") or k == "hacking_alarms"
        },
        "stage_wall_s": walls,
        "total_wall_s": round(total, 1),
        "peak_rss_gb": {},
        "examples": examples,
        "checkpoints": policies | {"rm": rm_ckpt},
    }
    for label, res in (("sft", sft), ("rm", rm), ("dpo", dpo), ("ppo", ppo)):
        if res is not None:
            out["peak_rss_gb"][label] = round((res.get("peak_rss_mb") or 0) / 1024, 2)
    print(json.dumps(out, indent=1))
    (HERE / "movie_smollm2.json").write_text(json.dumps(out, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    dc = [(t / 60, m["reward_accuracy"]) for t, m in curves["dpo"] if "reward_accuracy" in m]
    pc = [(t / 60, m) for t, m in curves.get("ppo", []) if "gold_mean" in m]
    if dc:
        a1.plot(*zip(*dc), marker=".", label="DPO: batch preference accuracy")
    if pc:
        a1.plot(
            [t for t, _ in pc],
            [m["gold_mean"] for _, m in pc],
            marker=".",
            label="PPO: rollout VADER",
        )
        a1b = a1.twinx()
        a1b.plot(
            [t for t, _ in pc],
            [m["reward_mean"] for _, m in pc],
            color="grey",
            alpha=0.6,
            label="PPO: rollout RM score (right)",
        )
        a1b.legend(fontsize=7, loc="lower right")
    a1.set_xlabel("wall clock (min) of each stage")
    a1.set_title("SmolLM2-135M-Instruct on movie reviews")
    a1.legend(fontsize=7, loc="upper left")
    a1.grid(alpha=0.3)
    names = list(policies)
    means = [held[k]["vader"]["mean"] for k in names]
    err = np.array(
        [
            [held[k]["vader"]["mean"] - held[k]["vader"]["ci95"][0] for k in names],
            [held[k]["vader"]["ci95"][1] - held[k]["vader"]["mean"] for k in names],
        ]
    )
    a2.bar(
        names, means, yerr=err, capsize=6, color=["grey", "tab:blue", "tab:orange"][: len(names)]
    )
    a2.set_ylabel(f"held-out VADER (mean, 95% CI), {n} prompts")
    for i, k in enumerate(names[1:], 1):
        dd = held[k]["vader_minus_sft"]
        a2.annotate(
            f"{dd['mean']:+.3f}\n[{dd['ci95'][0]:+.3f}, {dd['ci95'][1]:+.3f}]",
            (i, means[i]),
            ha="center",
            va="bottom",
            fontsize=7,
            xytext=(0, 14),
            textcoords="offset points",
        )
    a2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(HERE / "movie_smollm2.png", dpi=90)


if __name__ == "__main__":
    main()
