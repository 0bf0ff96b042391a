"""One stage as a flow, for running stages on a Prefect work pool (``runner.work_pool``): the
pipeline's task submits this deployment and waits; the worker launches the stage process."""

from __future__ import annotations

from prefect import flow

from tasks.common import execute


@flow(name="stage-runner", log_prints=True)
def stage_runner(stage: str, cfg_dict: dict, inputs: dict | None = None) -> dict:
    return execute(stage, cfg_dict, inputs or {})
