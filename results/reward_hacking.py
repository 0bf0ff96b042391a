"""Reward hacking, built on purpose, and what the watch makes of it. PPO is run twice from the
demo's SFT policy with the same settings: against the demo's reward model, and against a reward
model trained on the same preference pairs with chosen and rejected swapped (a labelling
mistake that happens: a column mix-up in an annotation export). The second RM rewards what the
raters liked least; the gold judge (VADER, which the policy never sees) measures what they
liked. The reward-hacking watch (mindrlhf/monitor.py, ppo.hacking_* at their defaults,
hacking_stop on) should fire on the second run -- which then stops, keeping its best-gold policy
-- and stay quiet on the first. results/README.md has what it did.

    make demo && .venv/bin/python results/reward_hacking.py      # ~8 minutes on 2 CPU cores

Prints JSON (also written to results/reward_hacking.json) and writes results/reward_hacking.png
(RM score and gold per iteration, alarms marked). Stages run as processes through
mindrlhf.launch, in the demo's store, under the config name ``hackdemo``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def flipped(store, ref: str) -> str:
    t = store.read_dataset(ref)
    swap = {"chosen_ids": "rejected_ids", "rejected_ids": "chosen_ids"}
    art = store.write_dataset(
        t.rename_columns([swap.get(c, c) for c in t.column_names]),
        name=f"{ref}-flipped",
        parents=[store.resolve(ref)],
        meta={"edited": "chosen and rejected swapped (a labelling mistake, on purpose)"},
    )
    return art.id


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="artifacts")
    args = ap.parse_args()
    from mindrlhf.config import load_config
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.keys import stage_key
    from mindrlhf.launch import run_stage

    # the watch at its defaults; hacking_stop: a run that fires ends there, keeping its best-gold
    # policy (a run that never fires is the same as without it)
    # under its own name, so the refs of the demo's artifacts stay where they are; 30 PPO
    # iterations (the demo runs 15) give the flipped RM time to pull the policy away
    over = {
        "name": "hackdemo",
        "store": {"root": args.store},
        "ppo": {"hacking_stop": True, "iterations": 30},
    }
    cfg = load_config("demo", over)
    store = ArtifactStore(cfg.store.root)
    sft, demo_rm = store.resolve("demo-sft"), store.resolve("demo-rm")
    prompts = {
        "prompts": store.resolve("demo-prompts_movie_reviews_train"),
        "heldout": store.resolve("demo-prompts_movie_reviews_heldout"),
    }

    def stage(name: str, inputs: dict) -> dict:
        run_dir = (
            Path(cfg.store.root)
            / "runs"
            / f"hack-{name}-{stage_key(name, cfg.to_dict(), inputs)[:16]}"
        )
        return run_stage(name, cfg, inputs, cfg.store.root, run_dir, log=lambda s: None)

    bad_rm = stage(
        "rm",
        {
            "train": flipped(store, "demo-pairs_train"),
            "heldout": flipped(store, "demo-pairs_heldout"),
            "sft": sft,
        },
    )
    runs = {
        "demo RM": stage("ppo", {**prompts, "sft": sft, "rm": demo_rm}),
        "flipped RM": stage("ppo", {**prompts, "sft": sft, "rm": bad_rm["outputs"]["checkpoint"]}),
    }
    out = {
        "settings": {
            k: getattr(cfg.ppo, k)
            for k in (
                "hacking_probe_every",
                "hacking_probe_prompts",
                "hacking_probe_samples",
                "hacking_margin",
                "hacking_z",
                "iterations",
            )
        },
        "flipped_rm_heldout_accuracy_on_its_own_labels": bad_rm["metrics"].get("heldout_accuracy"),
    }
    for label, r in runs.items():
        h = r["history"]
        out[label] = {
            "alarms_at_iteration": [x["step"] for x in h if x.get("hacking_suspected")],
            "rm_score": [round(x["reward_mean"], 3) for x in h],
            "gold": [round(x["gold_mean"], 3) for x in h],
            "probes": [
                [st, round(px, 3), round(gd, 3)]
                for st, px, gd in store.get(r["outputs"]["checkpoint"]).meta["hacking_probes"]
            ],
            "heldout_gold_sft": round(r["metrics"]["heldout_gold_sft"], 4),
            "heldout_gold_ppo": round(r["metrics"]["heldout_gold_ppo"], 4),
            "checkpoint": r["outputs"]["checkpoint"],
            "stopped_early": store.get(r["outputs"]["checkpoint"]).meta.get("stopped_early"),
        }
    print(json.dumps(out, indent=1))
    (HERE / "reward_hacking.json").write_text(json.dumps(out, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (label, r) in zip(axes, runs.items()):
        h, probes = r["history"], out[label]["probes"]
        ax2 = ax.twinx()
        for axis, key, col, color, name in (
            (ax, "reward_mean", 1, "tab:blue", "RM score"),
            (ax2, "gold_mean", 2, "tab:green", "VADER"),
        ):
            steps, values = [x["step"] for x in h], [x[key] for x in h]
            axis.plot(steps, values, color=color, alpha=0.35, lw=1, label=f"{name}, rollouts")
            axis.plot(
                [p[0] for p in probes],
                [p[col] for p in probes],
                color=color,
                marker="o",
                label=f"{name}, probe",
            )
        ax2.set_ylabel("gold (VADER)")
        for x in h:
            if x.get("hacking_suspected"):
                ax.axvline(x["step"], color="tab:red", ls="--", alpha=0.6)
        ax.set_title(f"PPO vs {label}: {len(out[label]['alarms_at_iteration'])} alarm(s)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("RM score")
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "reward_hacking.png", dpi=90)


if __name__ == "__main__":
    main()
