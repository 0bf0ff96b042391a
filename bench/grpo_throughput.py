"""GRPO iteration throughput, this project (MindSpore, CPU; compiled and PyNative) vs TRL's
GRPOTrainer
(PyTorch CPU), measured one after the other in one run. One iteration = sample ``group``
responses for each of ``prompts`` prompts (temperature 1.0, no top-k/top-p, exactly
``new_tokens`` tokens each: eos ignored here, held back with min_new_tokens in TRL), score them
(reward, reference log-probs, old log-probs where the implementation needs them, group-normalised
advantages), then one clipped policy-gradient update with a k3 KL penalty (beta 0.04, as
grpo.beta) per mini-batch per epoch. Same GPT-2-shaped config (6 layers, d=512, 8 heads, random
init, the reference a copy of the initial policy), the same arithmetic prompts from the
reasoning-gym recipe in the same order, the same reward (``bench_reward`` in peer_trl_grpo.py:
1.0 if the first word is the answer, else the digit fraction of the completion).

Our iteration mirrors mindrlhf/stages/grpo.py: ``rollout.sample`` (prompts left-padded to a
multiple of 8, the KV-cache decoder, responses padded to the training step's multiple),
``score_rollout(response_logprobs)`` of policy and reference over the whole batch,
``group_advantages``,
the experience table round trip, ``Trainer`` steps on mini-batches with ``grpo_loss``; the
artifact-store write of the rollout and the evaluation passes are left out. It runs once per
``--modes`` entry, each in its own process (its own peak RSS): ``compiled`` is the default
configuration (decode step and training step as ``mindspore.jit`` graphs, generation.compiled /
grpo.compiled), ``pynative`` the same with both off, ``decode`` compiled decoding with an eager
training step, ``layers`` that with each decoder layer one compiled graph shared by all layers
in the eager training and scoring passes (grpo.layer_graphs). A mode with ``+sampled``
(``layers+sampled``) takes the old policy's log-probs from the sampler instead of a scoring
pass (grpo.old_logprobs: sampling). Graph compilation happens in the
warm-up iteration, which is not timed (as TRL's), and is reported as ``warmup_iter_s``.

``--shape smollm2`` times SmolLM2-135M's shape and vocabulary (LLaMA, 30 layers, d=576, 9 heads /
3 kv heads, 49,152 tokens; random weights, its own tokenizer on both sides; the peer a
transformers LlamaForCausalLM of the same config), e.g. as results/grpo_smollm2.py trains it:

    .venv/bin/python bench/grpo_throughput.py --shape smollm2 --seq 64 --prompts 8 --group 8 \
        --new-tokens 8 --mini-batch 32 --lr 2e-6 --modes decode

    make bench-peers && .venv/bin/python bench/grpo_throughput.py
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from benchlib import (
    add_layer_graph_args,
    model_config,
    own_side,
    peak_rss_gb,
    run_peer,
    write_inputs,
)
from peer_trl_grpo import (
    bench_reward,
)  # pure Python at import time; the peer uses the same function


def make_prompts(n: int, seed: int = 0, max_digits: int = 3) -> list[dict]:
    """The arithmetic recipe's problems: "Calculate 867 + 821. Answer:" with the oracle answer."""
    from mindrlhf.data.recipes import load_recipe

    ar = load_recipe("arithmetic")
    ds = ar.generator(n, seed=seed, max_digits=max_digits)
    return [{"prompt": ds[i]["question"] + ar.SUFFIX, "answer": ds[i]["answer"]} for i in range(n)]


