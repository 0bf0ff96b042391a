"""Hugging Face safetensors checkpoints <-> our parameter names.

Layouts: GPT-2 (Conv1D weights stored (in, out), fused c_attn), LLaMA, Qwen2 (q/k/v bias) and
Baichuan2 (fused ``W_pack`` = [q; k; v], NormHead lm_head normalised per row at inference).
Export writes ``model.safetensors`` + ``config.json`` that ``transformers`` loads (GPT2LMHeadModel,
LlamaForCausalLM, Qwen2ForCausalLM).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..data.store import atomic_write_bytes

GPT2_BLOCK = {"attn_norm": "ln_1", "mlp_norm": "ln_2"}
LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


HF_ARCH = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def layout_of(cfg: ModelConfig) -> str:
    """The Hugging Face architecture an export writes: the source's own when the config records
    one (a Qwen2 in is a Qwen2 out), else the one the model's features need."""
    if cfg.family == "gpt2":
        return "gpt2"
    fits = {
        "qwen3": cfg.qk_norm,
        "qwen2": cfg.use_qkv_bias and not cfg.qk_norm,
        "llama": not cfg.qk_norm,
        "mistral": not cfg.qk_norm and not cfg.use_qkv_bias,
    }
    if fits.get(cfg.arch):
        return cfg.arch
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if cfg.use_qkv_bias else "llama"


# ---- export --------------------------------------------------------------------------------------


def check_export(cfg: ModelConfig, w: dict[str, np.ndarray], source: str) -> None:
    """Tensors that are exactly the parameters of ``CausalLM(cfg)``: every name, shape, a float
    dtype and finite values; anything else is refused naming the tensor (an export that drops a
    layer or mislabels a width loads in transformers and computes something else)."""
    from .decoder import CausalLM

    if cfg.family == "pangualpha":
        raise ValueError(
            f"{source}: a pangualpha model has no Hugging Face transformers architecture to "
            "export to; its checkpoint artifact is the model"
        )
    want = {n: tuple(p.shape) for n, p in CausalLM(cfg, seed=0).parameters_and_names()}
    missing = sorted(set(want) - set(w))
    extra = sorted(set(w) - set(want))
    if missing or extra:
        raise ValueError(
            f"{source}: tensors do not match the model config ({cfg.family}, {cfg.n_layers} "
            "layers, "
            f"d_model {cfg.d_model}): missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for n, shape in want.items():
        t = w[n]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{source}: {n} has shape {tuple(t.shape)}, the model config gives {shape}"
            )
        if not np.issubdtype(t.dtype, np.floating):
            raise ValueError(
                f"{source}: {n} has dtype {t.dtype}; export writes floating-point weights"
            )
        if not np.isfinite(t).all():
            raise ValueError(
                f"{source}: {n} has {int((~np.isfinite(t)).sum())} non-finite values (NaN/inf)"
            )


def to_hf(cfg: ModelConfig, w: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """Our tensors -> (HF tensors, HF config dict)."""
    out: dict[str, np.ndarray] = {}
    layout = layout_of(cfg)
    if layout == "gpt2":
        out["transformer.wte.weight"] = w["model.embed_tokens"]
        out["transformer.wpe.weight"] = w["model.embed_positions"]
        for i in range(cfg.n_layers):
            p, h = f"model.layers.{i}.", f"transformer.h.{i}."
            for ours, theirs in GPT2_BLOCK.items():
                out[h + theirs + ".weight"] = w[p + ours + ".weight"]
                out[h + theirs + ".bias"] = w[p + ours + ".bias"]
            qkv = [w[p + f"attn.{n}_proj.weight"] for n in "qkv"]
            out[h + "attn.c_attn.weight"] = np.concatenate(qkv, 0).T
            out[h + "attn.c_attn.bias"] = np.concatenate(
                [w[p + f"attn.{n}_proj.bias"] for n in "qkv"]
            )
            out[h + "attn.c_proj.weight"] = w[p + "attn.o_proj.weight"].T
            out[h + "attn.c_proj.bias"] = w[p + "attn.o_proj.bias"]
            out[h + "mlp.c_fc.weight"] = w[p + "mlp.up_proj.weight"].T
            out[h + "mlp.c_fc.bias"] = w[p + "mlp.up_proj.bias"]
            out[h + "mlp.c_proj.weight"] = w[p + "mlp.down_proj.weight"].T
            out[h + "mlp.c_proj.bias"] = w[p + "mlp.down_proj.bias"]
        out["transformer.ln_f.weight"] = w["model.norm.weight"]
        out["transformer.ln_f.bias"] = w["model.norm.bias"]
        config = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.ffn_dim,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": True,
        }
        return out, config
    out["model.embed_tokens.weight"] = w["model.embed_tokens"]
    for i in range(cfg.n_layers):
        p, h = f"model.layers.{i}.", f"model.layers.{i}."
        for ours, theirs in LLAMA_BLOCK.items():
            out[h + theirs] = w[p + ours]
        for n in "qkv":
            out[h + f"self_attn.{n}_proj.weight"] = w[p + f"attn.{n}_proj.weight"]
            if cfg.use_qkv_bias:
                out[h + f"self_attn.{n}_proj.bias"] = w[p + f"attn.{n}_proj.bias"]
        if cfg.qk_norm:
            for n in "qk":
                out[h + f"self_attn.{n}_norm.weight"] = w[p + f"attn.{n}_norm.weight"]
    out["model.norm.weight"] = w["model.norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    config = {
        "architectures": [HF_ARCH[layout]],
        "model_type": layout,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
    }
    if layout in ("llama", "qwen3"):
        config.update({"attention_bias": cfg.use_qkv_bias, "head_dim": cfg.head_dim})
    if layout == "llama":
        config["mlp_bias"] = False
    if layout == "mistral":
        config.update({"head_dim": cfg.head_dim, "sliding_window": None})
    return out, config


