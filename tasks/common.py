"""What every stage task shares: the cache key, the run directory, launching and log streaming.

Cache key = sha256(stage, the config sections the stage reads, input artifact ids, code version).
The run directory (working checkpoints) is derived from the same key, so a retry of a failed
stage finds the checkpoints its previous attempt left and resumes from them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mindrlhf.config import Config, from_dict
from mindrlhf.data.store import ArtifactStore, atomic_write_bytes
from mindrlhf.keys import stage_key
from mindrlhf.launch import run_dir_lock, run_stage


def _index_path(root: str, base: str) -> Path:
    return Path(root) / "cache" / f"{base}.json"


def read_index(root: str, base: str) -> dict | None:
    """The cache index record of a stage key, or None when it is missing or unreadable."""
    try:
        rec = json.loads(_index_path(root, base).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("gen"), str):
        return None
    return rec


def outputs_valid(root: str, outputs) -> bool:
    """Every artifact an index record names is present in this store and passes its sha256 check."""
    if not isinstance(outputs, dict) or not outputs:
        return False
    store = ArtifactStore(root)
    return all(store.is_valid(i) for i in outputs.values() if isinstance(i, str))


def cache_generation(root: str, base: str) -> str:
    """Which generation of this stage's outputs the cache may serve. Prefect serves a cached
    result by key alone, so the key carries a generation that is only reused while the outputs
    it produced are present and verified. Anything else -- no index (store wiped or new), an
    unreadable index, a missing or corrupt output -- starts a fresh random generation that no
    cached record can match, recorded as pending until the stage writes its outputs."""
    rec = read_index(root, base)
    if rec is not None:
        if rec.get("outputs") is None:  # pending: a run of this generation has not finished yet
            return rec["gen"]
        if outputs_valid(root, rec["outputs"]):
            return rec["gen"]
    gen = uuid.uuid4().hex
    atomic_write_bytes(_index_path(root, base), json.dumps({"gen": gen, "outputs": None}).encode())
    return gen


def full_key(stage: str, cfg_dict: dict, inputs: dict) -> tuple[str, str, str]:
    root = str(Path(cfg_dict["store"]["root"]).resolve())
    base = stage_key(stage, cfg_dict, inputs)
    gen = cache_generation(root, base)
    key = hashlib.sha256(f"{base}|{root}|{gen}".encode()).hexdigest()
    return base, key, gen


def cache_key_fn(context, parameters) -> str:
    return full_key(parameters["stage"], parameters["cfg_dict"], parameters.get("inputs") or {})[1]


def run_dir_for(cfg: Config, key: str, stage: str) -> Path:
    return Path(cfg.store.root) / "runs" / f"{stage}-{key[:16]}"


def execute(stage: str, cfg_dict: dict, inputs: dict) -> dict:
    """Body of every stage task: launch the stage process, stream its lines into Prefect's log.
    The run directory is held exclusively while the stage runs; a run that had to wait for it
    (the same stage of the same config started twice, a schedule overlapping a manual run)
    finds the other's finished result and returns it instead of training again."""
    logger = get_run_logger()
    cfg = from_dict(cfg_dict, "<flow config>")
    root = str(Path(cfg.store.root).resolve())
    base, _, gen = full_key(stage, cfg_dict, inputs)
    run_dir = run_dir_for(cfg, base, stage)
    if cfg.runner.work_pool:  # the worker that runs it holds the run directory
        result = run_on_work_pool(stage, cfg, cfg_dict, inputs, run_dir, logger)
    else:
        with run_dir_lock(run_dir, logger.info):
            result = finished_result(root, run_dir)
            if result is not None:
                logger.info(
                    f"{stage}: outputs of an identical run are in the store and verified; reusing "
                    "them"
                )
            else:
                result = run_stage(
                    stage,
                    cfg,
                    inputs,
                    cfg.store.root,
                    run_dir,
                    log=stage_log(logger, cfg.name),
                    lock=False,
                )
            atomic_write_bytes(
                _index_path(root, base),
                json.dumps({"gen": gen, "outputs": result.get("outputs", {})}).encode(),
            )
    try:  # the figures are a view of the result; losing the API must not lose the stage
        publish_prefect_artifacts(stage, cfg, result)
    except Exception as e:  # noqa: BLE001 - httpx / Prefect client errors of every kind
        logger.warning(
            f"{stage}: could not publish its figures to the Prefect API ({type(e).__name__}: {e})"
        )
    return result


