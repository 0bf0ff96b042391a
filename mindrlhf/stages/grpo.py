"""GRPO stage: ``python -m mindrlhf.stages.grpo --spec S --out O``.

Inputs: ``prompts`` / ``heldout`` prompt datasets (with the columns the reward needs, e.g.
``answer``), ``sft`` (policy and frozen reference), optionally ``rm``. Each iteration samples
``group_size`` responses for each of ``prompts_per_iter`` prompts with the KV cache, scores them
with a recipe's verifiable reward function (``grpo.reward: arithmetic``) or the reward model
(``grpo.reward: rm``), normalises rewards within each group, writes the rollout as an Arrow
dataset, and runs clipped policy updates with a k3 KL penalty to the reference. No critic.
``grpo.estimator`` / ``grpo.loss_agg`` choose the advantages and the aggregation (RLOO,
REINFORCE++, Dr. GRPO, DAPO: :mod:`..algos.estimators`); DAPO's dynamic sampling
and overlong penalty shape the batch and the reward (:mod:`.dynamic_sampling`).
With ``grpo.gold_reward`` the reward-hacking watch (:mod:`.watch`) probes the policy as in PPO,
the optimised reward as the proxy.
"""

from __future__ import annotations

import functools

import numpy as np

from .. import rewards
from ..algos.dapo import overlong_penalty
from ..algos.estimators import ESTIMATORS, policy_loss
from ..data.tokenizer import load_tokenizer
from ..models import lora
from ..models.generation import Generation
from .common import (
    NumericalError,
    RunCheckpoints,
    StageContext,
    Trainer,
    epoch_order,
    finish_chunk,
    gather_rows,
    minibatches,
    model_meta,
    save_training_state,
    shard,
    stage_main,
    start_chunk,
)
from .dynamic_sampling import fill_batch, more_prompts
from .metrics import publish_metrics
from .ppo import load_gold_reward, load_policy
from .rm import load_reward_model, score_sequences
from .rollout import (
    RolloutLog,
    decode_responses,
    experience_table,
    greedy_config,
    response_logprobs,
    rollout_config,
    sample,
    score_mask,
    score_rollout,
)
from .watch import HackingWatch


def make_reward_fn(ctx: StageContext, tok):
    """(generation, prompt-table rows) -> per-sample rewards: the reward model (``grpo.reward:
    rm``) or reward functions (a recipe's, or the user's ``python:<file>:<fn>``, weighted)."""
    gc = ctx.cfg.grpo
    if gc.reward == "rm":
        if not ctx.inputs.get("rm"):
            raise ValueError("grpo.reward is 'rm' but no reward-model checkpoint was given")
        model, norm = load_reward_model(ctx.store, ctx.inputs["rm"], ctx.cfg.model)
        return lambda g, rows: score_sequences(model, g.sequences, score_mask(g, tok.eos_id), norm)
    fn = rewards.load(gc.reward, gc.reward_weights)
    return lambda g, rows: fn(
        rows["prompt"],
        decode_responses(g, tok),
        {k: v for k, v in rows.items() if k not in ("prompt_ids",)},
    )


def rows_of(table, idx) -> dict[str, list]:
    sub = table.take(idx)
    return {c: sub.column(c).to_pylist() for c in sub.column_names}


def accuracy(
    ctx, policy, table, reward_fn, tok, n: int, greedy: bool, seed: int
) -> tuple[float, float]:
    """(mean reward, fraction with reward 1.0) over the first ``n`` rows of ``table``, answered in
    batches of the rollout's row count (prompts_per_iter x group_size; the last one filled up with
    its last prompt, whose extra answers are not counted): compiled decoding then steps at the
    rollouts' shape, with their decode cache and graphs, and keeps none of a second shape."""
    gc = ctx.cfg.grpo
    gen = (
        greedy_config(ctx.cfg.generation, gc.max_new_tokens)
        if greedy
        else rollout_config(ctx.cfg.generation, max_new_tokens=gc.max_new_tokens)
    )
    size, n = gc.prompts_per_iter * gc.group_size, min(n, table.num_rows)
    rewards = []
    for s in range(0, n, size):
        idx = list(range(s, min(s + size, n)))
        real = len(idx)
        rows = rows_of(table, idx + idx[-1:] * (size - real))
        g = sample(policy, rows["prompt_ids"], gen, tok, seed=seed + s)
        rewards.append(reward_fn(g, rows)[:real])
    r = np.concatenate(rewards)
    return float(r.mean()), float((r >= 1.0).mean())


