"""TRL's side of results/grpo_vs_trl.py: ``GRPOTrainer`` (torch CPU, .venv-bench from
`make bench-peers`) on the SmolLM2-135M-Instruct weights our pipeline imported and exported
(``mindrlhf export``), the same training prompts in the same order, the same reward function
(``results/arith_reward.py``), group size, batch, updates, sampling settings, learning rate, KL
coefficient and clip range as our GRPO stage. Greedy held-out accuracy (transformers
``generate``, our held-out token ids, the same answer rule) before training, every
``--eval-every`` iterations and after; times are seconds since this process started, the
before-training evaluation taken out (ours measures from its stage process's launch and runs its
before-evaluation after the loop).

Writes the trained model (safetensors) to ``--out`` and prints one JSON object (last line)."""

from __future__ import annotations

import time

T_START = time.time()  # noqa: E402  (before torch and TRL are imported: the clock starts here)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "bench")]


def MindSporeAdamWeightDecay(params, lr: float, eps: float, weight_decay: float = 0.0):
    """The update rule of MindSpore's ``nn.AdamWeightDecay`` (our Trainer's optimizer) in torch:
    Adam moments with beta (0.9, 0.999) and *no bias correction*, w -= lr * (m / (sqrt(v) + eps)
    + weight_decay * w). torch's AdamW divides m and v by (1 - beta^t): at the same lr its first
    steps are 3-6.6x smaller (step 1: 0.32x, step 12: 0.15x, step 100: 0.31x, step 1000: 0.79x)."""
    import torch

    class Opt(torch.optim.Optimizer):
        def __init__(self):
            super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    st = self.state[p]
                    if not st:
                        st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                    m, v, g = st["m"], st["v"], p.grad
                    m.mul_(0.9).add_(g, alpha=0.1)
                    v.mul_(0.999).addcmul_(g, g, value=0.001)
                    upd = m / (v.sqrt() + group["eps"])
                    if group["weight_decay"]:
                        upd.add_(p, alpha=group["weight_decay"])
                    p.add_(upd, alpha=-group["lr"])

    return Opt()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True, help="mindrlhf export of the starting policy")
    ap.add_argument("--tokenizer-dir", required=True, help="benchlib.write_inputs(smollm2)")
    ap.add_argument("--train", required=True, help="JSONL {prompt, prompt_ids, answer}, in order")
    ap.add_argument("--heldout", required=True, help="JSONL {prompt_ids, answer}")
    ap.add_argument("--out", required=True)
    ap.add_argument("--iterations", type=int, required=True)
    ap.add_argument("--eval-every", type=int, required=True)
    ap.add_argument("--prompts-per-iter", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--mini-batch", type=int, required=True)
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--beta", type=float, required=True)
    ap.add_argument("--clip", type=float, required=True)
    ap.add_argument("--temperature", type=float, required=True)
    ap.add_argument("--top-k", type=int, required=True)
    ap.add_argument("--top-p", type=float, required=True)
    ap.add_argument("--adam-eps", type=float, required=True)
    ap.add_argument(
        "--optimizer",
        choices=["ms_adamw", "torch_adamw"],
        required=True,
        help="ms_adamw: MindSpore AdamWeightDecay's update (ours: no bias correction); "
        "torch_adamw: TRL's stock torch.optim.AdamW",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.shape, args.seq = "smollm2", 2048

    import torch
    import transformers
    import trl
    from arith_reward import first_integer
    from benchlib import peak_rss_gb, peer_tokenizer_and_config
    from transformers import AutoModelForCausalLM, TrainerCallback

    from datasets import Dataset

    tok, _ = peer_tokenizer_and_config(args)
    train = [json.loads(x) for x in open(args.train)]
    held = [json.loads(x) for x in open(args.heldout)]
    batch = args.prompts_per_iter * args.group_size
    if batch % args.mini_batch:
        raise SystemExit(f"prompts x group ({batch}) must divide by mini-batch ({args.mini_batch})")
    spg = batch // args.mini_batch  # TRL optimizer steps per generation = our updates / iteration
    if len(train) != args.prompts_per_iter * args.iterations:
        raise SystemExit(f"{args.train}: {len(train)} rows for {args.iterations} iterations")
    for i, r in enumerate(train):  # TRL tokenizes the text: it must give our very prompt tokens
        ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        if ids != r["prompt_ids"]:
            raise SystemExit(
                f"{args.train} row {i}: field prompt tokenizes to {ids[:12]}..., "
                f"not our prompt_ids {r['prompt_ids'][:12]}..."
            )

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)

    optimizers = (None, None)  # TRL's own: torch.optim.AdamW with the config's lr and eps
    if args.optimizer == "ms_adamw":
        optimizers = (MindSporeAdamWeightDecay(model.parameters(), args.lr, args.adam_eps), None)

    @torch.no_grad()
    def heldout_accuracy(m) -> float:
        """Greedy answers to the held-out problems (our token ids, left-padded, batches of 32),
        scored by the answer rule: the fraction right."""
        was = m.training
        m.eval()
        right = 0.0
        for s in range(0, len(held), 32):
            rows = held[s : s + 32]
            width = max(len(r["prompt_ids"]) for r in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                n = len(r["prompt_ids"])
                ids[i, width - n :] = torch.tensor(r["prompt_ids"])
                mask[i, width - n :] = 1
            out = m.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
            right += sum(first_integer(None, texts, [r["answer"] for r in rows]))
        m.train(was)
        return right / len(held)

    t = time.time()
    before = heldout_accuracy(model)
    offset = time.time() - t  # the before-evaluation is not part of the curve's clock
    now = lambda: round(time.time() - T_START - offset, 1)  # noqa: E731
    curve = [(0.0, before)]
    eval_times: list[float] = []

    class Evaluate(TrainerCallback):
        def on_step_end(self, a, state, control, model=None, **kw):
            it = state.global_step // spg
            if state.global_step % spg == 0 and it % args.eval_every == 0 and it < args.iterations:
                t = time.time()
                acc = heldout_accuracy(model)
                eval_times.append(time.time() - t)
                curve.append((now(), acc))

    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in train])

    def reward_func(prompts, completions, answer, **kw):
        return first_integer(prompts, completions, answer)

    conf = trl.GRPOConfig(
        output_dir=str(Path(args.out) / "trainer"),
        per_device_train_batch_size=args.mini_batch,
        gradient_accumulation_steps=1,
        steps_per_generation=spg,
        num_generations=args.group_size,
        num_iterations=1,
        max_steps=spg * args.iterations,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        use_vllm=False,
        beta=args.beta,
        epsilon=args.clip,
        loss_type="grpo",  # each sequence's mean over its tokens, then the mean: ours
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_epsilon=args.adam_eps,
        max_grad_norm=1.0,
        shuffle_dataset=False,
        disable_dropout=True,
        gradient_checkpointing=False,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        log_completions=False,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward_func,
        args=conf,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Evaluate()],
        optimizers=optimizers,
    )
    out = trainer.train()
    trained = now()
    after_hf = heldout_accuracy(trainer.model)
    curve.append((trained, after_hf))
    trainer.model.save_pretrained(args.out, safe_serialization=True)
    # TRL logs once per optimizer step the metrics gathered since the last log: the rollout's
    # (reward) on the step that generated, the loss's (kl) on every step
    hist = trainer.state.log_history
    rewards = [round(x["reward"], 4) for x in hist if "reward" in x]
    kls = [x["kl"] for x in hist if "kl" in x]
    kl_per_iter = [round(sum(kls[i : i + spg]) / spg, 4) for i in range(0, len(kls), spg)]
    print(
        json.dumps(
            {
                "impl": f"trl {trl.__version__} / torch {torch.__version__} / "
                f"transformers {transformers.__version__}",
                "optimizer": type(trainer.optimizer.optimizer).__name__
                if hasattr(trainer.optimizer, "optimizer")
                else type(trainer.optimizer).__name__,
                "torch_threads": torch.get_num_threads(),
                "greedy_accuracy_before_hf": before,
                "greedy_accuracy_after_hf": after_hf,
                "accuracy_vs_wall_s": curve,
                "train_wall_s": trained,
                "mid_run_eval_s": round(sum(eval_times), 1),
                "train_runtime_s": out.metrics.get("train_runtime"),
                "optimizer_steps": trainer.state.global_step,
                "reward_per_iteration": rewards,
                "kl_per_iteration": kl_per_iter,
                "peak_rss_gb": peak_rss_gb(),
            }
        )
    )


if __name__ == "__main__":
    main()
