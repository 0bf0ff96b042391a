"""The RLHF pipeline as a Prefect flow: prepare -> sft (-> rm -> ppo|grpo -> dpo as they land)."""
from __future__ import annotations

import json

from prefect import flow, get_run_logger

from mindrlhf.config import load_config
from tasks.stages import prepare_task, sft_task


def call(task, *args) -> tuple[dict, str]:
    """Run a task; return its result and its final state's name (Completed / Cached)."""
    state = task(*args, return_state=True)
    return state.result(), state.name


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(config: str = "demo", overrides: dict | None = None) -> dict:
    cfg = load_config(config, overrides)
    c = cfg.to_dict()
    logger = get_run_logger()
    states = {}
    data, states["prepare"] = call(prepare_task, "prepare", c)
    d = data["outputs"]
    sft, states["sft"] = call(sft_task, "sft", c, {"train": d["sft_train"], "heldout": d["sft_heldout"]})
    summary = {
        "states": states,
        "store_root": cfg.store.root,
        "datasets": d,
        "sft": {"checkpoint": sft["outputs"]["checkpoint"], **sft["metrics"], "samples": sft.get("samples", []),
                "loss_curve": sft.get("loss_curve", [])},
    }
    logger.info("pipeline summary:\n" + json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    import sys

    from mindrlhf.report import format_summary

    print(format_summary(rlhf_pipeline(sys.argv[1] if len(sys.argv) > 1 else "demo")))
