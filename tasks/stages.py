"""One thin Prefect task per pipeline stage. Each is cached on (stage config, input artifact ids,
code version) with a JSON result (no pickle), and retried: a retry resumes from the stage's last
working checkpoint because the run directory is derived from the same key."""

from __future__ import annotations

from prefect import task

from .common import cache_key_fn, execute


def stage_task(name: str):
    @task(
        name=name,
        cache_key_fn=cache_key_fn,
        persist_result=True,
        result_serializer="json",
        retries=2,
        retry_delay_seconds=2,
    )
    def run(stage: str, cfg_dict: dict, inputs: dict | None = None) -> dict:
        return execute(stage, cfg_dict, inputs or {})

    return run


prepare_task = stage_task("prepare")
sft_task = stage_task("sft")
rm_task = stage_task("rm")
ppo_task = stage_task("ppo")
grpo_task = stage_task("grpo")
dpo_task = stage_task("dpo")
reflogp_task = stage_task("reflogp")
online_dpo_task = stage_task("online_dpo")
import_task = stage_task("import_weights")
evaluate_task = stage_task("evaluate")
promote_task = stage_task("promote")
