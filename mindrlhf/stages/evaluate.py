"""Evaluate stage: ``python -m mindrlhf.stages.evaluate --spec S --out O``.

Inputs: ``policy`` (the checkpoint judged), ``prompts`` (a held-out prompt table), ``sft`` (the
reference its KL is measured from) and, optionally, ``rm``. The first ``evaluate.n_prompts``
prompts are answered by the policy -- greedily by default, else sampled with a fixed seed -- and
every answer is scored: by the judge (``evaluate.judge``: a recipe's gold judge such as VADER, a
verifiable reward such as arithmetic's, or the user's ``python:<file>:<fn>``), by the reward model,
by its log-ratio to the reference (sum over response tokens of log pi - log pi_ref; its mean is
the KL when the answers are sampled) and by its length. One row per prompt, in prompt order, in
an Arrow dataset: the promote stage compares two of them prompt by prompt."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import rewards
from ..config import GenerationConfig
from ..data.recipes import load_recipe
from ..data.tokenizer import load_tokenizer
from .common import StageContext, stage_main
from .grpo import rows_of
from .ppo import load_policy, recipe_gold
from .rm import load_reward_model, score_sequences
from .rollout import (
    decode_responses,
    greedy_config,
    response_logprobs,
    rollout_config,
    sample,
    score_mask,
)


def load_judge(spec, weights=None):
    """(prompts, completions, columns) -> scores. A recipe with an independent gold judge
    (movie_reviews: VADER) is judged by it; another recipe by its verifiable reward; a
    ``python:`` function (or a list, weighted) as the reward functions everywhere else."""
    if isinstance(spec, str) and not spec.startswith("python:"):
        try:
            recipe = load_recipe(spec)
        except FileNotFoundError:
            recipe = None
        if recipe is not None and hasattr(recipe, "gold_reward"):
            return recipe_gold(spec, recipe)
    return rewards.load(spec, weights)


def generation_config(ctx) -> GenerationConfig:
    ec, gen = ctx.cfg.evaluate, ctx.cfg.generation
    if ec.greedy:
        return greedy_config(gen, ec.max_new_tokens)
    return rollout_config(gen, max_new_tokens=ec.max_new_tokens)


def run(ctx: StageContext) -> None:
    from mindspore import Tensor

    cfg, ec, inputs = ctx.cfg, ctx.cfg.evaluate, ctx.inputs
    tok = load_tokenizer(cfg.tokenizer)
    table = ctx.store.read_dataset(inputs["prompts"])
    n = min(ec.n_prompts, table.num_rows)
    policy = load_policy(ctx.store, inputs["policy"], cfg.model, train=False, parallel=cfg.parallel)
    ref = (
        policy
        if inputs["sft"] == inputs["policy"]
        else load_policy(ctx.store, inputs["sft"], cfg.model, train=False, parallel=cfg.parallel)
    )
    rm, norm = (
        load_reward_model(ctx.store, inputs["rm"], cfg.model) if inputs.get("rm") else (None, {})
    )
    judge = load_judge(ec.judge, ec.judge_weights) if ec.judge else None
    gen = generation_config(ctx)
    cols: dict[str, list] = {"prompt": [], "response": [], "length": [], "logratio": []}
    if judge is not None:
        cols["judge"] = []
    if rm is not None:
        cols["rm"] = []
    for s in range(0, n, 32):
        rows = rows_of(table, list(range(s, min(s + 32, n))))
        g = sample(policy, rows["prompt_ids"], gen, tok, seed=cfg.seed + 99 + s)
        texts = decode_responses(g, tok)
        seq, am = Tensor(g.sequences), Tensor(g.attention_mask)
        lp = response_logprobs(policy, seq, am, g.prompt_len).asnumpy()
        lr = lp if ref is policy else response_logprobs(ref, seq, am, g.prompt_len).asnumpy()
        cols["prompt"] += rows["prompt"]
        cols["response"] += texts
        cols["length"] += g.response_mask.sum(1).tolist()
        cols["logratio"] += ((lp - lr) * g.response_mask).sum(1).tolist()
        if judge is not None:
            extra = {k: v for k, v in rows.items() if k not in ("prompt", "prompt_ids")}
            cols["judge"] += np.asarray(judge(rows["prompt"], texts, extra)).tolist()
        if rm is not None:
            cols["rm"] += score_sequences(rm, g.sequences, score_mask(g, tok.eos_id), norm).tolist()
    out = pa.table(
        {
            k: pa.array(v, pa.string() if k in ("prompt", "response") else pa.float64())
            for k, v in cols.items()
        }
    )
    metrics = {
        f"{k}_mean": float(np.mean(v)) for k, v in cols.items() if k not in ("prompt", "response")
    }
    metrics["prompts"] = n
    pol = ctx.store.get(inputs["policy"], verify=False)
    ctx.log(
        f"{pol.name}@{pol.id[:8]} on {n} held-out prompts: "
        + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "prompts")
        + f"  e.g. {cols['response'][:1]}"
    )
    art = ctx.store.write_dataset(
        out,
        name=f"{cfg.name}-eval",
        parents=[inputs["policy"], inputs["prompts"], inputs["sft"]]
        + ([inputs["rm"]] if inputs.get("rm") else []),
        meta={
            "stage": "evaluate",
            "policy": inputs["policy"],
            "judge": ec.judge,
            "greedy": ec.greedy,
            "metrics": metrics,
        },
    )
    ctx.finish({"scores": art.id}, metrics)


if __name__ == "__main__":
    stage_main("evaluate", run)
