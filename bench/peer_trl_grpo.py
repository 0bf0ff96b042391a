"""The peer side of bench/grpo_throughput.py: TRL's GRPOTrainer on PyTorch CPU, the same
GPT-2-shaped model config (random init, policy and reference identical at the start), the same
prompts in the same order, the same reward (``bench_reward`` below, imported by our side), the
same number of sampled tokens and updates per iteration. Runs in .venv-bench (`make bench-peers`);
prints one JSON object.

How TRL counts: one optimizer step ("step") trains on ``per_device_train_batch_size`` samples;
completions are generated once every ``steps_per_generation * num_iterations`` steps for
``generation_batch_size`` samples. With ``per_device_train_batch_size = mini_batch``,
``gradient_accumulation_steps = 1`` and ``steps_per_generation = batch / mini_batch`` one
iteration of ours (one rollout of prompts x group samples, then one optimizer update per
mini-batch per epoch) is exactly ``steps_per_generation * epochs`` TRL steps.

This module's top level imports nothing heavy, so our side can import ``bench_reward`` from it.
"""

from __future__ import annotations

import argparse
import json
import time


def bench_reward(completion: str, answer: str) -> float:
    """The benchmark's reward, deterministic, cheap and pure Python (both venvs run this exact
    function): 1.0 if the completion's first whitespace-separated word is the arithmetic answer,
    else the fraction of the completion's non-whitespace characters that are digits (0.0 if it
    has none). Random-init policies almost never score 1.0, but the digit fraction varies within
    a group, so advantages are not all zero."""
    words = completion.split()
    if words and words[0] == answer:
        return 1.0
    chars = [c for c in completion if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="JSONL rows {prompt, answer}, in iteration order")
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--shape", choices=["gpt2", "smollm2"], default="gpt2")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--mini-batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument(
        "--iters", type=int, default=3, help="timed iterations (one more runs first as warm-up)"
    )
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--clip", type=float, default=0.2)
    args = ap.parse_args()

    import tempfile

    import torch
    import transformers
    import trl
    from benchlib import peak_rss_gb, peer_tokenizer_and_config, step_timer
    from transformers import AutoModelForCausalLM

    from datasets import Dataset

    batch = args.prompts * args.group
    if batch % args.mini_batch:
        raise SystemExit(
            f"prompts*group ({batch}) must be divisible by mini-batch ({args.mini_batch})"
        )
    spg = batch // args.mini_batch  # TRL steps per generation = our updates per rollout per epoch
    steps_per_iter = spg * args.epochs

    torch.manual_seed(0)
    tok, cfg = peer_tokenizer_and_config(args)
    # GRPOTrainer builds the reference with from_pretrained(model.config._name_or_path), so the
    # random init goes through a directory: policy and reference then start from the same weights.
    model_dir = tempfile.mkdtemp(prefix="trl-grpo-model-")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    rows = [json.loads(line) for line in open(args.data)]
    n_prompts = args.prompts * (args.iters + 1)
    if len(rows) < n_prompts:
        raise SystemExit(f"need {n_prompts} prompts, got {len(rows)}")
    ds = Dataset.from_list(rows[:n_prompts])

    def reward_func(prompts, completions, answer, **kw):
        return [bench_reward(c, a) for c, a in zip(completions, answer)]

    step_times: list[float] = []
    conf = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-bench-"),
        per_device_train_batch_size=args.mini_batch,
        gradient_accumulation_steps=1,
        steps_per_generation=spg,
        num_generations=args.group,
        num_iterations=args.epochs,
        max_steps=steps_per_iter * (args.iters + 1),
        max_completion_length=args.new_tokens,
        # exactly new-tokens per completion, as ours with eos ignored: eos is masked until then
        generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        beta=args.beta,
        epsilon=args.clip,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        shuffle_dataset=False,
        disable_dropout=True,
        gradient_checkpointing=False,
        bf16=False,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        log_completions=False,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward_func,
        args=conf,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[step_timer(step_times)],
    )

    # Phase timers: generation = model.generate on the left-padded prompts (the sampling loop);
    # score = the rest of _generate_and_score_completions (tokenize/decode, old log-probs when
    # TRL needs them, reference log-probs, reward, advantages); update = the rest of the steps.
    gen_times: list[float] = []
    gs_times: list[float] = []
    completion_lens: list[float] = []
    prompt_lens: list[int] = []
    old_logps_computed: list[bool] = []

    def timed(fn, sink, after=None):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            sink.append(time.perf_counter() - t)
            if after:
                after(a, out)
            return out

        return wrapper

    def after_gen_score(a, out):
        completion_lens.append(float(out["completion_mask"].sum(1).float().mean()))
        prompt_lens.append(int(out["prompt_ids"].shape[1]))
        old_logps_computed.append(out.get("old_per_token_logps") is not None)

    trainer._generate_single_turn = timed(trainer._generate_single_turn, gen_times)
    trainer._generate_and_score_completions = timed(
        trainer._generate_and_score_completions, gs_times, after_gen_score
    )
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    import shutil

    for d in (model_dir, conf.output_dir):  # the saved initial weights are 4 bytes a parameter
        shutil.rmtree(d, ignore_errors=True)

    n_iter = len(step_times) // steps_per_iter
    assert len(gen_times) == n_iter == len(gs_times) == args.iters + 1, (
        len(step_times),
        gen_times,
        gs_times,
    )
    iters = [sum(step_times[i * steps_per_iter : (i + 1) * steps_per_iter]) for i in range(n_iter)]
    steady = slice(1, None)  # the first iteration pays one-off costs on both sides
    it_s, gen_s, gs_s = iters[steady], gen_times[steady], gs_times[steady]
    score_s = [b - a for a, b in zip(gen_s, gs_s)]
    upd_s = [i - b for i, b in zip(it_s, gs_s)]
    mean = lambda xs: round(sum(xs) / len(xs), 3)  # noqa: E731
    print(
        json.dumps(
            {
                "impl": f"trl {trl.__version__} / torch {torch.__version__} / "
                f"transformers {transformers.__version__}",
                "iterations": len(it_s),
                "samples_per_iter": batch,
                "trl_steps_per_iter": steps_per_iter,
                "samples_per_s": round(batch * len(it_s) / sum(it_s), 3),
                "peak_rss_gb": peak_rss_gb(),
                "iter_s": mean(it_s),
                "generation_s": mean(gen_s),
                "score_s": mean(score_s),
                "update_s": mean(upd_s),
                "new_tokens_per_sample": completion_lens[-1],
                "prompt_len_padded": prompt_lens,
                "old_logps_recomputed": old_logps_computed[-1],
                "loss_type": conf.loss_type,
                "mixed_precision": str(trainer.accelerator.mixed_precision),
                "torch_threads": torch.get_num_threads(),
                "train_wall_s": round(wall, 2),
                "train_runtime_s": out.metrics.get("train_runtime"),
            }
        )
    )


if __name__ == "__main__":
    main()
