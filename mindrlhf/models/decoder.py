"""Decoder-only transformers in plain MindSpore.

Three families chosen by ``ModelConfig.family``:

* ``gpt2``: learned positions, LayerNorm, GELU (tanh) MLP, biases everywhere.
* ``llama``: RoPE (Hugging Face "rotate half" layout), RMSNorm, SwiGLU MLP, grouped-query
  attention, optional q/k/v bias (Qwen2). Baichuan2's fused W_pack is split on import.
* ``pangualpha``: GPT-style blocks (fast GELU) whose final norm is followed by Pangu-alpha's top
  query layer, a block whose query comes from its own position embedding (models/pangualpha.py).

Weights use the Hugging Face (out_features, in_features) layout so import/export is a rename.
Every forward takes an attention mask, so left-padded batches work, and an optional KV cache
(a list of per-layer (k, v) tensors) for incremental decoding.
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.primitive import constexpr

from ..config import ModelConfig, OptimConfig
from . import fused

NEG_INF = -1e9

# Set per stage process from its section's ``layer_graphs`` and ``layer_graph_span``
# (stages/common.start_stage): every Transformer built afterwards runs its layers as shared
# graphs, at most LAYER_SPAN consecutive layers a graph call, when called eagerly.
LAYER_GRAPHS = False
LAYER_SPAN = OptimConfig.layer_graph_span
# and LAYER_PAD from ``layer_graph_pad``: a block's length is padded to a multiple of it
LAYER_PAD = OptimConfig.layer_graph_pad
# the layer-graph functions, one pair per block architecture (class and model config): models of
# one architecture (a policy and its reference) share them, so a shape compiles once and the
# memory its graph holds is held once (see Transformer.use_layer_graphs)
_LAYER_GRAPH_FNS: dict[tuple[str, str], tuple] = {}
# the widths (padded lengths) each layer-graph shape has run at, per architecture, rows and
# cached length: width -> calls (see _graph_width; release_layer_graphs clears it)
_WIDTHS: dict[tuple, dict[int, int]] = {}
# a block takes an already compiled width up to this fraction (and at least one LAYER_PAD step)
# wider than its own padded length instead of compiling its own
LAYER_REUSE = 0.125


def _graph_width(key: tuple, t: int, room: int) -> int:
    """The length a block of ``t`` tokens runs the layer graphs at: its own padded length (a
    multiple of LAYER_PAD), or the narrowest width already run for this architecture, row count
    and cache that is at most LAYER_REUSE (at least one LAYER_PAD step) wider -- a compile costs
    seconds and each shape's graphs keep their buffers (DPO at SmolLM2's shape: 2.4 s and
    ~0.4 GB for 112 tokens after 120), more than a few more padded positions. ``room``: the
    positions max_seq_len leaves (more padding than that, none at all). LAYER_PAD 1 pads
    nothing and reuses nothing."""
    own = -(-t // LAYER_PAD) * LAYER_PAD
    if own - t > room:
        return t
    seen = _WIDTHS.setdefault(key, {})
    if LAYER_PAD > 1:
        limit = min(own + max(LAYER_PAD, int(own * LAYER_REUSE)), t + room)
        own = min((w for w in seen if own <= w <= limit), default=own)
    seen[own] = seen.get(own, 0) + 1
    return own


def layer_graph_widths() -> dict[tuple, dict[int, int]]:
    """What the layer graphs have run since their last release: (block class, model config,
    rows, cached length) -> {width: calls}."""
    return {k: dict(v) for k, v in _WIDTHS.items()}


def _noop() -> int:
    return 0


@constexpr(check=False)
def _unresolved(fn) -> bool:
    return fn is None


def in_graph() -> bool:
    """True where the code is parsed into a MindSpore graph, False when it runs eagerly: a graph
    hands a compile-time function a Python function as None (MindSpore tests itself the same way,
    ``mindspore.common.api._run_in_jit``, whose import inside its body a graph cannot parse)."""
    return _unresolved(_noop)


def _init(rng: np.random.Generator, shape, std: float) -> Parameter:
    return Parameter(Tensor(rng.normal(0.0, std, shape).astype(np.float32)))


def _const(shape, value: float) -> Parameter:
    return Parameter(Tensor(np.full(shape, value, dtype=np.float32)))


class Linear(nn.Cell):
    def __init__(self, d_in: int, d_out: int, bias: bool, rng: np.random.Generator, std: float):
        super().__init__()
        self.weight = _init(rng, (d_out, d_in), std)
        self.bias = _const((d_out,), 0.0) if bias else None
        self.n_w = 2 if bias else 1
        self.mm = ops.MatMul(transpose_b=True)

    def weights(self) -> tuple:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def construct(self, x, w=None):
        """``w``: this cell's :meth:`weights` passed in (a layer graph, see Transformer) instead of
        read from ``self``."""
        weight, bias = self.weight, self.bias
        if w is not None:
            weight = w[0]
            bias = w[1] if len(w) > 1 else None
        lead = x.shape[:-1]
        y = self.mm(x.reshape(-1, x.shape[-1]), weight)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, -1)


def _offsets(*cells) -> tuple:
    """Where each cell's weights start in the concatenation of their ``weights()`` tuples, and
    (last) where they end: Python ints, so slicing by them costs a layer graph nothing."""
    at = [0]
    for c in cells:
        at.append(at[-1] + c.n_w)
    return tuple(at)


class LayerNorm(nn.Cell):
    n_w = 2

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = _const((d,), 1.0)
        self.bias = _const((d,), 0.0)
        # the fused primitive is ~8x faster on CPU than composing mean/var/rsqrt
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def weights(self) -> tuple:
        return (self.weight, self.bias)

    def construct(self, x, w=None):
        if w is None:
            return self.norm(x, self.weight, self.bias)[0]
        return self.norm(x, w[0], w[1])[0]


class RMSNorm(nn.Cell):
    """On the CPU in float32, one fused kernel each way (models/fused.py); else composed."""

    n_w = 1

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = _const((d,), 1.0)
        self.eps = eps
        self.fused = fused.forward_op()
        self.eps_t = Tensor(np.array([eps], np.float32))

    def weights(self) -> tuple:
        return (self.weight,)

    def construct(self, x, w=None):
        weight = self.weight if w is None else w[0]
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x, weight, self.eps_t)[0]
        return fused.composed(x, weight, self.eps)


def half_swap(hd: int) -> Tensor:
    """(hd, hd) permutation P with x @ P = cat(x[half:], x[:half]): RoPE's rotate-half is
    ``(x @ P) * sign``, and the sign is folded into the sine table (Transformer._embed), so a
    rotation costs one matmul instead of two slices, a negation and a concat (each a slow
    strided kernel on CPU)."""
    h = hd // 2
    p = np.zeros((hd, hd), np.float32)
    p[np.arange(h) + h, np.arange(h)] = 1.0
    p[np.arange(h), np.arange(h) + h] = 1.0
    return Tensor(p)


class Attention(nn.Cell):
    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        bias, std = cfg.use_qkv_bias, cfg.init_std
        self.q_proj = Linear(cfg.d_model, self.n_heads * self.hd, bias, rng, std)
        self.k_proj = Linear(cfg.d_model, self.n_kv * self.hd, bias, rng, std)
        self.v_proj = Linear(cfg.d_model, self.n_kv * self.hd, bias, rng, std)
        # GPT-2 scales residual projections by 1/sqrt(2 * n_layers) at init
        self.o_proj = Linear(
            self.n_heads * self.hd,
            cfg.d_model,
            cfg.gpt_style,
            rng,
            std / math.sqrt(2 * cfg.n_layers),
        )
        self.scale = 1.0 / math.sqrt(self.hd)
        self.rope = cfg.family == "llama"
        self.swap = half_swap(self.hd) if self.rope else None
        self.fused_rope = fused.forward_op("rope") if self.rope else None
        self.fused_swap = fused.forward_op("swap12")
        # softmax(q k^T / sqrt(D) + bias) v as one kernel each way, reading only each query's
        # allowed span of keys (models/fused.py); head_dim up to 128
        self.fused_attention = fused.forward_op("attention") if self.hd <= 128 else None
        self.bmm_nt = ops.BatchMatMul(transpose_b=True)
        # Qwen3: each head's query and key RMS-normalised (over head_dim) before RoPE
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.w_at = _offsets(self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        self.n_w = self.w_at[-1] + (2 if cfg.qk_norm else 0)

    def weights(self) -> tuple:
        """q, k, v, o projections' weights (and biases), then q/k norms': one flat tuple."""
        w = self.q_proj.weights() + self.k_proj.weights() + self.v_proj.weights()
        w = w + self.o_proj.weights()
        if self.q_norm is not None:
            w = w + self.q_norm.weights() + self.k_norm.weights()
        return w

    def _vo(self, w):
        """The v and o projections' slices of :meth:`weights` passed in (None, None without)."""
        if w is None:
            return None, None
        o = self.w_at
        return w[o[2] : o[3]], w[o[3] : o[4]]

    def _qk(self, x, b, t, query=None, w=None):
        wq = wk = wqn = wkn = None
        if w is not None:
            o = self.w_at  # where each part starts in weights(), constants of a graph
            wq, wk, wqn, wkn = w[: o[1]], w[o[1] : o[2]], w[o[4] : o[4] + 1], w[o[4] + 1 :]
        q = self.q_proj(x if query is None else query, wq).reshape(b, t, self.n_heads, self.hd)
        k = self.k_proj(x, wk).reshape(b, t, self.n_kv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q, wqn), self.k_norm(k, wkn)
        return self._swap_heads(q), self._swap_heads(k)

    def _swap_heads(self, x):
        """(B, T, heads, D) <-> (B, heads, T, D): the fused row-copy kernel on the CPU in float32
        (models/fused.py), else ops.transpose (Tensor.transpose's eager CPU path is ~2x slower for
        the same kernel)."""
        if self.fused_swap is not None and x.dtype == ms.float32:
            return self.fused_swap(x)
        return ops.transpose(x, (0, 2, 1, 3))

    def _rope(self, x, cos, sin):
        """x cos + rotate_half(x) sin, ``sin`` carrying rotate-half's sign (Transformer._embed):
        one fused kernel each way on the CPU in float32 (models/fused.py)."""
        if self.fused_rope is not None and x.dtype == ms.float32 and cos.shape[1] == 1:
            return self.fused_rope(x, cos, sin)
        return x * cos + ops.matmul(x, self.swap) * sin

    def construct(self, x, bias, cos, sin, past=None, query=None, w=None):
        """``query``: the input of the query projection when it is not ``x`` (Pangu-alpha's top
        query layer); keys and values always come from ``x``. The query heads that share a kv
        head are one batched matmul against it (heads h = j * rep + r read kv head j, as
        Hugging Face's repeat_kv), so keys and values are never copied per query head.
        ``w``: :meth:`weights` passed in (a layer graph) instead of read from the sub-cells."""
        b, t, _ = x.shape
        wv, wo = self._vo(w)
        q, k = self._qk(x, b, t, query, w)
        v = self._swap_heads(self.v_proj(x, wv).reshape(b, t, self.n_kv, self.hd))
        if self.rope:
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        if past is not None:
            k = ops.cat((past[0], k), 2)
            v = ops.cat((past[1], v), 2)
        present = (k, v)
        if self.fused_attention is not None and q.dtype == ms.float32:
            out = self.fused_attention(q, k, v, bias)[0]  # (B, T, heads, D): no swap back
            return self.o_proj(out.reshape(b, t, self.n_heads * self.hd), wo), present
        s, rep = k.shape[2], self.n_heads // self.n_kv
        scores = self.bmm_nt(q.reshape(b, self.n_kv, rep * t, self.hd), k) * self.scale
        scores = scores.reshape(b, self.n_kv, rep, t, s) + bias[:, :, None]
        probs = ops.softmax(scores, -1).reshape(b, self.n_kv, rep * t, s)
        out = ops.matmul(probs, v).reshape(b, self.n_heads, t, self.hd)
        out = self._swap_heads(out).reshape(b, t, self.n_heads * self.hd)
        return self.o_proj(out, wo), present

    def decode_static(
        self, x, bias, cos, sin, kt_cache, v_cache, k_idx, v_idx, query=None, w=None, new=False
    ):
        """One new token against a fixed-size cache held in Parameters and updated in place:
        keys transposed, (B * kv_heads, hd, S), values (B * kv_heads, S, hd). The new key and value
        are scattered into column ``pos`` (``k_idx``/``v_idx`` hold it), then attention runs over
        all S columns with ``bias`` (B * kv_heads, 1, S) hiding the unfilled ones. The query heads
        sharing a kv head are one batched matmul against it, so no copy of the cache is made.
        ``w``: :meth:`weights` passed in (a decode layer graph); ``new``: the caches are tensors
        (a graph's inputs), written into new ones, returned with the output."""
        b = x.shape[0]
        rep = self.n_heads // self.n_kv
        wv, wo = self._vo(w)
        q, k = self._qk(x, b, 1, query, w)
        v = self.v_proj(x, wv).reshape(b, self.n_kv, self.hd)
        if self.rope:
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        scatter = ops.tensor_scatter_update if new else ops.scatter_nd_update
        kt_cache = scatter(kt_cache, k_idx, k.reshape(-1))
        v_cache = scatter(v_cache, v_idx, v.reshape(b * self.n_kv, self.hd))
        scores = ops.bmm(q.reshape(b * self.n_kv, rep, self.hd), kt_cache) * self.scale + bias
        probs = ops.softmax(scores, -1)
        out = self.o_proj(ops.bmm(probs, v_cache).reshape(b, 1, self.n_heads * self.hd), wo)
        return (out, kt_cache, v_cache) if new else out


