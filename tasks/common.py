"""What every stage task shares: the cache key, the run directory, launching and log streaming.

Cache key = sha256(stage, the config sections the stage reads, input artifact ids, code version).
The run directory (working checkpoints) is derived from the same key, so a retry of a failed
stage finds the checkpoints its previous attempt left and resumes from them.
"""
from __future__ import annotations

import base64
import hashlib
import json
from functools import lru_cache
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mindrlhf.config import Config, from_dict
from mindrlhf.data.store import ArtifactStore, atomic_write_bytes
from mindrlhf.launch import run_stage

REPO = Path(__file__).resolve().parents[1]

# config sections (top-level keys) each stage's output depends on
_TRAIN = ("name", "seed", "device_target", "model", "tokenizer", "parallel")
STAGE_SECTIONS = {
    "prepare": ("name", "data", "tokenizer"),
    "import_weights": ("name", "device_target", "model"),
    "sft": _TRAIN + ("sft", "generation"),
    "rm": _TRAIN + ("rm",),
    "ppo": _TRAIN + ("ppo", "generation"),
    "grpo": _TRAIN + ("grpo", "generation"),
    "reflogp": _TRAIN,  # not the dpo section: changing beta must not rerun the reference model
    "dpo": _TRAIN + ("dpo",),
    "online_dpo": _TRAIN + ("dpo", "online_dpo", "generation"),
}


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the library and recipe sources: a code change invalidates cached stages."""
    h = hashlib.sha256()
    for d in ("mindrlhf", "datasets"):
        for p in sorted((REPO / d).rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def stage_key(stage: str, cfg_dict: dict, inputs: dict) -> str:
    sections = {k: cfg_dict[k] for k in STAGE_SECTIONS[stage]}
    if "parallel" in sections:  # where it runs does not change what it computes; how many ranks does
        sections["parallel"] = {"worker_num": cfg_dict["parallel"]["worker_num"]}
    blob = json.dumps({"stage": stage, "config": sections, "inputs": inputs, "code": code_version()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _index_path(root: str, base: str) -> Path:
    return Path(root) / "cache" / f"{base}.json"


def cache_generation(root: str, base: str) -> int:
    """Which generation of this stage's outputs the cache may serve. A task's cached result is
    only worth serving while the artifacts it names are present and intact; when one is missing
    or fails its sha256 check the generation moves on, the cache misses and the stage rebuilds."""
    idx = _index_path(root, base)
    if not idx.exists():
        return 0
    rec = json.loads(idx.read_text())
    store = ArtifactStore(root)
    ok = all(store.is_valid(i) for i in rec["outputs"].values() if isinstance(i, str))
    return rec["gen"] if ok else rec["gen"] + 1


def full_key(stage: str, cfg_dict: dict, inputs: dict) -> tuple[str, str, int]:
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
    """Body of every stage task: launch the stage process, stream its lines into Prefect's log."""
    logger = get_run_logger()
    cfg = from_dict(cfg_dict, "<flow config>")
    base, _, gen = full_key(stage, cfg_dict, inputs)
    run_dir = run_dir_for(cfg, base, stage)
    if cfg.runner.work_pool:
        result = run_on_work_pool(stage, cfg, cfg_dict, inputs, run_dir, logger)
    else:
        result = run_stage(stage, cfg, inputs, cfg.store.root, run_dir, log=logger.info)
    atomic_write_bytes(_index_path(str(Path(cfg.store.root).resolve()), base),
                       json.dumps({"gen": gen, "outputs": result.get("outputs", {})}).encode())
    publish_prefect_artifacts(stage, cfg, result)
    return result


def run_on_work_pool(stage: str, cfg: Config, cfg_dict: dict, inputs: dict, run_dir: Path, logger) -> dict:
    """Submit the stage-runner deployment to ``cfg.runner.work_pool`` and wait for it. The stage
    writes result.json into its run directory in the shared store, which is read back here."""
    from prefect.deployments import run_deployment

    local = {**cfg_dict, "runner": {**cfg_dict["runner"], "work_pool": ""}}  # the worker runs it in place
    fr = run_deployment(name=cfg.runner.deployment, parameters={"stage": stage, "cfg_dict": local, "inputs": inputs},
                        work_queue_name=None, timeout=cfg.runner.timeout_s, tags=[f"stage:{stage}"])
    logger.info(f"{stage} ran on work pool {cfg.runner.work_pool} as flow run {fr.name} ({fr.id}): {fr.state.name}")
    if not fr.state.is_completed():
        raise RuntimeError(f"stage {stage} on work pool {cfg.runner.work_pool}: flow run {fr.id} ended {fr.state.name}")
    return json.loads((run_dir / "result.json").read_text())


def publish_prefect_artifacts(stage: str, cfg: Config, result: dict) -> None:
    """A markdown table of the stage's figures (with the reward/KL plot embedded for RL stages)
    and, for stages that log per-step history, that history as a table artifact."""
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in result.get("metrics", {}).items())
    outs = "\n".join(f"| {k} | `{v[:16]}` |" for k, v in result.get("outputs", {}).items())
    md = f"## {stage}\n\n| metric | value |\n|---|---|\n{rows}\n\n| output | artifact id |\n|---|---|\n{outs}\n"
    metrics_id = result.get("outputs", {}).get("metrics")
    if metrics_id:
        art = ArtifactStore(cfg.store.root).get(metrics_id)
        png = base64.b64encode(art.file("plot.png").read_bytes()).decode()
        md += f"\n![{stage} metrics](data:image/png;base64,{png})\n"
    create_markdown_artifact(key=f"{stage.replace('_', '-')}-summary", description=f"{stage} stage figures", markdown=md)
    if result.get("history"):
        create_table_artifact(key=f"{stage.replace('_', '-')}-history", table=result["history"],
                              description=f"{stage} per-step metrics")
