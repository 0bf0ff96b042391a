"""DPO stages.

``python -m mindrlhf.stages.reflogp``: summed reference log-probs of chosen and rejected responses
for a pair dataset, written once as a versioned Arrow dataset (its cache key ignores the DPO
hyperparameters, so changing beta or the loss does not rerun the reference model).

``python -m mindrlhf.stages.dpo``: offline DPO from the SFT checkpoint on (prompt, chosen,
rejected) pairs with those stored reference log-probs; held-out preference accuracy of the
implicit reward (ties count one half, so the SFT policy itself scores 0.5) and margins.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..algos.dpo import dpo_loss, preference_accuracy, sequence_logps
from ..data.tokenize import longest_row, pair_batch
from ..data.tokenizer import load_tokenizer
from ..models.decoder import state_dict
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


def pair_logps(
    model, table: pa.Table, pad_id: int, batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs of every row's chosen and rejected sequence under ``model``."""
    from mindspore import Tensor

    model.set_train(False)
    chosen, rejected = [], []
    for s in range(0, table.num_rows, batch):
        idx = np.arange(s, min(s + batch, table.num_rows))
        bt = pair_batch(table, idx, pad_id)
        ids = Tensor(bt["input_ids"])
        logits, _ = model(ids, Tensor(bt["attention_mask"]))
        lp = sequence_logps(logits, ids, Tensor(bt["response_mask"])).asnumpy()
        chosen.append(lp[: len(idx)])
        rejected.append(lp[len(idx) :])
    if not chosen:  # no pairs (an online DPO round whose judge tied them all)
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(chosen), np.concatenate(rejected)


def reference_table(chosen: np.ndarray, rejected: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "ref_chosen_logp": pa.array(chosen, pa.float32()),
            "ref_rejected_logp": pa.array(rejected, pa.float32()),
        }
    )


def make_dpo_loss(policy, dc):
    def loss_fn(input_ids, attention_mask, response_mask, ref_chosen, ref_rejected):
        logits, _ = policy(input_ids, attention_mask)
        lp = sequence_logps(logits, input_ids, response_mask)
        k = lp.shape[0] // 2
        loss, rc, rr = dpo_loss(
            lp[:k], lp[k:], ref_chosen, ref_rejected, dc.beta, dc.loss, dc.label_smoothing
        )
        return loss, preference_accuracy(rc, rr), (rc - rr).mean()

    return loss_fn


def evaluate(policy, table, ref: pa.Table, pad_id: int, dc) -> dict:
    """Implicit-reward accuracy and margin on held-out pairs, plus the plain likelihood
    preference (log pi(chosen) > log pi(rejected))."""
    c, r = pair_logps(policy, table, pad_id)
    rc = dc.beta * (c - ref.column("ref_chosen_logp").to_numpy())
    rr = dc.beta * (r - ref.column("ref_rejected_logp").to_numpy())
    acc = float(((rc > rr) + 0.5 * (rc == rr)).mean())
    return {
        "reward_accuracy": acc,
        "reward_margin": float((rc - rr).mean()),
        "likelihood_accuracy": float((c > r).mean()),
    }


