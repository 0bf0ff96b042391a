"""DPO stages.

``python -m mindrlhf.stages.reflogp``: summed reference log-probs of chosen and rejected responses
for a pair dataset, written once as a versioned Arrow dataset (its cache key ignores the DPO
hyperparameters, so changing beta or the loss does not rerun the reference model). With the
input ``examples: kto`` (the flow adds it for ``dpo.loss: kto``) it scores KTO's examples
instead: every desirable / undesirable completion and its mismatched KL sequence.

``python -m mindrlhf.stages.dpo``: offline preference optimisation from the SFT checkpoint with
``dpo.loss``: sigmoid / IPO DPO on (prompt, chosen, rejected) pairs and KTO on labelled single
completions, both with those stored reference log-probs, or the reference-free ORPO and SimPO on
pairs (no reference inputs). Held-out figures: the preference accuracy of the loss's own implicit
reward (ties count one half, so a reference-based loss at its start scores 0.5), its margin and
the plain likelihood preference; KTO adds its label accuracy and the KL estimate.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..data.tokenize import longest_row, pair_batch
from ..data.tokenizer import load_tokenizer
from ..data.unpaired import EXAMPLE_COLUMNS, kl_partners, kto_examples, with_kl_sequences
from ..models import decoder, lora
from .common import (
    RunCheckpoints,
    StageContext,
    Trainer,
    epoch_order,
    model_meta,
    resume_training_state,
    save_training_state,
    shard,
    stage_main,
)
from .dpo_losses import IMPLICIT_REWARD, evaluate, make_dpo_loss, pair_logps, step_columns

SPLITS = ("train", "heldout")


def reference_table(chosen: np.ndarray, rejected: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "ref_chosen_logp": pa.array(chosen, pa.float32()),
            "ref_rejected_logp": pa.array(rejected, pa.float32()),
        }
    )


def kto_table(pairs: pa.Table | None, unpaired: pa.Table | None, partner) -> pa.Table:
    """KTO's examples of one split with their KL sequences, the partners read back from the
    reference table reflogp wrote."""
    ex = kto_examples(pairs, unpaired)
    if len(partner) != ex.num_rows:
        raise ValueError(f"{ex.num_rows} KTO examples but {len(partner)} reference log-probs")
    return with_kl_sequences(ex, np.asarray(partner))


def reference_logps(
    model, pairs: pa.Table | None, pad_id: int, kto: bool, seed: int, unpaired=None
) -> tuple[pa.Table, pa.Table]:
    """(the table a loss trains on, its reference log-probs under ``model``): the pairs and
    their chosen / rejected log-probs, or with ``kto`` KTO's examples (see data/unpaired.py) and
    each example's and its mismatched sequence's log-prob with the partner it was paired with."""
    if not kto:
        return pairs, reference_table(*pair_logps(model, pairs, pad_id))
    ex = kto_examples(pairs, unpaired)
    partner = kl_partners(ex.num_rows, seed)
    ex = with_kl_sequences(ex, partner)
    lp, kl = pair_logps(model, ex, pad_id, columns=EXAMPLE_COLUMNS)
    ref = pa.table(
        {
            "ref_logp": pa.array(lp, pa.float32()),
            "ref_kl_logp": pa.array(kl, pa.float32()),
            "kl_partner": pa.array(partner, pa.int32()),
        }
    )
    return ex, ref


def train_dpo(
    ctx: StageContext,
    policy,
    train: pa.Table,
    ref: pa.Table | None,
    steps: int,
    seed: int,
    tok,
    history: list | None = None,
    log_prefix: str = "",
    dc=None,
) -> list[dict]:
    """``steps`` updates of ``dc.loss`` over ``train`` (pairs, or KTO's examples) with its
    reference log-probs ``ref`` (None for a reference-free loss), resuming from the run
    directory's checkpoints; ``dc`` overrides the config's dpo section (online DPO's lr)."""
    from mindspore import Tensor

    dc = dc or ctx.cfg.dpo
    trainer = Trainer(policy.trainable_params(), make_dpo_loss(policy, dc), dc, ctx.dist, steps)
    ckpts = RunCheckpoints(ctx.run_dir, ctx.key)
    models, trainers = {"policy": policy}, {"policy": trainer}
    start, state = resume_training_state(ctx, ckpts, models, trainers)
    history = state.get("history", history or [])
    columns, per_row = step_columns(train, ref, dc)
    longest = longest_row(train, *columns)
    policy.set_train(True)
    window = state.get("window", [])  # losses since the last log line: part of the resumed state
    for step in range(start, steps):
        idx = shard(epoch_order(train.num_rows, step, dc.batch_size, seed), ctx.dist)
        bt = pair_batch(train, idx, tok.pad_id, dc.pad_to, longest, columns)
        loss, gnorm, (acc, margin) = trainer.step(
            Tensor(bt["input_ids"]),
            Tensor(bt["attention_mask"]),
            Tensor(bt["response_mask"]),
            *(Tensor(x[idx]) for x in per_row),
        )
        window.append((loss, float(acc.asnumpy()), float(margin.asnumpy())))
        done = step + 1
        if done % dc.log_every == 0 or done == steps:
            mean_loss, a, m = np.mean(window, 0)
            row = {
                "step": done,
                "loss": float(mean_loss),
                "reward_accuracy": float(a),
                "reward_margin": float(m),
            }
            ctx.metric(
                **{f"{log_prefix}{k}" if k != "step" else k: v for k, v in row.items()},
                grad_norm=gnorm,
            )
            history.append(row)
            window = []
        if done % dc.ckpt_every == 0 and done < steps and ctx.dist.is_main:
            save_training_state(
                ckpts, done, models, trainers, {"history": history, "window": window}
            )
            ctx.log(f"checkpoint at step {done}")
    policy.set_train(False)
    return history


def run_reflogp(ctx: StageContext) -> None:
    from .ppo import load_policy

    tok = load_tokenizer(ctx.cfg.tokenizer)
    model = load_policy(
        ctx.store, ctx.inputs["model"], ctx.cfg.model, train=False, parallel=ctx.cfg.parallel
    )
    kto = ctx.inputs.get("examples") == "kto"
    out = {}
    for k, split in enumerate(SPLITS):
        names = (split, f"unpaired_{split}") if kto else (split,)
        tables = {n: ctx.store.read_dataset(ctx.inputs[n]) for n in names if n in ctx.inputs}
        table, ref = reference_logps(
            model,
            tables.get(split),
            tok.pad_id,
            kto,
            seed=ctx.cfg.seed * 1000 + 700 + k,
            unpaired=tables.get(f"unpaired_{split}"),
        )
        if ctx.dist.is_main:
            art = ctx.store.write_dataset(
                ref,
                name=f"{ctx.cfg.name}-ref-logps-{'kto-' if kto else ''}{split}",
                parents=[*(ctx.inputs[n] for n in tables), ctx.inputs["model"]],
                meta={"stage": "reflogp", "split": split, **({"examples": "kto"} if kto else {})},
            )
            out[split] = art.id
            ctx.log(f"{split}: {table.num_rows} {'examples' if kto else 'pairs'} -> {art.id[:12]}")
    if ctx.dist.is_main:
        count = "examples_train" if kto else "pairs_train"
        ctx.finish(out, {count: ctx.store.get(out["train"]).manifest["num_rows"]})


def preference_data(ctx: StageContext, dc) -> tuple[list[pa.Table], list]:
    """[train, held-out] tables ``dc.loss`` reads (pairs, or KTO's examples built from the
    pairs and unpaired rows) and their reference log-probs (None for a reference-free loss)."""

    def read(name):
        return ctx.store.read_dataset(ctx.inputs[name]) if name in ctx.inputs else None

    refs = [None, None] if dc.reference_free else [read(f"ref_{s}") for s in SPLITS]
    if dc.loss == "kto":
        tables = [
            kto_table(read(s), read(f"unpaired_{s}"), r.column("kl_partner").to_numpy())
            for s, r in zip(SPLITS, refs)
        ]
    else:
        tables = [read(s) for s in SPLITS]
    for name, t, r in zip(SPLITS, tables, refs):
        if r is not None and t.num_rows != r.num_rows:
            raise ValueError(f"{name}: {t.num_rows} pairs but {r.num_rows} reference log-probs")
    return tables, refs


# held-out figures that are 0 by construction at the start of a loss with a reference
ZERO_AT_START = ("reward_margin", "kl")


def run(ctx: StageContext) -> None:
    from .ppo import load_policy

    cfg, dc = ctx.cfg, ctx.cfg.dpo
    tok = load_tokenizer(cfg.tokenizer)
    (train, heldout), (ref_train, ref_heldout) = preference_data(ctx, dc)
    policy = load_policy(ctx.store, ctx.inputs["sft"], cfg.model, train=True, parallel=cfg.parallel)
    policy = lora.wrap(policy, cfg.model.lora, cfg.seed + 11, ctx.inputs["sft"])
    before = evaluate(policy, heldout, ref_heldout, tok.pad_id, dc)
    ctx.metric(step=0, **{f"heldout_{k}": v for k, v in before.items()})

    # with layer graphs, each phase's graphs go before the next: evaluation and training meet
    # different shapes, and each shape's graph holds its buffers
    def release(after: str) -> None:
        if dc.layer_graphs:
            ctx.log(f"layer graphs: released {decoder.release_layer_graphs()} after {after}")

    release("the held-out evaluation")
    history = train_dpo(ctx, policy, train, ref_train, dc.steps, cfg.seed + 11, tok)
    release("training")
    after = evaluate(policy, heldout, ref_heldout, tok.pad_id, dc)
    ctx.metric(step=dc.steps, **{f"heldout_{k}": v for k, v in after.items()})
    if not ctx.dist.is_main:
        return
    metrics = {}
    for k, v in after.items():
        if k in before and (dc.reference_free or k not in ZERO_AT_START):
            metrics[f"heldout_{k}_sft"] = before[k]
        metrics[f"heldout_{k}_dpo"] = v
    metrics.update({"loss": dc.loss, "beta": dc.beta, "steps": dc.steps})
    if dc.loss in IMPLICIT_REWARD:
        metrics["implicit_reward"] = IMPLICIT_REWARD[dc.loss]
    keys = ("train", "heldout", "unpaired_train", "unpaired_heldout", "sft", "ref_train")
    parents = [ctx.inputs[k] for k in (*keys, "ref_heldout") if k in ctx.inputs]
    art = ctx.store.write_checkpoint(
        lora.saved_state(policy),
        name=f"{cfg.name}-dpo",
        parents=parents,
        meta={
            "stage": "dpo",
            "model": model_meta(cfg),
            "metrics": metrics,
            "history": history,
            **lora.checkpoint_meta(policy),
        },
    )
    ctx.finish({"checkpoint": art.id}, metrics, history=history)


if __name__ == "__main__":
    stage_main("dpo", run)
