"""LoRA vs full fine-tuning: the SFT stage twice on the same base checkpoint, data, seed and
steps, once training every weight and once ``model.lora`` adapters. Per side: the stage's peak
RSS, seconds per training step, the checkpoint artifact's bytes, the optimizer state's bytes (a
working checkpoint's ``model_optim.safetensors``), the trained tensors' count and the held-out loss
before / after. Both run as stage processes (``run_stage``), exactly as the pipeline runs them.

    .venv/bin/python bench/lora_sft.py --store artifacts --base grpo-smollm2-import \\
        --train grpo-smollm2-sft_train --heldout grpo-smollm2-sft_heldout [--steps 12]

``--config`` is the profile whose model the base checkpoint holds (default ``smollm2-135m``;
``demo`` with a demo checkpoint as ``--base`` for the quick version)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", default="artifacts")
    ap.add_argument("--config", default="smollm2-135m")
    ap.add_argument("--base", required=True, help="checkpoint (ref or id) both sides start from")
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr-full", type=float, default=2e-5)
    ap.add_argument("--lr-lora", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="q,k,v,o,gate,up,down")
    ap.add_argument("--modes", default="full,lora")
    args = ap.parse_args()
    from mindrlhf.config import load_config
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.launch import run_stage
    from mindrlhf.preflight import lora_param_count, param_count

    store = ArtifactStore(args.store)
    base = store.resolve(args.base)
    inputs = {
        "train": store.resolve(args.train),
        "heldout": store.resolve(args.heldout),
        "init": base,
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    out: dict = {"bench": "lora_sft", "config": args.config, "base": base, "steps": args.steps}
    for mode in args.modes.split(","):
        lora = mode == "lora"
        over = {
            "name": f"lorabench-{mode}",
            "store": {"root": str(Path(args.store).resolve())},
            "pipeline": {"stages": ["prepare", "sft"]},
            "generation": {"max_new_tokens": 4},  # the stage's sample answers: not measured here
            "model": {"init": f"artifact:{base}"},
            "sft": {
                "steps": args.steps,
                "batch_size": args.batch,
                "ckpt_every": max(1, args.steps // 2),  # one working checkpoint: optimizer bytes
                "log_every": max(1, args.steps // 4),
                "eval_batches": 4,
                "lr": args.lr_lora if lora else args.lr_full,
            },
        }
        if lora:
            over["model"]["lora"] = {
                "rank": args.rank,
                "alpha": args.alpha,
                "targets": args.targets.split(","),
            }
        cfg = load_config(args.config, over)
        run_dir = tmp / mode
        r = run_stage("sft", cfg, inputs, store.root, run_dir, log=lambda s: None)
        art = store.get(r["outputs"]["checkpoint"])
        optim = sorted(run_dir.glob("ckpt-*/model_optim.safetensors"))
        m = r["metrics"]
        out[mode] = {
            "peak_rss_gb": round(r["peak_rss_mb"] / 1024, 2),
            "step_seconds": round(args.batch / m["train_samples_per_s"], 2),
            "checkpoint_bytes": (art.path / "model.safetensors").stat().st_size,
            "optimizer_state_bytes": optim[-1].stat().st_size if optim else None,
            "trained_params": lora_param_count(cfg.model) if lora else param_count(cfg.model),
            "heldout_loss_before": round(m["heldout_loss_before"], 4),
            "heldout_loss_after": round(m["heldout_loss_after"], 4),
            "stage_seconds": r["seconds"],
            "checkpoint": art.id,
        }
        print(json.dumps({mode: out[mode]}), flush=True)
    if "full" in out and "lora" in out:
        f, lo = out["full"], out["lora"]
        out["lora_over_full"] = {
            k: round(lo[k] / f[k], 4)
            for k in ("peak_rss_gb", "step_seconds", "checkpoint_bytes", "optimizer_state_bytes")
            if lo[k] and f[k]
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
