"""The training step in PyNative vs compiled (``mindspore.jit``) form, measured side by side in one
process: copies of the same model (same seed), each with the library's ``Trainer`` (its loss
closure, ``value_and_grad``, AdamWeightDecay, clipping), stepped alternately on the same batches
so machine load hits them alike: ``Trainer(compiled=False)`` runs each operator eagerly,
``Trainer(compiled=True)`` (the default) runs the step as one jit graph: loss + gradients,
gradient norm, and -- in a graph branch taken only when loss and norm are finite -- clipping and
the optimizer update.

Per (model, loss) one JSON line: median steady step of each, the ratio, the jit first call
(compile + run) and compile cost, the steps that pay it back, and the parity of the two runs
after N steps (losses, grad norms, every parameter: max abs diff). The learning rate warms up
over the steps, so its per-step update is covered by the parity check.

Then the costs a real run pays:

* ``sft_real_shapes``: the demo SFT stage's own batches (its recipes, seed and batch order; lr and
  warm-up from the demo config). Batches are padded to their longest row, so each new padded
  length compiles a new graph. Also jit on the same batches padded up to a multiple of 8
  (``jit_bucket8``), and an estimate of the whole 600-step stage for the three.
* ``grpo_int_arg``: the GRPO loss, whose last argument is the prompt length as a Python int: a
  compile-time constant of the graph, so each new value compiles and a repeated one reuses it.
* ``trainer_warmup``: whether the learning rate ``Trainer.step`` sets reaches the optimizer at
  every step in both modes (it is assigned in place: ``Parameter.set_data`` after the first
  call was not seen by MindSpore 2.9's optimizer, and the warm-up stayed at its step-0 value).

    .venv/bin/python bench/train_step_modes.py [--configs demo,gpt2] [--steps 5] [--real-steps 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import numpy as np


def model_cfg(name: str, args):
    from mindrlhf.config import ModelConfig, load_config

    if name == "demo":
        return load_config("demo").model, 16, 48  # batch 16, padded length 48 (data.max_len)
    return (
        ModelConfig(
            family="gpt2",
            vocab_size=50257,
            d_model=args.d,
            n_layers=args.layers,
            n_heads=args.heads,
            max_seq_len=args.seq,
        ),
        args.batch,
        args.len,
    )


def synthetic_batch(rng, kind: str, b: int, t: int, vocab: int, prompt: int = 16):
    """Random tokens with per-row lengths in [t/2, t] (right padding), prompt then response."""
    from mindspore import Tensor

    rows = b * 2 if kind == "dpo" else b
    lens = rng.integers(t // 2, t + 1, rows)
    lens[0] = t
    ids = rng.integers(0, vocab, (rows, t)).astype(np.int32)
    am = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    resp = (am * (np.arange(t)[None] >= prompt)).astype(np.float32)
    ids[am == 0] = 0
    if kind == "sft":
        return (
            Tensor(ids),
            Tensor(am),
            Tensor(resp),
            Tensor(np.float32(max(resp[:, 1:].sum(), 1.0))),
        )
    return Tensor(ids), Tensor(am), Tensor(resp)


def make_loss(kind: str, model):
    from mindrlhf.algos.sft import sft_loss
    from mindrlhf.config import DPOConfig
    from mindrlhf.stages.dpo import make_dpo_loss

    if kind == "dpo":
        return make_dpo_loss(model, DPOConfig(beta=0.1))

    def loss_fn(input_ids, attention_mask, loss_mask, denom):  # as in stages/sft.py
        logits, _ = model(input_ids, attention_mask)
        loss = sft_loss(logits, input_ids, loss_mask, denom)
        return loss, loss

    return loss_fn


def runners(cfg, kind: str, lr: float, warmup: int, modes=("pynative", "jit"), loss=None) -> dict:
    """One (model, Trainer.step) per mode, identical models; a mode containing "jit" is compiled."""
    from mindrlhf.config import OptimConfig
    from mindrlhf.models.decoder import CausalLM
    from mindrlhf.runtime import Dist
    from mindrlhf.stages.common import Trainer

    out = {}
    for mode in modes:
        m = CausalLM(cfg, seed=0)
        m.set_train(True)
        fn = loss(m) if loss else make_loss(kind, m)
        tr = Trainer(
            m.trainable_params(),
            fn,
            OptimConfig(lr=lr, warmup_steps=warmup, grad_clip=1.0, compiled="jit" in mode),
            Dist(),
            1000,
        )
        out[mode] = (m, tr.step)
    return out


def max_abs(a, b) -> float:
    return (
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        if len(a)
        else 0.0
    )


def param_diff(m1, m2) -> tuple[float, float]:
    """(max abs diff over all parameters, max abs parameter value) after training."""
    d, scale = 0.0, 0.0
    for p1, p2 in zip(m1.trainable_params(), m2.trainable_params()):
        a, b = p1.asnumpy(), p2.asnumpy()
        d = max(d, float(np.abs(a - b).max()))
        scale = max(scale, float(np.abs(a).max()))
    return d, scale


def run_pair(runs, batches) -> dict:
    """Step every runner on each batch in turn (order alternating); times, losses, grad norms.
    ``batches``: a list of arg tuples, or of {mode: args} for per-mode variants of a batch."""
    res = {m: {"t": [], "loss": [], "gnorm": []} for m in runs}
    for i, bt in enumerate(batches):
        order = list(runs.items()) if i % 2 == 0 else list(runs.items())[::-1]
        for mode, (_, step) in order:
            args = bt[mode] if isinstance(bt, dict) else bt
            t = time.perf_counter()
            loss, gnorm, _ = step(*args)
            res[mode]["t"].append(time.perf_counter() - t)
            res[mode]["loss"].append(loss)
            res[mode]["gnorm"].append(gnorm)
    return res


def fixed_shape(name: str, kind: str, args) -> dict:
    from mindspore import Tensor

    from mindrlhf.algos.dpo import sequence_logps

    cfg, b, t = model_cfg(name, args)
    steps = args.steps if name == "demo" else args.gpt2_steps
    rng = np.random.default_rng(0)
    runs = runners(cfg, kind, lr=5e-4, warmup=steps + 1)
    batches = [synthetic_batch(rng, kind, b, t, cfg.vocab_size) for _ in range(steps + 1)]
    if kind == "dpo":  # reference log-probs: the initial policy's (a margin of 0 to start from)
        m0 = runs["pynative"][0]
        full = []
        for bt in batches:
            lp = sequence_logps(m0(bt[0], bt[1])[0], bt[0], bt[2]).asnumpy()
            full.append(
                (*bt, Tensor(lp[:b] + rng.normal(0, 1, b).astype(np.float32)), Tensor(lp[b:]))
            )
        batches = full
    res = run_pair(runs, batches)
    py, jt = res["pynative"], res["jit"]
    py_s, jt_s = float(np.median(py["t"][1:])), float(np.median(jt["t"][1:]))
    compile_s = jt["t"][0] - jt_s
    pdiff, pscale = param_diff(runs["pynative"][0], runs["jit"][0])
    return {
        "config": name,
        "loss": kind,
        "batch": b,
        "seq_len": t,
        "model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "vocab": cfg.vocab_size},
        "steps": steps,
        "pynative_step_s": round(py_s, 4),
        "jit_step_s": round(jt_s, 4),
        "speedup_jit": round(py_s / jt_s, 3),
        "pynative_first_call_s": round(py["t"][0], 3),
        "jit_first_call_s": round(jt["t"][0], 3),
        "jit_compile_s": round(compile_s, 3),
        "breakeven_steps": round(compile_s / (py_s - jt_s), 1) if py_s > jt_s else None,
        "total_s": {"pynative": round(sum(py["t"]), 2), "jit": round(sum(jt["t"]), 2)},
        "max_abs_diff": {
            "loss": max_abs(py["loss"], jt["loss"]),
            "grad_norm": max_abs(py["gnorm"], jt["gnorm"]),
            "params": pdiff,
        },
        "max_abs_param": pscale,
        "final_loss": {"pynative": py["loss"][-1], "jit": jt["loss"][-1]},
    }


def demo_sft_table():
    """The demo config's SFT training tokens, built from its recipes as the prepare stage does."""
    import pyarrow as pa

    from mindrlhf.config import load_config
    from mindrlhf.data.recipes import load_recipe
    from mindrlhf.data.tokenize import tokenize_sft
    from mindrlhf.data.tokenizer import load_tokenizer

    cfg = load_config("demo")
    dc, tok = cfg.data, load_tokenizer(cfg.tokenizer)
    parts = [
        tokenize_sft(t, tok, dc.max_prompt_len, dc.max_len)
        for name in dc.recipes
        for tn, t in load_recipe(name).build(dc).items()
        if tn == "sft_train"
    ]
    return cfg, pa.concat_tables(parts, promote_options="permissive"), tok


