"""The policy / reference model of ``model.backend``: our decoder (``native``) or MindFormers'
LLaMA behind the same interface (``mindformers``, models/mindformers_backend.py); the critic and
reward model likewise (decoder.ScalarHeadModel or its MindFormers counterpart)."""

from __future__ import annotations

from ..config import ModelConfig, ParallelConfig
from ..parallel import apply_parallel
from .decoder import CausalLM, ScalarHeadModel


def build_policy(cfg: ModelConfig, seed: int = 0, parallel: ParallelConfig | None = None):
    """A causal LM of ``cfg``; a seeded init is the same weights with either backend. With a
    ``parallel`` section in semi_auto mode, sharded: our decoder by mindrlhf.parallel's
    strategies, MindFormers' by its own parallel_config built from the same section."""
    if cfg.backend == "mindformers":
        from .mindformers_backend import MindFormersCausalLM

        return MindFormersCausalLM(cfg, seed, parallel=parallel)
    model = CausalLM(cfg, seed)
    if parallel is not None:
        apply_parallel(model, parallel)
    return model


def build_scalar_head(cfg: ModelConfig, seed: int = 0, parallel: ParallelConfig | None = None):
    """The critic / reward model of ``cfg.backend``: a transformer with a value per position.
    A seeded init is the same weights with either backend; sharded as build_policy's."""
    if cfg.backend == "mindformers":
        from .mindformers_backend import MindFormersScalarHeadModel

        return MindFormersScalarHeadModel(cfg, seed, parallel=parallel)
    model = ScalarHeadModel(cfg, seed)
    if parallel is not None:
        apply_parallel(model, parallel)
    return model