def export_hf(
    cfg: ModelConfig, w: dict[str, np.ndarray], out_dir: str | Path, source: str = "export"
) -> Path:
    from safetensors.numpy import save

    check_export(cfg, w, source)
    out_dir = Path(out_dir)
    tensors, config = to_hf(cfg, w)
    atomic_write_bytes(
        out_dir / "model.safetensors",
        save(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
            metadata={"format": "pt"},
        ),
    )
    atomic_write_bytes(out_dir / "config.json", json.dumps(config, indent=1).encode())
    return out_dir


# ---- import --------------------------------------------------------------------------------------

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "baichuan")


def rope_theta_of(config: dict, source: str) -> float:
    """The RoPE base of a config.json: top-level ``rope_theta`` (transformers 4) or
    ``rope_parameters.rope_theta`` (transformers 5 writes only that). Scaled RoPE (llama3, yarn,
    linear, dynamic ...) is refused: our decoder's rotary is the plain one, and importing such a
    model as if it were would silently give it different positions."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for field, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", None):
            raise ValueError(
                f"{source}: {field}.rope_type {kind!r} (scaled RoPE) is not supported; "
                "only the plain rotary embedding ('default')"
            )
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def config_from_hf(config: dict, source: str = "config.json") -> ModelConfig:
    """Our model config from a Hugging Face config.json (its architecture recorded as ``arch``)."""
    mt = config.get("model_type")
    try:
        if mt == "gpt2":
            return ModelConfig(
                family="gpt2",
                vocab_size=config["vocab_size"],
                d_model=config["n_embd"],
                n_layers=config["n_layer"],
                n_heads=config["n_head"],
                d_ff=config.get("n_inner") or 4 * config["n_embd"],
                max_seq_len=config["n_positions"],
                norm_eps=config.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=True,
                arch="gpt2",
            )
        if mt in SUPPORTED:
            heads = config["num_attention_heads"]
            head_dim = config.get("head_dim") or config["hidden_size"] // heads
            window = config.get("sliding_window") if mt == "mistral" else None
            longest = min(config.get("max_position_embeddings", 2048), window or 1 << 30, 4096)
            bias = {"qwen2": True, "qwen3": config.get("attention_bias", False)}.get(
                mt, config.get("attention_bias", False)
            )
            return ModelConfig(
                family="llama",
                vocab_size=config["vocab_size"],
                d_model=config["hidden_size"],
                n_layers=config["num_hidden_layers"],
                n_heads=heads,
                n_kv_heads=config.get("num_key_value_heads") or heads,
                d_ff=config["intermediate_size"],
                max_seq_len=longest,
                norm_eps=config.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta_of(config, source),
                qkv_bias=bias,
                tie_embeddings=config.get("tie_word_embeddings", mt != "baichuan"),
                attn_head_dim=head_dim if head_dim * heads != config["hidden_size"] else None,
                qk_norm=mt == "qwen3",
                arch=mt,
            )
    except KeyError as e:
        raise ValueError(f"{source}: model_type {mt!r} needs the key {e.args[0]!r}") from None
    raise ValueError(f"{source}: unsupported model_type {mt!r} (supported: {', '.join(SUPPORTED)})")


def from_hf(cfg: ModelConfig, t: dict[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
    """HF tensors -> ours. Baichuan2's W_pack is split into q/k/v; its NormHead is normalised."""
    w: dict[str, np.ndarray] = {}
    if model_type == "gpt2":
        t = {
            k[len("transformer.") :] if k.startswith("transformer.") else k: v for k, v in t.items()
        }
        w["model.embed_tokens"], w["model.embed_positions"] = t["wte.weight"], t["wpe.weight"]
        d = cfg.d_model
        for i in range(cfg.n_layers):
            p, h = f"model.layers.{i}.", f"h.{i}."
            for ours, theirs in GPT2_BLOCK.items():
                w[p + ours + ".weight"], w[p + ours + ".bias"] = (
                    t[h + theirs + ".weight"],
                    t[h + theirs + ".bias"],
                )
            qkv_w, qkv_b = t[h + "attn.c_attn.weight"].T, t[h + "attn.c_attn.bias"]
            for j, n in enumerate("qkv"):
                w[p + f"attn.{n}_proj.weight"] = qkv_w[j * d : (j + 1) * d]
                w[p + f"attn.{n}_proj.bias"] = qkv_b[j * d : (j + 1) * d]
            w[p + "attn.o_proj.weight"], w[p + "attn.o_proj.bias"] = (
                t[h + "attn.c_proj.weight"].T,
                t[h + "attn.c_proj.bias"],
            )
            w[p + "mlp.up_proj.weight"], w[p + "mlp.up_proj.bias"] = (
                t[h + "mlp.c_fc.weight"].T,
                t[h + "mlp.c_fc.bias"],
            )
            w[p + "mlp.down_proj.weight"] = t[h + "mlp.c_proj.weight"].T
            w[p + "mlp.down_proj.bias"] = t[h + "mlp.c_proj.bias"]
        w["model.norm.weight"], w["model.norm.bias"] = t["ln_f.weight"], t["ln_f.bias"]
        return w
    w["model.embed_tokens"] = t["model.embed_tokens.weight"]
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        for ours, theirs in LLAMA_BLOCK.items():
            w[p + ours] = t[p + theirs]
        if model_type == "baichuan":
            pack = t[p + "self_attn.W_pack.weight"]
            w[p + "attn.q_proj.weight"] = pack[:q_rows]
            w[p + "attn.k_proj.weight"] = pack[q_rows : q_rows + kv_rows]
            w[p + "attn.v_proj.weight"] = pack[q_rows + kv_rows :]
        else:
            for n in "qkv":
                w[p + f"attn.{n}_proj.weight"] = t[p + f"self_attn.{n}_proj.weight"]
                if cfg.use_qkv_bias:
                    w[p + f"attn.{n}_proj.bias"] = t[p + f"self_attn.{n}_proj.bias"]
        if cfg.qk_norm:
            for n in "qk":
                w[p + f"attn.{n}_norm.weight"] = t[p + f"self_attn.{n}_norm.weight"]
    w["model.norm.weight"] = t["model.norm.weight"]
    if not cfg.tie_embeddings:
        head = t["lm_head.weight"]
        if model_type == "baichuan":  # NormHead: rows are L2-normalised before use
            head = head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)
        w["lm_head.weight"] = head
    return w


def import_hf(model_dir: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """A Hugging Face model directory -> (our config, our tensors): config.json and the safetensors
    weights (one file or shards with their index; F32, F16 or BF16). A missing tensor names the
    tensor and the directory."""
    from .safetensors_io import CheckpointError, read_checkpoint_dir

    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{model_dir}: no config.json (a Hugging Face model directory has one)"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: not valid JSON ({e})") from None
    cfg = config_from_hf(config, str(model_dir / "config.json"))
    tensors = read_checkpoint_dir(model_dir)
    try:
        return cfg, from_hf(cfg, tensors, config["model_type"])
    except KeyError as e:
        raise CheckpointError(
            f"{model_dir}: tensor {e.args[0]} is missing for a {config['model_type']} "
            f"model of {cfg.n_layers} layers"
        ) from None
