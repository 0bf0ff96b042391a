"""The policy / reference model of ``model.backend``: our decoder (``native``) or MindFormers'
LLaMA behind the same interface (``mindformers``, models/mindformers_backend.py); the critic and
reward model likewise (decoder.ScalarHeadModel or its MindFormers counterpart)."""

from __future__ import annotations

from ..config import ModelConfig, ParallelConfig
from ..parallel import apply_parallel
from .decoder import CausalLM, ScalarHeadModel


def _build(kind: str, cfg: ModelConfig, seed: int, parallel: ParallelConfig | None):
    if cfg.backend == "mindformers":
        from . import mindformers_backend as mf

        cls = mf.MindFormersCausalLM if kind == "lm" else mf.MindFormersScalarHeadModel
        return cls(cfg, seed, parallel=parallel)
    model = (CausalLM if kind == "lm" else ScalarHeadModel)(cfg, seed)
    if parallel is not None:
        apply_parallel(model, parallel)
    return model


def build_policy(cfg: ModelConfig, seed: int = 0, parallel: ParallelConfig | None = None):
    """A causal LM of ``cfg``; a seeded init is the same weights with either backend. With a
    ``parallel`` section in semi_auto mode, sharded: our decoder by mindrlhf.parallel's
    strategies, MindFormers' by its own parallel_config built from the same section."""
    return _build("lm", cfg, seed, parallel)


def build_scalar_head(cfg: ModelConfig, seed: int = 0, parallel: ParallelConfig | None = None):
    """The critic / reward model of ``cfg.backend``: a transformer with a value per position.
    A seeded init is the same weights with either backend; sharded as build_policy's."""
    return _build("scalar", cfg, seed, parallel)
