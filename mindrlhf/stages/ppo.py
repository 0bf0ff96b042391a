"""PPO stage (InstructGPT / MindRLHF loop): ``python -m mindrlhf.stages.ppo --spec S --out O``.

Inputs: ``prompts`` / ``heldout`` prompt datasets, ``sft`` (actor and frozen reference) and ``rm``
(frozen reward model, and the critic's initialisation). Each iteration:

1. make_experience: sample responses from the actor with the KV cache; log-probs of actor and
   reference; critic values; reward-model score (standardised, clipped); per-token KL penalty;
   GAE advantages (whitened) and returns. The rollout is written as an Arrow dataset in the store
   before any update, and its id recorded in the run directory, so a crashed update resumes
   from the same rollout without sampling again.
2. ``ppo_epochs`` passes of clipped policy and clipped value updates over mini-batches.
3. The KL controller (adaptive or fixed) moves the penalty coefficient.

At the end the held-out prompts are sampled from the SFT policy and from the PPO policy with the
same seed and scored by the reward model: the figures the pipeline reports. With ``ppo.gold_reward``
(e.g. ``movie_reviews``: VADER) every rollout and both evaluations are also scored by that
independent judge, which the policy never optimises: when the RM score climbs and the gold score
does not, the policy is exploiting the reward model: the reward-hacking watch
(:mod:`mindrlhf.monitor`) probes the policy on fixed held-out prompts every
``ppo.hacking_probe_every`` iterations and raises an alarm (and, with ``hacking_stop``, stops,
keeping the best-gold probe's policy).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .. import rewards
from ..algos.common import entropy_from_logits, masked_mean, token_logprobs
from ..algos.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from ..data.recipes import load_recipe
from ..data.tokenizer import load_tokenizer
from ..models import lora
from ..models.decoder import load_state_dict
from ..models.generation import Generation
from ..models.policy import build_policy, build_scalar_head
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
from .metrics import publish_metrics
from .rm import load_reward_model, score_sequences
from .rollout import (
    RolloutLog,
    decode_responses,
    experience_table,
    response_logprobs,
    response_values,
    rollout_config,
    sample,
    score_mask,
    score_rollout,
)
from .watch import HackingWatch


def load_policy(store, ckpt_id: str, model_cfg, train: bool, *, parallel):
    """A stored checkpoint as the policy of ``model_cfg.backend`` (models/policy.py), sharded by
    ``parallel`` (the config's section: every caller passes it, so no policy is left unsharded)."""
    m = build_policy(model_cfg, seed=0, parallel=parallel)
    load_state_dict(m, lora.read_weights(store, ckpt_id), source=f"policy {ckpt_id[:12]}")
    m.set_train(train)
    return m


def recipe_gold(spec: str, recipe):
    """A recipe's independent judge (``gold_reward``, movie_reviews: VADER) as (prompts, responses,
    columns) -> scores, its output checked."""
    return lambda prompts, responses, columns=None: rewards.check(
        recipe.gold_reward(prompts, responses), len(responses), f"{spec}.gold_reward"
    )


def load_gold_reward(spec: str, key: str = "ppo.gold_reward"):
    """(prompt texts, response texts, columns) -> gold scores from an independent judge: a recipe's
    ``gold_reward`` (movie_reviews: VADER) or a user function ``python:<file>:<fn>``; None if
    unset. ``key`` names the setting in errors."""
    if not spec:
        return None
    if spec.startswith("python:"):
        fn = rewards.load(spec)
        return lambda prompts, responses, columns=None: fn(prompts, responses, columns)
    recipe = load_recipe(spec)
    if not hasattr(recipe, "gold_reward"):
        raise ValueError(f"{key}: recipe {spec!r} has no gold_reward function")
    return recipe_gold(spec, recipe)


def evaluate_policies(
    ctx, policies: dict, reward, norm, prompts, tok, n: int, seed: int, gold=None
) -> dict:
    """Mean RM score (and gold score, if a gold judge is given) of each policy's samples on the
    same held-out prompts and seed, and the KL (sum over response tokens of log pi - log pi_ref)
    of each policy from the first one."""
    from mindspore import Tensor

    rows = prompts.column("prompt_ids").to_pylist()[:n]
    texts_in = prompts.column("prompt").to_pylist()[:n]
    ref = next(iter(policies.values()))
    out = {}
    for name, pol in policies.items():
        scores, golds, kls, lens, texts = [], [], [], [], []
        for s in range(0, len(rows), 32):
            g = sample(
                pol, rows[s : s + 32], rollout_config(ctx.cfg.generation), tok, seed=seed + s
            )
            scores.append(score_sequences(reward, g.sequences, score_mask(g, tok.eos_id), norm))
            if gold is not None:
                golds.append(gold(texts_in[s : s + 32], decode_responses(g, tok)))
            seq, am = Tensor(g.sequences), Tensor(g.attention_mask)
            lp = response_logprobs(pol, seq, am, g.prompt_len).asnumpy()
            lr = response_logprobs(ref, seq, am, g.prompt_len).asnumpy()
            kls.append(((lp - lr) * g.response_mask).sum(1))
            lens.append(g.response_mask.sum(1))
            texts += decode_responses(g, tok)[:2] if s == 0 else []
        out[name] = {
            "score": float(np.concatenate(scores).mean()),
            "kl": float(np.concatenate(kls).mean()),
            "length": float(np.concatenate(lens).mean()),
            "samples": texts,
        }
        if gold is not None:
            out[name]["gold"] = float(np.concatenate(golds).mean())
    return out


def run(ctx: StageContext) -> None:
    from mindspore import Tensor

    cfg, pc = ctx.cfg, ctx.cfg.ppo
    tok = load_tokenizer(cfg.tokenizer)
    prompts = ctx.store.read_dataset(ctx.inputs["prompts"])
    heldout = ctx.store.read_dataset(ctx.inputs["heldout"])
    prompt_rows = prompts.column("prompt_ids").to_pylist()
    prompt_texts = prompts.column("prompt").to_pylist()
    gold = load_gold_reward(pc.gold_reward)
    actor = load_policy(ctx.store, ctx.inputs["sft"], cfg.model, train=True, parallel=cfg.parallel)
    actor = lora.wrap(actor, cfg.model.lora, cfg.seed, ctx.inputs["sft"])
    # LoRA: the reference is the actor's own base weights, adapters off (no second copy)
    ref = lora.base_of(actor) or load_policy(
        ctx.store, ctx.inputs["sft"], cfg.model, train=False, parallel=cfg.parallel
    )
    reward, norm = load_reward_model(ctx.store, ctx.inputs["rm"], cfg.model)
    critic = build_scalar_head(cfg.model, seed=0, parallel=cfg.parallel)
    load_state_dict(critic, lora.read_weights(ctx.store, ctx.inputs["rm"]), source="critic init")
    critic = lora.wrap(critic, cfg.model.lora, cfg.seed + 2, ctx.inputs["rm"], train=("score.",))

    def actor_loss(seq, am, old_lp, adv, mask, p, denom):
        logits = actor.response_logits(seq, am, p)
        lp = token_logprobs(logits, seq[:, p:])
        loss, clipfrac, approx_kl = policy_loss(lp, old_lp, adv, mask, pc.clip_range, denom)
        ent = masked_mean(entropy_from_logits(logits), mask, denom=denom)
        if pc.entropy_coef:
            loss = loss - pc.entropy_coef * ent
        return loss, clipfrac, approx_kl, ent

    def critic_loss(seq, am, old_v, ret, mask, p, denom):
        v = response_values(critic, seq, am, p)
        return value_loss(v, old_v, ret, mask, pc.clip_range_value, denom)

    updates = pc.iterations * pc.ppo_epochs * (pc.rollout_batch // pc.mini_batch)
    t_actor = Trainer(actor.trainable_params(), actor_loss, pc, ctx.dist, updates)
    critic_opt = dataclasses.replace(pc, lr=pc.critic_lr)
    t_critic = Trainer(critic.trainable_params(), critic_loss, critic_opt, ctx.dist, updates)
    kl_ctl = (
        AdaptiveKLController(pc.kl_coef, pc.kl_target, pc.kl_horizon)
        if pc.adaptive_kl
        else FixedKLController(pc.kl_coef)
    )
    ckpts = RunCheckpoints(ctx.run_dir, ctx.key)
    models, trainers = {"actor": actor, "critic": critic}, {"actor": t_actor, "critic": t_critic}
    first, end, start, state = start_chunk(ctx, pc, ckpts, models, trainers)
    history, experience_ids = state.get("history", []), state.get("experience", [])
    kl_ctl.value = state.get("kl_coef", kl_ctl.value)
    rollout_cfg = rollout_config(cfg.generation)
    rollouts = RolloutLog(ctx)
    watch = HackingWatch(
        ctx,
        pc,
        "actor",
        actor,
        lambda g, rows: score_sequences(reward, g.sequences, score_mask(g, tok.eos_id), norm),
        gold,
        heldout,
        tok,
        state.get("probes"),
    )
    watch.start(start)

    def make_experience(it: int):
        """Sample this rank's rows of the iteration's prompt batch, score them, gather every rank's
        rows (so each rank holds the whole rollout: advantages are whitened over all of it and the
        mini-batches are the ones one worker would take) and compute the advantages."""
        order = epoch_order(len(prompt_rows), it, pc.rollout_batch, cfg.seed + 3)
        batch = [prompt_rows[i] for i in order]
        mine = shard(np.arange(pc.rollout_batch), ctx.dist)
        actor.set_train(False)
        g = sample(
            actor,
            [batch[i] for i in mine],
            rollout_cfg,
            tok,
            seed=cfg.seed * 1000 + it * 16,
            multiple=pc.pad_to,
            row_ids=mine,
            batch_prompts=batch,
            dist=ctx.dist,
            logprobs=pc.old_logprobs == "sampling",
        )
        seq, am, p = g.sequences, g.attention_mask, g.prompt_len
        rmask = g.response_mask.astype(np.float32)
        raw = score_sequences(reward, g.sequences, score_mask(g, tok.eos_id), norm)
        if pc.old_logprobs == "sampling":
            old = g.logprobs  # the sampler's own, recorded as it sampled
        else:
            old = score_rollout(response_logprobs, actor, seq, am, p, pc.compiled)
        local = {
            "sequence": seq,
            "attention_mask": am,
            "response_mask": g.response_mask,
            "logprobs": old * rmask,
            "ref_logprobs": score_rollout(response_logprobs, ref, seq, am, p, pc.compiled) * rmask,
            "values": score_rollout(response_values, critic, seq, am, p, pc.compiled) * rmask,
            "score": np.clip(raw, -pc.score_clip, pc.score_clip),
        }
        if gold is not None:  # logged only: the policy never sees it
            local["gold"] = gold([prompt_texts[i] for i in order[mine]], decode_responses(g, tok))
        c = gather_rows(local, ctx.dist)
        rmask = c["response_mask"].astype(np.float32)
        rewards, kl = kl_penalized_rewards(
            c["score"], c["logprobs"], c["ref_logprobs"], rmask, kl_ctl.value
        )
        adv, ret = gae(rewards, c["values"], rmask, pc.gamma, pc.lam)
        if pc.whiten_advantages:
            adv = whiten(adv, rmask)
        cols = {
            "logprobs": c["logprobs"],
            "ref_logprobs": c["ref_logprobs"],
            "values": c["values"],
            "rewards": rewards,
            "advantages": adv,
            "returns": ret,
            "kl": kl,
            "score": c["score"],
        }
        if gold is not None:
            cols["gold"] = c["gold"]
        table = experience_table(
            Generation(c["sequence"], c["attention_mask"], c["response_mask"], p), cols
        )
        return table, dict(
            name=f"{cfg.name}-ppo-rollout-{it}",
            parents=[ctx.inputs["prompts"], ctx.inputs["sft"], ctx.inputs["rm"]],
            meta={"stage": "ppo", "iteration": it, "kl_coef": kl_ctl.value},
        )

    alarm = None
    for it in range(start, end):
        exp_id, ex = rollouts.get_or_make(it, functools.partial(make_experience, it))
        experience_ids.append(exp_id)

        # ---- PPO epochs over the whole rollout, each rank taking its share of every mini-batch ---
        actor.set_train(True)
        seqs, am, p = ex["sequence"], ex["attention_mask"], int(ex["prompt_len"][0])
        rmask = ex["response_mask"].astype(np.float32)
        stats = {
            "pg_loss": [],
            "clipfrac": [],
            "approx_kl": [],
            "entropy": [],
            "vf_loss": [],
            "vf_clipfrac": [],
        }
        n = len(seqs)
        for epoch in range(pc.ppo_epochs):
            for b, whole in minibatches(n, pc.mini_batch, [cfg.seed, it, epoch], ctx.dist):
                denom = Tensor(np.float32(max(rmask[whole].sum(), 1.0) / ctx.dist.size))
                args = (Tensor(seqs[b]), Tensor(am[b]))
                pl, _, (cf, ak, ent) = t_actor.step(
                    *args,
                    Tensor(ex["logprobs"][b]),
                    Tensor(ex["advantages"][b]),
                    Tensor(rmask[b]),
                    p,
                    denom,
                )
                vl, _, vcf = t_critic.step(
                    *args,
                    Tensor(ex["values"][b]),
                    Tensor(ex["returns"][b]),
                    Tensor(rmask[b]),
                    p,
                    denom,
                )
                for k, v in (
                    ("pg_loss", pl),
                    ("clipfrac", cf),
                    ("approx_kl", ak),
                    ("entropy", ent),
                    ("vf_loss", vl),
                    ("vf_clipfrac", vcf),
                ):
                    stats[k].append(float(v if isinstance(v, float) else v.asnumpy()))
        seq_kl = float(
            ex["kl"].sum(1).mean()
        )  # the whole rollout: every rank's KL controller agrees
        kl_ctl.update(seq_kl, n)
        row = {
            "step": it + 1,
            "reward_mean": float(ex["score"].mean()),
            "kl": seq_kl,
            "kl_coef": kl_ctl.value,
            "response_length": float(rmask.sum(1).mean()),
            **{k: float(np.mean(v)) for k, v in stats.items()},
        }
        if gold is not None:
            row["gold_mean"] = float(ex["gold"].mean())
            row["gold_std"] = float(ex["gold"].std(ddof=1))
        if not all(np.isfinite(v) for v in row.values()):
            raise NumericalError(f"iteration {it}: non-finite metrics {row}")
        alarm = watch.check(it + 1, row)
        history.append(row)
        ctx.metric(**row)
        done = it + 1
        if done % pc.ckpt_every == 0 and done < pc.iterations and ctx.dist.is_main:
            save_training_state(
                ckpts,
                done,
                models,
                trainers,
                {
                    "history": history,
                    "experience": experience_ids,
                    "kl_coef": kl_ctl.value,
                    "probes": watch.probes,
                },
            )
            ctx.log(f"checkpoint at iteration {done}")
        if watch.stops(alarm):
            break

    if not ctx.dist.is_main:
        return
    stop_now = watch.stops(alarm)
    if end < pc.iterations and not stop_now:  # a chunk: hand the whole state to the next one
        extra = {"kl_coef": kl_ctl.value, "probes": watch.probes}
        return finish_chunk(
            ctx, first, end, models, trainers, history, experience_ids, extra, watch.carry_out()
        )
    stopped = watch.restore_best(alarm, history[-1]["step"]) if stop_now else None
    actor.set_train(False)
    ev = evaluate_policies(
        ctx,
        {"sft": ref, "ppo": actor},
        reward,
        norm,
        heldout,
        tok,
        pc.eval_prompts,
        seed=cfg.seed + 99,
        gold=gold,
    )
    for name, e in ev.items():
        g_txt = f"  gold {e['gold']:.3f}" if gold is not None else ""
        ctx.log(
            f"held-out {name}: rm score {e['score']:.3f}{g_txt}  kl {e['kl']:.3f}  length "
            f"{e['length']:.1f}  "
            f"e.g. {e['samples'][:1]}"
        )
    metrics = {
        "heldout_score_sft": ev["sft"]["score"],
        "heldout_score_ppo": ev["ppo"]["score"],
        "heldout_kl_ppo": ev["ppo"]["kl"],
        "iterations": len(history),
        "final_kl_coef": kl_ctl.value,
        "hacking_alarms": sum(1 for h in history if h.get("hacking_suspected")),
    }
    if gold is not None:
        metrics.update(heldout_gold_sft=ev["sft"]["gold"], heldout_gold_ppo=ev["ppo"]["gold"])
    plotted = (
        ["reward_mean", "gold_mean", "probe_proxy", "probe_gold", "kl"]
        if gold is not None
        else ["reward_mean", "kl", "entropy", "vf_loss"]
    )
    mart = publish_metrics(ctx, history, plotted, parents=sorted(set(experience_ids)))
    art = ctx.store.write_checkpoint(
        lora.saved_state(actor),
        name=f"{cfg.name}-ppo",
        parents=[ctx.inputs["prompts"], ctx.inputs["sft"], ctx.inputs["rm"], mart.id],
        meta={
            "stage": "ppo",
            "model": model_meta(cfg),
            "metrics": metrics,
            "eval": ev,
            "gold_reward": pc.gold_reward,
            "experience": experience_ids,
            "stopped_early": stopped,
            "hacking_probes": watch.summary(),  # step, mean RM score, mean gold score
            **lora.checkpoint_meta(actor),
        },
    )
    ctx.finish({"checkpoint": art.id, "metrics": mart.id}, metrics, history=history, eval=ev)


if __name__ == "__main__":
    stage_main("ppo", run)
