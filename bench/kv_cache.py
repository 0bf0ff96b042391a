"""Generation throughput with and without the KV cache, same model, same prompts, one run.

    python bench/kv_cache.py [--models tiny,gpt2-6x512,gpt2-small] [--prompt 64]
                             [--new 32,128,256] [--batch 1,8]

Prints one JSON object per (model, batch, new tokens) with tokens/s of three paths -- ``cache``:
the default, a fixed-size KV cache with the decode step compiled as one graph; ``cache_eager``:
the growing cache run op by op in PyNative; ``no_cache``: the whole sequence recomputed each step
-- the ratios of the cached paths over ``no_cache``, and whether all three produced the same
tokens (greedy). The compiled decode step is compiled before timing (``compile_s``: the first
generation at this shape minus a timed one), as a stage pays it once per (batch, prompt bucket).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from benchlib import model_config

from mindrlhf.config import GenerationConfig, ModelConfig, load_config
from mindrlhf.models.decoder import CausalLM
from mindrlhf.models.generation import generate, left_pad
from mindrlhf.runtime import init_runtime

MODELS = {
    "tiny": lambda: load_config("demo").model,
    "gpt2-6x512": lambda: ModelConfig(
        family="gpt2", vocab_size=50257, d_model=512, n_layers=6, n_heads=8, max_seq_len=512
    ),  # the DPO / GRPO bench shape
    "gpt2-small": lambda: ModelConfig(
        family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024
    ),
    "llama-small": lambda: model_config("smollm2", 2048)[0],
}


def run(model_name: str, prompt: int, new: int, batch: int, seed: int = 0) -> dict:
    cfg = MODELS[model_name]()
    cfg.max_seq_len = max(cfg.max_seq_len, prompt + new)
    model = CausalLM(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    ids, mask = left_pad([list(rng.integers(0, cfg.vocab_size, prompt)) for _ in range(batch)], 0)
    gen = GenerationConfig(max_new_tokens=new, do_sample=False)
    generate(
        model,
        ids[:, :8],
        mask[:, :8],
        GenerationConfig(max_new_tokens=2, do_sample=False),
        -1,
        0,
        compiled=False,
    )  # warm-up of the eager kernels
    t = time.perf_counter()
    generate(model, ids, mask, gen, eos_id=-1, pad_id=0)  # compiles the decode step for this shape
    first = time.perf_counter() - t
    out = {}
    for name, kw in (
        ("cache", {}),
        ("cache_eager", {"compiled": False}),
        ("no_cache", {"use_cache": False}),
    ):
        t = time.perf_counter()
        g = generate(model, ids, mask, gen, eos_id=-1, pad_id=0, **kw)
        dt = time.perf_counter() - t
        out[name] = {
            "seconds": round(dt, 3),
            "tokens_per_s": round(batch * new / dt, 2),
            "seq": g.sequences,
        }
    same = all(np.array_equal(out["cache"]["seq"], o["seq"]) for o in out.values())
    tps = {k: v["tokens_per_s"] for k, v in out.items()}
    return {
        "bench": "kv_cache",
        "model": model_name,
        "layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "prompt": prompt,
        "new_tokens": new,
        "batch": batch,
        "cache_tokens_per_s": tps["cache"],
        "cache_eager_tokens_per_s": tps["cache_eager"],
        "no_cache_tokens_per_s": tps["no_cache"],
        "speedup": round(tps["cache"] / tps["no_cache"], 2),
        "speedup_eager_cache": round(tps["cache_eager"] / tps["no_cache"], 2),
        "compiled_over_eager_cache": round(tps["cache"] / tps["cache_eager"], 2),
        "compile_s": round(first - out["cache"]["seconds"], 2),
        "identical_tokens": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="tiny,gpt2-small")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", default="128", help="comma-separated new-token counts")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    args = ap.parse_args()
    init_runtime("CPU")
    for m in args.models.split(","):
        for b in (int(x) for x in args.batch.split(",")):
            for n in (int(x) for x in args.new.split(",")):
                print(json.dumps(run(m, args.prompt, n, b)), flush=True)


if __name__ == "__main__":
    main()
