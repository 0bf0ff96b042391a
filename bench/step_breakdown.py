"""Where the time of a training step goes at SmolLM2-135M's shape, ours (MindSpore, eager and
compiled) beside PyTorch's (the engine under TRL), in one run: the profile behind #17's GRPO
gap. Each side in its own process, random weights of the same shape, the same token ids:

- ``forward_s``: log-probs of the last ``--new`` positions of ``--batch`` x ``--length`` token
  rows (GRPO's scoring pass: the vocabulary projection on response positions only), no grad;
- ``step_s``: the same plus the backward pass (value and gradients of their sum: GRPO's update
  without the optimizer);
- ``op_us``: one tiny elementwise op (4 floats), the fixed cost every eager operator pays;
- ``matmul_gflops``: the MLP's up projection alone at this batch ((B*T) x d x d_ff), the largest
  per-layer matmul, repeated;
- ``layer_ms``: one decoder layer's parts on a (B, T, d) input -- attention (with RoPE and the
  grouped kv heads), the SwiGLU MLP, one RMSNorm, the whole block -- forward (``fwd``) and
  forward + backward of a weighted sum (``step``), ours eager and compiled, torch eager: which
  part of a layer the gap is in (times 30 layers, twice the norms).

Ours also runs both passes compiled (``mindspore.jit``, compile time apart): the difference
eager - compiled is what per-operator dispatch costs the eager step.

    .venv/bin/python bench/step_breakdown.py [--batch 32 --length 24 --new 8 --reps 3]

Needs .venv-bench (`make bench-peers`) for the PyTorch side; prints one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import SMOLLM2, peak_rss_gb, smollm2_llama_config  # noqa: E402


def best(fn, reps: int) -> float:
    """The fastest of ``reps`` timed calls after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def batch_ids(args):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, SMOLLM2["vocab_size"], (args.batch, args.length)).astype(np.int64)


def ours(args) -> dict:
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, ops

    from mindrlhf.config import ModelConfig
    from mindrlhf.models.decoder import CausalLM
    from mindrlhf.runtime import init_runtime
    from mindrlhf.stages.rollout import response_logprobs

    init_runtime("CPU", seed=0)
    cfg = ModelConfig(**SMOLLM2, max_seq_len=args.length)
    model = CausalLM(cfg, seed=0)
    ids = Tensor(batch_ids(args).astype(np.int32))
    mask = Tensor(np.ones((args.batch, args.length), np.int32))
    p = args.length - args.new

    def loss(s, m):
        return response_logprobs(model, s, m, p).sum()

    grad = ms.value_and_grad(loss, None, model.trainable_params())

    def fwd(s, m):
        return response_logprobs(model, s, m, p)

    def step(s, m):
        return grad(s, m)

    fwd_graph, step_graph = ms.jit(fwd), ms.jit(step)

    model.set_train(False)
    out = {"forward_eager_s": best(lambda: response_logprobs(model, ids, mask, p).asnumpy(), 2)}
    t = time.perf_counter()
    fwd_graph(ids, mask).asnumpy()
    out["forward_compile_s"] = time.perf_counter() - t
    out["forward_compiled_s"] = best(lambda: fwd_graph(ids, mask).asnumpy(), args.reps)
    model.set_train(True)
    out["step_eager_s"] = best(lambda: grad(ids, mask)[0].asnumpy(), 2)
    t = time.perf_counter()
    step_graph(ids, mask)[0].asnumpy()
    out["step_compile_s"] = time.perf_counter() - t
    out["step_compiled_s"] = best(lambda: step_graph(ids, mask)[0].asnumpy(), args.reps)

    small = Tensor(np.ones(4, np.float32))
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        small = ops.add(small, 1.0)
    small.asnumpy()
    out["op_us"] = (time.perf_counter() - t) / n * 1e6
    x = Tensor(
        np.random.default_rng(1).standard_normal((args.batch * args.length, 576), np.float32)
    )
    w = Tensor(np.random.default_rng(2).standard_normal((1536, 576), np.float32))
    mm = ops.MatMul(transpose_b=True)
    s = best(lambda: mm(x, w).asnumpy(), 20)
    out["matmul_gflops"] = 2 * args.batch * args.length * 576 * 1536 / s / 1e9
    out["impl"] = f"mindspore {ms.__version__}"
    out["peak_rss_gb"] = peak_rss_gb()
    out["layer_ms"] = layer_parts_ours(args, cfg)
    return out