class MLP(nn.Cell):
    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        super().__init__()
        d, f, std = cfg.d_model, cfg.ffn_dim, cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)
        self.gpt2 = cfg.gpt_style
        self.fast_gelu = cfg.family == "pangualpha"  # MindFormers' hidden_act: fast_gelu
        if self.gpt2:
            self.up_proj = Linear(d, f, True, rng, std)
            self.down_proj = Linear(f, d, True, rng, out_std)
            self.gate_proj = None
        else:
            self.gate_proj = Linear(d, f, False, rng, std)
            self.up_proj = Linear(d, f, False, rng, std)
            self.down_proj = Linear(f, d, False, rng, out_std)
        self.swiglu = fused.forward_op("swiglu")
        self.w_at = _offsets(self.up_proj, self.down_proj)
        self.n_w = self.w_at[-1] + (0 if self.gate_proj is None else 1)

    def weights(self) -> tuple:
        """up, down (and gate) projections' weights and biases: one flat tuple."""
        w = self.up_proj.weights() + self.down_proj.weights()
        return w if self.gate_proj is None else w + self.gate_proj.weights()

    def construct(self, x, w=None):
        wu = wd = wg = None
        if w is not None:
            o = self.w_at
            wu, wd, wg = w[: o[1]], w[o[1] : o[2]], w[o[2] :]
        if self.fast_gelu:
            return self.down_proj(ops.fast_gelu(self.up_proj(x, wu)), wd)
        if self.gpt2:
            return self.down_proj(ops.gelu(self.up_proj(x, wu), approximate="tanh"), wd)
        g, u = self.gate_proj(x, wg), self.up_proj(x, wu)
        if self.swiglu is not None and g.dtype == ms.float32:
            return self.down_proj(self.swiglu(g, u), wd)
        return self.down_proj(ops.silu(g) * u, wd)


