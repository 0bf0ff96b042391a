"""Import a LLaMA-architecture GGUF file (weights, tokenizer, chat template) into our model.

GGUF stores q/k projections permuted for llama.cpp's interleaved RoPE; our model uses the
Hugging Face "rotate half" layout, so those rows are permuted back. Quantised tensors (Q4_1,
Q8_0, ...) are dequantised to float32 with the ``gguf`` package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig


@dataclass
class GGUFModel:
    config: ModelConfig
    tensors: dict[str, np.ndarray]  # our parameter names -> float32 arrays
    tokenizer: object  # tokenizers.Tokenizer
    eos_id: int
    bos_id: int
    chat_template: str | None
    metadata: dict


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permutation: (heads, 2, hd/2, d) <- (heads, hd/2, 2, d)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation from the Hugging Face layout (for tests and export to GGUF)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "attn.q_proj.bias",
    "attn_k.bias": "attn.k_proj.bias",
    "attn_v.bias": "attn.v_proj.bias",
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
}


def build_tokenizer(tokens: list[str], merges: list[str], token_types: list[int], pre: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (
        "smollm",
        "qwen2",
        "llama-bpe",
    ):  # these split digits one by one before byte-level BPE
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, token_types)
        if ty == 3
    ]
    tok.add_special_tokens(special)
    return tok


ARCHS = ("llama", "qwen2", "qwen3")


def _config(r, path: str) -> ModelConfig:
    arch = _field(r, "general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"{path}: architecture {arch!r} is not supported ({', '.join(ARCHS)})")
    n_heads = int(_field(r, f"{arch}.attention.head_count"))
    n_kv = int(_field(r, f"{arch}.attention.head_count_kv", n_heads))
    d = int(_field(r, f"{arch}.embedding_length"))
    head_dim = int(_field(r, f"{arch}.attention.key_length", d // n_heads))
    names = {t.name for t in r.tensors}
    cfg = ModelConfig(
        family="llama",
        vocab_size=len(_field(r, "tokenizer.ggml.tokens")),
        d_model=d,
        n_layers=int(_field(r, f"{arch}.block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_ff=int(_field(r, f"{arch}.feed_forward_length")),
        max_seq_len=min(int(_field(r, f"{arch}.context_length", 2048)), 2048),
        qkv_bias="blk.0.attn_q.bias" in names,
        tie_embeddings="output.weight" not in names,
        norm_eps=float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
        attn_head_dim=head_dim if head_dim * n_heads != d else None,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        arch=arch,
    )
    cfg.validate()
    return cfg


def gguf_config(path: str) -> ModelConfig:
    """The model config of a GGUF file, from its metadata (the tensors are not read)."""
    from gguf import GGUFReader

    try:
        return _config(GGUFReader(path), path)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, ValueError) and str(e).startswith(path):
            raise
        raise ValueError(f"{path}: not a readable GGUF model ({e})") from None


def load_gguf(path: str) -> GGUFModel:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(path)
    cfg = _config(r, path)
    arch, n_heads, n_kv = cfg.arch, cfg.n_heads, cfg.kv_heads
    tokens = list(_field(r, "tokenizer.ggml.tokens"))
    tensors: dict[str, np.ndarray] = {}
    for t in r.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name == "token_embd.weight":
            tensors["model.embed_tokens"] = w
        elif t.name == "output_norm.weight":
            tensors["model.norm.weight"] = w
        elif t.name == "output.weight":
            tensors["lm_head.weight"] = w
        elif t.name.startswith("blk."):
            _, i, rest = t.name.split(".", 2)
            if rest not in NAMES:
                raise ValueError(f"{path}: unexpected tensor {t.name}")
            if arch == "llama" and rest in ("attn_q.weight", "attn_k.weight"):
                w = unpermute_rope(w, n_heads if rest == "attn_q.weight" else n_kv)
            tensors[f"model.layers.{i}.{NAMES[rest]}"] = w
        else:
            raise ValueError(f"{path}: unexpected tensor {t.name}")
    tok = build_tokenizer(
        tokens,
        list(_field(r, "tokenizer.ggml.merges")),
        list(_field(r, "tokenizer.ggml.token_type")),
        str(_field(r, "tokenizer.ggml.pre", "")),
    )
    meta = {k: _field(r, k) for k in ("general.name", "general.license", "general.architecture")}
    return GGUFModel(
        cfg,
        tensors,
        tok,
        int(_field(r, "tokenizer.ggml.eos_token_id")),
        int(_field(r, "tokenizer.ggml.bos_token_id", 0)),
        _field(r, "tokenizer.chat_template"),
        meta,
    )


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The model's own chat template (Jinja), as Hugging Face applies it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


def numpy_forward(cfg: ModelConfig, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Reference forward pass of the llama family (LLaMA, Mistral, Qwen2's q/k/v biases, Qwen3's q/k
    norms and own head size) in float64 NumPy, no cache, one sequence: logits (T, V)."""
    t, hd = len(ids), cfg.head_dim
    x = w["model.embed_tokens"][ids].astype(np.float64)
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.norm_eps) * g

    def rope(v):
        half = hd // 2
        return v * cos + np.concatenate([-v[..., half:], v[..., :half]], -1) * sin

    mask = np.triu(np.full((t, t), -np.inf), 1)
    rep = cfg.n_heads // cfg.kv_heads

    def proj(h, p, n, heads):
        y = h @ w[p + f"attn.{n}_proj.weight"].T + w.get(p + f"attn.{n}_proj.bias", 0.0)
        y = y.reshape(t, heads, hd)
        if n in "qk" and cfg.qk_norm:
            y = rms(y, w[p + f"attn.{n}_norm.weight"])
        return y.transpose(1, 0, 2)

    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q, k, v = (
            proj(h, p, "q", cfg.n_heads),
            proj(h, p, "k", cfg.kv_heads),
            proj(h, p, "v", cfg.kv_heads),
        )
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + a.transpose(1, 0, 2).reshape(t, -1) @ w[p + "attn.o_proj.weight"].T
        h = rms(x, w[p + "mlp_norm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = (
            x
            + ((g / (1 + np.exp(-g))) * (h @ w[p + "mlp.up_proj.weight"].T))
            @ w[p + "mlp.down_proj.weight"].T
        )
    x = rms(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens"])
    return x @ head.T
