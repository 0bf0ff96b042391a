"""Reward-model stage: ``python -m mindrlhf.stages.rm --spec spec.json --out result.json``.

Inputs: ``train`` / ``heldout`` pair datasets (chosen_ids, rejected_ids, prompt_len) and ``sft``,
the SFT checkpoint whose transformer initialises the reward model (InstructGPT). The scalar head
reads the last real token. Output: a checkpoint whose manifest carries held-out accuracy and loss,
and (``rm.normalize``) the mean/std of rewards over held-out responses for standardising scores.
"""

from __future__ import annotations

import numpy as np

from ..algos.rm import bradley_terry_loss, gather_last
from ..data.tokenize import longest_row, pair_batch
from ..data.tokenizer import load_tokenizer
from ..models import lora
from ..models.decoder import backbone_state, load_state_dict
from ..models.policy import build_scalar_head
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


def load_reward_model(store, ckpt_id: str, model_cfg) -> tuple:
    """A frozen reward model of ``model_cfg.backend`` and its normalisation stats ({"mean",
    "std"} or {})."""
    model = build_scalar_head(model_cfg, seed=0)
    load_state_dict(model, lora.read_weights(store, ckpt_id), source=f"reward model {ckpt_id[:12]}")
    model.set_train(False)
    return model, store.get(ckpt_id, verify=False).meta.get("reward_norm", {})


def score_sequences(
    model, ids: np.ndarray, mask: np.ndarray, norm: dict | None = None
) -> np.ndarray:
    """Reward of each row at its last real token, standardised when ``norm`` is given."""
    from mindspore import Tensor

    r = gather_last(model(Tensor(ids), Tensor(mask)), Tensor(mask)).asnumpy().astype(np.float64)
    if norm:
        r = (r - norm["mean"]) / norm["std"]
    return r


def evaluate(model, table, pad_id: int, batch: int = 32) -> dict:
    from mindspore import Tensor

    losses, accs, rewards, n = [], [], [], table.num_rows
    for s in range(0, n, batch):
        idx = np.arange(s, min(s + batch, n))
        bt = pair_batch(table, idx, pad_id)
        r = gather_last(
            model(Tensor(bt["input_ids"]), Tensor(bt["attention_mask"])),
            Tensor(bt["attention_mask"]),
        )
        k = len(idx)
        loss, acc = bradley_terry_loss(r[:k], r[k:])
        losses.append(float(loss.asnumpy()) * k)
        accs.append(float(acc.asnumpy()) * k)
        rewards.append(r.asnumpy())
    allr = np.concatenate(rewards)
    return {
        "accuracy": sum(accs) / n,
        "loss": sum(losses) / n,
        "reward_mean": float(allr.mean()),
        "reward_std": float(allr.std() + 1e-6),
    }


def run(ctx: StageContext) -> None:
    from mindspore import Tensor

    cfg, rc = ctx.cfg, ctx.cfg.rm
    tok = load_tokenizer(cfg.tokenizer)
    train = ctx.store.read_dataset(ctx.inputs["train"])
    heldout = ctx.store.read_dataset(ctx.inputs["heldout"])
    model = build_scalar_head(cfg.model, seed=cfg.seed + 1, parallel=cfg.parallel)
    sft = backbone_state(lora.read_weights(ctx.store, ctx.inputs["sft"]))
    missing = load_state_dict(model, sft, strict=False, source=f"sft {ctx.inputs['sft'][:12]}")
    if any(not m.startswith("score.") for m in missing):
        raise KeyError(f"SFT checkpoint lacks transformer weights: {missing[:5]}")
    # with LoRA the new scalar head trains whole beside the adapters
    model = lora.wrap(model, cfg.model.lora, cfg.seed + 1, ctx.inputs["sft"], train=("score.",))

    def loss_fn(input_ids, attention_mask):
        r = gather_last(model(input_ids, attention_mask), attention_mask)
        k = r.shape[0] // 2
        return bradley_terry_loss(r[:k], r[k:])

    trainer = Trainer(model.trainable_params(), loss_fn, rc, ctx.dist, rc.steps)
    ckpts = RunCheckpoints(ctx.run_dir, ctx.key)
    models, trainers = {"model": model}, {"model": trainer}
    start, state = resume_training_state(ctx, ckpts, models, trainers)
    history = state.get("history", [])
    if not history:
        model.set_train(False)
        before = evaluate(model, heldout, tok.pad_id)
        history.append({"step": 0, "heldout_accuracy": before["accuracy"]})
        ctx.metric(step=0, heldout_accuracy=before["accuracy"], heldout_loss=before["loss"])
    model.set_train(True)
    longest = longest_row(train, "chosen_ids", "rejected_ids")
    window = state.get("window", [])  # losses since the last log line: part of the resumed state
    for step in range(start, rc.steps):
        idx = shard(epoch_order(train.num_rows, step, rc.batch_size, cfg.seed + 1), ctx.dist)
        bt = pair_batch(train, idx, tok.pad_id, rc.pad_to, longest)
        loss, gnorm, acc = trainer.step(Tensor(bt["input_ids"]), Tensor(bt["attention_mask"]))
        window.append((loss, float(acc.asnumpy())))
        done = step + 1
        if done % rc.log_every == 0 or done == rc.steps:
            mean_loss, a = np.mean(window, 0)
            ctx.metric(step=done, loss=mean_loss, accuracy=a, grad_norm=gnorm)
            history.append({"step": done, "loss": float(mean_loss), "accuracy": float(a)})
            window = []
        if done % rc.ckpt_every == 0 and done < rc.steps and ctx.dist.is_main:
            save_training_state(
                ckpts, done, models, trainers, {"history": history, "window": window}
            )
            ctx.log(f"checkpoint at step {done}")

    model.set_train(False)
    ev = evaluate(model, heldout, tok.pad_id)
    ctx.metric(step=rc.steps, heldout_accuracy=ev["accuracy"], heldout_loss=ev["loss"])
    if not ctx.dist.is_main:
        return
    metrics = {
        "heldout_accuracy_before": history[0]["heldout_accuracy"],
        "heldout_accuracy": ev["accuracy"],
        "heldout_loss": ev["loss"],
        "steps": rc.steps,
    }
    meta = {"stage": "rm", "model": model_meta(cfg), "metrics": metrics, "history": history}
    meta.update(lora.checkpoint_meta(model))
    if rc.normalize:
        meta["reward_norm"] = {"mean": ev["reward_mean"], "std": ev["reward_std"]}
    art = ctx.store.write_checkpoint(
        lora.saved_state(model),
        name=f"{cfg.name}-rm",
        parents=[ctx.inputs["train"], ctx.inputs["heldout"], ctx.inputs["sft"]],
        meta=meta,
    )
    ctx.finish({"checkpoint": art.id}, metrics)


if __name__ == "__main__":
    stage_main("rm", run)