def stage_log(logger, cfg_name: str = ""):
    """Where a stage's lines go in the task's log: all at INFO but the METRIC lines (one JSON per
    logging step, kept whole in the stage's history artifact), which are DEBUG unless
    MINDRLHF_LOG_METRICS=1 asks for them. An ALARM line is a warning and a Prefect event
    ``mindrlhf.<kind>.suspected`` (e.g. reward_hacking) with its figures."""
    import os

    metrics = logger.info if os.environ.get("MINDRLHF_LOG_METRICS") == "1" else logger.debug

    def log(line: str) -> None:
        if line.startswith("METRIC "):
            metrics(line)
        elif line.startswith("ALARM "):
            logger.warning(line)
            emit_alarm(json.loads(line[len("ALARM ") :]), cfg_name)
        else:
            logger.info(line)

    return log


def emit_alarm(alarm: dict, cfg_name: str) -> None:
    from prefect.events import emit_event

    emit_event(
        event=f"mindrlhf.{alarm['kind']}.suspected",
        resource={
            "prefect.resource.id": f"mindrlhf.stage.{cfg_name}.{alarm['stage']}",
            "prefect.resource.name": f"{cfg_name} {alarm['stage']}",
        },
        payload=alarm,
    )


def finished_result(root: str, run_dir: Path) -> dict | None:
    """The result an earlier run of this stage key left in its run directory, if every output it
    names is present and verified (whatever happened to the cache index or Prefect's records)."""
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return (
        result if isinstance(result, dict) and outputs_valid(root, result.get("outputs")) else None
    )


def run_on_work_pool(
    stage: str, cfg: Config, cfg_dict: dict, inputs: dict, run_dir: Path, logger
) -> dict:
    """Submit the stage-runner deployment to ``cfg.runner.work_pool`` and wait for it. The stage
    writes result.json into its run directory in the shared store, which is read back here."""
    from prefect.deployments import run_deployment

    local = {
        **cfg_dict,
        "runner": {**cfg_dict["runner"], "work_pool": ""},
    }  # the worker runs it in place
    fr = run_deployment(
        name=cfg.runner.deployment,
        parameters={"stage": stage, "cfg_dict": local, "inputs": inputs},
        work_queue_name=None,
        timeout=cfg.runner.timeout_s,
        tags=[f"stage:{stage}"],
    )
    logger.info(
        f"{stage} ran on work pool {cfg.runner.work_pool} as flow run {fr.name} ({fr.id}): "
        f"{fr.state.name}"
    )
    if not fr.state.is_completed():
        raise RuntimeError(
            f"stage {stage} on work pool {cfg.runner.work_pool}: flow run {fr.id} ended "
            f"{fr.state.name}"
        )
    return json.loads((run_dir / "result.json").read_text())


def publish_prefect_artifacts(stage: str, cfg: Config, result: dict) -> None:
    """A markdown table of the stage's figures (with the reward/KL plot embedded for RL stages)
    and, for stages that log per-step history, that history as a table artifact."""
    rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in result.get("metrics", {}).items()
    )
    outs = "\n".join(f"| {k} | `{v[:16]}` |" for k, v in result.get("outputs", {}).items())
    md = (
        f"## {stage}\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        f"| output | artifact id |\n|---|---|\n{outs}\n"
    )
    metrics_id = result.get("outputs", {}).get("metrics")
    if metrics_id:
        art = ArtifactStore(cfg.store.root).get(metrics_id)
        png = base64.b64encode(art.file("plot.png").read_bytes()).decode()
        md += f"\n![{stage} metrics](data:image/png;base64,{png})\n"
    create_markdown_artifact(
        key=f"{stage.replace('_', '-')}-summary", description=f"{stage} stage figures", markdown=md
    )
    if result.get("history"):
        create_table_artifact(
            key=f"{stage.replace('_', '-')}-history",
            table=result["history"],
            description=f"{stage} per-step metrics",
        )
