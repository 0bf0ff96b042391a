"""One round of online DPO: ``python -m mindrlhf.stages.online_dpo --spec S --out O``.

Inputs: ``policy`` (this round's starting checkpoint), ``reference`` (the SFT checkpoint, fixed
across rounds), ``prompts`` / ``heldout`` prompt datasets, ``rm`` and ``round``. The round samples
two responses per prompt from the current policy with the KV cache, ranks them with the reward
model or, with ``online_dpo.judge``, reward functions (the user's ``python:<file>:<fn>``),
writes the pairs as a versioned dataset, computes the
reference log-probs once, trains ``online_dpo.steps_per_round`` DPO steps on the pairs and reports
the held-out reward-model score of the policy before and after. The flow chains rounds, so each
round's pair dataset appears in the lineage between two checkpoints.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from .. import rewards
from ..data.tokenize import IDS
from ..data.tokenizer import load_tokenizer
from ..models import lora
from .common import StageContext, epoch_order, model_meta, stage_main
from .dpo import reference_logps, train_dpo
from .ppo import load_policy
from .rm import load_reward_model, score_sequences
from .rollout import decode_responses, rollout_config, sample, score_mask


def heldout_score(policy, reward, norm, prompts, tok, gen, n: int, seed: int) -> float:
    rows = prompts.column("prompt_ids").to_pylist()[:n]
    scores = [
        score_sequences(
            reward,
            (g := sample(policy, rows[s : s + 32], gen, tok, seed + s)).sequences,
            score_mask(g, tok.eos_id),
            norm,
        )
        for s in range(0, len(rows), 32)
    ]
    return float(np.concatenate(scores).mean())


def build_pairs(g, scores: np.ndarray, tok) -> tuple[pa.Table, dict]:
    """Consecutive rows (2i, 2i+1) answer the same prompt; the higher-scored one is chosen.
    Ties and identical responses are dropped."""
    p = g.prompt_len
    chosen, rejected, plen, margins = [], [], [], []
    for i in range(0, len(scores), 2):
        a, b = (i, i + 1) if scores[i] >= scores[i + 1] else (i + 1, i)
        if scores[a] == scores[b]:
            continue
        ra, rb = g.responses[a][g.response_mask[a] > 0], g.responses[b][g.response_mask[b] > 0]
        if len(ra) == 0 or len(rb) == 0 or np.array_equal(ra, rb):
            continue
        prompt = g.sequences[a, :p][g.attention_mask[a, :p] > 0].tolist()
        chosen.append(prompt + ra.tolist())
        rejected.append(prompt + rb.tolist())
        plen.append(len(prompt))
        margins.append(float(scores[a] - scores[b]))
    table = pa.table(
        {
            "chosen_ids": pa.array(chosen, IDS),
            "rejected_ids": pa.array(rejected, IDS),
            "prompt_len": pa.array(plen, pa.int32()),
            "margin": pa.array(margins, pa.float32()),
        }
    )
    return table, {"pairs": len(chosen), "mean_margin": float(np.mean(margins)) if margins else 0.0}


def run(ctx: StageContext) -> None:
    cfg, oc, dc = ctx.cfg, ctx.cfg.online_dpo, ctx.cfg.dpo
    rnd = int(ctx.inputs["round"])
    tok = load_tokenizer(cfg.tokenizer)
    prompts, heldout = (
        ctx.store.read_dataset(ctx.inputs["prompts"]),
        ctx.store.read_dataset(ctx.inputs["heldout"]),
    )
    policy = load_policy(
        ctx.store, ctx.inputs["policy"], cfg.model, train=False, parallel=cfg.parallel
    )
    policy = lora.wrap(policy, cfg.model.lora, cfg.seed + 13 + rnd, ctx.inputs["policy"])
    reference = load_policy(
        ctx.store, ctx.inputs["reference"], cfg.model, train=False, parallel=cfg.parallel
    )
    reward, norm = load_reward_model(ctx.store, ctx.inputs["rm"], cfg.model)  # the held-out score
    judge = None if oc.judge == "rm" else rewards.load(oc.judge, oc.judge_weights)
    gen = rollout_config(cfg.generation)
    seed = cfg.seed * 1000 + 500 + rnd

    score_before = heldout_score(
        policy, reward, norm, heldout, tok, gen, oc.eval_prompts, cfg.seed + 99
    )
    idx = np.repeat(epoch_order(prompts.num_rows, rnd, oc.prompts_per_round, cfg.seed + 13), 2)
    table = prompts.take(pa.array(idx))
    g = sample(policy, table.column("prompt_ids").to_pylist(), gen, tok, seed=seed)
    if judge is None:  # ranked by the reward model
        scores = score_sequences(reward, g.sequences, score_mask(g, tok.eos_id), norm)
    else:  # ranked by the user's (or a recipe's) reward functions, given the prompt table's columns
        cols = {
            c: table.column(c).to_pylist()
            for c in table.column_names
            if c not in ("prompt_ids", "prompt")
        }
        scores = judge(table.column("prompt").to_pylist(), decode_responses(g, tok), cols)
    pairs, info = build_pairs(g, scores, tok)
    if pairs.num_rows == 0:  # the judge could not tell any pair apart: this round teaches nothing
        ctx.log(
            f"round {rnd}: every sampled pair tied under the judge; the policy goes on unchanged"
        )
    pairs_art = ctx.store.write_dataset(
        pairs,
        name=f"{cfg.name}-online-dpo-pairs-{rnd}",
        parents=[ctx.inputs["prompts"], ctx.inputs["policy"], ctx.inputs["rm"]],
        meta={"stage": "online_dpo", "round": rnd, **info, "example": decode_responses(g, tok)[:2]},
    )
    ctx.log(
        f"round {rnd}: {info['pairs']} pairs (mean score margin {info['mean_margin']:.3f}) -> "
        f"{pairs_art.id[:12]}"
    )
    # the table dpo.loss trains on (the pairs, or KTO's examples) and its reference log-probs
    train, ref_table = reference_logps(reference, pairs, tok.pad_id, dc.loss == "kto", seed + 2)
    ref_art = ctx.store.write_dataset(
        ref_table,
        name=f"{cfg.name}-online-dpo-ref-{rnd}",
        parents=[pairs_art.id, ctx.inputs["reference"]],
        meta={"round": rnd},
    )
    policy.set_train(True)
    history = (
        train_dpo(
            ctx,
            policy,
            train,
            ctx.store.read_dataset(ref_art.id),
            oc.steps_per_round,
            seed + 1,
            tok,
            dc=dataclasses.replace(dc, lr=oc.lr),
        )
        if pairs.num_rows
        else []
    )
    score_after = heldout_score(
        policy, reward, norm, heldout, tok, gen, oc.eval_prompts, cfg.seed + 99
    )
    ctx.metric(
        step=rnd + 1, heldout_score_before=score_before, heldout_score_after=score_after, **info
    )
    if not ctx.dist.is_main:
        return
    metrics = {
        "round": rnd,
        "heldout_score_before": score_before,
        "heldout_score_after": score_after,
        "sample_score_mean": float(scores.mean()),
        **info,
    }
    art = ctx.store.write_checkpoint(
        lora.saved_state(policy),
        name=f"{cfg.name}-online-dpo-{rnd}",
        parents=[ctx.inputs["policy"], pairs_art.id, ref_art.id, ctx.inputs["reference"]],
        meta={
            "stage": "online_dpo",
            "model": model_meta(cfg),
            "metrics": metrics,
            "history": history,
            **lora.checkpoint_meta(policy),
        },
    )
    ctx.finish(
        {"checkpoint": art.id, "pairs": pairs_art.id, "reference_logps": ref_art.id},
        metrics,
        history=history,
    )


if __name__ == "__main__":
    stage_main("online_dpo", run)