class Block(nn.Cell):
    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        super().__init__()
        norm = LayerNorm if cfg.gpt_style else RMSNorm
        self.attn_norm = norm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rng)
        self.mlp_norm = norm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rng)
        self.w_at = _offsets(self.attn_norm, self.attn, self.mlp_norm, self.mlp)

    def weights(self) -> tuple:
        """Every weight of the layer, one flat tuple in the order ``construct``'s ``w`` reads them:
        what a layer graph (Transformer.use_layer_graphs) takes as its inputs. (Flat: MindSpore
        2.9 cannot differentiate a graph through nested tuple inputs.)"""
        w = self.attn_norm.weights() + self.attn.weights() + self.mlp_norm.weights()
        return w + self.mlp.weights()

    def _parts(self, w):
        """:meth:`weights` passed in, cut into the two norms', attention's and the MLP's (all
        None without)."""
        if w is None:
            return None, None, None, None
        o = self.w_at
        return w[: o[1]], w[o[1] : o[2]], w[o[2] : o[3]], w[o[3] :]

    def construct(self, x, bias, cos, sin, past=None, query=None, w=None):
        wn1, wa, wn2, wm = self._parts(w)
        a, present = self.attn(self.attn_norm(x, wn1), bias, cos, sin, past, query, wa)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x, wn2), wm)
        return x, present

    def decode_static(
        self, x, bias, cos, sin, kt_cache, v_cache, k_idx, v_idx, query=None, w=None, new=False
    ):
        """``w`` and ``new``: as Attention.decode_static's (with ``new``, returns the output and
        the two new caches)."""
        wn1, wa, wn2, wm = self._parts(w)
        a = self.attn.decode_static(
            self.attn_norm(x, wn1), bias, cos, sin, kt_cache, v_cache, k_idx, v_idx, query, wa, new
        )
        if new:
            a, kt_cache, v_cache = a
        x = x + a
        x = x + self.mlp(self.mlp_norm(x, wn2), wm)
        return (x, kt_cache, v_cache) if new else x


