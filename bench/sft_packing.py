"""SFT with sequence packing vs padding (``sft.packing``), side by side in one run, on the mixture
that needs it: movie-review sentences (~20 tokens) and gsm_symbolic worked solutions (~150-300),
both from the pinned recipes, tokenized as the prepare stage does (GPT-2 BPE, max_len 320).

Both sides train the same model from the same initial weights with the SFT stage's own pieces
(``sft_batch`` padded to the batch's bucket length vs ``pack_sft_table`` + ``packed_batch``,
the same Trainer and loss) for ``--steps`` steps after one warm-up step; padding sees
``--batch`` examples a step, packing ``--batch`` packed rows of <= 320 tokens (several examples
each). Reported: real (non-padding) tokens per second and examples per second of each, their
ratio, the padding fraction of each side's batches, and the largest difference between an
example's loss read off a packed row and the same example's loss run alone (should be ~1e-6).

    .venv/bin/python bench/sft_packing.py [--layers 6 --d 512 --heads 8] [--modes pynative]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def mixture(n_reviews: int, n_gsm: int, max_len: int):
    import pyarrow as pa

    from mindrlhf.config import load_config
    from mindrlhf.data.recipes import load_recipe
    from mindrlhf.data.tokenize import tokenize_sft
    from mindrlhf.data.tokenizer import load_tokenizer

    cfg = load_config(
        "demo",
        {
            "model": {"max_seq_len": max_len},
            "data": {
                "recipes": ["movie_reviews", "gsm_symbolic", "arithmetic"],
                "limit": n_reviews,
                "gsm_size": n_gsm,
                "max_len": max_len,
                "max_prompt_len": 160,
            },
        },
    )
    tok = load_tokenizer(cfg.tokenizer)
    parts = []
    for name in ("movie_reviews", "gsm_symbolic"):
        text = load_recipe(name).build(cfg.data)["sft_train"]
        parts.append(tokenize_sft(text.select(["prompt", "response"]), tok, 160, max_len))
    table = pa.concat_tables(parts)
    order = np.random.default_rng(0).permutation(table.num_rows)  # the two kinds interleaved
    return table.take(pa.array(order)), tok


def run_side(table, tok, args, packing: bool, compiled: bool) -> dict:
    from mindspore import Tensor

    from mindrlhf.algos.sft import sft_loss
    from mindrlhf.config import ModelConfig, SFTConfig
    from mindrlhf.data.packing import pack_sft_table, packed_batch
    from mindrlhf.data.tokenize import longest_row, sft_batch
    from mindrlhf.models.decoder import CausalLM
    from mindrlhf.runtime import Dist
    from mindrlhf.stages.common import Trainer

    mc = ModelConfig(
        family="gpt2",
        vocab_size=50257,
        d_model=args.d,
        n_layers=args.layers,
        n_heads=args.heads,
        max_seq_len=args.max_len,
    )
    model = CausalLM(mc, seed=0)
    sc = SFTConfig(lr=1e-4, batch_size=args.batch, compiled=compiled)
    rows = pack_sft_table(table, args.max_len) if packing else table
    key = "segment_ids" if packing else "attention_mask"

    def loss_fn(ids, mask, lm):
        logits, _ = model(ids, mask, segments=mask if packing else None)
        loss = sft_loss(logits, ids, lm)
        return loss, loss

    trainer = Trainer(model.trainable_params(), loss_fn, sc, Dist(), args.steps + 1)
    model.set_train(True)
    longest = longest_row(rows, "input_ids")
    batch_of = packed_batch if packing else sft_batch
    times, tokens, slots, examples = [], [], [], []
    for step in range(args.steps + 1):
        idx = np.arange(step * args.batch, (step + 1) * args.batch) % rows.num_rows
        bt = batch_of(rows, idx, tok.pad_id, sc.pad_to, longest)
        t = time.perf_counter()
        trainer.step(Tensor(bt["input_ids"]), Tensor(bt[key]), Tensor(bt["loss_mask"]))
        times.append(time.perf_counter() - t)
        tokens.append(int((bt[key] > 0).sum()))
        slots.append(bt["input_ids"].size)
        examples.append(int(bt[key].max(1).sum()))
    s = slice(1, None)  # the warm-up step (and its compile) is not timed
    out = {
        "rows_per_step": args.batch,
        "padded_lengths": sorted({int(x) for x in np.array(slots[s]) // args.batch}),
        "tokens_per_s": round(sum(tokens[s]) / sum(times[s]), 1),
        "examples_per_s": round(sum(examples[s]) / sum(times[s]), 2),
        "examples_per_step": round(float(np.mean(examples[s])), 1),
        "padding_fraction": round(1 - sum(tokens[s]) / sum(slots[s]), 3),
        "step_s": round(float(np.mean(times[s])), 3),
    }
    if packing:
        out["loss_max_abs_diff_packed_vs_alone"] = loss_check(model, rows, table, tok)
    return out


def loss_check(model, packed, table, tok) -> float:
    """Each example of the first packed row: its SFT loss inside the row vs run by itself."""
    from mindspore import Tensor

    from mindrlhf.algos.common import shifted_logprobs
    from mindrlhf.algos.sft import sft_loss
    from mindrlhf.data.packing import packed_batch

    model.set_train(False)
    bt = packed_batch(packed, np.array([0]), tok.pad_id)
    ids = Tensor(bt["input_ids"])
    lp = shifted_logprobs(
        model(ids, Tensor(bt["segment_ids"]), segments=Tensor(bt["segment_ids"]))[0], ids
    )
    lp = lp.asnumpy()[0]
    worst, pos = 0.0, 0
    for i in packed.column("examples")[0].as_py():
        x = np.array([table.column("input_ids")[i].as_py()], np.int32)
        lm = np.array([table.column("loss_mask")[i].as_py()], np.float32)
        n = x.shape[1]
        alone = float(
            sft_loss(model(Tensor(x), Tensor(np.ones_like(x)))[0], Tensor(x), Tensor(lm)).asnumpy()
        )
        m = lm[0, 1:]
        inside = float(-(lp[pos : pos + n - 1] * m).sum() / m.sum())
        worst = max(worst, abs(inside - alone))
        pos += n
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reviews", type=int, default=1500)
    ap.add_argument("--gsm", type=int, default=300)
    ap.add_argument("--modes", default="pynative", help="pynative and/or compiled")
    args = ap.parse_args()
    from mindrlhf.runtime import init_runtime

    init_runtime("CPU")
    table, tok = mixture(args.reviews, args.gsm, args.max_len)
    lengths = [len(r) for r in table.column("input_ids").to_pylist()]
    result = {
        "bench": "sft_packing",
        "config": vars(args),
        "examples": table.num_rows,
        "example_tokens": {
            "mean": round(float(np.mean(lengths)), 1),
            "p10": int(np.percentile(lengths, 10)),
            "p90": int(np.percentile(lengths, 90)),
            "max": max(lengths),
        },
    }
    for mode in args.modes.split(","):
        c = mode == "compiled"
        pad = run_side(table, tok, args, packing=False, compiled=c)
        pack = run_side(table, tok, args, packing=True, compiled=c)
        result[mode] = {
            "padding": pad,
            "packing": pack,
            "tokens_per_s_ratio_packing_over_padding": round(
                pack["tokens_per_s"] / pad["tokens_per_s"], 2
            ),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
