"""The policy / reference model of ``model.backend``: our decoder (``native``) or MindFormers'
LLaMA behind the same interface (``mindformers``, models/mindformers_backend.py). Critic and
reward model (decoder.ScalarHeadModel) are ours with either backend."""

from __future__ import annotations

from ..config import ModelConfig
from .decoder import CausalLM


def build_policy(cfg: ModelConfig, seed: int = 0):
    """A causal LM of ``cfg``; a seeded init is the same weights with either backend."""
    if cfg.backend == "mindformers":
        from .mindformers_backend import MindFormersCausalLM

        return MindFormersCausalLM(cfg, seed)
    return CausalLM(cfg, seed)