def ours(prompts: list[dict], args, mode: str) -> dict:
    """Our iteration in ``mode``: compiled (decode and training steps as graphs), pynative
    (neither), decode (compiled decoding, eager training and scoring: the smollm2-135m profile's
    setting, where a compiled SmolLM2 training step costs ~7 GB per batch length)."""
    base, _, extra = mode.partition("+")
    if base not in ("compiled", "pynative", "decode", "layers") or extra not in ("", "sampled"):
        raise SystemExit(f"unknown mode {mode!r}")
    compiled, gen_compiled = base == "compiled", base in ("compiled", "decode", "layers")
    layers, sampled = base == "layers", extra == "sampled"
    from types import SimpleNamespace

    import mindspore as ms  # noqa: F401
    from mindspore import Tensor

    from mindrlhf.algos.grpo import group_advantages, grpo_loss
    from mindrlhf.config import GenerationConfig, GRPOConfig
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.models import decoder
    from mindrlhf.models.decoder import CausalLM
    from mindrlhf.runtime import Dist
    from mindrlhf.stages.common import Trainer
    from mindrlhf.stages.rollout import (
        decode_responses,
        experience_table,
        response_logprobs,
        rollout_config,
        sample,
        score_rollout,
        table_arrays,
    )

    cfg, tok_name = model_config(args.shape, args.seq, args.layers, args.d, args.heads)
    tok = load_tokenizer(tok_name)
    decoder.LAYER_GRAPHS = layers  # as a stage with grpo.layer_graphs sets it
    decoder.LAYER_SPAN = args.layer_span  # and its layer_graph_span
    decoder.LAYER_PAD = args.layer_pad  # and its layer_graph_pad
    policy, ref = CausalLM(cfg, seed=0), CausalLM(cfg, seed=0)
    ref.set_train(False)
    batch = args.prompts * args.group
    gc = GRPOConfig(
        lr=args.lr,
        prompts_per_iter=args.prompts,
        group_size=args.group,
        mini_batch=args.mini_batch,
        epochs=args.epochs,
        beta=args.beta,
        clip_range=args.clip,
        max_new_tokens=args.new_tokens,
        iterations=args.iters + 1,
        compiled=compiled,
        layer_graphs=layers,
        old_logprobs="sampling" if sampled else "recompute",
    )
    gc.validate()
    gen = rollout_config(
        GenerationConfig(compiled=gen_compiled), max_new_tokens=args.new_tokens
    )  # as the stage
    no_eos = SimpleNamespace(
        pad_id=tok.pad_id, eos_id=-1
    )  # every sample runs new_tokens tokens, as TRL's

    def loss_fn(seq, am, old_lp, ref_lp, adv, mask, p):
        lp = response_logprobs(policy, seq, am, p, share_prompts=not compiled)  # as the stage
        return grpo_loss(lp, old_lp, ref_lp, adv, mask, gc.clip_range, gc.beta)

    trainer = Trainer(
        policy.trainable_params(),
        loss_fn,
        gc,
        Dist(),
        gc.iterations * gc.epochs * (batch // gc.mini_batch),
    )
    phases = {"iter": [], "generation": [], "score": [], "update": []}
    new_tokens, prompt_lens, rewards_seen = [], [], []
    for it in range(args.iters + 1):
        chunk = prompts[it * args.prompts : (it + 1) * args.prompts]
        rows = {
            "prompt": [r["prompt"] for r in chunk for _ in range(args.group)],
            "answer": [r["answer"] for r in chunk for _ in range(args.group)],
        }  # each group consecutive
        prompt_ids = tok.encode_batch(rows["prompt"])
        t0 = time.perf_counter()
        policy.set_train(False)
        g = sample(
            policy, prompt_ids, gen, no_eos, seed=it * 16, multiple=gc.pad_to, logprobs=sampled
        )
        t1 = time.perf_counter()
        seq, am, p = g.sequences, g.attention_mask, g.prompt_len
        rmask = g.response_mask.astype(np.float32)
        if sampled:  # as the stage with grpo.old_logprobs: sampling
            old_lp = g.logprobs * rmask
        else:
            old_lp = score_rollout(
                response_logprobs, policy, seq, am, p, compiled, share_prompts=True
            )
            old_lp = old_lp * rmask
        ref_lp = score_rollout(response_logprobs, ref, seq, am, p, compiled, share_prompts=True)
        ref_lp = ref_lp * rmask
        rewards = np.array(
            [bench_reward(c, a) for c, a in zip(decode_responses(g, tok), rows["answer"])]
        )
        ex = table_arrays(
            experience_table(
                g,
                {
                    "logprobs": old_lp,
                    "ref_logprobs": ref_lp,
                    "reward": rewards,
                    "advantage": group_advantages(rewards, gc.group_size),
                },
            )
        )
        t2 = time.perf_counter()
        policy.set_train(True)
        seqs, ams, p = ex["sequence"], ex["attention_mask"], int(ex["prompt_len"][0])
        rm = ex["response_mask"].astype(np.float32)
        n, mb = len(seqs), gc.mini_batch
        for epoch in range(gc.epochs):
            order = np.random.default_rng([0, it, epoch]).permutation(n)
            for s in range(0, n - mb + 1, mb):
                b = order[s : s + mb]
                trainer.step(
                    Tensor(seqs[b]),
                    Tensor(ams[b]),
                    Tensor(ex["logprobs"][b]),
                    Tensor(ex["ref_logprobs"][b]),
                    Tensor(ex["advantage"][b]),
                    Tensor(rm[b]),
                    p,
                )
        t3 = time.perf_counter()
        for k, v in (
            ("iter", t3 - t0),
            ("generation", t1 - t0),
            ("score", t2 - t1),
            ("update", t3 - t2),
        ):
            phases[k].append(v)
        new_tokens.append(float(rmask.sum(1).mean()))
        prompt_lens.append(int(p))
        rewards_seen.append(float(rewards.mean()))
    steady = {
        k: v[1:] for k, v in phases.items()
    }  # the first iteration pays one-off costs on both sides
    n_params = sum(int(np.prod(q.shape)) for q in policy.trainable_params())
    return {
        "impl": f"mindrlhf-flow / mindspore 2.9.0 {mode}",
        "iterations": len(steady["iter"]),
        "warmup_iter_s": round(phases["iter"][0], 2),
        "samples_per_iter": batch,
        "updates_per_iter": gc.epochs * (batch // gc.mini_batch),
        "samples_per_s": round(batch * len(steady["iter"]) / sum(steady["iter"]), 3),
        **{f"{k}_s": round(float(np.mean(v)), 3) for k, v in steady.items()},
        "new_tokens_per_sample": new_tokens[-1],
        "prompt_len_padded": prompt_lens,
        "old_logps_recomputed": not sampled,
        "mean_reward": round(float(np.mean(rewards_seen)), 4),
        "params": n_params,
    }


def peer(args, prompts) -> dict:
    """TRL's side, in its own process (the peer venv)."""
    data, tokdir = write_inputs(prompts, "bench-grpo-", model_config(args.shape, args.seq)[1])
    cmd = ["--data", str(data), "--tokenizer-dir", str(tokdir)]
    for k in (
        "shape",
        "layers",
        "d",
        "heads",
        "seq",
        "prompts",
        "group",
        "new_tokens",
        "mini_batch",
        "epochs",
        "iters",
        "lr",
        "beta",
        "clip",
    ):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return run_peer("peer_trl_grpo.py", cmd)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--shape",
        choices=["gpt2", "smollm2"],
        default="gpt2",
        help="gpt2: the --layers/--d/--heads GPT-2 shape; smollm2: SmolLM2-135M's",
    )
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument(
        "--seq",
        type=int,
        default=128,
        help="max_seq_len / n_positions (prompt + new tokens must fit)",
    )
    ap.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--mini-batch", type=int, default=8, help="samples per optimizer update")
    ap.add_argument(
        "--epochs", type=int, default=1, help="passes over each rollout (TRL's num_iterations)"
    )
    ap.add_argument(
        "--iters", type=int, default=3, help="timed iterations; one more runs first as warm-up"
    )
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument(
        "--modes",
        default="compiled,pynative",
        help="our configurations to time: compiled (the default), pynative, decode (compiled "
        "decoding, eager training), layers (compiled decoding, eager training and scoring with "
        "each decoder layer one shared graph: grpo.layer_graphs); a +sampled suffix "
        "(layers+sampled) takes the old log-probs from the sampler (grpo.old_logprobs: sampling)",
    )
    ap.add_argument("--skip-peer", action="store_true", help="only our side")
    ap.add_argument(
        "--peer-first",
        action="store_true",
        help="run TRL before our modes (by default it runs last): on a VM whose speed drifts "
        "within a run, the two orders bracket the ratio",
    )
    add_layer_graph_args(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one of our modes, in its own process
    args = ap.parse_args()
    prompts = make_prompts(args.prompts * (args.iters + 1))
    if args.child:
        from mindrlhf.runtime import init_runtime

        init_runtime("CPU")
        r = ours(prompts, args, args.child)
        r["peak_rss_gb"] = peak_rss_gb()
        print(json.dumps(r))
        return
    # each side in its own process, one after the other: its own peak RSS, nothing shared
    modes = args.modes.split(",")
    trl = peer(args, prompts) if args.peer_first and not args.skip_peer else None
    runs = {m: own_side(__file__, m) for m in modes}
    result = {
        "bench": "grpo_throughput",
        "config": vars(args),
        "ours": runs[modes[0]],
        "ours_by_mode": runs,
    }
    if not args.skip_peer:
        trl = result["trl"] = trl or peer(args, prompts)
        o = result["ours"]
        result["ratio_vs_trl"] = round(
            o["samples_per_s"] / trl["samples_per_s"], 3
        )  # >1: ours faster
        result["ratio_vs_trl_by_mode"] = {
            m: round(r["samples_per_s"] / trl["samples_per_s"], 3) for m, r in runs.items()
        }
        result["phase_time_ratio_ours_over_trl"] = {  # >1: ours slower in that phase
            k: round(o[f"{k}_s"] / trl[f"{k}_s"], 3)
            for k in ("generation", "score", "update")
            if trl[f"{k}_s"] > 0
        }
        result["peak_rss_gb"] = {
            **{f"ours_{m}": r["peak_rss_gb"] for m, r in runs.items()},
            "trl": trl["peak_rss_gb"],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
