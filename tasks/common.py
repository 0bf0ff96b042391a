"""What every stage task shares: the cache key, the run directory, launching and log streaming.

Cache key = sha256(stage, the config sections the stage reads, input artifact ids, code version).
The run directory (working checkpoints) is derived from the same key, so a retry of a failed
stage finds the checkpoints its previous attempt left and resumes from them.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from mindrlhf.config import Config, from_dict
from mindrlhf.data.store import ArtifactStore
from mindrlhf.launch import run_stage

REPO = Path(__file__).resolve().parents[1]

# config sections (top-level keys) each stage's output depends on
STAGE_SECTIONS = {
    "prepare": ("data", "tokenizer"),
    "sft": ("name", "seed", "device_target", "model", "tokenizer", "sft", "generation", "parallel"),
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


def stage_key(stage: str, cfg_dict: dict, inputs: dict, extra: str = "") -> str:
    sections = {k: cfg_dict[k] for k in STAGE_SECTIONS[stage]}
    if "parallel" in sections:  # where it runs does not change what it computes; how many ranks does
        sections["parallel"] = {"worker_num": cfg_dict["parallel"]["worker_num"]}
    blob = json.dumps({"stage": stage, "config": sections, "inputs": inputs, "code": code_version(),
                       "extra": extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key_fn(context, parameters) -> str:
    return stage_key(parameters["stage"], parameters["cfg_dict"], parameters.get("inputs") or {},
                     parameters.get("extra", ""))


def run_dir_for(cfg: Config, key: str, stage: str) -> Path:
    return Path(cfg.store.root) / "runs" / f"{stage}-{key[:16]}"


def execute(stage: str, cfg_dict: dict, inputs: dict, extra: str = "") -> dict:
    """Body of every stage task: launch the stage process, stream its lines into Prefect's log."""
    logger = get_run_logger()
    cfg = from_dict(cfg_dict, "<flow config>")
    key = stage_key(stage, cfg_dict, inputs, extra)
    ArtifactStore(cfg.store.root)
    result = run_stage(stage, cfg, inputs, cfg.store.root, run_dir_for(cfg, key, stage), log=logger.info)
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.get("metrics", {}).items())
    outs = "\n".join(f"| {k} | `{v[:16]}` |" for k, v in result.get("outputs", {}).items())
    create_markdown_artifact(
        key=f"{stage}-summary", description=f"{stage} stage figures",
        markdown=f"## {stage}\n\n| metric | value |\n|---|---|\n{rows}\n\n| output | artifact id |\n|---|---|\n{outs}\n")
    return result
