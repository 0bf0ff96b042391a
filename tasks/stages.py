"""One thin Prefect task per pipeline stage. Each is cached on (stage config, input artifact ids,
code version) with a JSON result (no pickle), and retried: a retry resumes from the stage's last
working checkpoint because the run directory is derived from the same key."""
from __future__ import annotations

from prefect import task

from .common import cache_key_fn, execute

COMMON = dict(cache_key_fn=cache_key_fn, persist_result=True, result_serializer="json",
              retries=2, retry_delay_seconds=2)


@task(name="prepare", **COMMON)
def prepare_task(stage: str, cfg_dict: dict, inputs: dict | None = None) -> dict:
    return execute(stage, cfg_dict, inputs or {})


@task(name="sft", **COMMON)
def sft_task(stage: str, cfg_dict: dict, inputs: dict) -> dict:
    return execute(stage, cfg_dict, inputs)
