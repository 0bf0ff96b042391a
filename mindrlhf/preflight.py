"""Checks that need the host, made before a stage process starts: what the config alone can tell
is refused when the config loads (``config.py``); what depends on this machine -- its cores and
its memory -- is refused here, with the numbers, instead of as an allocator error or an OOM kill
after minutes of work.

The memory figure is a lower bound (weights, gradients, AdamW moments, the logits of one batch
and a few activations per layer, fp32): a stage refused here could not have run; a stage that
passes may still need more (compiled graphs, the allocator's pools), which the launcher reports
as peak RSS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .config import Config, ConfigError, ModelConfig

F32 = 4
# per stage: (models trained with AdamW, frozen models held for inference)
STAGE_MODELS = {
    "sft": (1, 0),
    "rm": (1, 0),
    "ppo": (2, 2),
    "grpo": (1, 1),
    "dpo": (1, 0),
    "reflogp": (0, 1),
    "online_dpo": (1, 2),
    "import_weights": (0, 2),
    "prepare": (0, 0),
}


def param_count(m: ModelConfig) -> int:
    """Parameters of ``CausalLM(m)`` (models/decoder.py), counted from the config."""
    d, f, hd = m.d_model, m.ffn_dim, m.head_dim
    q, kv = m.n_heads * hd, m.kv_heads * hd
    attn = (
        d * q
        + 2 * d * kv
        + q * d
        + (q + 2 * kv if m.use_qkv_bias else 0)
        + (2 * hd if m.qk_norm else 0)
    )
    if m.gpt_style:
        per_layer = attn + d + 2 * d * f + f + d + 4 * d  # o bias, MLP with biases, two LayerNorms
        # positions, final LayerNorm; Pangu-alpha's top query embedding (n_layers counts its layer)
        extra = m.max_seq_len * d * (2 if m.family == "pangualpha" else 1) + 2 * d
    else:
        per_layer = attn + 3 * d * f + 2 * d
        extra = d
    head = 0 if m.tie_embeddings else m.vocab_size * d
    return m.vocab_size * d + m.n_layers * per_layer + extra + head


def lora_param_count(m: ModelConfig) -> int:
    """Adapter parameters of ``m.lora`` (A and B of every target projection of every layer)."""
    d, f, q, kv = m.d_model, m.ffn_dim, m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    dims = {"q": d + q, "k": d + kv, "v": d + kv, "o": q + d, "gate": d + f, "up": d + f}
    dims["down"] = f + d
    return m.n_layers * m.lora.rank * sum(dims[t] for t in m.lora.targets) if m.lora else 0


@dataclass
class MemoryEstimate:
    weights: int
    activations: int
    workers: int

    @property
    def total(self) -> int:
        return (self.weights + self.activations) * self.workers

    def describe(self) -> str:
        gb = 2**30
        return (
            f"{self.total / gb:.1f} GB = {self.workers} worker(s) x ({self.weights / gb:.1f} GB "
            "of weights, "
            f"gradients and optimizer moments + {self.activations / gb:.1f} GB of activations for "
            "one batch)"
        )


def stage_batch(cfg: Config, stage: str) -> tuple[int, int]:
    """(sequences per step in one process, tokens per sequence) of a stage's largest forward."""
    w = (
        cfg.parallel.worker_num
        if cfg.parallel.mode == "data_parallel"
        else cfg.parallel.data_parallel
    )
    prompt = cfg.data.max_prompt_len
    if stage == "sft":
        return cfg.sft.batch_size // w, cfg.data.max_len
    if stage in ("rm", "dpo", "reflogp"):
        b = {"rm": cfg.rm.batch_size, "dpo": cfg.dpo.batch_size, "reflogp": 32}[stage]
        return 2 * max(1, b // w), cfg.data.max_len
    if stage == "ppo":
        return max(cfg.ppo.rollout_batch // w, 32), prompt + cfg.generation.max_new_tokens
    if stage == "grpo":
        return max(
            cfg.grpo.prompts_per_iter * cfg.grpo.group_size // w, 32
        ), prompt + cfg.grpo.max_new_tokens
    if stage == "online_dpo":
        return max(2 * cfg.online_dpo.prompts_per_round, 32), prompt + cfg.generation.max_new_tokens
    return 1, min(cfg.model.max_seq_len, 8)


def estimate_memory(cfg: Config, stage: str) -> MemoryEstimate:
    m = cfg.model
    trained, frozen = STAGE_MODELS.get(stage, (1, 0))
    params = param_count(m)
    if m.lora and stage in ("sft", "rm", "ppo", "grpo", "dpo", "online_dpo"):
        # adapters: weights, gradients and moments of the adapters only; PPO's and GRPO's
        # reference is the policy's own base weights
        shared_ref = 1 if stage in ("ppo", "grpo") else 0
        adapters = lora_param_count(m)
        weights = F32 * (params * (trained + frozen - shared_ref) + 4 * trained * adapters)
    else:  # trained: weights, gradients, two AdamW moments
        weights = params * F32 * (4 * trained + frozen)
    b, t = stage_batch(cfg, stage)
    tokens = b * t
    # the vocabulary projection and its softmax (and, when training, their gradient), plus a few
    # d-wide and FFN-wide activations per layer kept for the backward pass
    per_token = (2 if trained else 1) * m.vocab_size + m.n_layers * (4 * m.d_model + m.ffn_dim)
    acts = tokens * per_token * F32 if stage != "prepare" else 0
    return MemoryEstimate(weights, acts, cfg.parallel.local_worker_num)


def host_memory_bytes(cfg: Config) -> int:
    import psutil

    return (
        int(cfg.resources.memory_gb * 2**30)
        if cfg.resources.memory_gb
        else psutil.virtual_memory().total
    )


def preflight(cfg: Config, stage: str, source: str = "<config>") -> None:
    """Refuse, before anything runs, a stage this host cannot run."""
    if cfg.device_target == "CPU":
        cores = os.cpu_count() or 1
        if cfg.parallel.local_worker_num > cores:
            raise ConfigError(
                f"{source}: parallel.local_worker_num ({cfg.parallel.local_worker_num}) is more "
                "than "
                f"this host's {cores} CPU cores; on device_target CPU every worker is a process "
                "with its own copy of every model"
            )
    est = estimate_memory(cfg, stage)
    have = host_memory_bytes(cfg)
    if est.total > have:
        raise ConfigError(
            f"{source}: stage {stage} needs at least {est.describe()}, but "
            f"{'resources.memory_gb allows' if cfg.resources.memory_gb else 'this host has'} "
            f"{have / 2**30:.1f} GB; lower the batch size, the sequence lengths or the model size"
        )
