"""GRPO on the real SmolLM2-135M-Instruct with a verifiable reward: does RLHF here make a real
model better? The imported GGUF weights are the policy and the reference; prompts are
reasoning-gym ``basic_arithmetic`` problems (two terms, up to two digits, + and -: "Calculate
47 - 9. Answer:"); held-out problems never occur in training (split by a hash of their text).

The answer-extraction rule is fixed (``results/arith_reward.py``): the first integer in the
response is the answer, right or wrong, no partial credit; it is both the GRPO reward and the
accuracy. Greedy held-out accuracy on ``--heldout`` problems is measured before
training, every ``--eval-every`` iterations and after; the curve is drawn against the
wall-clock time of the GRPO stage (process start, model loading and the mid-run evaluations
included; the final point at the loop's end, before the closing evaluations). "format" is the
fraction of each rollout's responses that are a bare integer (nothing after the number).

    .venv/bin/python results/grpo_smollm2.py [--iterations 60] [--eval-every 10]

Prints JSON (also results/grpo_smollm2.json) and writes results/grpo_smollm2.png. Stages run as
processes through mindrlhf.launch in the store ``--store`` under the config name
``grpo-smollm2``."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "bench"))

from benchlib import add_layer_graph_args  # noqa: E402

BARE_INT = re.compile(r"^-?\d+\.?$")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--store", default="artifacts")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--heldout", type=int, default=224)
    ap.add_argument("--prompts-per-iter", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument(
        "--compiled",
        action="store_true",
        help="GRPO's training step and scoring passes as compiled graphs (grpo.compiled); at "
        "SmolLM2's size they take ~7 GB (step) and ~3.7 GB (each scoring pass) per shape and "
        "the graph pool recompiles them in turn on a 24 GB machine, so eager is the default",
    )
    ap.add_argument(
        "--layer-graphs",
        action="store_true",
        help="eager GRPO steps and scoring with each decoder layer one shared compiled graph "
        "(grpo.layer_graphs): compiles in seconds per shape, no whole-step graph memory",
    )
    add_layer_graph_args(ap)  # --layer-span, --layer-pad: with --layer-graphs
    ap.add_argument(
        "--sampling-logprobs",
        action="store_true",
        help="the old policy's log-probs read off the sampler's logits (grpo.old_logprobs: "
        "sampling) instead of a second forward pass over each rollout",
    )


def run_ours(args) -> dict:
    """Prepare, import and GRPO through the pipeline's stages; the experiment's JSON (``out``)
    with the config, store, prepared datasets and the GRPO stage's result."""
    os.environ["MINDRLHF_LOG_METRICS"] = "1"
    from mindrlhf.config import load_config
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.keys import stage_key
    from mindrlhf.launch import run_stage

    over = {
        "name": "grpo-smollm2",
        "store": {"root": args.store},
        "pipeline": {"stages": ["prepare", "sft", "grpo"]},
        "data": {
            "recipes": ["arithmetic"],
            "arithmetic_size": 6000,
            "arithmetic_digits": 2,
            "heldout_fraction": 0.05,
        },
        "grpo": {
            "prompts": "arithmetic",
            "reward": f"python:{HERE / 'arith_reward.py'}:first_integer",
            "compiled": args.compiled,
            "layer_graphs": args.layer_graphs,
            "layer_graph_span": args.layer_span,
            "layer_graph_pad": args.layer_pad,
            "old_logprobs": "sampling" if args.sampling_logprobs else "recompute",
            "iterations": args.iterations,
            "prompts_per_iter": args.prompts_per_iter,
            "group_size": args.group_size,
            "mini_batch": args.group_size * args.prompts_per_iter // 2,
            "lr": args.lr,
            "beta": args.beta,
            "max_new_tokens": args.max_new_tokens,
            "eval_prompts": args.heldout,
            "eval_every": args.eval_every,
            "ckpt_every": 10,
        },
    }
    cfg = load_config("smollm2-135m", over)
    store = ArtifactStore(cfg.store.root)
    marks: list[tuple[float, dict]] = []

    def log(line: str) -> None:
        if line.startswith("METRIC "):
            marks.append((time.perf_counter(), json.loads(line[len("METRIC ") :])))
        elif "policy: reward/accuracy" in line:
            marks.append((time.perf_counter(), {"line": line}))

    def stage(name: str, inputs: dict) -> dict:
        key = stage_key(name, cfg.to_dict(), inputs)[:16]
        run_dir = Path(cfg.store.root) / "runs" / f"results-{name}-{key}"
        return run_stage(name, cfg, inputs, cfg.store.root, run_dir, log=log)

    data = stage("prepare", {})["outputs"]
    policy = stage("import_weights", {})["outputs"]["checkpoint"]
    held = store.read_dataset(data["prompts_arithmetic_heldout"]).num_rows
    if held < args.heldout:
        raise SystemExit(f"only {held} held-out problems; raise data.arithmetic_size")
    inputs = {
        "prompts": data["prompts_arithmetic_train"],
        "heldout": data["prompts_arithmetic_heldout"],
        "sft": policy,
    }
    t0 = time.perf_counter()
    marks.clear()
    res = stage("grpo", inputs)
    wall = time.perf_counter() - t0
    m = res["metrics"]
    h = res["history"]
    # the learning curve against wall-clock: before (the stage's first evaluation), the mid-run
    # evaluations (METRIC lines carrying heldout_greedy_accuracy), after
    curve = [(0.0, m["accuracy_greedy_sft"])]
    curve += [
        (round(t - t0, 1), x["heldout_greedy_accuracy"])
        for t, x in marks
        if "heldout_greedy_accuracy" in x
    ]
    trained = max(t for t, x in marks if "step" in x) - t0  # the loop's end, before evaluation
    curve.append((round(trained, 1), m["accuracy_greedy_grpo"]))
    tok = load_tokenizer(cfg.tokenizer)
    art = store.get(res["outputs"]["checkpoint"], verify=False)
    fmt = []
    for exp in art.meta["experience"]:
        t = store.read_dataset(exp)
        seqs = t.column("sequence").to_pylist()
        resp = t.column("response_mask").to_pylist()
        p = t.column("prompt_len")[0].as_py()  # the response mask covers the response block
        texts = [tok.decode([s for s, r in zip(q[p:], rm) if r]) for q, rm in zip(seqs, resp)]
        fmt.append(sum(bool(BARE_INT.match(x.strip())) for x in texts) / len(texts))
    out = {
        "experiment": "grpo_smollm2",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
        "task": "reasoning-gym basic_arithmetic, 2 terms, <= 2 digits, + -",
        "heldout_problems": args.heldout,
        "settings": {k: v for k, v in over["grpo"].items() if k not in ("prompts", "reward")},
        "greedy_accuracy_before": m["accuracy_greedy_sft"],
        "greedy_accuracy_after": m["accuracy_greedy_grpo"],
        "gain_points": round(100 * (m["accuracy_greedy_grpo"] - m["accuracy_greedy_sft"]), 1),
        "sampled_accuracy_before": m["accuracy_sft"],
        "sampled_accuracy_after": m["accuracy_grpo"],
        "grpo_stage_wall_s": round(wall, 1),
        "grpo_loop_wall_s": round(trained, 1),
        "peak_rss_gb": round((res.get("peak_rss_mb") or 0) / 1024, 2),
        "accuracy_vs_wall_s": curve,
        "reward_per_iteration": [round(x["reward_mean"], 3) for x in h],
        "rollout_accuracy_per_iteration": [round(x["accuracy"], 3) for x in h],
        "format_per_iteration": [round(f, 3) for f in fmt],
        "kl_per_iteration": [round(x["kl"], 4) for x in h],
        "checkpoint": res["outputs"]["checkpoint"],
    }
    return {"out": out, "cfg": cfg, "store": store, "data": data, "policy": policy, "tok": tok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_args(ap)
    args = ap.parse_args()
    out = run_ours(args)["out"]
    curve, fmt = out["accuracy_vs_wall_s"], out["format_per_iteration"]
    print(json.dumps(out, indent=1))
    (HERE / "grpo_smollm2.json").write_text(json.dumps(out, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    a1.plot([c[0] / 60 for c in curve], [100 * c[1] for c in curve], marker="o")
    a1.set_xlabel("wall clock (min) of the GRPO stage")
    a1.set_ylabel(f"held-out greedy accuracy (%), {args.heldout} problems")
    a1.set_title("SmolLM2-135M-Instruct, GRPO, basic arithmetic")
    a1.grid(alpha=0.3)
    it = range(1, len(out["reward_per_iteration"]) + 1)
    a2.plot(it, out["reward_per_iteration"], label="reward (mean)")
    a2.plot(it, out["rollout_accuracy_per_iteration"], label="rollout accuracy")
    a2.plot(it[: len(fmt)], fmt, label="format: bare integer")
    a2.set_xlabel("iteration")
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "grpo_smollm2.png", dpi=90)


if __name__ == "__main__":
    main()
