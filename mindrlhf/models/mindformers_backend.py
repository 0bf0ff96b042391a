"""MindFormers' LLaMA as a model backend (``model.backend: mindformers``): the policy and
reference (:class:`MindFormersCausalLM`), the critic and reward model
(:class:`MindFormersScalarHeadModel`).

:class:`MindFormersCausalLM` wraps MindFormers 1.9's ``LlamaForCausalLM`` behind what the stages
use of :class:`decoder.CausalLM`: ``model(input_ids, attention_mask) -> (logits, presents)``,
``response_logits``, ``logits_from_hidden``, ``cfg`` and ``trainable_params``; the Trainer, the
losses and the stages run it unchanged. ``decoder.state_dict`` / ``load_state_dict`` read and
write it in our parameter names, so a checkpoint is the same kind of artifact whichever backend
trained it (and ``mindrlhf export`` works from either).

What computes what. MindFormers' cells run the token embedding, every ``LLamaDecodeLayer`` (its
RMSNorms, q/k/v projections with optional bias (Qwen2), ``RotaryEmbedding``, the repeat of
grouped kv heads, softmax attention, output projection, SwiGLU FFN), the final norm and the LM
head. The wrapper makes the two inputs ``LlamaModel.construct`` would otherwise make itself:

* The attention mask: our decoder's additive causal + padding bias, from the batch's attention
  mask (flash attention on Ascend takes the same mask as uint8, 1 = hidden). LlamaModel's own
  mask reads padding as "token == pad_token_id" (wrong where pad is also eos, or a real token)
  and, without dynamic shapes, wants every batch exactly seq_length long.
* RoPE tables per row at our positions (cumulative sum of the mask - 1), gathered from
  MindFormers' own ``FreqsMgr`` tables, shape (B, 1, T, head_dim), which ``RotaryEmbedding``
  takes as batch-wise tables. LlamaModel gives every row 0..T-1; since rotary attention depends
  only on position differences that is the same up to float rounding for a left-padded row
  (a mutant doing so survived the logits test), but ours keeps the numbers those of our decoder.

Weights. MindFormers' LLaMA keeps the Hugging Face layout: linears (out, in); RoPE rotating
halves (``FreqsMgr`` builds concat(freqs, freqs) tables and ``RotaryEmbedding`` pairs x[i] with
x[i + hd/2]: ``slice_half`` = concat(-x2, x1), or the same as a ``swap_mask`` matmul), so q/k rows
need no permutation; query head h reads kv head h // (n_heads / n_kv_heads) (MindFormers'
``_repeat_kv`` tiles each kv head rep times in a row), as ours. The mapping (:func:`name_map`) is
therefore a rename, and the native decoder the wrapper keeps (``shared_decoder``) holds the very
same Parameter objects: generation (our KV-cache decoder, compiled or eager) reads the weights
MindFormers trains, with nothing copied at any time, and graphs compiled before an update see it.

CPU: MindSpore 2.9 has no CPU RmsNorm kernel and MindFormers' ``generate(use_past=True)`` has no
CPU kernels (``generation.engine: mindformers``, models/mindformers_generation.py, runs it on
Ascend), so on CPU (and GPU) the model is built with ``fused_rms_norm=False``,
``use_flash_attention=False``, ``use_rope_slice=True`` and float32 everywhere; on Ascend with the
fused RmsNorm, flash attention (bfloat16 compute, float32 weights, norms, softmax and RoPE).

Parallelism. With ``parallel.mode: semi_auto`` (Ascend, graph mode) MindFormers shards its own
cells: :func:`op_parallel_config` turns our ``parallel`` section into its
``TransformerOpParallelConfig`` (data / model parallel, pipeline stages, micro batches,
optimizer shard, recompute), which ``LlamaForCausalLM`` turns into shard strategies on its
matmuls (column-parallel wq/wk/wv/w1/w3, row-parallel wo/w2), pipeline stages of its layers and
recompute, so :func:`mindrlhf.parallel.apply_parallel` leaves this model alone. The section is
validated first, as for the native decoder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import ModelConfig, ParallelConfig
from .decoder import NEG_INF, CausalLM, ScalarHeadModel

# ---- weight mapping (plain NumPy: no MindFormers needed) ------------------------------------

_ATTN = {"q": "wq", "k": "wk", "v": "wv", "o": "wo"}
_MLP = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> MindFormers' LlamaForCausalLM parameter name. Same shapes and
    layout on both sides (see the module docstring): a tensor moves across unchanged."""
    m = {
        "model.embed_tokens": "model.tok_embeddings.embedding_weight",
        "model.norm.weight": "model.norm_out.weight",
    }
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        m[p + "attn_norm.weight"] = p + "attention_norm.weight"
        m[p + "mlp_norm.weight"] = p + "ffn_norm.weight"
        for ours, theirs in _ATTN.items():
            m[p + f"attn.{ours}_proj.weight"] = p + f"attention.{theirs}.weight"
            if cfg.use_qkv_bias and ours != "o":
                m[p + f"attn.{ours}_proj.bias"] = p + f"attention.{theirs}.bias"
        for ours, theirs in _MLP.items():
            m[p + f"mlp.{ours}.weight"] = p + f"feed_forward.{theirs}.weight"
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    return m


