"""What a stage's outputs depend on, as one key: the stage, the config sections it reads, its
input artifact ids, the bytes of the user files it reads and the code. The cache key of a stage
task, its run directory and the fingerprint of its working checkpoints all derive from it, so a
retry resumes only from checkpoints written by the same computation.

User files (model weights, tokenizers, data files, reward functions) enter the key by their
sha256, not their path or mtime: moving a project re-runs nothing, editing one byte of a data
file re-runs what reads it. Hashes are remembered per (path, size, mtime), so a 500 MB weight
file is read once, not at every key.
"""

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
    "evaluate": _TRAIN + ("evaluate", "generation"),
    "promote": ("name", "promote"),
}


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the library and recipe sources (Python and C++ kernels): a code change
    invalidates cached stages."""
    h = hashlib.sha256()
    for d in ("mindrlhf", "datasets"):
        for p in sorted([*(REPO / d).rglob("*.py"), *(REPO / d).rglob("*.cc")]):
            h.update(str(p.relative_to(REPO)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered in the cache directory by (path, size, mtime)."""
    import os

    from .data.store import atomic_write_bytes, sha256_file

    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    memo = Path(os.environ.get("MINDRLHF_CACHE", Path.cwd() / ".cache")) / "file-hashes.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    rec = known.get(str(path))
    if rec and rec[0] == stamp:
        return rec[1]
    digest = sha256_file(path)
    known[str(path)] = [stamp, digest]
    try:
        atomic_write_bytes(memo, json.dumps(known).encode())
    except OSError:
        pass  # a read-only cache only costs the re-hash
    return digest


def _files_digest(paths, named: bool = True) -> str:
    """One digest of several files' bytes; ``named``: their names count too (a sharded
    directory)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update((p.name.encode() if named else b"") + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


def content_keyed(cfg_dict: dict) -> dict:
    """The config with every user file it names replaced by the sha256 of its bytes."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg_dict.items()}
    model = out.get("model")
    if isinstance(model, dict) and model.get("init"):
        from .models import sources

        src = sources.parse(model["init"])
        if src.kind in (
            "hf",
            "gguf",
        ):  # a GGUF file by its bytes alone: the pinned alias = the same file by path
            model["init"] = (
                f"{src.kind}:sha256:{_files_digest(sources.files_of(src), named=src.kind == 'hf')}"
            )
    tok = out.get("tokenizer")
    if isinstance(tok, dict) and tok.get("path"):
        p = Path(tok["path"])
        files = (
            [p / n for n in ("tokenizer.json", "tokenizer_config.json") if (p / n).is_file()]
            if p.is_dir()
            else [p]
        )
        tok["path"] = f"sha256:{_files_digest(files)}"
    data = out.get("data")
    if isinstance(data, dict) and isinstance(data.get("sources"), list):
        data["sources"] = [
            {**s, "path": f"sha256:{_files_digest(_source_files(s['path']))}"}
            if isinstance(s, dict) and s.get("path")
            else s
            for s in data["sources"]
        ]
    for section, key in (
        ("grpo", "reward"),
        ("ppo", "gold_reward"),
        ("online_dpo", "judge"),
        ("evaluate", "judge"),
    ):
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section][key] = _reward_keyed(out[section][key])
    return out


def _source_files(path: str) -> list[Path]:
    p = Path(path)
    return sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]


def _reward_keyed(v):
    if isinstance(v, list):
        return [_reward_keyed(x) for x in v]
    if isinstance(v, str) and v.startswith("python:"):
        target, _, fn = v[len("python:") :].rpartition(":")
        if target.endswith(".py") and Path(target).is_file():
            return f"python:sha256:{file_sha256(target)}:{fn}"
    return v


def stage_key(stage: str, cfg_dict: dict, inputs: dict) -> str:
    cfg_dict = content_keyed(cfg_dict)
    sections = {k: cfg_dict[k] for k in STAGE_SECTIONS[stage]}
    if stage == "import_weights" and "lora" in sections["model"]:  # the weights, not the training
        sections["model"] = {k: v for k, v in sections["model"].items() if k != "lora"}
    if (
        "parallel" in sections
    ):  # where it runs does not change what it computes; how many ranks does
        sections["parallel"] = {"worker_num": cfg_dict["parallel"]["worker_num"]}
    blob = json.dumps(
        {"stage": stage, "config": sections, "inputs": inputs, "code": code_version()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
