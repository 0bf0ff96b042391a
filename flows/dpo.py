"""DPO only: prepare -> sft -> reference log-probs -> dpo (no reference stage for the
reference-free dpo.loss orpo / simpo), for users who want preference optimisation without a
reward model. The same cached tasks as the full pipeline, so a DPO run
after a pipeline run reuses its prepared data, SFT checkpoint and reference log-probs."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

from flows.pipeline import call, finished, run_dpo_branch
from mindrlhf.config import load_config
from tasks.stages import prepare_task, sft_task


@flow(name="dpo-only", log_prints=True)
def dpo_pipeline(config: str = "demo", overrides: dict | None = None) -> dict:
    cfg = load_config(config, overrides)
    c = cfg.to_dict()
    summary: dict = {"states": {}, "peak_rss_gb": {}, "store_root": cfg.store.root}
    d = call(prepare_task, "prepare", c, None, summary)["outputs"]
    sft = call(sft_task, "sft", c, {"train": d["sft_train"], "heldout": d["sft_heldout"]}, summary)
    sft_ckpt = sft["outputs"]["checkpoint"]
    summary["sft"] = {"checkpoint": sft_ckpt, **sft["metrics"], "samples": sft.get("samples", [])}
    summary["dpo"] = run_dpo_branch(c, d, sft_ckpt, summary)
    finished(summary)
    get_run_logger().info("dpo summary:\n" + json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    import sys

    from mindrlhf.report import format_summary

    print(format_summary(dpo_pipeline(sys.argv[1] if len(sys.argv) > 1 else "demo")))