def layer_parts_ours(args, cfg) -> dict:
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor

    from mindrlhf.models.decoder import Block

    rng = np.random.default_rng(3)
    b, t, hd = args.batch, args.length, cfg.head_dim
    x = Tensor(rng.standard_normal((b, t, cfg.d_model)).astype(np.float32))
    up = Tensor(rng.standard_normal((b, t, cfg.d_model)).astype(np.float32))
    bias = Tensor(np.zeros((b, 1, t, t), np.float32))
    freqs = np.arange(t)[:, None] / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    emb = np.broadcast_to(np.concatenate([freqs, freqs], -1), (b, 1, t, hd))
    sign = np.repeat([-1.0, 1.0], hd // 2)  # rotate-half's sign rides on the sine table
    cos, sin = (
        Tensor(np.cos(emb).astype(np.float32)),
        Tensor((np.sin(emb) * sign).astype(np.float32)),
    )
    block = Block(cfg, rng)

    def attn(h):
        return block.attn(h, bias, cos, sin)[0]

    def mlp(h):
        return block.mlp(h)

    def norm(h):
        return block.attn_norm(h)

    def whole(h):
        return block(h, bias, cos, sin)[0]

    def weighted(fn):
        def loss(h):
            return (fn(h) * up).sum()

        return loss

    out = {}
    for name, fn, cell in (
        ("attention", attn, block.attn),
        ("mlp", mlp, block.mlp),
        ("rmsnorm", norm, block.attn_norm),
        ("block", whole, block),
    ):
        grad = ms.grad(weighted(fn), 0, cell.trainable_params())
        fwd_graph, step_graph = ms.jit(fn), ms.jit(grad)
        ms_of = lambda f: round(1000 * best(lambda: f(x)[0].asnumpy(), 5), 2)  # noqa: E731
        out[name] = {
            "fwd_eager": ms_of(fn),
            "fwd_compiled": ms_of(fwd_graph),
            "step_eager": ms_of(grad),
            "step_compiled": ms_of(step_graph),
        }
    return out


def torch_side(args) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = smollm2_llama_config(args.length)
    model = LlamaForCausalLM(cfg).float()
    ids = torch.tensor(batch_ids(args))
    mask = torch.ones_like(ids)
    p = args.length - args.new

    def logprobs():
        # TRL's scoring: logits of the response positions only (logits_to_keep), log-softmax
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=args.new + 1).logits
        logits = logits[:, :-1]
        return torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None]).squeeze(-1)

    def fwd():
        with torch.no_grad():
            logprobs()

    def step():
        model.zero_grad(set_to_none=True)
        logprobs().sum().backward()

    model.eval()
    out = {"forward_eager_s": best(fwd, args.reps)}
    model.train()
    out["step_eager_s"] = best(step, args.reps)
    small = torch.ones(4)
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        small = torch.add(small, 1.0)
    out["op_us"] = (time.perf_counter() - t) / n * 1e6
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch * args.length, 576, generator=g)
    w = torch.randn(1536, 576, generator=g)
    s = best(lambda: x @ w.T, 20)
    out["matmul_gflops"] = 2 * args.batch * args.length * 576 * 1536 / s / 1e9
    out["impl"] = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    out["peak_rss_gb"] = peak_rss_gb()
    out["layer_ms"] = layer_parts_torch(args, cfg)
    return out


def layer_parts_torch(args, cfg) -> dict:
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg._attn_implementation = "eager"  # the same arithmetic as ours: softmax(q k^T + mask) v
    layer = LlamaDecoderLayer(cfg, 0).float()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(args.batch, args.length, cfg.hidden_size, generator=g, requires_grad=True)
    up = torch.randn(args.batch, args.length, cfg.hidden_size, generator=g)
    positions = torch.arange(args.length)[None].repeat(args.batch, 1)
    rope = LlamaRotaryEmbedding(cfg)(x, positions)
    mask = torch.zeros(args.batch, 1, args.length, args.length)
    parts = {
        "attention": lambda: layer.self_attn(x, position_embeddings=rope, attention_mask=mask)[0],
        "mlp": lambda: layer.mlp(x),
        "rmsnorm": lambda: layer.input_layernorm(x),
        "block": lambda: layer(x, attention_mask=mask, position_embeddings=rope),
    }
    out = {}
    for name, fn in parts.items():

        def fwd(fn=fn):
            with torch.no_grad():
                fn()

        def step(fn=fn):
            y = fn()
            ((y[0] if isinstance(y, tuple) else y) * up).sum().backward()

        out[name] = {
            "fwd_eager": round(1000 * best(fwd, 5), 2),
            "step_eager": round(1000 * best(step, 5), 2),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=24)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", choices=["ours", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        r = ours(args) if args.child == "ours" else torch_side(args)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
        return
    from benchlib import own_side, run_peer

    # each side in its own process (its own peak RSS): ours in this venv, torch in .venv-bench
    o = own_side(__file__, "ours")
    t = run_peer("step_breakdown.py", [*sys.argv[1:], "--child", "torch"])
    ratio = lambda a, b: round(a / b, 2)  # noqa: E731
    print(
        json.dumps(
            {
                "bench": "step_breakdown",
                "shape": "SmolLM2-135M (30 x 576, 9/3 heads, vocab 49152)",
                "config": vars(args),
                "ours": o,
                "torch": t,
                "ours_over_torch": {
                    "forward_eager": ratio(o["forward_eager_s"], t["forward_eager_s"]),
                    "forward_compiled": ratio(o["forward_compiled_s"], t["forward_eager_s"]),
                    "step_eager": ratio(o["step_eager_s"], t["step_eager_s"]),
                    "step_compiled": ratio(o["step_compiled_s"], t["step_eager_s"]),
                    "op_us": ratio(o["op_us"], t["op_us"]),
                    "matmul_s": ratio(t["matmul_gflops"], o["matmul_gflops"]),
                },
                "layer_ours_over_torch": {
                    part: {
                        k: ratio(v, t["layer_ms"][part][k.split("_")[0] + "_eager"])
                        for k, v in o["layer_ms"][part].items()
                    }
                    for part in o["layer_ms"]
                },
                "eager_overhead_s": {
                    "forward": round(o["forward_eager_s"] - o["forward_compiled_s"], 3),
                    "step": round(o["step_eager_s"] - o["step_compiled_s"], 3),
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
