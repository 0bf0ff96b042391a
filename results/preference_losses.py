"""The offline preference losses side by side on the demo: sigmoid DPO, KTO, ORPO and SimPO,
each from the same SFT checkpoint on the same movie-review pairs with the same seed, step count,
batch size and learning rate (the demo's ``dpo`` section); only ``dpo.loss`` and its own
settings change. SimPO runs at beta 2.0 and gamma 1.0 (its paper's range: beta 2.0-2.5,
gamma / beta about 0.5) rather than DPO's 0.1; ORPO at its paper's lambda 0.1; KTO at beta 0.1
with equal weights (the pairs give as many desirable as undesirable examples).

The reference-based losses run the reflogp stage first (KTO in its per-example layout); ORPO and
SimPO run none. Held-out figures come from each dpo stage: ``reward_accuracy`` is the preference
accuracy of the loss's own implicit reward (DPO, KTO: beta * log pi/ref, 0.5 at the start by
construction; ORPO: log odds of the per-token mean log-prob; SimPO: beta * that mean), and
``likelihood_accuracy`` the plain summed log pi(chosen) > log pi(rejected).

    .venv/bin/python results/preference_losses.py [--store DIR] [--sft CHECKPOINT_ID]

Prints JSON (also results/preference_losses.json). ``--sft`` reuses a stored demo SFT
checkpoint; otherwise the demo SFT is trained (several minutes) in the store."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "sigmoid": {},
    "kto": {},
    "orpo": {"orpo_lambda": 0.1},
    "simpo": {"beta": 2.0, "simpo_gamma": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", default="artifacts")
    ap.add_argument("--sft", default="", help="a stored demo SFT checkpoint id to start from")
    ap.add_argument("--losses", default=",".join(SETTINGS))
    args = ap.parse_args()
    from flows.pipeline import dpo_plan
    from mindrlhf.config import load_config
    from mindrlhf.keys import stage_key
    from mindrlhf.launch import run_stage

    def stage(name: str, cfg, inputs: dict) -> dict:
        key = stage_key(name, cfg.to_dict(), inputs)[:16]
        run_dir = Path(cfg.store.root) / "runs" / f"results-{name}-{key}"
        t0 = time.perf_counter()
        res = run_stage(name, cfg, inputs, cfg.store.root, run_dir, log=lambda s: None)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        return res

    base = load_config("demo", {"store": {"root": args.store}})
    data = stage("prepare", base, {})["outputs"]
    sft = args.sft
    if not sft:
        sft = stage("sft", base, {"train": data["sft_train"], "heldout": data["sft_heldout"]})
        sft = sft["outputs"]["checkpoint"]
    out = {
        "experiment": "preference_losses",
        "config": "demo (dpo: steps, batch_size, lr, seed as shipped)",
        "sft_checkpoint": sft,
        "losses": {},
    }
    for loss in args.losses.split(","):
        cfg = load_config(
            "demo", {"store": {"root": args.store}, "dpo": {"loss": loss, **SETTINGS[loss]}}
        )
        ref_inputs, inputs = dpo_plan(cfg.to_dict(), data, sft)
        ref_wall = None
        if ref_inputs is not None:
            ref = stage("reflogp", cfg, ref_inputs)
            inputs.update(ref_train=ref["outputs"]["train"], ref_heldout=ref["outputs"]["heldout"])
            ref_wall = ref["wall_s"]
        res = stage("dpo", cfg, inputs)
        m = res["metrics"]
        out["losses"][loss] = {
            "settings": {"beta": cfg.dpo.beta, **SETTINGS[loss]},
            "reflogp_ran": ref_inputs is not None,
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()},
            "train_loss_by_step": [(h["step"], round(h["loss"], 4)) for h in res["history"]],
            "reflogp_wall_s": ref_wall,
            "dpo_wall_s": res["wall_s"],
            "checkpoint": res["outputs"]["checkpoint"],
        }
        print(json.dumps({loss: out["losses"][loss]}), flush=True)
    print(json.dumps(out, indent=1))
    (HERE / "preference_losses.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