def pad_to(bt: dict, length: int, pad_id: int) -> dict:
    """A right-padded SFT batch padded further to ``length`` (pad tokens, masks 0)."""
    extra = length - bt["input_ids"].shape[1]
    return {
        "input_ids": np.pad(bt["input_ids"], ((0, 0), (0, extra)), constant_values=pad_id),
        "attention_mask": np.pad(bt["attention_mask"], ((0, 0), (0, extra))),
        "loss_mask": np.pad(bt["loss_mask"], ((0, 0), (0, extra))),
    }


def real_shapes(args) -> dict:
    """K demo SFT steps on the stage's own batches (varying padded length): totals with compiles."""
    from mindspore import Tensor

    from mindrlhf.data.tokenize import sft_batch
    from mindrlhf.stages.common import epoch_order

    cfg, table, tok = demo_sft_table()
    sc = cfg.sft
    bucket = lambda n: -(-n // 8) * 8  # noqa: E731
    lengths = np.array([len(r) for r in table.column("input_ids").to_pylist()])
    full_run = [
        int(lengths[epoch_order(table.num_rows, s, sc.batch_size, cfg.seed)].max())
        for s in range(sc.steps)
    ]
    modes = ("pynative", "jit", "jit_bucket8")
    runs = runners(cfg.model, "sft", lr=sc.lr, warmup=sc.warmup_steps, modes=modes)
    batches, seen = [], []
    for step in range(args.real_steps):
        bt = sft_batch(
            table, epoch_order(table.num_rows, step, sc.batch_size, cfg.seed), tok.pad_id
        )
        denom = Tensor(np.float32(max(int(bt["loss_mask"][:, 1:].sum()), 1)))

        def as_args(b, denom=denom):
            return (
                Tensor(b["input_ids"]),
                Tensor(b["attention_mask"]),
                Tensor(b["loss_mask"]),
                denom,
            )

        t = bt["input_ids"].shape[1]
        batches.append(
            {
                "pynative": as_args(bt),
                "jit": as_args(bt),
                "jit_bucket8": as_args(pad_to(bt, bucket(t), tok.pad_id)),
            }
        )
        seen.append(t)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = run_pair(runs, batches)
    t = {m: np.array(r["t"]) for m, r in res.items()}
    new = {"jit": np.array([x not in seen[:i] for i, x in enumerate(seen)])}
    bseen = [bucket(x) for x in seen]
    new["jit_bucket8"] = np.array([x not in bseen[:i] for i, x in enumerate(bseen)])
    py_mean = float(t["pynative"].mean())  # no compiles: the mean over the stage's length mix
    out = {
        "config": "demo",
        "loss": "sft",
        "case": "sft_real_shapes",
        "steps": args.real_steps,
        "lr": sc.lr,
        "warmup_steps": sc.warmup_steps,
        "total_s": {m: round(float(v.sum()), 2) for m, v in t.items()},
        "speedup_incl_compiles": {
            m: round(float(t["pynative"].sum() / t[m].sum()), 3) for m in new
        },
    }
    full = {"steps": len(full_run), "pynative_s": round(py_mean * len(full_run), 1)}
    for m, nw in new.items():
        rep = ~nw
        distinct = len({bucket(x) for x in full_run}) if m == "jit_bucket8" else len(set(full_run))
        if not rep.any():  # every step a new shape: no steady figure yet (raise --real-steps)
            out[m] = {"compiles": int(nw.sum())}
            full[m] = {"distinct_shapes": distinct}
            continue
        # steady ratio on steps whose shape was compiled before; pynative on the same steps
        ratio = float(np.median(t["pynative"][rep] / t[m][rep]))
        compile_each = float(np.median(t[m][nw] - t["pynative"][nw] / ratio))
        est = py_mean / ratio * len(full_run) + compile_each * distinct
        out[m] = {
            "compiles": int(nw.sum()),
            "steady_speedup_on_compiled_shapes": round(ratio, 3),
            "compile_s_per_new_shape": round(compile_each, 2),
        }
        full[m] = {
            "distinct_shapes": distinct,
            "estimated_s": round(est, 1),
            "estimated_speedup": round(py_mean * len(full_run) / est, 3),
        }
    out["full_stage_estimate"] = full
    out["max_abs_diff_vs_pynative"] = {
        m: {
            "loss_first_10_steps": max_abs(res["pynative"]["loss"][:10], res[m]["loss"][:10]),
            "loss_all": max_abs(res["pynative"]["loss"], res[m]["loss"]),
            "params": param_diff(runs["pynative"][0], runs[m][0])[0],
        }
        for m in new
    }
    out["final_loss"] = {m: round(r["loss"][-1], 4) for m, r in res.items()}
    out["maxrss_mb_growth"] = round(
        (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1
    )
    return out


def grpo_int_arg(args) -> dict:
    """The GRPO loss (stages/grpo.py) with its Python-int prompt length: which calls compile."""
    from mindspore import Tensor

    from mindrlhf.algos.grpo import grpo_loss
    from mindrlhf.config import load_config
    from mindrlhf.stages.rollout import response_logprobs

    cfg = load_config("demo")
    gc = cfg.grpo

    def loss(model):
        def loss_fn(seq, am, old_lp, ref_lp, adv, mask, p):
            lp = response_logprobs(model, seq, am, p)
            return grpo_loss(lp, old_lp, ref_lp, adv, mask, gc.clip_range, gc.beta)

        return loss_fn

    runs = runners(cfg.model, "grpo", lr=gc.lr, warmup=0, loss=loss)
    rng = np.random.default_rng(1)
    b, new_tokens = gc.mini_batch, gc.max_new_tokens
    plens = [10, 12, 10, 12, 10, 14]
    batches = []
    for p in plens:
        t = p + new_tokens
        seq = rng.integers(0, 1000, (b, t)).astype(np.int32)
        am = np.ones((b, t), np.int32)
        am[: b // 2, :2] = 0  # left padding on some prompts
        n = np.full((b, new_tokens), -2.0, np.float32)
        batches.append(
            (
                Tensor(seq),
                Tensor(am),
                Tensor(n),
                Tensor(n + 0.1),
                Tensor(rng.normal(0, 1, b).astype(np.float32)),
                Tensor(np.ones((b, new_tokens), np.float32)),
                p,
            )
        )
    res = run_pair(runs, batches)
    pdiff, _ = param_diff(runs["pynative"][0], runs["jit"][0])
    return {
        "config": "demo",
        "loss": "grpo",
        "case": "grpo_int_arg",
        "batch": b,
        "prompt_lens": plens,
        "step_s": {m: [round(x, 3) for x in r["t"]] for m, r in res.items()},
        "max_abs_diff": {
            "loss": max_abs(res["pynative"]["loss"], res["jit"]["loss"]),
            "params": pdiff,
        },
    }


def linear_loss(w):
    def loss_fn(x):
        loss = (w * x).sum()
        return loss, loss

    return loss_fn


def trainer_warmup() -> dict:
    """Does Trainer.step's learning-rate warm-up reach the optimizer? One weight, constant
    gradient, no clipping: the per-step change of the weight against the one the schedule gives."""
    from mindspore import Parameter, Tensor

    from mindrlhf.config import OptimConfig
    from mindrlhf.runtime import Dist
    from mindrlhf.stages.common import Trainer

    oc = OptimConfig(lr=0.1, warmup_steps=5, grad_clip=0.0)
    out = {}
    for name in ("Trainer(compiled=False)", "Trainer(compiled=True)"):
        w = Parameter(Tensor(np.zeros(1, np.float32)), name="w")
        tr = Trainer(
            [w],
            linear_loss(w),
            dataclasses.replace(oc, compiled=name.endswith("True)")),
            Dist(),
            10,
        )
        step = tr.step
        deltas = []
        for _ in range(8):
            before = float(w.asnumpy()[0])
            step(Tensor(np.ones(1, np.float32)))
            deltas.append(before - float(w.asnumpy()[0]))
        out[name] = deltas
    # AdamWeightDecay without bias correction, constant gradient: step t moves lr_t * (1 - b1^t) /
    # sqrt(1 - b2^t)
    want = [
        oc.lr
        * min(1.0, (i + 1) / oc.warmup_steps)
        * (1 - 0.9 ** (i + 1))
        / np.sqrt(1 - 0.999 ** (i + 1))
        for i in range(8)
    ]
    return {
        "case": "trainer_warmup",
        "lr": oc.lr,
        "warmup_steps": oc.warmup_steps,
        "expected_deltas": [round(x, 5) for x in want],
        **{k: [round(x, 5) for x in v] for k, v in out.items()},
        "warmup_applied": {k: bool(np.allclose(v, want, rtol=1e-4)) for k, v in out.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--configs", default="demo,gpt2", help="demo (load_config('demo').model) and/or gpt2"
    )
    ap.add_argument("--losses", default="sft,dpo")
    ap.add_argument(
        "--steps", type=int, default=5, help="timed steps after the first call, demo model"
    )
    ap.add_argument(
        "--gpt2-steps", type=int, default=2, help="timed steps after the first call, GPT-2 shape"
    )
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256, help="GPT-2 shape: max_seq_len")
    ap.add_argument(
        "--len",
        type=int,
        default=128,
        help="GPT-2 shape: padded batch length (dpo_throughput's real pairs: ~109 tokens)",
    )
    ap.add_argument(
        "--batch", type=int, default=8, help="GPT-2 shape: sequences (SFT) / pairs (DPO)"
    )
    ap.add_argument("--real-steps", type=int, default=20, help="sft_real_shapes steps (0 skips it)")
    ap.add_argument("--no-grpo", action="store_true", help="skip the grpo_int_arg case")
    args = ap.parse_args()

    from mindrlhf.runtime import init_runtime

    init_runtime("CPU")
    t0 = time.perf_counter()
    print(json.dumps(trainer_warmup()), flush=True)
    for name in args.configs.split(","):
        for kind in args.losses.split(","):
            print(json.dumps(fixed_shape(name, kind, args)), flush=True)
    if args.real_steps:
        print(json.dumps(real_shapes(args)), flush=True)
    if not args.no_grpo:
        print(json.dumps(grpo_int_arg(args)), flush=True)
    print(
        json.dumps({"bench": "train_step_modes", "wall_s": round(time.perf_counter() - t0, 1)}),
        flush=True,
    )


if __name__ == "__main__":
    main()
