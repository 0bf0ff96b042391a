"""GRPO on SmolLM2-135M-Instruct here and in TRL, side by side, in one run: the same experiment as
results/grpo_smollm2.py (reasoning-gym basic arithmetic, the strict first-integer reward) run by
our pipeline, then by TRL's ``GRPOTrainer`` on PyTorch CPU (.venv-bench, `make bench-peers`),
starting from identical tensors (``mindrlhf export`` of the imported SmolLM2), on the same
training prompts in the same order with the same reward function, group size, batch, updates per
iteration, sampling settings (temperature / top-k / top-p of the profile), max new tokens,
learning rate, Adam epsilon, KL coefficient and clip range. TRL runs twice: with MindSpore
``AdamWeightDecay``'s update rule in torch (our Trainer's optimizer: Adam *without* bias
correction, so both sides do the same arithmetic per update: the like-for-like comparison), and
as shipped (torch ``AdamW``, bias-corrected: at the same lr its first hundred steps are 3-6.6x
smaller than ours).

Both final checkpoints then go through one evaluator (ours: greedy answers to the same held-out
problems, the same rule) after a round trip through Hugging Face safetensors (ours exported with
``mindrlhf export``, TRL's saved by ``save_pretrained``, both read back with our HF
importer). The time-to-accuracy ratio (per TRL run): our GRPO stage's wall clock to its first
evaluation at or above that run's final accuracy, over the run's wall clock to the end of its
training (each side's clock from its process start, model loading and mid-run evaluations
included, before- and after-evaluations not).

    .venv/bin/python results/grpo_vs_trl.py [--iterations 24] [--eval-every 4]
        [--trl-runs same_update,stock_adamw]

Prints JSON (also results/grpo_vs_trl.json) and writes results/grpo_vs_trl.png."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "bench")]

from benchlib import run_peer, write_inputs  # noqa: E402
from grpo_smollm2 import add_args, run_ours  # noqa: E402

TRL_RUNS = (("same_update", "ms_adamw"), ("stock_adamw", "torch_adamw"))
TRL_LABELS = ("same update rule", "stock AdamW, same lr")


def export(store_root: str, ref: str, out: Path) -> Path:
    """``mindrlhf export REF --out DIR``, the command a user runs."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mindrlhf.cli",
            "export",
            ref,
            "--out",
            str(out),
            "--store",
            store_root,
        ],
        check=True,
        cwd=REPO,
    )
    return out


