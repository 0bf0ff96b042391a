"""What a stage's outputs depend on, as one key: the stage, the config sections it reads, its
input artifact ids and the code. The cache key of a stage task, its run directory and the
fingerprint of its working checkpoints all derive from it, so a retry resumes only from
checkpoints written by the same computation."""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

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