def _renamed(w: dict, names: dict, source: str) -> dict[str, np.ndarray]:
    missing = sorted(set(names) - set(w))
    extra = sorted(set(w) - set(names))
    if missing or extra:
        raise KeyError(f"{source}: missing {missing[:4]}, unexpected {extra[:4]}")
    return {names[k]: w[k] for k in names}


def to_mindformers(cfg: ModelConfig, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our tensors -> MindFormers LlamaForCausalLM tensors (its parameter names)."""
    if cfg.family != "llama":
        raise ValueError(f"MindFormers' LLaMA holds family llama, not {cfg.family!r}")
    return _renamed(w, name_map(cfg), "to MindFormers")


def from_mindformers(cfg: ModelConfig, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MindFormers LlamaForCausalLM tensors -> ours (a tied ``lm_head.weight`` is dropped)."""
    names = {theirs: ours for ours, theirs in name_map(cfg).items()}
    if cfg.tie_embeddings:
        t = {k: v for k, v in t.items() if k != "lm_head.weight"}
    return _renamed(t, names, "from MindFormers")


# ---- the model --------------------------------------------------------------------------------


def import_mindformers():
    """``mindformers`` with its log files out of the working directory (by default it writes
    ./output/log on import) and its INFO chatter off the stage log."""
    base = Path(tempfile.gettempdir()) / f"mindrlhf-mindformers-{os.getuid()}"
    os.environ.setdefault("LOCAL_DEFAULT_PATH", str(base))
    os.environ.setdefault("LOG_MF_PATH", str(base / "log"))
    import mindformers
    from mindformers.tools.logger import get_logger

    get_logger().setLevel(logging.WARNING)
    return mindformers


def op_parallel_config(p: ParallelConfig):
    """MindFormers' TransformerOpParallelConfig of our ``parallel`` section (semi_auto): the sizes
    passed through, recompute of every layer or none; the vocabulary embedding split by data
    parallel only (MindFormers' default)."""
    from mindformers.modules.transformer import (
        TransformerOpParallelConfig,
        TransformerRecomputeConfig,
    )

    return TransformerOpParallelConfig(
        data_parallel=p.data_parallel,
        model_parallel=p.model_parallel,
        pipeline_stage=p.pipeline_stages,
        micro_batch_num=p.micro_batches,
        optimizer_shard=p.optimizer_shard,
        recompute=TransformerRecomputeConfig(recompute=p.recompute),
        vocab_emb_dp=True,
    )


def llama_config(cfg: ModelConfig, device_target: str, parallel: ParallelConfig | None = None):
    """MindFormers' LlamaConfig for our model section on ``device_target``; with a semi_auto
    ``parallel`` section, its parallel_config from it (:func:`op_parallel_config`)."""
    cfg.check_mindformers("model.")
    from mindformers import LlamaConfig

    sharding = {}
    if parallel is not None and parallel.mode == "semi_auto":
        sharding["parallel_config"] = op_parallel_config(parallel)

    if device_target == "Ascend":  # fused kernels; flash attention needs 16-bit inputs
        flags = dict(
            compute_dtype="bfloat16",
            fused_rms_norm=True,
            use_flash_attention=True,
            use_rope_slice=False,
        )
    else:  # no CPU RmsNorm kernel, no CPU flash attention
        flags = dict(
            compute_dtype="float32",
            fused_rms_norm=False,
            use_flash_attention=False,
            use_rope_slice=True,
        )
    return LlamaConfig(
        batch_size=1,
        seq_length=cfg.max_seq_len,
        max_position_embedding=cfg.max_seq_len,
        hidden_size=cfg.d_model,
        num_layers=cfg.n_layers,
        num_heads=cfg.n_heads,
        n_kv_heads=cfg.kv_heads,
        intermediate_size=cfg.ffn_dim,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.norm_eps,
        theta=cfg.rope_theta,
        qkv_has_bias=cfg.use_qkv_bias,
        tie_word_embeddings=cfg.tie_embeddings,
        init_method_std=cfg.init_std,
        use_past=False,
        param_init_type="float32",
        layernorm_compute_type="float32",
        softmax_compute_type="float32",
        rotary_dtype="float32",
        **flags,
        **sharding,
    )


def _bind(model: nn.Cell, name: str, param) -> None:
    """Make ``param`` the parameter ``name`` (a dotted path) of ``model``."""
    owner, _, attr = name.rpartition(".")
    cell = dict(model.cells_and_names())[owner] if owner else model
    setattr(cell, attr, param)


class MindFormersCausalLM(nn.Cell):
    """The policy / reference model on MindFormers' LlamaForCausalLM (see the module docstring).
    A seeded init equals ``CausalLM(cfg, seed)``'s, so both backends start from the same weights.
    """

    # parallel.mode semi_auto: MindFormers shards its cells itself (see the module docstring)
    shards_itself = True

    def __init__(
        self,
        cfg: ModelConfig,
        seed: int = 0,
        device_target: str | None = None,
        parallel: ParallelConfig | None = None,
    ):
        super().__init__()
        import_mindformers()
        from mindformers import LlamaForCausalLM

        device = device_target or ms.get_context("device_target")
        self.cfg = cfg
        decoder = CausalLM(cfg, seed)  # our seeded init, then our view of the weights
        mf_cfg = llama_config(cfg, device, parallel)
        self.net = LlamaForCausalLM(mf_cfg)
        theirs = dict(self.net.parameters_and_names())
        names = name_map(cfg)
        if set(names.values()) != set(theirs):
            raise RuntimeError(
                "MindFormers' LlamaForCausalLM parameters do not match the name map: "
                f"{sorted(set(theirs) ^ set(names.values()))[:6]}"
            )
        ours = dict(decoder.parameters_and_names())
        for name, mf_name in names.items():
            ops.assign(theirs[mf_name], ours[name].astype(theirs[mf_name].dtype))
            _bind(decoder, name, theirs[mf_name])
        # a plain attribute, not a sub-cell: its parameters are the net's, listed once
        object.__setattr__(self, "shared_decoder", decoder)
        self.flash = bool(mf_cfg.use_flash_attention)
        self.compute_dtype = mf_cfg.compute_dtype
        n = cfg.max_seq_len
        self.causal = Tensor(np.tril(np.ones((n, n), dtype=np.float32)))

    def _freqs(self, positions):
        """MindFormers' RoPE tables at each token's position: (B, 1, T, head_dim) each."""
        fm = self.net.model.freqs_mgr
        cos = ops.gather(fm.freqs_cos, positions, 0)[:, None]
        sin = ops.gather(fm.freqs_sin, positions, 0)[:, None]
        return cos, sin, fm.swap_mask

    def hidden(self, input_ids, attention_mask):
        """Final-norm hidden states (B, T, d) of a (left- or right-)padded batch."""
        t = input_ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        positions = ops.clamp(ops.cumsum(attention_mask.astype(ms.int32), 1) - 1, min=0)
        allowed = self.causal[:t, :t][None] * attention_mask.astype(ms.float32)[:, None, :]
        if self.flash:  # uint8, 1 = hidden; a pad query sees itself, so no row is all hidden
            eye = ops.eye(t, t, ms.float32)[None]
            mask = (1.0 - ops.maximum(allowed, eye)).astype(ms.uint8)[:, None]
        else:
            mask = ((1.0 - allowed) * NEG_INF)[:, None]
        body = self.net.model
        h = body.tok_embeddings(input_ids).astype(self.compute_dtype)
        freqs = self._freqs(positions)
        for layer in body.layers:
            h = layer(h, freqs, mask)
        return body.norm_out(h)

    def logits_from_hidden(self, h):
        return self.net.lm_head(h).astype(ms.float32)

    def response_logits(self, input_ids, attention_mask, prompt_len: int, share_prompts=False):
        """Logits predicting input_ids[:, P:] (positions P-1 .. T-2), as CausalLM's. MindFormers'
        forward takes no cache here, so ``share_prompts`` is a no-op: every row runs whole."""
        h = self.hidden(input_ids, attention_mask)
        return self.logits_from_hidden(h[:, prompt_len - 1 : -1])

    def construct(
        self, input_ids, attention_mask, past=None, last_only: bool = False, segments=None
    ):
        if segments is not None:
            raise ValueError(
                "packed rows (segments=) are not supported with model.backend: mindformers"
            )
        if past is not None:
            raise ValueError(
                "model.backend: mindformers has no KV cache here; generation runs on "
                "shared_decoder (models/generation.py)"
            )
        h = self.hidden(input_ids, attention_mask)
        if last_only:
            h = h[:, -1:]
        return self.logits_from_hidden(h), None


class MindFormersScalarHeadModel(nn.Cell):
    """The critic / reward model on MindFormers' LLaMA: its decoder stack and final norm (as
    MindRLHF builds its critic and reward model on a MindFormers backbone) under our scalar head,
    ``score``, a value per position. Our names, state dicts and seeded init are
    ``ScalarHeadModel``'s (``shared_decoder`` is one holding the very same Parameters), so an RM
    trained on either backend loads into the other."""

    shards_itself = True

    def __init__(
        self,
        cfg: ModelConfig,
        seed: int = 0,
        device_target: str | None = None,
        parallel: ParallelConfig | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        # the backbone only: tied, so MindFormers holds no vocabulary head of its own to train
        self.lm = MindFormersCausalLM(
            dataclasses.replace(cfg, tie_embeddings=True), seed, device_target, parallel
        )
        native = ScalarHeadModel(cfg, seed)  # the same seeded backbone, then its score head
        native.model = self.lm.shared_decoder.model  # MindFormers' Parameters, our names
        self.score = native.score
        object.__setattr__(self, "shared_decoder", native)

    def construct(self, input_ids, attention_mask):
        return self.score(self.lm.hidden(input_ids, attention_mask))[..., 0]