def train_dpo(
    ctx: StageContext,
    policy,
    train: pa.Table,
    ref: pa.Table,
    steps: int,
    seed: int,
    tok,
    history: list | None = None,
    log_prefix: str = "",
    dc=None,
) -> list[dict]:
    """``steps`` DPO updates over ``train`` with resume from the run directory's checkpoints;
    ``dc`` overrides the config's dpo section (online DPO's learning rate)."""
    from mindspore import Tensor

    dc = dc or ctx.cfg.dpo
    trainer = Trainer(policy.trainable_params(), make_dpo_loss(policy, dc), dc, ctx.dist, steps)
    ckpts = RunCheckpoints(ctx.run_dir, ctx.key)
    models, trainers = {"policy": policy}, {"policy": trainer}
    start, state = resume_training_state(ctx, ckpts, models, trainers)
    history = state.get("history", history or [])
    longest = longest_row(train, "chosen_ids", "rejected_ids")
    ref_c = ref.column("ref_chosen_logp").to_numpy()
    ref_r = ref.column("ref_rejected_logp").to_numpy()
    policy.set_train(True)
    window = state.get("window", [])  # losses since the last log line: part of the resumed state
    for step in range(start, steps):
        idx = shard(epoch_order(train.num_rows, step, dc.batch_size, seed), ctx.dist)
        bt = pair_batch(train, idx, tok.pad_id, dc.pad_to, longest)
        loss, gnorm, (acc, margin) = trainer.step(
            Tensor(bt["input_ids"]),
            Tensor(bt["attention_mask"]),
            Tensor(bt["response_mask"]),
            Tensor(ref_c[idx]),
            Tensor(ref_r[idx]),
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
    model = load_policy(ctx.store, ctx.inputs["model"], ctx.cfg.model, train=False)
    out = {}
    for split in ("train", "heldout"):
        table = ctx.store.read_dataset(ctx.inputs[split])
        c, r = pair_logps(model, table, tok.pad_id)
        if ctx.dist.is_main:
            art = ctx.store.write_dataset(
                reference_table(c, r),
                name=f"{ctx.cfg.name}-ref-logps-{split}",
                parents=[ctx.inputs[split], ctx.inputs["model"]],
                meta={"stage": "reflogp", "split": split},
            )
            out[split] = art.id
            ctx.log(f"{split}: {table.num_rows} pairs -> {art.id[:12]}")
    if ctx.dist.is_main:
        ctx.finish(out, {"pairs_train": ctx.store.get(out["train"]).manifest["num_rows"]})


def run(ctx: StageContext) -> None:
    from .ppo import load_policy

    cfg, dc = ctx.cfg, ctx.cfg.dpo
    tok = load_tokenizer(cfg.tokenizer)
    train, heldout = (
        ctx.store.read_dataset(ctx.inputs["train"]),
        ctx.store.read_dataset(ctx.inputs["heldout"]),
    )
    ref_train = ctx.store.read_dataset(ctx.inputs["ref_train"])
    ref_heldout = ctx.store.read_dataset(ctx.inputs["ref_heldout"])
    for name, t, r in (("train", train, ref_train), ("heldout", heldout, ref_heldout)):
        if t.num_rows != r.num_rows:
            raise ValueError(f"{name}: {t.num_rows} pairs but {r.num_rows} reference log-probs")
    policy = load_policy(ctx.store, ctx.inputs["sft"], cfg.model, train=True, parallel=cfg.parallel)
    before = evaluate(policy, heldout, ref_heldout, tok.pad_id, dc)
    ctx.metric(step=0, **{f"heldout_{k}": v for k, v in before.items()})
    history = train_dpo(ctx, policy, train, ref_train, dc.steps, cfg.seed + 11, tok)
    after = evaluate(policy, heldout, ref_heldout, tok.pad_id, dc)
    ctx.metric(step=dc.steps, **{f"heldout_{k}": v for k, v in after.items()})
    if not ctx.dist.is_main:
        return
    metrics = {
        "heldout_reward_accuracy_sft": before["reward_accuracy"],
        "heldout_reward_accuracy_dpo": after["reward_accuracy"],
        "heldout_reward_margin_dpo": after["reward_margin"],
        "heldout_likelihood_accuracy_sft": before["likelihood_accuracy"],
        "heldout_likelihood_accuracy_dpo": after["likelihood_accuracy"],
        "loss": dc.loss,
        "beta": dc.beta,
        "steps": dc.steps,
    }
    parents = [ctx.inputs[k] for k in ("train", "heldout", "sft", "ref_train", "ref_heldout")]
    art = ctx.store.write_checkpoint(
        state_dict(policy),
        name=f"{cfg.name}-dpo",
        parents=parents,
        meta={"stage": "dpo", "model": model_meta(cfg), "metrics": metrics, "history": history},
    )
    ctx.finish({"checkpoint": art.id}, metrics, history=history)


if __name__ == "__main__":
    stage_main("dpo", run)