class Transformer(nn.Cell):
    """Embeddings + blocks + final norm (+ Pangu-alpha's top query layer): hidden states (B, T, d)
    and the updated KV cache, one entry per layer, the top query layer's last."""

    layer_graphs = None  # see use_layer_graphs

    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = _init(rng, (cfg.vocab_size, cfg.d_model), cfg.init_std)
        self.embed_positions = (
            _init(rng, (cfg.max_seq_len, cfg.d_model), 0.01) if cfg.gpt_style else None
        )
        top = None
        if cfg.family == "pangualpha":
            from .pangualpha import TopQueryLayer

            top = TopQueryLayer(cfg, rng)
        n_blocks = cfg.n_layers - (top is not None)
        self.layers = nn.CellList([Block(cfg, rng) for _ in range(n_blocks)])
        self.norm = (LayerNorm if cfg.gpt_style else RMSNorm)(cfg.d_model, cfg.norm_eps)
        self.top_query_layer = top
        hd = cfg.head_dim
        # allowed[i, j] = key j is not after query i; sliced per call instead of rebuilt
        self.causal = Tensor(np.tril(np.ones((cfg.max_seq_len, cfg.max_seq_len), dtype=np.float32)))
        self.inv_freq = Tensor(
            (1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
        )
        # rotate_half(x) = (x @ half_swap) * rot_sign; the sign rides on the sine table
        self.rot_sign = Tensor(np.repeat(np.float32([-1.0, 1.0]), hd // 2))
        if LAYER_GRAPHS:
            self.use_layer_graphs()

    def construct(self, input_ids, attention_mask, past=None, segments=None):
        """``segments`` (B, T) for packed rows (mindrlhf/data/packing.py): the example each token
        belongs to (1, 2, ...; 0 padding). A token then attends only to earlier tokens of its own
        example and positions restart at each example's first token; ``attention_mask`` is not
        read (no cache with packed rows). A packed row may be wider than max_seq_len: its
        positions restart at each example, and no example is longer than the batch it came from."""
        b, t = input_ids.shape
        s = attention_mask.shape[1]  # keys: cached + current
        p = s - t
        if s > self.cfg.max_seq_len and segments is None:
            raise ValueError(f"sequence of {s} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        # the positions padding may take: up to max_seq_len, or any number in a packed row
        room = self.cfg.max_seq_len - s if segments is None else 1 << 30
        # layer graphs (see use_layer_graphs): training runs spans, a forward out of training
        # mode one graph over every layer; after a cache, only a block of tokens (share_prompts)
        # takes one: one-token decode steps stay eager, their key length grows every step and
        # would compile anew
        graphs = self.layer_graphs is not None and (past is None or t > 1)
        # ... and meet the block padded at its end to a multiple of LAYER_PAD (a graph per
        # length otherwise); no real position sees the padding (it comes after all of them),
        # and the outputs are cut back to the real length below
        t0, s0 = t, s
        if not graphs:
            pad = 0
        elif in_graph():  # inside a compiled step: its own padded length
            pad = (-t) % LAYER_PAD
        else:
            pad = _graph_width(self._width_key + (b, p), t, room) - t
        if 0 < pad <= room:
            input_ids = ops.cat((input_ids, ops.zeros((b, pad), input_ids.dtype)), 1)
            attention_mask = ops.cat((attention_mask, ops.zeros((b, pad), attention_mask.dtype)), 1)
            if segments is not None:
                segments = ops.cat((segments, ops.zeros((b, pad), segments.dtype)), 1)
            t, s = t + pad, s + pad
        else:
            pad = 0
        if segments is None:
            positions = ops.clamp(ops.cumsum(attention_mask.astype(ms.int32), 1) - 1, min=0)
            positions = positions[:, p:]
            allowed = self.causal[p:s, :s][None] * attention_mask.astype(ms.float32)[:, None, :]
        else:
            seg = segments.astype(ms.int32)
            same = ops.equal(seg[:, :, None], seg[:, None, :]).astype(ms.float32)
            idx = ops.arange(t)
            causal = ops.less_equal(idx[None, :], idx[:, None]).astype(ms.float32)
            allowed = causal[None] * same * (seg > 0).astype(ms.float32)[:, None, :]
            # a token's position in its example: the keys it may see, itself included, minus one
            positions = ops.clamp(allowed.sum(-1).astype(ms.int32) - 1, min=0)
        bias = ((1.0 - allowed) * NEG_INF)[:, None]
        if pad:  # a query that sees no real key (a left-padded position) ignores the padding too
            bias = bias + ops.cat(
                (
                    ops.zeros((1, 1, 1, s - pad), bias.dtype),
                    ops.full((1, 1, 1, pad), NEG_INF, dtype=bias.dtype),
                ),
                -1,
            )
        x, cos, sin = self._embed(input_ids, positions)
        presents = []
        if graphs:
            for start, stop in self._spans:  # plain loops: a compiled step parses this too
                w, kv = [], []
                for i in range(start, stop):
                    w += self._weight_views(i)
                    if past is not None:
                        kv += [past[i][0], past[i][1]]
                if past is None:
                    out = self.layer_graphs(x, bias, cos, sin, *w)
                else:
                    out = self._layer_graph_past(x, bias, cos, sin, *kv, *w)
                x = out[0]
                if not self.training and not in_graph():
                    x.asnumpy()  # out of training mode, before the next call: use_layer_graphs
                for j in range(stop - start):
                    presents.append((out[1 + 2 * j], out[2 + 2 * j]))
            if pad:
                x = x[:, :t0]
                presents = [(k[:, :, :s0], v[:, :, :s0]) for k, v in presents]
                bias, positions = bias[:, :, :t0, :s0], positions[:, :t0]
        else:
            for i, layer in enumerate(self.layers):
                x, present = layer(x, bias, cos, sin, None if past is None else past[i])
                presents.append(present)
        h = self.norm(x)
        if self.top_query_layer is not None:
            h, present = self.top_query_layer(
                h, bias, positions, None if past is None else past[-1]
            )
            presents.append(present)
        return h, presents

    def _weight_views(self, i: int) -> list:
        """Layer ``i``'s weights as a layer graph takes them: a view of each. A Parameter
        argument keys the graph by its name (every span would compile its own), and
        Parameter.value() is an Identity copy, which the graph then held until its next call
        (SmolLM2: 425 MB of layer weights a forward; a view: the graph's pool peak 489 -> 83 MB)."""
        return [ops.reshape(p, p.shape) for p in self.layers[i].weights()]

    def use_layer_graphs(self, on: bool = True, span: int | None = None) -> None:
        """Eagerly (PyNative), run the decoder layers as compiled graphs -- forward and, under a
        gradient, backward -- instead of ~40 operators each dispatched one by one: a graph runs
        ``span`` consecutive layers (default LAYER_SPAN) and takes their weights as inputs, so
        every run of as many layers shares it; it compiles once per input shape (seconds), where
        compiling the whole model per shape takes minutes and gigabytes. The layers are cut into
        spans as even as can be (SmolLM2's 30 at 5: six calls of one graph; 24 at 5: four of 5
        and one of 4, two graphs). Why spans and not one layer a graph: each graph call under a
        PyNative gradient costs ~50-70 ms at SmolLM2's shape on top of its kernels (what it
        keeps for the backward), so one layer a graph spent about a quarter of the layers'
        forward and backward on 30 calls (4.87 s against 3.74 at 5, bench/README.md). Not for
        LoRA-wrapped layers (lora._rebuild does not carry it) or one-token decode steps.

        Out of training mode (``set_train(False)``: scoring, generation's prompt pass,
        evaluation) the same spans run, and ``construct`` reads each span's output on the host
        before the next call: without that read the chained calls ran at half speed (SmolLM2's
        shape, 16 x 72: six spans 2.9-3.0 s against 1.45 s with it, and 1.5-1.6 s for all 30
        layers in one call), with it they match one call while each shape holds a sixth of what
        a 30-layer graph held (+0.06 GB a new shape against +0.36: a graph's kernels keep
        buffers that grow with its layers and tokens), a shape met in training compiles nothing
        more, and a compile takes about half as long. Before, every layer ran in one call there
        and each shape held its graph's buffers (+1.0 GB peak in the GRPO bench, +1.5 GB before
        the policy and the reference shared the functions, _LAYER_GRAPH_FNS, one pair per block
        class and model config). Hence also ``construct`` pads a block to a multiple of
        LAYER_PAD for the graphs (DPO's bench: batches of 59-65 tokens met seven shapes and
        peaked at 11.8 GB; padded, two and 9.0 GB), or to a width already run up to an eighth
        wider (``_graph_width``: 112 tokens after 120 run at 120)."""
        span = max(1, LAYER_SPAN if span is None else span)
        n = len(self.layers)
        calls = -(-n // span)
        sizes = [n // calls + (i < n % calls) for i in range(calls)]
        bounds = np.cumsum([0] + sizes)
        object.__setattr__(self, "_spans", list(zip(bounds[:-1].tolist(), bounds[1:].tolist())))
        key = (type(self.layers[0]).__qualname__, repr(self.cfg))
        object.__setattr__(self, "_width_key", key)
        if on and key not in _LAYER_GRAPH_FNS:  # kept: a new function compiles anew
            # the first model of its architecture lends its first block: the weights are inputs,
            # and a block keeps nothing else that differs between models of one config
            template = self.layers[0]
            nw = len(template.weights())

            def run(x, bias, cos, sin, kv, w):
                out = []
                for j in range(len(w) // nw):
                    past = None if not kv else (kv[2 * j], kv[2 * j + 1])
                    x, (k, v) = template(x, bias, cos, sin, past, None, w[j * nw : (j + 1) * nw])
                    out += [k, v]
                return (x, *out)

            def layer_graph(x, bias, cos, sin, *w):
                return run(x, bias, cos, sin, (), w)

            def layer_graph_past(x, bias, cos, sin, *kv_w):
                n_kv = 2 * (len(kv_w) // (nw + 2))  # keys and values, then weights, per layer
                return run(x, bias, cos, sin, kv_w[:n_kv], kv_w[n_kv:])

            def layer_graph_decode(x, bias, cos, sin, k_idx, v_idx, *kv_w):
                n = len(kv_w) // (nw + 2)  # caches (keys, values), then weights, per layer
                out = []
                for j in range(n):
                    w = kv_w[2 * n + j * nw : 2 * n + (j + 1) * nw]
                    x, kt, v = template.decode_static(
                        x, bias, cos, sin, kv_w[2 * j], kv_w[2 * j + 1], k_idx, v_idx, None, w, True
                    )
                    out += [kt, v]
                return (x, *out)

            _LAYER_GRAPH_FNS[key] = tuple(
                ms.jit(f) for f in (layer_graph, layer_graph_past, layer_graph_decode)
            )
        graph, past, decode = _LAYER_GRAPH_FNS[key] if on else (None, None, None)
        object.__setattr__(self, "_layer_graph_past", past)
        object.__setattr__(self, "_layer_graph_decode", decode)
        object.__setattr__(self, "layer_graphs", graph)

    def _embed(self, input_ids, positions):
        x = ops.gather(self.embed_tokens, input_ids, 0)
        cos = sin = None
        if self.embed_positions is not None:
            x = x + ops.gather(self.embed_positions, positions, 0)
        else:
            freqs = positions.astype(self.inv_freq.dtype)[..., None] * self.inv_freq
            emb = ops.cat((freqs, freqs), -1)[:, None]
            cos, sin = ops.cos(emb), ops.sin(emb) * self.rot_sign  # sign: see half_swap
        return x, cos, sin

    def decode_static(self, input_ids, key_mask, pos, cache):
        """Feed one token per row (B, 1), written at column ``pos`` (an int32 (1,) tensor) of the
        fixed-size ``cache`` (a StaticCache of S columns, updated in place); ``key_mask`` (B, S)
        marks the filled columns including ``pos``. Returns the hidden state (B, 1, d)."""
        b, s = key_mask.shape
        km = key_mask.astype(ms.float32)
        positions = ops.clamp(km.sum(1, keepdims=True).astype(ms.int32) - 1, min=0)
        bias = ops.broadcast_to(((1.0 - km) * NEG_INF)[:, None, :], (b, self.cfg.kv_heads, s))
        bias = bias.reshape(b * self.cfg.kv_heads, 1, s)
        k_idx = ops.cat((cache.k_grid, ops.broadcast_to(pos, (cache.k_grid.shape[0], 1))), 1)
        v_idx = ops.cat((cache.v_grid, ops.broadcast_to(pos, (cache.v_grid.shape[0], 1))), 1)
        x, cos, sin = self._embed(input_ids, positions)
        if self.layer_graphs is not None and not in_graph():
            # eagerly, the spans as decode layer graphs (use_layer_graphs): each takes its
            # layers' caches as views and returns new ones, written back into the Parameters
            for start, stop in self._spans:
                w, kv = [], []
                for i in range(start, stop):
                    w += self._weight_views(i)
                    kv += [ops.reshape(c, c.shape) for c in (cache.kt[i], cache.v[i])]
                out = self._layer_graph_decode(x, bias, cos, sin, k_idx, v_idx, *kv, *w)
                x = out[0]
                x.asnumpy()  # read before the next call, as out of training mode
                for j, i in enumerate(range(start, stop)):
                    ops.assign(cache.kt[i], out[1 + 2 * j])
                    ops.assign(cache.v[i], out[2 + 2 * j])
        else:
            for i, layer in enumerate(self.layers):
                x = layer.decode_static(x, bias, cos, sin, cache.kt[i], cache.v[i], k_idx, v_idx)
        h = self.norm(x)
        if self.top_query_layer is not None:
            h = self.top_query_layer.decode_static(
                h, bias, positions, cache.kt[-1], cache.v[-1], k_idx, v_idx
            )
        return h


class StaticCache(nn.Cell):
    """The KV cache of compiled decoding: per layer, keys (B * kv_heads, hd, S) and values
    (B * kv_heads, S, hd) as Parameters written in place, plus the index grids that address
    column ``pos`` of every (row, head[, dim])."""

    def __init__(self, cfg: ModelConfig, batch: int, length: int):
        super().__init__()
        n, hd = batch * cfg.kv_heads, cfg.head_dim
        self.shape = (batch, length)
        self.kt = ms.ParameterTuple(
            [
                Parameter(
                    Tensor(np.zeros((n, hd, length), np.float32)),
                    name=f"kt{i}",
                    requires_grad=False,
                )
                for i in range(cfg.n_layers)
            ]
        )
        self.v = ms.ParameterTuple(
            [
                Parameter(
                    Tensor(np.zeros((n, length, hd), np.float32)), name=f"v{i}", requires_grad=False
                )
                for i in range(cfg.n_layers)
            ]
        )
        grid = np.stack(np.meshgrid(np.arange(n), np.arange(hd), indexing="ij"), -1).reshape(-1, 2)
        self.k_grid = Tensor(grid.astype(np.int32))  # [row*head, dim] in k.reshape(-1)'s order
        self.v_grid = Tensor(np.arange(n, dtype=np.int32)[:, None])

    def fill(self, presents) -> None:
        """Write the prompt's keys and values (eager forward's (B, kv_heads, P, hd) per layer)
        into columns 0..P-1 and zero the rest."""
        n, length = self.kt[0].shape[0], self.shape[1]
        for i, (k, v) in enumerate(presents):
            p = k.shape[2]
            kt = np.zeros((n, k.shape[3], length), np.float32)
            kt[:, :, :p] = k.asnumpy().reshape(n, p, -1).transpose(0, 2, 1)
            vv = np.zeros((n, length, v.shape[3]), np.float32)
            vv[:, :p] = v.asnumpy().reshape(n, p, -1)
            ops.assign(self.kt[i], Tensor(kt))
            ops.assign(self.v[i], Tensor(vv))


class CausalLM(nn.Cell):
    """The policy / reference model: logits over the vocabulary."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.cfg = cfg
        self.model = Transformer(cfg, rng)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.d_model, cfg.vocab_size, False, rng, cfg.init_std)
        )
        self.mm = ops.MatMul(transpose_b=True)
        self.head_t = None  # (d, V) copy of the output weights while generating; see frozen_head

    def logits_from_hidden(self, h):
        lead = h.shape[:-1]
        h2 = h.reshape(-1, h.shape[-1])
        if self.head_t is not None:
            return ops.matmul(h2, self.head_t).reshape(*lead, -1)
        w = self.model.embed_tokens if self.lm_head is None else self.lm_head.weight
        return self.mm(h2, w).reshape(*lead, -1)

    def response_logits(self, input_ids, attention_mask, prompt_len: int, share_prompts=False):
        """Logits predicting the response tokens input_ids[:, P:]: positions P-1 .. T-2 only, so
        the vocabulary projection (the largest matmul and tensor here) skips the prompt.

        ``share_prompts`` (eager: the rows are read on the host): rows whose prompt columns
        (tokens and mask) are identical -- a GRPO group -- run the prompt once; its keys and
        values are gathered into each row's place and the responses run against them as a
        cache. The same logits up to float rounding and, through the gather, the same
        gradients: a group of G pays one prompt, forward and backward."""
        if share_prompts:
            first, inverse = prompt_groups(
                input_ids.asnumpy(), attention_mask.asnumpy(), prompt_len
            )
            if len(first) < input_ids.shape[0]:
                return self._shared_prompt_logits(
                    input_ids, attention_mask, prompt_len, first, inverse
                )
        h, _ = self.model(input_ids, attention_mask)
        return self.logits_from_hidden(h[:, prompt_len - 1 : -1])

    def _shared_prompt_logits(self, input_ids, attention_mask, p: int, first, inverse):
        rows, idx = Tensor(first.astype(np.int32)), Tensor(inverse.astype(np.int32))
        h, presents = self.model(input_ids[rows, :p], attention_mask[rows, :p])
        past = cache_rows(presents, idx)
        # positions P .. T-2 attend to the cached prompt; position P-1's state is the prompt's last
        h_resp, _ = self.model(input_ids[:, p:-1], attention_mask[:, :-1], past)
        h = ops.cat((ops.gather(h[:, -1:], idx, 0), h_resp), 1)
        return self.logits_from_hidden(h)

    def construct(
        self, input_ids, attention_mask, past=None, last_only: bool = False, segments=None
    ):
        h, presents = self.model(input_ids, attention_mask, past, segments)
        if last_only:
            h = h[:, -1:]
        return self.logits_from_hidden(h), presents


def prompt_groups(ids: np.ndarray, mask: np.ndarray, prompt_len: int):
    """Rows with identical prompt columns (tokens and mask): ``first`` the row of each distinct
    prompt, ``inverse`` (B,) each row's index into ``first``. ``first`` is padded to a power of
    two by repeating its last row (computed, never read back), so the prompt pass meets few
    batch shapes: a layer graph compiles for each, and a GRPO mini-batch drawn from G-row groups
    holds a varying number of them. When that is not fewer than the rows, each row is its own."""
    rows = np.concatenate([ids[:, :prompt_len], mask[:, :prompt_len]], 1)
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    bucket = 1 << (len(first) - 1).bit_length()
    if bucket >= len(rows):
        return np.arange(len(rows)), np.arange(len(rows))
    return np.pad(first, (0, bucket - len(first)), mode="edge"), inverse.reshape(-1)


def release_layer_graphs() -> int:
    """Release every graph the layer-graph functions have compiled (all shapes, all models): the
    memory each shape's graph holds goes back (RSS falls), and a shape met again compiles again
    -- the same graph, the same numbers. For a stage between phases that meet different shapes:
    DPO's held-out evaluation, then its training steps (the DPO bench's peak 9.0 -> 7.3 GB when
    the reference's forward graphs go before training). Returns how many were released."""
    from mindspore.graph import api

    from ..graphs import _release_phases, _trim

    names = (".layer_graph.", ".layer_graph_past.", ".layer_graph_decode.")
    phases = {p for p in api.ms_compile_cache if any(n in p for n in names)}
    _release_phases(phases)
    _WIDTHS.clear()
    _trim()
    return len(phases)


def cache_rows(presents, idx: Tensor) -> list:
    """Each layer's (keys, values) with rows taken by ``idx``: a prompt pass over the distinct
    prompts (:func:`prompt_groups`) spread back to every row that shares one."""
    return [tuple(ops.gather(x, idx, 0) for x in kv) for kv in presents]


class frozen_head:
    """While generating (no gradients), keep a transposed copy of the output projection:
    MatMul with transpose_b re-transposes the (V, d) weight on every CPU call, ~3x slower."""

    def __init__(self, model: "CausalLM"):
        self.model = model

    def __enter__(self):
        w = (
            self.model.model.embed_tokens
            if self.model.lm_head is None
            else self.model.lm_head.weight
        )
        self.model.head_t = Tensor(np.ascontiguousarray(w.asnumpy().T))
        return self.model

    def __exit__(self, *exc):
        self.model.head_t = None


class ScalarHeadModel(nn.Cell):
    """A transformer with a scalar head per position: the critic (values) or reward model."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.cfg = cfg
        self.model = Transformer(cfg, rng)
        self.score = Linear(cfg.d_model, 1, True, rng, 1.0 / math.sqrt(cfg.d_model + 1))

    def construct(self, input_ids, attention_mask):
        h, _ = self.model(input_ids, attention_mask)
        return self.score(h)[..., 0]


def graph_cache(model: nn.Cell, kind: str) -> dict:
    """A dict of compiled graphs (and what they own) kept on ``model`` under ``kind``. A plain
    attribute, not a sub-cell, so nothing in it becomes a model parameter; graphs are cached by
    their jitted function, so keeping the function is what keeps a graph from compiling again."""
    graphs = model.__dict__.get(kind)
    if graphs is None:
        graphs = {}
        object.__setattr__(model, kind, graphs)
    return graphs


# ---- state dicts ------------------------------------------------------------------------------


def state_dict(cell: nn.Cell) -> dict[str, np.ndarray]:
    """Every parameter by our name. A model of another backend (models/mindformers_backend.py)
    is read through ``shared_decoder``, our decoder holding its very Parameters."""
    cell = getattr(cell, "shared_decoder", cell)
    return {name: p.asnumpy() for name, p in cell.parameters_and_names()}


def load_state_dict(
    cell: nn.Cell, tensors: dict[str, np.ndarray], strict: bool = True, source: str = "checkpoint"
) -> list[str]:
    """Copy arrays into the cell's parameters; returns the names not found in ``tensors``.
    Another backend's model is written through its ``shared_decoder`` (see state_dict)."""
    cell = getattr(cell, "shared_decoder", cell)
    params = dict(cell.parameters_and_names())
    missing = [n for n in params if n not in tensors]
    unexpected = [n for n in tensors if n not in params]
    if strict and (missing or unexpected):
        raise KeyError(
            f"{source}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, p in params.items():
        if name in tensors:
            arr = np.asarray(tensors[name])
            if tuple(arr.shape) != tuple(p.shape):
                raise ValueError(
                    f"{source}: {name} has shape {arr.shape}, model wants {tuple(p.shape)}"
                )
            # in place: set_data would give the Parameter new storage that graphs compiled
            # before (the decode step, a training step) no longer read
            ops.assign(p, Tensor(arr.astype(np.float32)))
    return missing


def backbone_state(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The shared transformer weights of a CausalLM/ScalarHeadModel checkpoint (prefix
    ``model.``)."""
    return {k: v for k, v in tensors.items() if k.startswith("model.")}
