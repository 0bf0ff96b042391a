"""One typed config schema for the whole pipeline, loaded from YAML with ``yaml.safe_load``.

Every section is a dataclass whose defaults are the project's defaults. Loading walks the YAML
against the dataclasses: an unknown key, a wrong type or a bad value raises :class:`ConfigError`
naming the file and the dotted key (``sft.lr``), before any training starts.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config value is wrong; the message names the file and the key."""


def _positive(v, key):
    if v <= 0:
        raise ValueError(f"{key} must be > 0, got {v!r}")


def _non_negative(v, key):
    if v < 0:
        raise ValueError(f"{key} must be >= 0, got {v!r}")


def _unit(v, key):
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{key} must be in [0, 1], got {v!r}")


@dataclass
class ModelConfig:
    family: Literal["gpt2", "llama"] = "gpt2"  # llama covers LLaMA / Qwen2 / Baichuan2 layouts
    vocab_size: int = 50257
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # GQA; None means n_heads
    d_ff: Optional[int] = None  # None: 4*d_model (gpt2) or 8/3*d_model rounded (llama)
    max_seq_len: int = 256
    qkv_bias: Optional[bool] = None  # None: True for gpt2, False for llama (Qwen2 sets True)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def validate(self):
        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _positive(getattr(self, k), k)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.family == "gpt2":
            return 4 * self.d_model
        return 64 * ((int(8 * self.d_model / 3) + 63) // 64)

    @property
    def use_qkv_bias(self) -> bool:
        return self.family == "gpt2" if self.qkv_bias is None else self.qkv_bias


@dataclass
class TokenizerConfig:
    kind: Literal["gpt2_bpe"] = "gpt2_bpe"


@dataclass
class DataConfig:
    recipe: Literal["movie_reviews"] = "movie_reviews"
    max_prompt_len: int = 24
    max_len: int = 64  # prompt + response tokens
    heldout_fraction: float = 0.05
    limit: int = 0  # 0: all rows; otherwise the first N rows after shuffling (demo speed)

    def validate(self):
        _positive(self.max_prompt_len, "max_prompt_len")
        if self.max_len <= self.max_prompt_len:
            raise ValueError(f"max_len ({self.max_len}) must exceed max_prompt_len ({self.max_prompt_len})")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        _non_negative(self.limit, "limit")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off

    def validate(self):
        _positive(self.lr, "lr")
        _non_negative(self.weight_decay, "weight_decay")
        _non_negative(self.warmup_steps, "warmup_steps")
        _non_negative(self.grad_clip, "grad_clip")


@dataclass
class SFTConfig(OptimConfig):
    batch_size: int = 8
    steps: int = 200
    ckpt_every: int = 50
    log_every: int = 10
    eval_batches: int = 4

    def validate(self):
        super().validate()
        for k in ("batch_size", "steps", "ckpt_every", "log_every"):
            _positive(getattr(self, k), k)
        _non_negative(self.eval_batches, "eval_batches")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0

    def validate(self):
        _positive(self.max_new_tokens, "max_new_tokens")
        _positive(self.temperature, "temperature")
        _non_negative(self.top_k, "top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class ParallelConfig:
    worker_num: int = 1  # total processes across all nodes
    local_worker_num: int = 1  # processes on this node
    master_addr: str = "127.0.0.1"
    master_port: int = 8118
    node_rank: int = 0
    log_dir: str = "msrun_log"
    cluster_time_out: int = 600

    def validate(self):
        _positive(self.worker_num, "worker_num")
        _positive(self.local_worker_num, "local_worker_num")
        if self.local_worker_num > self.worker_num:
            raise ValueError("local_worker_num must be <= worker_num")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be a TCP port, got {self.master_port}")
        _non_negative(self.node_rank, "node_rank")


@dataclass
class StoreConfig:
    root: str = "artifacts"


@dataclass
class Config:
    name: str = "default"
    seed: int = 1234
    device_target: Literal["CPU", "Ascend", "GPU"] = "CPU"
    store: StoreConfig = field(default_factory=StoreConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self):
        if self.sft.batch_size % self.parallel.worker_num:
            raise ValueError(
                f"sft.batch_size ({self.sft.batch_size}) must be divisible by "
                f"parallel.worker_num ({self.parallel.worker_num})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1]
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {type(value).__name__}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{key} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {_type_name(tp)} at {key}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ValueError(f"unknown key {where!r} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in data.items():
        where = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(v, hints[k], where)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ValueError as e:
            raise ValueError(f"{prefix}: {e}" if prefix else str(e)) from None
    return obj


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(data: dict, source: str = "<dict>") -> Config:
    try:
        return _build(Config, data)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Load a YAML config (a path, or a shipped profile name such as ``demo``).

    ``overrides`` is a nested dict merged over the file, for tests and the CLI.
    """
    if path is None:
        path = "demo"
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        p = CONFIG_DIR / f"{path}.yaml"
    if not p.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    if overrides:
        data = _merge(data, overrides)
    return from_dict(data, str(p))