def run(ctx: StageContext) -> None:
    from mindspore import Tensor

    cfg, gc = ctx.cfg, ctx.cfg.grpo
    tok = load_tokenizer(cfg.tokenizer)
    prompts = ctx.store.read_dataset(ctx.inputs["prompts"])
    heldout = ctx.store.read_dataset(ctx.inputs["heldout"])
    policy = load_policy(ctx.store, ctx.inputs["sft"], cfg.model, train=True, parallel=cfg.parallel)
    policy = lora.wrap(policy, cfg.model.lora, cfg.seed, ctx.inputs["sft"])
    # LoRA: the reference is the policy's own base weights, adapters off (no second copy)
    ref = lora.base_of(policy) or load_policy(
        ctx.store, ctx.inputs["sft"], cfg.model, train=False, parallel=cfg.parallel
    )
    reward_fn = make_reward_fn(ctx, tok)
    gen = rollout_config(cfg.generation, max_new_tokens=gc.max_new_tokens)

    objective = policy_loss(gc)

    def loss_fn(seq, am, old_lp, ref_lp, adv, mask, denom, p):
        # eagerly, a mini-batch's rows of one group run their prompt once (forward and backward)
        lp = response_logprobs(policy, seq, am, p, share_prompts=not gc.compiled)
        return objective(lp, old_lp, ref_lp, adv, mask, denom)

    batch = gc.prompts_per_iter * gc.group_size
    trainer = Trainer(
        policy.trainable_params(),
        loss_fn,
        gc,
        ctx.dist,
        gc.iterations * gc.epochs * (batch // gc.mini_batch),
    )
    ckpts = RunCheckpoints(ctx.run_dir, ctx.key)
    models, trainers = {"policy": policy}, {"policy": trainer}
    first, end, start, state = start_chunk(ctx, gc, ckpts, models, trainers)
    history, experience_ids = state.get("history", []), state.get("experience", [])
    rollouts = RolloutLog(ctx)
    watch = HackingWatch(
        ctx,
        gc,
        "policy",
        policy,
        reward_fn,
        load_gold_reward(gc.gold_reward, "grpo.gold_reward"),
        heldout,
        tok,
        state.get("probes"),
    )
    watch.start(start)

    def draw(it: int, t: int, idx: np.ndarray):
        """Round ``t`` of iteration ``it``: the groups of prompts ``idx`` (each repeated
        group_size times), this rank's rows sampled and rewarded, then every rank's rows
        gathered (advantages are relative within whole groups: each rank holds the whole
        rollout). Returns (Generation, {reward, score: the reward advantages see})."""
        batch_rows = np.repeat(idx, gc.group_size)
        mine = shard(np.arange(len(batch_rows)), ctx.dist)
        rows = rows_of(prompts, batch_rows[mine])
        policy.set_train(False)
        g = sample(
            policy,
            rows["prompt_ids"],
            gen,
            tok,
            seed=cfg.seed * 1000 + it * 16,
            multiple=gc.pad_to,
            row_ids=mine + t * len(batch_rows),  # round t: rows of their own random streams
            batch_prompts=rows_of(prompts, batch_rows)["prompt_ids"],
            dist=ctx.dist,
            logprobs=gc.old_logprobs == "sampling",
        )
        local = {
            "sequence": g.sequences,
            "attention_mask": g.attention_mask,
            "response_mask": g.response_mask,
            "reward": reward_fn(g, rows),
        }
        if g.logprobs is not None:
            local["logprobs"] = g.logprobs
        c = gather_rows(local, ctx.dist)
        whole = Generation(
            c["sequence"], c["attention_mask"], c["response_mask"], g.prompt_len, c.get("logprobs")
        )
        cols = {"reward": np.asarray(c["reward"])}
        if gc.overlong_buffer:
            lengths = whole.response_mask.sum(1)
            cols["overlong_penalty"] = overlong_penalty(
                lengths, gc.max_new_tokens, gc.overlong_buffer, gc.overlong_penalty
            )
        cols["score"] = cols["reward"] + cols.get("overlong_penalty", 0.0)
        return whole, cols

    def pick(it: int, t: int, seen: np.ndarray) -> np.ndarray:
        if t == 0:
            return epoch_order(prompts.num_rows, it, gc.prompts_per_iter, cfg.seed + 5)
        return more_prompts(prompts.num_rows, gc.prompts_per_iter, cfg.seed + 6, it, t, seen)

    sampling_counts: dict[int, dict] = {}

    def make_rollout(it: int):
        """The iteration's groups (refilled by dynamic sampling when it is on), scored by the
        policy and the reference (each rank its shard, then gathered), with advantages."""
        if gc.dynamic_sampling:
            g, cols, counts = fill_batch(
                lambda t, idx: draw(it, t, idx),
                lambda t, seen: pick(it, t, seen),
                gc.prompts_per_iter,
                gc.group_size,
                gc.dynamic_sampling_max_tries,
                tok.pad_id,
            )
            sampling_counts[it] = counts
        else:
            g, cols = draw(it, 0, pick(it, 0, np.zeros(0, np.int64)))
        seq, am, p = g.sequences, g.attention_mask, g.prompt_len
        mine = shard(np.arange(len(seq)), ctx.dist)
        rmask = g.response_mask[mine].astype(np.float32)
        scored = {
            "ref_logprobs": score_rollout(
                response_logprobs, ref, seq[mine], am[mine], p, gc.compiled, share_prompts=True
            )
            * rmask
        }
        if gc.old_logprobs == "recompute":
            scored["logprobs"] = (
                score_rollout(
                    response_logprobs,
                    policy,
                    seq[mine],
                    am[mine],
                    p,
                    gc.compiled,
                    share_prompts=True,
                )
                * rmask
            )
        c = gather_rows(scored, ctx.dist)
        mask = g.response_mask.astype(np.float32)
        if gc.old_logprobs == "sampling":  # the sampler's own, recorded in draw()
            c["logprobs"] = g.logprobs * mask
        adv = ESTIMATORS[gc.estimator](gc, cols["score"], c["logprobs"], c["ref_logprobs"], mask)
        shaping = {k: cols[k] for k in ("overlong_penalty",) if k in cols}
        table = experience_table(
            g,
            {
                "logprobs": c["logprobs"],
                "ref_logprobs": c["ref_logprobs"],
                "reward": cols["reward"],
                **shaping,
                "advantage": adv,
            },
        )
        meta = {"stage": "grpo", "iteration": it}
        if gc.dynamic_sampling:
            meta["dynamic_sampling"] = sampling_counts[it]
        return table, dict(
            name=f"{cfg.name}-grpo-rollout-{it}",
            parents=[ctx.inputs["prompts"], ctx.inputs["sft"]],
            meta=meta,
        )

    def counts_of(it: int, exp_id: str | None) -> dict:
        """Dynamic sampling's counts of iteration ``it``: kept when it sampled, else (a resumed
        run reusing the rollout) in the rollout's manifest."""
        if it in sampling_counts:
            return sampling_counts.pop(it)
        return ctx.store.get(exp_id, verify=False).meta["dynamic_sampling"]

    n_eval = gc.eval_prompts
    alarm = None
    for it in range(start, end):
        exp_id, ex = rollouts.get_or_make(it, functools.partial(make_rollout, it))
        experience_ids.append(exp_id)

        policy.set_train(True)
        seqs, am, p = ex["sequence"], ex["attention_mask"], int(ex["prompt_len"][0])
        rmask = ex["response_mask"].astype(np.float32)
        losses, kls, cfs = [], [], []
        for epoch in range(gc.epochs):
            for b, whole in minibatches(len(seqs), gc.mini_batch, [cfg.seed, it, epoch], ctx.dist):
                denom = np.float32(max(rmask[whole].sum(), 1.0) / ctx.dist.size)
                loss, _, (kl, cf) = trainer.step(
                    Tensor(seqs[b]),
                    Tensor(am[b]),
                    Tensor(ex["logprobs"][b]),
                    Tensor(ex["ref_logprobs"][b]),
                    Tensor(ex["advantage"][b]),
                    Tensor(rmask[b]),
                    Tensor(denom),
                    p,
                )
                losses.append(loss)
                kls.append(float(kl.asnumpy()))
                cfs.append(float(cf.asnumpy()))
        row = {
            "step": it + 1,
            "reward_mean": float(ex["reward"].mean()),
            "accuracy": float((ex["reward"] >= 1.0).mean()),
            "loss": float(np.mean(losses)),
            "kl": float(np.mean(kls)),
            "clipfrac": float(np.mean(cfs)),
            "response_length": float(rmask.sum(1).mean()),
        }
        if "overlong_penalty" in ex:
            row["overlong_penalty"] = float(ex["overlong_penalty"].mean())
        if gc.dynamic_sampling:
            row.update(counts_of(it, exp_id))
        if not all(np.isfinite(v) for v in row.values()):
            raise NumericalError(f"iteration {it}: non-finite metrics {row}")
        if gc.eval_every and (it + 1) % gc.eval_every == 0 and it + 1 < gc.iterations:
            policy.set_train(False)
            row["heldout_greedy_accuracy"] = accuracy(
                ctx, policy, heldout, reward_fn, tok, n_eval, True, 0
            )[1]
        alarm = watch.check(it + 1, row)
        history.append(row)
        ctx.metric(**row)
        done = it + 1
        if done % gc.ckpt_every == 0 and done < gc.iterations and ctx.dist.is_main:
            save_training_state(
                ckpts,
                done,
                models,
                trainers,
                {"history": history, "experience": experience_ids, "probes": watch.probes},
            )
            ctx.log(f"checkpoint at iteration {done}")
        if watch.stops(alarm):
            break

    if not ctx.dist.is_main:
        return
    stop_now = watch.stops(alarm)
    if end < gc.iterations and not stop_now:  # a chunk: hand the whole state to the next one
        extra, carry = {"probes": watch.probes}, watch.carry_out()
        return finish_chunk(
            ctx, first, end, models, trainers, history, experience_ids, extra, carry
        )
    stopped = watch.restore_best(alarm, history[-1]["step"]) if stop_now else None
    before = {  # the SFT policy's figures (the reference: frozen, so the same at any time)
        "train": accuracy(ctx, ref, prompts, reward_fn, tok, n_eval, False, cfg.seed + 7),
        "heldout_greedy": accuracy(ctx, ref, heldout, reward_fn, tok, n_eval, True, 0),
        "heldout": accuracy(ctx, ref, heldout, reward_fn, tok, n_eval, False, cfg.seed + 8),
    }
    ctx.log(f"SFT policy: reward/accuracy {before}")
    policy.set_train(False)
    after = {
        "train": accuracy(ctx, policy, prompts, reward_fn, tok, n_eval, False, cfg.seed + 7),
        "heldout_greedy": accuracy(ctx, policy, heldout, reward_fn, tok, n_eval, True, 0),
        "heldout": accuracy(ctx, policy, heldout, reward_fn, tok, n_eval, False, cfg.seed + 8),
    }
    ctx.log(f"GRPO policy: reward/accuracy {after}")
    metrics = {
        "accuracy_sft": before["heldout"][1],
        "accuracy_grpo": after["heldout"][1],
        "accuracy_greedy_sft": before["heldout_greedy"][1],
        "accuracy_greedy_grpo": after["heldout_greedy"][1],
        "train_prompts_accuracy_sft": before["train"][1],
        "train_prompts_accuracy_grpo": after["train"][1],
        "reward_sft": before["heldout"][0],
        "reward_grpo": after["heldout"][0],
        "iterations": len(history),
        "hacking_alarms": sum(1 for h in history if h.get("hacking_suspected")),
    }
    mart = publish_metrics(
        ctx,
        history,
        ["reward_mean", "accuracy", "heldout_greedy_accuracy", "probe_gold", "kl", "loss"],
        parents=sorted(set(experience_ids)),
    )
    parents = [ctx.inputs["prompts"], ctx.inputs["heldout"], ctx.inputs["sft"], mart.id]
    art = ctx.store.write_checkpoint(
        lora.saved_state(policy),
        name=f"{cfg.name}-grpo",
        parents=parents,
        meta={
            "stage": "grpo",
            "model": model_meta(cfg),
            "metrics": metrics,
            "reward": gc.reward,
            "experience": experience_ids,
            "gold_reward": gc.gold_reward,
            "stopped_early": stopped,
            "hacking_probes": watch.summary(),  # step, mean reward, mean gold score
            **lora.checkpoint_meta(policy),
        },
    )
    ctx.finish({"checkpoint": art.id, "metrics": mart.id}, metrics, history=history)


if __name__ == "__main__":
    stage_main("grpo", run)
