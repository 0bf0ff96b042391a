"""The peer side of bench/dpo_throughput.py: TRL's DPOTrainer on PyTorch CPU, the same
model shape (GPT-2 or SmolLM2-135M), the same pairs, the same number of steps. Runs in .venv-bench
(`make bench-peers`); prints one JSON object."""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--shape", choices=["gpt2", "smollm2"], default="gpt2")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precompute-ref", action="store_true")
    args = ap.parse_args()

    import torch
    import transformers
    import trl
    from benchlib import peak_rss_gb, peer_tokenizer_and_config, step_timer
    from transformers import AutoModelForCausalLM

    from datasets import Dataset

    torch.manual_seed(0)
    tok, cfg = peer_tokenizer_and_config(args)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    rows = [json.loads(line) for line in open(args.data)]
    ds = Dataset.from_list(rows)

    times: list[float] = []
    conf = trl.DPOConfig(
        output_dir="/tmp/trl-dpo-bench",
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + 1,
        max_length=args.seq,
        learning_rate=5e-4,
        beta=0.1,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        precompute_ref_log_probs=args.precompute_ref,
        gradient_checkpointing=False,
        seed=0,
        bf16=False,
    )  # TRL turns bf16 on by default, even on CPU; ours is fp32
    import copy

    ref = (
        None if args.precompute_ref else copy.deepcopy(model)
    )  # a model built in code has no hub id to reload
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=ref,
        args=conf,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[step_timer(times)],
    )
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    batch = next(iter(trainer.get_train_dataloader()))
    mean_tokens = int(batch["attention_mask"].sum())
    steady = times[1:]  # the first step pays one-off costs on both sides
    print(
        json.dumps(
            {
                "impl": f"trl {trl.__version__} / torch {torch.__version__} / "
                f"transformers {transformers.__version__}",
                "precompute_ref": args.precompute_ref,
                "steps": len(steady),
                "pairs_per_s": round(args.batch * len(steady) / sum(steady), 3),
                "torch_threads": torch.get_num_threads(),
                "mixed_precision": str(trainer.accelerator.mixed_precision),
                "train_wall_s": round(wall, 2),
                "train_runtime_s": out.metrics.get("train_runtime"),
                "tokens_per_step": mean_tokens,
                "peak_rss_gb": peak_rss_gb(),
            }
        )
    )


if __name__ == "__main__":
    main()
