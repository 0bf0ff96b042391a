"""The fused CPU kernels (models/fused.py, models/kernels/cpu_ops.cc). RMSNorm: forward and
gradients against a float64 NumPy RMSNorm written here, eagerly and compiled, on rows of very
different scales, non-unit gains and a non-contiguous input. RoPE: forward and gradient against
a float64 NumPy rotate-half written here, with arbitrary (not cos/sin-shaped) tables, so every
element's partner and sign is checked. Attention's head swap against NumPy's. The composed
fallback; the whole decoder the same with either."""

import dataclasses

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, ops

from conftest import randomize, tiny_model_cfg
from mindrlhf.config import GenerationConfig
from mindrlhf.models import fused
from mindrlhf.models.decoder import CausalLM, RMSNorm, load_state_dict
from mindrlhf.models.generation import generate, left_pad


def reference(x, w, g, eps):
    """y = x / rms(x) * w and, for the loss sum(y * g), dL/dx and dL/dw: float64 NumPy."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    d = x.shape[-1]
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    y = x * r * w
    gw = g * w
    dx = r * gw - x * r**3 * (gw * x).sum(-1, keepdims=True) / d
    dw = (g * x * r).reshape(-1, d).sum(0)
    return y, dx, dw


def norm_with(w, eps, on: bool, monkeypatch):
    monkeypatch.setenv("MINDRLHF_FUSED_KERNELS", "1" if on else "0")
    n = RMSNorm(w.size, eps)
    n.weight.set_data(Tensor(w))
    assert (n.fused is not None) == on
    return n


def grads(norm, x, g, compiled: bool):
    def loss(x):
        return (norm(x) * g).sum()

    fn = ms.value_and_grad(loss, 0, norm.trainable_params())
    if compiled:
        fn = ms.jit(fn)
    _, (dx, (dw,)) = fn(x)
    return norm(x).asnumpy(), dx.asnumpy(), dw.asnumpy()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    "shape", [(3, 5, 64), (2, 7, 4, 16), (64, 9, 64)]
)  # the last on two threads
def test_fused_rmsnorm_equals_float64_reference(shape, compiled, monkeypatch):
    r = np.random.default_rng(sum(shape))
    x = r.normal(size=shape).astype(np.float32)
    x[0, 0] *= 300.0  # rows of very different scales
    x[-1, -1] *= 1e-3
    w = r.normal(1.0, 0.3, shape[-1]).astype(np.float32)
    g = r.normal(size=shape).astype(np.float32)
    eps = 1e-5
    y_ref, dx_ref, dw_ref = reference(x, w, g, eps)
    y, dx, dw = grads(norm_with(w, eps, True, monkeypatch), Tensor(x), Tensor(g), compiled)
    np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5 * np.abs(dx_ref).max())
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5 * np.abs(dw_ref).max())


def test_fused_rmsnorm_reads_a_non_contiguous_input(monkeypatch):
    """A transposed view (as a per-head norm can meet) is read in its logical layout."""
    r = np.random.default_rng(3)
    base = r.normal(size=(4, 16, 6)).astype(np.float32)
    w = r.normal(1.0, 0.3, 16).astype(np.float32)
    norm = norm_with(w, 1e-6, True, monkeypatch)
    got = norm(ops.transpose(Tensor(base), (0, 2, 1))).asnumpy()
    want, _, _ = reference(base.transpose(0, 2, 1), w, np.zeros((4, 6, 16)), 1e-6)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def rope_reference(x, cos, sin):
    """x * cos + rotate_half(x) * sin with rotate_half(x) = cat(x[D/2:], x[:D/2]) -- ``sin``
    carries rotate-half's sign, as decoder.Transformer._embed builds it; and for the loss
    sum(y * g), dL/dx."""
    x, cos, sin = (np.asarray(a, np.float64) for a in (x, cos, sin))
    half = x.shape[-1] // 2

    def swap(a):
        return np.concatenate([a[..., half:], a[..., :half]], -1)

    return x * cos + swap(x) * sin, lambda g: g * cos + swap(g * sin)


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_rope_equals_float64_reference(compiled, monkeypatch):
    from mindrlhf.models.decoder import Attention

    monkeypatch.setenv("MINDRLHF_FUSED_KERNELS", "1")
    cfg = tiny_model_cfg("llama", d_model=48, n_heads=3, n_kv_heads=3)
    attn = Attention(cfg, np.random.default_rng(0))
    assert attn.fused_rope is not None
    r = np.random.default_rng(1)
    base = r.normal(size=(2, 5, 3, 16)).astype(np.float32)  # (B, T, H, D): read transposed
    cos, sin = (r.normal(size=(2, 1, 5, 16)).astype(np.float32) for _ in range(2))
    g = r.normal(size=(2, 3, 5, 16)).astype(np.float32)
    want, back = rope_reference(base.transpose(0, 2, 1, 3), cos, sin)

    def loss(x):
        return (
            attn._rope(ops.transpose(x, (0, 2, 1, 3)), Tensor(cos), Tensor(sin)) * Tensor(g)
        ).sum()

    fn = ms.value_and_grad(loss, 0)
    if compiled:
        fn = ms.jit(fn)
    _, dx = fn(Tensor(base))
    got = attn._rope(ops.transpose(Tensor(base), (0, 2, 1, 3)), Tensor(cos), Tensor(sin))
    np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx.asnumpy(), back(g).transpose(0, 2, 1, 3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_head_swap_is_numpys_swapaxes_both_ways(compiled, monkeypatch):
    """Attention's (B, T, heads, D) <-> (B, heads, T, D) row-copy kernel: the forward is NumPy's
    swapaxes(1, 2) exactly, the gradient the gradient's swapaxes (every axis a different size, so
    a mixed-up index shows)."""
    from mindrlhf.models.decoder import Attention

    monkeypatch.setenv("MINDRLHF_FUSED_KERNELS", "1")
    attn = Attention(tiny_model_cfg("llama", d_model=48, n_heads=3), np.random.default_rng(0))
    assert attn.fused_swap is not None
    r = np.random.default_rng(5)
    x = r.normal(size=(2, 5, 3, 7)).astype(np.float32)
    g = r.normal(size=(2, 3, 5, 7)).astype(np.float32)

    def loss(x):
        return (attn._swap_heads(x) * Tensor(g)).sum()

    fn = ms.value_and_grad(loss, 0)
    if compiled:
        fn = ms.jit(fn)
    _, dx = fn(Tensor(x))
    np.testing.assert_array_equal(attn._swap_heads(Tensor(x)).asnumpy(), x.swapaxes(1, 2))
    np.testing.assert_array_equal(dx.asnumpy(), g.swapaxes(1, 2))


def swiglu_reference(g, u):
    """silu(g) * u and, for the loss sum(h * dh), dL/dg and dL/du: float64 NumPy, with sigmoid's
    derivative written out as s (1 - s)."""
    g, u = np.asarray(g, np.float64), np.asarray(u, np.float64)
    s = 1.0 / (1.0 + np.exp(-g))
    return g * s * u, lambda dh: (dh * u * (s + g * s * (1.0 - s)), dh * g * s)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 24), (96, 4, 100)])  # one thread; two (with a tail)
def test_fused_swiglu_equals_float64_reference(shape, compiled, monkeypatch):
    """The MLP's silu(gate) * up, forward and both gradients, at gates from -30 to +30 (where
    sigmoid saturates) and at sizes that run on one thread and on two."""
    from mindrlhf.models.decoder import MLP

    monkeypatch.setenv("MINDRLHF_FUSED_KERNELS", "1")
    mlp = MLP(tiny_model_cfg("llama"), np.random.default_rng(0))
    assert mlp.swiglu is not None
    r = np.random.default_rng(sum(shape))
    g = (r.normal(size=shape) * 3).astype(np.float32)
    g.reshape(-1)[:4] = [-30.0, 30.0, 0.0, -1e-3]
    u, dh = (r.normal(size=shape).astype(np.float32) for _ in range(2))
    want, back = swiglu_reference(g, u)

    def loss(g, u):
        return (mlp.swiglu(g, u) * Tensor(dh)).sum()

    fn = ms.grad(loss, (0, 1))
    if compiled:
        fn = ms.jit(fn)
    dg, du = fn(Tensor(g), Tensor(u))
    dg_ref, du_ref = back(dh)
    np.testing.assert_allclose(
        mlp.swiglu(Tensor(g), Tensor(u)).asnumpy(), want, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(dg.asnumpy(), dg_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(du.asnumpy(), du_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,vocab", [(5, 300), (70, 1000)])  # one thread; two
def test_fused_token_logprobs_equal_float64_reference(rows, vocab):
    """The loss head's log p(label) (eager, as models/head.py runs it): forward and the logits'
    gradient against float64 NumPy, at logits of very different scales (one row at +-1e4, one
    constant), labels at both ends."""
    from mindrlhf.models.head import _token_logprobs

    r = np.random.default_rng(rows)
    x = (r.normal(size=(rows, vocab)) * 5).astype(np.float32)
    x[1] *= 2000.0
    x[2] = 7.0
    labels = r.integers(0, vocab, rows).astype(np.int32)
    labels[:2] = [0, vocab - 1]
    w = r.normal(size=rows).astype(np.float32)
    x64 = x.astype(np.float64)
    lse = x64.max(-1) + np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1))
    want = x64[np.arange(rows), labels] - lse
    onehot = np.eye(vocab)[labels]
    dwant = w[:, None] * (onehot - np.exp(x64 - lse[:, None]))

    def loss(x):
        return (_token_logprobs(x, Tensor(labels)) * Tensor(w)).sum()

    got = _token_logprobs(Tensor(x), Tensor(labels)).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=2e-5)
    np.testing.assert_allclose(ms.grad(loss)(Tensor(x)).asnumpy(), dwant, rtol=1e-5, atol=1e-6)


def attention_reference(q, k, v, allowed, dout):
    """softmax(q k^T / sqrt(D) over the allowed keys) v as (B, T, H, D), and for the loss
    sum(out * dout) the gradients of q, k, v: float64 NumPy, the textbook backward (dV = P^T dO,
    dS = P (dO V^T - rowsum(P dO V^T)), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D)), kv head j
    serving query heads j * rep .. j * rep + rep - 1, its gradients summed over them."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    rep, d = q.shape[1] // k.shape[1], q.shape[-1]
    kk, vv = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
    s = np.einsum("bhtd,bhsd->bhts", q, kk) / np.sqrt(d)
    s = np.where(allowed[:, None] > 0, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    do = dout.transpose(0, 2, 1, 3)
    dp = np.einsum("bhtd,bhsd->bhts", do, vv)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhts,bhsd->bhtd", ds, kk) / np.sqrt(d)
    fold = lambda x: x.reshape(x.shape[0], -1, rep, *x.shape[2:]).sum(2)  # noqa: E731
    dk = fold(np.einsum("bhts,bhtd->bhsd", ds, q) / np.sqrt(d))
    dv = fold(np.einsum("bhts,bhtd->bhsd", p, do))
    return np.einsum("bhts,bhsd->bthd", p, vv), dq, dk, dv


def attention_masks(b, t, s, r):
    """(B, T, S) allowed keys: row 0 causal after s - t cached keys, row 1 left-padded by 3, the
    others packed: consecutive examples of random lengths, each causal within itself, a padded
    tail."""
    allowed = np.tril(np.ones((t, s)), s - t)[None].repeat(b, 0)
    allowed[1, :, :3] = 0
    allowed[1, :, :3][np.arange(min(3, t)), np.arange(min(3, t))] = 0
    allowed[1, : max(0, 3 - (s - t)), :] = 0
    for row in range(2, b):
        seg, start, n = np.zeros(t, int), 0, 1
        while start < t - 2:
            length = int(r.integers(1, max(2, t // 2)))
            seg[start : start + length], start, n = n, start + length, n + 1
        same = (seg[:, None] == seg[None, :]) & (seg[None, :] > 0)
        allowed[row] = 0
        allowed[row, :, :t] = np.tril(same)
    return allowed


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    "b,h,kv,t,s,d",
    [
        (3, 6, 2, 7, 9, 16),  # GQA, two cached keys, one thread
        (2, 6, 2, 30, 32, 16),  # a 16-key tile boundary inside a group of four queries
        (3, 4, 4, 5, 5, 8),  # one query head a kv head; head_dim padded to 16 inside
        (4, 9, 3, 70, 70, 64),  # SmolLM2's heads, 16-key tiles crossed: on two threads
    ],
)
def test_fused_attention_equals_float64_reference(b, h, kv, t, s, d, compiled):
    """Attention (decoder.Attention's fused path, as models/fused.py registers it): the output and
    the gradients of q, k and v against float64 NumPy, under a causal mask after cached keys, left
    padding and packed rows of examples (the queries of a padded tail read no key: left out)."""
    op = fused.forward_op("attention")
    r = np.random.default_rng(t * 7 + d)
    q = (r.normal(size=(b, h, t, d)) * 2).astype(np.float32)
    k = (r.normal(size=(b, kv, s, d)) * 2).astype(np.float32)
    v = r.normal(size=(b, kv, s, d)).astype(np.float32)
    allowed = attention_masks(b, t, s, r)
    sees = allowed.sum(-1) > 0  # (B, T): queries with at least one key
    dout = r.normal(size=(b, t, h, d)).astype(np.float32) * sees[:, :, None, None]
    bias = ((1.0 - allowed) * -1e9).astype(np.float32)[:, None]
    want = attention_reference(q, k, v, np.where(sees[..., None], allowed, 1), dout)

    def loss(q, k, v, bias):
        return (op(q, k, v, bias)[0] * Tensor(dout)).sum()

    fn = ms.value_and_grad(loss, (0, 1, 2))
    if compiled:
        fn = ms.jit(fn)
    _, grads = fn(Tensor(q), Tensor(k), Tensor(v), Tensor(bias))
    out = op(Tensor(q), Tensor(k), Tensor(v), Tensor(bias))[0].asnumpy()
    np.testing.assert_allclose(out[sees], want[0][sees], rtol=1e-5, atol=1e-5)
    for name, g, w in zip("qkv", grads, want[1:]):
        np.testing.assert_allclose(g.asnumpy(), w, rtol=1e-4, atol=1e-4, err_msg=name)


def test_fused_attention_equals_composed_where_a_query_sees_nothing():
    """A query whose every key is masked averages all of them, as the composed softmax does in
    float32 (every score -1e9): output and gradients equal decoder.Attention's composed path."""
    from mindrlhf.models.decoder import Attention

    cfg = tiny_model_cfg("llama")
    attn = Attention(cfg, np.random.default_rng(0))
    assert attn.fused_attention is not None
    r = np.random.default_rng(1)
    b, t, d = 2, 6, cfg.d_model
    x = r.normal(size=(b, t, d)).astype(np.float32)
    allowed = np.tril(np.ones((t, t)))[None].repeat(b, 0)
    allowed[1, :2] = 0  # two queries of row 1 see nothing
    bias = Tensor(((1.0 - allowed) * -1e9).astype(np.float32)[:, None])
    hd = attn.hd
    pos = np.arange(t, dtype=np.float32)[:, None] / 10.0 ** (np.arange(hd) / hd)
    cos, sin = (
        Tensor(f(pos)[None, None].repeat(b, 0).astype(np.float32)) for f in (np.cos, np.sin)
    )
    g = Tensor(r.normal(size=(b, t, d)).astype(np.float32))
    out = []
    for use in (attn.fused_attention, None):
        attn.fused_attention = use

        def loss(x):
            return (attn(x, bias, cos, sin)[0] * g).sum()

        val, grads = ms.value_and_grad(loss, 0, attn.trainable_params())(Tensor(x))
        out.append((attn(Tensor(x), bias, cos, sin)[0].asnumpy(), grads))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for a, c in zip([out[0][1][0], *out[0][1][1]], [out[1][1][0], *out[1][1][1]]):
        np.testing.assert_allclose(a.asnumpy(), c.asnumpy(), rtol=1e-4, atol=1e-4)


def test_switched_off_it_is_the_composed_norm(monkeypatch):
    r = np.random.default_rng(4)
    x = r.normal(size=(2, 3, 32)).astype(np.float32)
    w = r.normal(1.0, 0.3, 32).astype(np.float32)
    off = norm_with(w, 1e-5, False, monkeypatch)(Tensor(x)).asnumpy()
    composed = fused.composed(Tensor(x), Parameter(Tensor(w)), 1e-5).asnumpy()
    np.testing.assert_array_equal(off, composed)
    np.testing.assert_allclose(off, reference(x, w, x, 1e-5)[0], rtol=2e-6, atol=2e-6)


def test_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDRLHF_CACHE", str(tmp_path))
    lib = fused.library()
    assert lib.parent == tmp_path / "kernels" and lib.stat().st_size > 0
    stamp = lib.stat().st_mtime_ns
    assert fused.library() == lib and lib.stat().st_mtime_ns == stamp
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temp file left


def test_decoder_with_fused_norms_equals_composed(monkeypatch):
    """A LLaMA-family decoder (random non-unit norms, Qwen3's per-head q/k norms too, RoPE): logits
    and every gradient of a token loss with the fused kernels equal the composed ones, and so do
    cached greedy generations."""
    cfg = tiny_model_cfg("llama", qk_norm=True)
    monkeypatch.setenv("MINDRLHF_FUSED_KERNELS", "0")
    slow = CausalLM(cfg, seed=0)
    w = randomize(slow, seed=2, qk_scale=2.0)
    monkeypatch.setenv("MINDRLHF_FUSED_KERNELS", "1")
    fast = CausalLM(dataclasses.replace(cfg), seed=5)
    load_state_dict(fast, w)
    assert fast.model.norm.fused is not None and slow.model.norm.fused is None
    assert fast.model.layers[0].attn.fused_rope is not None
    r = np.random.default_rng(0)
    ids = Tensor(r.integers(1, cfg.vocab_size, (3, 11)).astype(np.int32))
    mask = Tensor(np.ones((3, 11), np.int32))
    out = []
    for m in (fast, slow):

        def loss(ids, mask, m=m):
            logits, _ = m(ids, mask)
            return ops.log_softmax(logits, -1)[:, :, 3].mean()

        v, gs = ms.value_and_grad(loss, None, m.trainable_params())(ids, mask)
        out.append((m(ids, mask)[0].asnumpy(), [g.asnumpy() for g in gs]))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    pid, pmask = left_pad([[5, 9, 2, 7], [3, 8]], 0)
    gen = GenerationConfig(max_new_tokens=8, do_sample=False)
    seqs = [generate(m, pid, pmask, gen, -1, 0).sequences for m in (fast, slow)]
    np.testing.assert_array_equal(*seqs)