def evaluate(hf_dir: Path, cfg, rows: dict, tok, max_new_tokens: int) -> float:
    """Our evaluator on a Hugging Face checkpoint: our HF importer, our decoder, greedy decoding of
    the held-out prompts (batches of 32), the first-integer rule. The import must give the
    architecture the experiment trained (every derived model field but the context length)."""
    from arith_reward import first_integer

    from mindrlhf.config import GenerationConfig
    from mindrlhf.models.decoder import CausalLM, load_state_dict
    from mindrlhf.models.hf import import_hf
    from mindrlhf.models.sources import DERIVED
    from mindrlhf.stages.rollout import decode_responses, sample

    mc, w = import_hf(hf_dir)
    diff = {
        k: (getattr(mc, k), getattr(cfg.model, k))
        for k in DERIVED
        if k != "max_seq_len" and getattr(mc, k) != getattr(cfg.model, k)
    }
    if diff:
        raise SystemExit(f"{hf_dir}: imports as a different model: {diff}")
    m = CausalLM(cfg.model, seed=0)
    load_state_dict(m, w, source=str(hf_dir))
    m.set_train(False)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
    right = 0.0
    for s in range(0, len(rows["prompt_ids"]), 32):
        ids = rows["prompt_ids"][s : s + 32]
        g = sample(m, ids, gen, tok, seed=s)
        right += sum(first_integer(None, decode_responses(g, tok), rows["answer"][s : s + 32]))
    return right / len(rows["prompt_ids"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_args(ap)
    ap.add_argument(
        "--trl-runs",
        default="same_update,stock_adamw",
        help="which TRL runs: same_update (MindSpore's AdamWeightDecay rule in torch, the "
        "like-for-like one) and/or stock_adamw (torch AdamW at the same lr)",
    )
    ap.set_defaults(iterations=24, eval_every=4)
    args = ap.parse_args()
    runs = [r for r in TRL_RUNS if r[0] in args.trl_runs.split(",")]
    if not runs:
        ap.error(f"--trl-runs names none of {[k for k, _ in TRL_RUNS]}")

    ours = run_ours(args)
    o, cfg, store, tok = ours["out"], ours["cfg"], ours["store"], ours["tok"]
    gc = cfg.grpo

    import numpy as np

    from mindrlhf.stages.common import epoch_order

    # the training prompts in the order our stage drew them (grpo.py: epoch_order, seed + 5), as
    # text TRL tokenizes back to our ids (the chat template's special tokens kept)
    train = store.read_dataset(ours["data"]["prompts_arithmetic_train"])
    held = store.read_dataset(ours["data"]["prompts_arithmetic_heldout"]).slice(0, args.heldout)
    order = np.concatenate(
        [
            epoch_order(train.num_rows, it, gc.prompts_per_iter, cfg.seed + 5)
            for it in range(gc.iterations)
        ]
    )
    t = train.take(order)
    ids, answers = t.column("prompt_ids").to_pylist(), t.column("answer").to_pylist()
    rows = [
        {"prompt": tok.impl.decode(p, skip_special_tokens=False), "prompt_ids": p, "answer": a}
        for p, a in zip(ids, answers)
    ]
    heldout = {c: held.column(c).to_pylist() for c in ("prompt_ids", "answer")}
    data, tok_dir = write_inputs(rows, "grpo-vs-trl-", tokenizer="smollm2")
    held_path = data.parent / "heldout.jsonl"
    held_path.write_text(
        "\n".join(json.dumps({"prompt_ids": p, "answer": a}) for p, a in zip(*heldout.values()))
    )
    work = Path(tempfile.mkdtemp(prefix="grpo-vs-trl-"))
    start = export(cfg.store.root, ours["policy"], work / "start")

    from mindrlhf.stages.rollout import rollout_config

    # the law our GRPO stage samples with (temperature 1, no top-k / top-p: the policy's own,
    # so the loss's log-probs are the sampling law's), not the profile's generation section --
    # before 2026-11-28 12:00 TRL was handed the latter (0.8 / 50 / 0.95) and sampled sharper
    gen = rollout_config(cfg.generation, max_new_tokens=gc.max_new_tokens)

    def run_trl(optimizer: str) -> dict:
        return run_peer(
            HERE / "peer_trl_grpo_smollm2.py",
            [
                *("--model-dir", str(start), "--tokenizer-dir", str(tok_dir)),
                *("--train", str(data), "--heldout", str(held_path)),
                *("--out", str(work / f"trl-{optimizer}"), "--optimizer", optimizer),
                *("--iterations", str(gc.iterations), "--eval-every", str(gc.eval_every)),
                *("--prompts-per-iter", str(gc.prompts_per_iter)),
                *("--group-size", str(gc.group_size), "--mini-batch", str(gc.mini_batch)),
                *("--max-new-tokens", str(gc.max_new_tokens), "--lr", str(gc.lr)),
                *("--beta", str(gc.beta), "--clip", str(gc.clip_range)),
                *("--temperature", str(gen.temperature), "--top-k", str(gen.top_k)),
                *("--top-p", str(gen.top_p), "--adam-eps", "1e-6"),  # AdamWeightDecay's eps
            ],
        )

    # the same update rule (MindSpore's AdamWeightDecay, no bias correction) first: the
    # like-for-like comparison; then TRL as shipped (torch AdamW) at the same nominal lr
    trls = {k: run_trl(opt) for k, opt in runs}

    from mindrlhf.runtime import init_runtime

    init_runtime("CPU", seed=0)
    mine = export(cfg.store.root, o["checkpoint"], work / "ours")

    def ev(d: Path) -> float:
        return evaluate(d, cfg, heldout, tok, gc.max_new_tokens)

    final = {"start": ev(start), "ours": ev(mine)}
    final.update({f"trl_{k}": ev(work / f"trl-{opt}") for k, opt in runs})
    import shutil

    for d in (work, data.parent):  # four fp32 copies of the model and TRL's output dirs: ~2 GB
        shutil.rmtree(d, ignore_errors=True)
    ours_curve = o["accuracy_vs_wall_s"][:-1] + [[o["grpo_loop_wall_s"], final["ours"]]]
    out = {
        "experiment": "grpo_vs_trl",
        "model": o["model"],
        "task": o["task"],
        "heldout_problems": args.heldout,
        "settings": {
            **o["settings"],
            "temperature": gen.temperature,
            "top_k": gen.top_k,
            "top_p": gen.top_p,
            "adam_eps": 1e-6,
            "updates_per_iteration": gc.prompts_per_iter * gc.group_size // gc.mini_batch,
        },
        "trl_impl": next(iter(trls.values()))["impl"],
        "common_evaluator_greedy_accuracy": final,
        "ours_stage_evaluator_greedy_accuracy": {
            "before": o["greedy_accuracy_before"],
            "after": o["greedy_accuracy_after"],
        },
        "ours": {
            "accuracy_vs_wall_s": ours_curve,
            "train_wall_s": o["grpo_loop_wall_s"],
            "peak_rss_gb": o["peak_rss_gb"],
            "reward_per_iteration": o["reward_per_iteration"],
            "kl_per_iteration": o["kl_per_iteration"],
        },
    }
    for k, _ in runs:
        t = trls[k]
        target = final[f"trl_{k}"]
        reach = next((s for s, a in ours_curve if a >= target), None)
        out[f"trl_{k}"] = {
            "optimizer": t["optimizer"],
            "own_evaluator_greedy_accuracy": {
                "before": t["greedy_accuracy_before_hf"],
                "after": t["greedy_accuracy_after_hf"],
            },
            "accuracy_vs_wall_s": t["accuracy_vs_wall_s"][:-1] + [[t["train_wall_s"], target]],
            "train_wall_s": t["train_wall_s"],
            "mid_run_eval_s": t["mid_run_eval_s"],
            "peak_rss_gb": t["peak_rss_gb"],
            "reward_per_iteration": t["reward_per_iteration"],
            "kl_per_iteration": t["kl_per_iteration"],
            "ours_s_to_its_final_accuracy": reach,
            "time_to_accuracy_ratio": None
            if reach is None
            else round(reach / t["train_wall_s"], 3),
            "wall_ratio_whole_run": round(o["grpo_loop_wall_s"] / t["train_wall_s"], 3),
        }
    print(json.dumps(out, indent=1))
    (HERE / "grpo_vs_trl.json").write_text(json.dumps(out, indent=1) + "\n")
    draw(out)


def draw(out: dict) -> None:
    """grpo_vs_trl.png from a run's JSON (``out``, as main writes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    series = [("mindrlhf-flow (MindSpore)", out["ours"])] + [
        (f"TRL, {label}", out[f"trl_{k}"])
        for (k, _), label in zip(TRL_RUNS, TRL_LABELS)
        if f"trl_{k}" in out
    ]
    for name, side in series:
        curve = side["accuracy_vs_wall_s"]
        a1.plot([c[0] / 60 for c in curve], [100 * c[1] for c in curve], marker="o", label=name)
        r = side["reward_per_iteration"]
        a2.plot(range(1, len(r) + 1), r, label=name)
    a1.set_xlabel("wall clock (min), process start to end of training")
    a1.set_ylabel(f"held-out greedy accuracy (%), {out['heldout_problems']} problems")
    a1.set_title("SmolLM2-135M-Instruct, GRPO, basic arithmetic", fontsize=9)
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    a2.set_xlabel("iteration")
    a2.set_ylabel("rollout reward (= accuracy)")
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "grpo_vs_trl.png", dpi=90)


if __name__ == "__main__":
    main()
