"""The fused CPU kernels (models/fused.py: RMSNorm, RoPE) against the composed operators, in one
process, interleaved: two SmolLM2-135M-shaped decoders holding the same random weights, one
built with ``MINDRLHF_FUSED_KERNELS=0``; each measurement alternates between them and keeps each
side's best, so the machine's drift hits both alike.

- ``norm``: one RMSNorm on a (batch, length, 576) input, forward and forward + backward;
- ``rope``: RoPE on one layer's queries (batch, 9, length, 64), forward and forward + backward;
- ``forward``: log-probs of the last ``--new`` positions (GRPO's scoring pass), no grad;
- ``step``: the same plus the backward (GRPO's update without the optimizer);
- ``generate``: ``--rows`` rollouts of ``--new`` tokens from ``--length - --new``-token prompts,
  compiled KV-cache decoding (the default), sampled: tokens must agree between the two.

Eager (PyNative, as the stages train SmolLM2) unless ``--compiled``. Prints one JSON object.

    .venv/bin/python bench/fused_kernels.py [--batch 32 --length 24 --new 8 --rows 64 --reps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import SMOLLM2, peak_rss_gb  # noqa: E402


def interleaved(fns: dict, reps: int) -> dict:
    """Best time of each callable, calls alternating between them; one untimed call each."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=24)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--compiled", action="store_true")
    args = ap.parse_args()

    import mindspore as ms
    import numpy as np
    from mindspore import Tensor

    from mindrlhf.config import GenerationConfig, ModelConfig
    from mindrlhf.models.decoder import CausalLM, RMSNorm, load_state_dict, state_dict
    from mindrlhf.models.generation import generate, left_pad
    from mindrlhf.runtime import init_runtime
    from mindrlhf.stages.rollout import response_logprobs

    init_runtime("CPU", seed=0)
    cfg = ModelConfig(**SMOLLM2, max_seq_len=max(args.length, 64))
    models, norms = {}, {}
    for side, flag in (("composed", "0"), ("fused", "1")):
        os.environ["MINDRLHF_FUSED_KERNELS"] = flag
        models[side] = CausalLM(cfg, seed=0)
        norms[side] = RMSNorm(cfg.d_model, cfg.norm_eps)
    assert models["composed"].model.layers[0].attn.fused_rope is None
    os.environ.pop("MINDRLHF_FUSED_KERNELS")
    assert models["fused"].model.norm.fused is not None, "the fused kernels did not build"
    load_state_dict(models["fused"], state_dict(models["composed"]))

    rng = np.random.default_rng(0)
    ids = Tensor(rng.integers(0, cfg.vocab_size, (args.batch, args.length)).astype(np.int32))
    mask = Tensor(np.ones((args.batch, args.length), np.int32))
    p = args.length - args.new
    x = Tensor(rng.standard_normal((args.batch, args.length, cfg.d_model)).astype(np.float32))
    q = Tensor(rng.standard_normal((args.batch, cfg.n_heads, args.length, 64)).astype(np.float32))
    angle = rng.uniform(0, 6.3, (args.batch, 1, args.length, 64)).astype(np.float32)
    cos, sin = Tensor(np.cos(angle)), Tensor(np.sin(angle))
    wrap = ms.jit if args.compiled else (lambda f: f)

    def passes(side):
        m, n = models[side], norms[side]

        def loss(s, k):
            return response_logprobs(m, s, k, p).sum()

        def norm_loss(x):
            return (n(x) * x).sum()

        attn = m.model.layers[0].attn

        def rope_loss(q):
            return (attn._rope(q, cos, sin) * q).sum()

        grad = wrap(ms.value_and_grad(loss, None, m.trainable_params()))
        norm_grad = wrap(ms.value_and_grad(norm_loss, 0, n.trainable_params()))
        fwd = wrap(lambda s, k: response_logprobs(m, s, k, p))
        norm_fwd = wrap(lambda x: n(x))
        rope_grad = wrap(ms.value_and_grad(rope_loss, 0))
        rope_fwd = wrap(lambda q: attn._rope(q, cos, sin))
        return {
            "norm_fwd": lambda: norm_fwd(x).asnumpy(),
            "norm_step": lambda: norm_grad(x)[0].asnumpy(),
            "rope_fwd": lambda: rope_fwd(q).asnumpy(),
            "rope_step": lambda: rope_grad(q)[0].asnumpy(),
            "forward": lambda: fwd(ids, mask).asnumpy(),
            "step": lambda: grad(ids, mask)[0].asnumpy(),
        }

    fns = {side: passes(side) for side in models}
    out = {"mode": "compiled" if args.compiled else "eager", "shape": [args.batch, args.length]}
    checks = {
        "forward_max_abs_diff": float(
            np.abs(fns["fused"]["forward"]() - fns["composed"]["forward"]()).max()
        )
    }
    for what in ("norm_fwd", "norm_step", "rope_fwd", "rope_step", "forward", "step"):
        reps = args.reps * 3 if what.startswith(("norm", "rope")) else args.reps
        t = interleaved({s: fns[s][what] for s in models}, reps)
        out[what] = {
            "composed_ms": round(t["composed"] * 1e3, 2),
            "fused_ms": round(t["fused"] * 1e3, 2),
            "speedup": round(t["composed"] / t["fused"], 3),
        }

    prompts = [list(rng.integers(1, cfg.vocab_size, p)) for _ in range(args.rows)]
    pid, pmask = left_pad(prompts, 0)
    gen = GenerationConfig(max_new_tokens=args.new, do_sample=True)
    seqs = {}

    def gen_fn(side):
        def run():
            seqs[side] = generate(models[side], pid, pmask, gen, -1, 0, seed=1).sequences

        return run

    t = interleaved({s: gen_fn(s) for s in models}, max(2, args.reps // 2))
    out["generate"] = {
        "composed_ms": round(t["composed"] * 1e3, 1),
        "fused_ms": round(t["fused"] * 1e3, 1),
        "speedup": round(t["composed"] / t["fused"], 3),
    }
    checks["generate_same_tokens"] = bool(np.array_equal(seqs["fused"], seqs["composed"]))
    out["checks"] = checks
    out["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
