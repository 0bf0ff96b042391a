"""SFT stage: ``python -m mindrlhf.stages.sft --spec spec.json --out result.json``.

Inputs (artifact ids): ``train`` and ``heldout`` token datasets (input_ids, loss_mask,
prompt_len) and optionally ``init``, a checkpoint to start from (else a seeded random init).
Output: a ``checkpoint`` artifact whose parents are the datasets (and init), with the
held-out loss before/after and sample generations in its manifest.
"""

from __future__ import annotations

import time

import numpy as np

from ..algos.sft import sft_loss
from ..data.packing import pack_sft_table, packed_batch
from ..data.schema import validate_table
from ..data.tokenize import longest_row, sft_batch
from ..data.tokenizer import load_tokenizer
from ..models import lora
from ..models.decoder import load_state_dict
from ..models.generation import generate, left_pad
from ..models.policy import build_policy
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


def heldout_loss(model, table, pad_id: int, batch: int, n_batches: int) -> float:
    from mindspore import Tensor

    losses = []
    for b in range(min(n_batches, max(1, table.num_rows // batch))):
        bt = sft_batch(table, np.arange(b * batch, min((b + 1) * batch, table.num_rows)), pad_id)
        logits, _ = model(Tensor(bt["input_ids"]), Tensor(bt["attention_mask"]))
        losses.append(
            float(sft_loss(logits, Tensor(bt["input_ids"]), Tensor(bt["loss_mask"])).asnumpy())
        )
    return float(np.mean(losses)) if losses else float("nan")


def sample_generations(ctx: StageContext, model, table, n: int = 3) -> list[dict]:
    tok = load_tokenizer(ctx.cfg.tokenizer)
    rows = table.slice(0, n)
    prompts = [
        ids[:pl]
        for ids, pl in zip(
            rows.column("input_ids").to_pylist(), rows.column("prompt_len").to_pylist()
        )
    ]
    ids, mask = left_pad(prompts, tok.pad_id)
    out = generate(model, ids, mask, ctx.cfg.generation, tok.eos_id, tok.pad_id, seed=ctx.cfg.seed)
    return [
        {"prompt": tok.decode(p), "response": tok.decode(r[m > 0])}
        for p, r, m in zip(prompts, out.responses, out.response_mask)
    ]


def run(ctx: StageContext) -> None:
    from mindspore import Tensor

    cfg, sc = ctx.cfg, ctx.cfg.sft
    train = ctx.store.read_dataset(ctx.inputs["train"])
    heldout = ctx.store.read_dataset(ctx.inputs["heldout"])
    validate_table(train, "sft_tokens", f"dataset {ctx.inputs['train'][:12]}")
    tok = load_tokenizer(cfg.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}"
        )

    model = build_policy(cfg.model, seed=cfg.seed, parallel=cfg.parallel)
    parents = [ctx.inputs["train"], ctx.inputs["heldout"]]
    if ctx.inputs.get("init"):
        load_state_dict(
            model, lora.read_weights(ctx.store, ctx.inputs["init"]), source=ctx.inputs["init"][:12]
        )
        parents.append(ctx.inputs["init"])
    model = lora.wrap(model, cfg.model.lora, cfg.seed, base=ctx.inputs.get("init"))

    def loss_fn(input_ids, attention_mask, loss_mask, denom):
        logits, _ = model(input_ids, attention_mask)
        loss = sft_loss(logits, input_ids, loss_mask, denom)
        return loss, loss

    def packed_loss_fn(input_ids, segment_ids, loss_mask, denom):
        logits, _ = model(input_ids, segment_ids, segments=segment_ids)
        loss = sft_loss(logits, input_ids, loss_mask, denom)
        return loss, loss

    rows, batch_of, mask_key = train, sft_batch, "attention_mask"
    if sc.packing:
        rows, batch_of, mask_key = (
            pack_sft_table(train, cfg.data.max_len),
            packed_batch,
            "segment_ids",
        )
        loss_fn = packed_loss_fn
        ctx.log(
            f"packing: {train.num_rows} examples in {rows.num_rows} rows of <= {cfg.data.max_len} "
            "tokens"
        )

    trainer = Trainer(model.trainable_params(), loss_fn, sc, ctx.dist, sc.steps)
    ckpts = RunCheckpoints(ctx.run_dir, ctx.key)
    models, trainers = {"model": model}, {"model": trainer}
    start, state = resume_training_state(ctx, ckpts, models, trainers)
    history = state.get("history", [])
    loss0 = (
        history[0]["heldout_loss"]
        if history
        else heldout_loss(model, heldout, tok.pad_id, sc.batch_size, sc.eval_batches)
    )
    if not history:
        history.append({"step": 0, "heldout_loss": loss0})
        ctx.metric(step=0, heldout_loss=loss0)

    model.set_train(True)
    longest = longest_row(rows, "input_ids")
    window = state.get("window", [])  # losses since the last log line: part of the resumed state
    t_train, seen, examples = time.perf_counter(), 0, 0
    for step in range(start, sc.steps):
        global_idx = epoch_order(rows.num_rows, step, sc.batch_size, cfg.seed)
        bt = batch_of(rows, shard(global_idx, ctx.dist), tok.pad_id, sc.pad_to, longest)
        tokens = sum(sum(m[1:]) for m in rows.column("loss_mask").take(global_idx).to_pylist())
        denom = Tensor(np.float32(max(tokens, 1) / ctx.dist.size))
        loss, gnorm, _ = trainer.step(
            Tensor(bt["input_ids"]), Tensor(bt[mask_key]), Tensor(bt["loss_mask"]), denom
        )
        seen += int((bt[mask_key] > 0).sum())
        examples += (
            sum(len(e) for e in rows.column("examples").take(global_idx).to_pylist())
            if sc.packing
            else len(global_idx)
        )
        window.append(loss)
        done = step + 1
        if done % sc.log_every == 0 or done == sc.steps:
            ctx.metric(
                step=done, loss=float(np.mean(window)), grad_norm=gnorm, lr=trainer.lr_at(step)
            )
            history.append({"step": done, "loss": float(np.mean(window))})
            window = []
        if done % sc.ckpt_every == 0 and done < sc.steps and ctx.dist.is_main:
            save_training_state(
                ckpts, done, models, trainers, {"history": history, "window": window}
            )
            ctx.log(f"checkpoint at step {done}")

    train_seconds = time.perf_counter() - t_train
    loss1 = heldout_loss(model, heldout, tok.pad_id, sc.batch_size, sc.eval_batches)
    ctx.metric(step=sc.steps, heldout_loss=loss1)
    samples = sample_generations(ctx, model, heldout) if ctx.dist.is_main else []
    for s in samples:
        ctx.log(f"sample: {s['prompt']!r} -> {s['response']!r}")
    if not ctx.dist.is_main:
        return
    metrics = {
        "heldout_loss_before": loss0,
        "heldout_loss_after": loss1,
        "steps": sc.steps,
        "train_loss_last": history[-1].get("loss"),
        "workers": ctx.dist.size,
    }
    art = ctx.store.write_checkpoint(
        lora.saved_state(model),
        name=f"{cfg.name}-sft",
        parents=parents,
        meta={
            "stage": "sft",
            "model": model_meta(cfg),
            "metrics": metrics,
            "history": history,
            "samples": samples,
            "tokenizer": cfg.tokenizer.kind,
            **lora.checkpoint_meta(model),
        },
    )
    curve = [(h["step"], h["loss"]) for h in history if "loss" in h]
    # timing goes in the result only: the manifest (and so the artifact id) must be reproducible
    speed = {
        "train_samples_per_s": examples / max(train_seconds, 1e-9),  # examples, packed or not
        "train_tokens_per_s": seen / max(train_seconds, 1e-9),  # this rank's, padding not counted
    }
    ctx.finish({"checkpoint": art.id}, {**metrics, **speed}, samples=samples, loss_curve=curve)


if __name__ == "__main__":
    stage_main("sft", run)
