"""The RLHF pipeline as a Prefect flow: prepare -> sft (-> rm -> ppo|grpo -> dpo as they land)."""
from __future__ import annotations

import json

from prefect import flow, get_run_logger

from mindrlhf.config import load_config
from tasks.stages import prepare_task, sft_task


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(config: str = "demo", overrides: dict | None = None) -> dict:
    cfg = load_config(config, overrides)
    c = cfg.to_dict()
    logger = get_run_logger()
    data = prepare_task("prepare", c)
    sft = sft_task("sft", c, {"train": data["outputs"]["sft_train"], "heldout": data["outputs"]["sft_heldout"]})
    summary = {
        "datasets": data["outputs"],
        "sft": {"checkpoint": sft["outputs"]["checkpoint"], **sft["metrics"], "samples": sft.get("samples", [])},
    }
    logger.info("pipeline summary:\n" + json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    import sys

    rlhf_pipeline(sys.argv[1] if len(sys.argv) > 1 else "demo")
