"""The policy / reference model of ``model.backend``: our decoder (``native``) or MindFormers'
LLaMA behind the same interface (``mindformers``, models/mindformers_backend.py). Critic and
reward model (decoder.ScalarHeadModel) are ours with either backend."""

from __future__ import annotations

from ..config import ModelConfig, ParallelConfig
from ..parallel import apply_parallel
from .decoder import CausalLM


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
