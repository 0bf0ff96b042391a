"""Pangu-alpha (``model.family: pangualpha``): our MindSpore model against a float64 NumPy forward
written from the paper (arXiv:2104.12369) and MindFormers 0.6's source (``models/pangualpha/
pangualpha.py``, ``modules/transformer/transformer.py``), on weights in MindFormers' own names and
layout; import of such checkpoints (MindFormers and MindRLHF naming, a real MindSpore .ckpt);
padding, KV cache, compiled decoding and gradients of the top query layer."""

import numpy as np
import pytest
from mindspore import Tensor

from conftest import assert_config_rejects, randomize, tiny_model_cfg
from mindrlhf.config import GenerationConfig, LoraConfig
from mindrlhf.models.decoder import CausalLM, ScalarHeadModel, load_state_dict, state_dict
from mindrlhf.models.generation import generate, left_pad
from mindrlhf.models.pangualpha_import import from_mindformers
from mindrlhf.models.safetensors_io import CheckpointError

VOCAB, D, HEADS, FF, SEQ, BLOCKS = 97, 32, 4, 64, 64, 2  # BLOCKS plain blocks + the top query layer


# ---- the reference: MindFormers' PanguAlphaHeadModel in NumPy, float64 ------------------------


def mf_checkpoint(seed=0, qk_scale=3.0) -> dict[str, np.ndarray]:
    """Random weights under MindFormers' names and layout: dense1/2/3 (out, in); attention
    projection and MLP mapping / projection (in, out). Norm gains around 1, biases non-zero,
    position and top-query embeddings large enough that positions matter, q/k scaled up so
    attention is sharp rather than uniform."""
    r = np.random.default_rng(seed)
    t = {
        "backbone.embedding.word_embedding.embedding_table": r.normal(0, 0.5, (VOCAB, D)),
        "backbone.embedding.position_embedding.embedding_table": r.normal(0, 0.5, (SEQ, D)),
        "backbone.top_query_embedding.embedding_table": r.normal(0, 0.5, (SEQ, D)),
        "backbone.layernorm.gamma": r.uniform(0.5, 1.5, D),
        "backbone.layernorm.beta": r.normal(0, 0.2, D),
    }
    for blk in [f"backbone.blocks.{i}." for i in range(BLOCKS)] + ["backbone.top_query_layer."]:
        for ln in ("layernorm1", "layernorm2"):
            t[blk + ln + ".gamma"] = r.uniform(0.5, 1.5, D)
            t[blk + ln + ".beta"] = r.normal(0, 0.2, D)
        for n in ("dense1", "dense2", "dense3"):
            scale = qk_scale if n != "dense3" else 1.0
            t[blk + f"attention.{n}.weight"] = r.normal(0, 0.1 * scale, (D, D))  # (out, in)
            t[blk + f"attention.{n}.bias"] = r.normal(0, 0.2, D)
        t[blk + "attention.projection.weight"] = r.normal(0, 0.1, (D, D))  # (in, out)
        t[blk + "attention.projection.bias"] = r.normal(0, 0.2, D)
        t[blk + "output.mapping.weight"] = r.normal(0, 0.1, (D, FF))  # (in, out)
        t[blk + "output.mapping.bias"] = r.normal(0, 0.2, FF)
        t[blk + "output.projection.weight"] = r.normal(0, 0.1, (FF, D))  # (in, out)
        t[blk + "output.projection.bias"] = r.normal(0, 0.2, D)
    return {k: v.astype(np.float32) for k, v in t.items()}


def _layernorm(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _fast_gelu(x):  # MindSpore's FastGelu, PanguAlphaConfig's hidden_act
    return x / (1.0 + np.exp(-1.702 * np.abs(x))) * np.exp(0.851 * (x - np.abs(x)))


def _layer(t, blk, x, query, allowed):
    """TransformerEncoderLayer / QueryLayer (pre-LayerNorm): ``query`` None means self-attention
    on layernorm1(x); else the query is this (un-normalised) tensor."""
    w = {k[len(blk) :]: v.astype(np.float64) for k, v in t.items() if k.startswith(blk)}
    h = _layernorm(x, w["layernorm1.gamma"], w["layernorm1.beta"])
    q_in = h if query is None else query
    q = q_in @ w["attention.dense1.weight"].T + w["attention.dense1.bias"]  # transpose_b=True
    k = h @ w["attention.dense2.weight"].T + w["attention.dense2.bias"]
    v = h @ w["attention.dense3.weight"].T + w["attention.dense3.bias"]
    t_len, hd = x.shape[0], D // HEADS
    q, k, v = (a.reshape(t_len, HEADS, hd).transpose(1, 0, 2) for a in (q, k, v))
    factor = np.sqrt(np.sqrt(hd))  # MultiHeadAttention._attn: q and k each divided by d^(1/4)
    scores = (q / factor) @ (k / factor).transpose(0, 2, 1)
    scores = scores + (1.0 - allowed) * -10000.0
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = (p @ v).transpose(1, 0, 2).reshape(t_len, D)
    x = x + a @ w["attention.projection.weight"] + w["attention.projection.bias"]  # (in, out)
    h2 = _layernorm(x, w["layernorm2.gamma"], w["layernorm2.beta"])
    m = _fast_gelu(h2 @ w["output.mapping.weight"] + w["output.mapping.bias"])
    return x + m @ w["output.projection.weight"] + w["output.projection.bias"]


def reference_logits(t: dict[str, np.ndarray], ids) -> np.ndarray:
    """PanguAlphaHeadModel.construct for one unpadded row (pipeline_stage 1): word + position
    embedding, the blocks, backbone.layernorm, the top query layer (query: top_query_embedding at
    the token's position), logits against the word embedding table."""
    f = {k: v.astype(np.float64) for k, v in t.items()}
    pos = np.arange(len(ids))
    x = (
        f["backbone.embedding.word_embedding.embedding_table"][ids]
        + f["backbone.embedding.position_embedding.embedding_table"][pos]
    )
    allowed = np.tril(np.ones((len(ids), len(ids))))
    for i in range(BLOCKS):
        x = _layer(t, f"backbone.blocks.{i}.", x, None, allowed)
    x = _layernorm(x, f["backbone.layernorm.gamma"], f["backbone.layernorm.beta"])
    query = f["backbone.top_query_embedding.embedding_table"][pos]
    x = _layer(t, "backbone.top_query_layer.", x, query, allowed)
    return x @ f["backbone.embedding.word_embedding.embedding_table"].T


def to_mindformers(ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our state dict under MindFormers' names and layout (the test's own mapping, written from
    their source: projection / mapping stored (in, out))."""
    out = {
        "backbone.embedding.word_embedding.embedding_table": ours["model.embed_tokens"],
        "backbone.embedding.position_embedding.embedding_table": ours["model.embed_positions"],
        "backbone.top_query_embedding.embedding_table": ours["model.top_query_layer.query_embed"],
        "backbone.layernorm.gamma": ours["model.norm.weight"],
        "backbone.layernorm.beta": ours["model.norm.bias"],
    }
    pairs = [(f"model.layers.{i}.", f"backbone.blocks.{i}.") for i in range(BLOCKS)]
    for o, b in [*pairs, ("model.top_query_layer.", "backbone.top_query_layer.")]:
        for ln, mine in (("layernorm1", "attn_norm"), ("layernorm2", "mlp_norm")):
            out[b + ln + ".gamma"] = ours[o + mine + ".weight"]
            out[b + ln + ".beta"] = ours[o + mine + ".bias"]
        for n, mine in (("dense1", "q_proj"), ("dense2", "k_proj"), ("dense3", "v_proj")):
            out[b + f"attention.{n}.weight"] = ours[o + f"attn.{mine}.weight"]
            out[b + f"attention.{n}.bias"] = ours[o + f"attn.{mine}.bias"]
        for theirs, mine in (
            ("attention.projection", "attn.o_proj"),
            ("output.mapping", "mlp.up_proj"),
            ("output.projection", "mlp.down_proj"),
        ):
            out[b + theirs + ".weight"] = ours[o + mine + ".weight"].T
            out[b + theirs + ".bias"] = ours[o + mine + ".bias"]
    return out


def pangu_cfg(**kw):
    base = dict(d_model=D, n_layers=BLOCKS + 1, n_heads=HEADS, d_ff=FF, max_seq_len=SEQ)
    return tiny_model_cfg("pangualpha", **{**base, **kw})


def sharp_model(seed=0) -> CausalLM:
    """Our model holding ``mf_checkpoint(seed)``."""
    cfg, ours = from_mindformers(mf_checkpoint(seed), HEADS, "test")
    m = CausalLM(cfg, seed=1)
    load_state_dict(m, ours)
    return m


def logits(m, ids, mask=None):
    mask = np.ones_like(ids) if mask is None else mask
    return m(Tensor(ids), Tensor(mask))[0].asnumpy()


# ---- (a) the forward pass ---------------------------------------------------------------------


def test_forward_equals_numpy_reference_of_the_source(rng):
    """Our model (random non-trivial weights, not through the importer) against the NumPy
    forward of MindFormers' PanguAlphaHeadModel on the same weights in their layout."""
    m = CausalLM(pangu_cfg(), seed=3)
    w = randomize(m, seed=4, qk_scale=3.0)
    r = np.random.default_rng(5)
    for name in ("model.embed_positions", "model.top_query_layer.query_embed"):
        w[name] = r.normal(0, 0.5, w[name].shape).astype(np.float32)  # positions matter
    load_state_dict(m, w)
    ids = rng.integers(0, VOCAB, (2, 24)).astype(np.int32)
    ours = logits(m, ids)
    theirs = to_mindformers(w)
    for row in range(2):
        ref = reference_logits(theirs, ids[row])
        np.testing.assert_allclose(ours[row], ref, atol=1e-4, rtol=0)
    # the top query embedding is really used: another table changes the logits
    w["model.top_query_layer.query_embed"] = w["model.top_query_layer.query_embed"][::-1].copy()
    load_state_dict(m, w)
    assert np.abs(logits(m, ids) - ours).max() > 1e-2


def test_state_dict_names_and_config():
    cfg = pangu_cfg()
    w = state_dict(CausalLM(cfg, 0))
    assert sum(k.startswith("model.layers.") and k.endswith("attn_norm.weight") for k in w) == 2
    assert w["model.top_query_layer.query_embed"].shape == (SEQ, D)
    assert w["model.top_query_layer.attn.o_proj.bias"].shape == (D,)
    assert "lm_head.weight" not in w and "model.top_query_layer.mlp.gate_proj.weight" not in w
    from mindrlhf.preflight import param_count

    assert param_count(cfg) == sum(v.size for v in w.values())


# ---- (b) padding, (c) KV cache and compiled decoding -----------------------------------------


def test_left_padded_batch_equals_unpadded_rows(rng):
    m = sharp_model()
    rows = [list(rng.integers(4, VOCAB, n)) for n in (20, 13, 7)]
    ids, mask = left_pad(rows, 0)
    batch = logits(m, ids, mask)
    for i, row in enumerate(rows):
        alone = logits(m, np.array([row], np.int32))[0]
        np.testing.assert_allclose(batch[i, -len(row) :], alone, atol=2e-4, rtol=0)


def test_incremental_decoding_with_past_equals_full_forward(rng):
    m = sharp_model()
    ids, mask = left_pad([list(rng.integers(4, VOCAB, n)) for n in (18, 11)], 0)
    full, _ = m(Tensor(ids), Tensor(mask))
    _, past = m(Tensor(ids[:, :9]), Tensor(mask[:, :9]))
    assert len(past) == BLOCKS + 1  # the top query layer has its own cache entry
    for t in range(9, ids.shape[1]):
        step, past = m(Tensor(ids[:, t : t + 1]), Tensor(mask[:, : t + 1]), past)
        np.testing.assert_allclose(step.asnumpy()[:, 0], full.asnumpy()[:, t], atol=2e-4)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-cache", "eager-cache"])
def test_cached_generation_equals_full_recompute(compiled, rng):
    m = sharp_model()
    ids, mask = left_pad([list(rng.integers(4, VOCAB, n)) for n in (5, 12, 2, 8)], 0)
    for gen in (
        GenerationConfig(max_new_tokens=24, do_sample=False),
        GenerationConfig(max_new_tokens=24, do_sample=True, temperature=0.8),
    ):
        a = generate(m, ids, mask, gen, 3, 0, seed=11, use_cache=True, compiled=compiled)
        b = generate(m, ids, mask, gen, 3, 0, seed=11, use_cache=False)
        np.testing.assert_array_equal(a.sequences, b.sequences)
        assert len({tuple(r) for r in a.responses.tolist()}) > 1


# ---- (d) import of MindFormers / MindRLHF checkpoints ----------------------------------------


def test_import_of_mindformers_naming_equals_the_reference(rng):
    t = mf_checkpoint(seed=2)
    cfg, ours = from_mindformers(t, HEADS, "pangu.ckpt")
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.ffn_dim, cfg.max_seq_len) == (
        "pangualpha",
        BLOCKS + 1,
        D,
        FF,
        SEQ,
    )
    m = CausalLM(cfg, seed=0)
    load_state_dict(m, ours)
    ids = rng.integers(0, VOCAB, (1, 30)).astype(np.int32)
    np.testing.assert_allclose(logits(m, ids)[0], reference_logits(t, ids[0]), atol=1e-4, rtol=0)


def test_mindrlhf_checkpoint_file_imports_through_the_model_source(tmp_path, rng):
    """A MindSpore .ckpt as MindRLHF's PPO saved its policy: the model under ``model.``, value
    heads and optimizer moments beside it, use_past's cache buffers inside it."""
    import mindspore as ms

    from mindrlhf.models import sources

    t = mf_checkpoint(seed=6)
    saved = {"model." + k: v for k, v in t.items()}
    saved["v_head0.weight"] = np.ones((1, D), np.float32)
    saved["adam_m.model.backbone.embedding.word_embedding.embedding_table"] = np.zeros(
        (VOCAB, D), np.float32
    )
    saved["model.backbone.blocks.0.key_past"] = np.zeros((1, HEADS, D // HEADS, SEQ), np.float16)
    path = tmp_path / "policy.ckpt"
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in saved.items()], str(path))
    src = sources.parse(f"pangualpha:{path}")
    derived = sources.derive_config(src, n_heads=HEADS)
    cfg, ours, files = sources.load_weights(src, n_heads=HEADS)
    assert derived == cfg and files[0]["bytes"] == path.stat().st_size
    m = CausalLM(cfg, seed=0)
    load_state_dict(m, ours)
    ids = rng.integers(0, VOCAB, (1, 17)).astype(np.int32)
    np.testing.assert_allclose(logits(m, ids)[0], reference_logits(t, ids[0]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"model\.n_heads"):
        sources.derive_config(src)


@pytest.mark.parametrize(
    "change, what",
    [
        (lambda t: t.pop("backbone.blocks.1.attention.dense2.bias"), "missing"),
        (lambda t: t.pop("backbone.top_query_layer.output.mapping.bias"), "missing"),
        (lambda t: t.update({"backbone.blocks.0.attention.rotary": np.zeros(3)}), "unexpected"),
    ],
)
def test_import_mismatch_names_the_file_and_parameter(change, what):
    t = mf_checkpoint()
    before = set(t)
    change(t)
    (name,) = set(t) ^ before
    with pytest.raises(CheckpointError, match=rf"pangu\.ckpt: parameter {name} is {what}"):
        from_mindformers(t, HEADS, "pangu.ckpt")


def test_not_a_pangu_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="x.ckpt: no parameter named"):
        from_mindformers({"foo.weight": np.zeros(2)}, HEADS, "x.ckpt")
    from mindrlhf.models.pangualpha_import import import_pangualpha

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not protobuf")
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        import_pangualpha(bad, HEADS)


def test_config_from_a_pangu_checkpoint(tmp_path):
    import mindspore as ms

    from mindrlhf.config import load_config

    path = tmp_path / "pangu.ckpt"
    t = mf_checkpoint()
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in t.items()], str(path))
    base = "model:\n  init: pangualpha:pangu.ckpt\n"
    (tmp_path / "ok.yaml").write_text(base + f"  n_heads: {HEADS}\n")
    cfg = load_config(tmp_path / "ok.yaml")
    assert (cfg.model.family, cfg.model.n_layers, cfg.model.vocab_size) == ("pangualpha", 3, VOCAB)
    assert cfg.model.init == f"pangualpha:{path}"
    assert_config_rejects(tmp_path, base, "model.n_heads")
    assert_config_rejects(tmp_path, base + f"  n_heads: {HEADS}\n  d_model: 48\n", "model.d_model")


# ---- (e) training: gradients, critic, LoRA, refusals -----------------------------------------


def test_gradients_reach_the_top_query_embedding(rng):
    import mindspore as ms

    m = sharp_model()
    ids = rng.integers(0, VOCAB, (2, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    params = [p for p in m.trainable_params() if p.name.endswith("query_embed")]
    assert len(params) == 1

    def loss_fn(x, mk):
        out, _ = m(x, mk)
        return (out * out).mean()

    grads = ms.grad(loss_fn, grad_position=None, weights=params)(Tensor(ids), Tensor(mask))
    g = np.abs(grads[0].asnumpy()).sum(-1)
    assert (g[:10] > 0).all()  # positions 0..9 are used (row 1 has 0..6)
    assert (g[10:] == 0).all()


def test_scalar_head_model_and_response_logits(rng):
    cfg = pangu_cfg()
    critic = ScalarHeadModel(cfg, seed=0)
    ids, mask = left_pad([list(rng.integers(4, VOCAB, n)) for n in (9, 4)], 0)
    assert critic(Tensor(ids), Tensor(mask)).shape == ids.shape
    m = sharp_model()
    full = logits(m, ids, mask)
    part = m.response_logits(Tensor(ids), Tensor(mask), 5).asnumpy()
    np.testing.assert_allclose(part, full[:, 4:-1], atol=1e-5)


def test_lora_adapts_the_top_query_layer_too():
    from mindrlhf.models import lora
    from mindrlhf.preflight import lora_param_count

    cfg = pangu_cfg(lora=LoraConfig(targets=["q", "v", "up"]))
    wrapped = lora.wrap(CausalLM(cfg, seed=0), cfg.lora, seed=0, base="b" * 64)
    trained = {n: p.size for n, p in wrapped.parameters_and_names() if p.requires_grad}
    assert "model.top_query_layer.attn.q_proj.lora_a" in trained
    assert "model.layers.1.mlp.up_proj.lora_b" in trained
    assert not any(n.endswith("query_embed") for n in trained)
    assert lora_param_count(cfg) == sum(trained.values())


def test_refused_settings_name_the_key(tmp_path):
    base = "model:\n  family: pangualpha\n  d_model: 32\n  n_heads: 4\n"
    assert_config_rejects(tmp_path, base + "  backend: mindformers\n", "model.backend")
    lora_gate = base + "  lora:\n    targets: [q, gate]\n"
    assert_config_rejects(tmp_path, lora_gate, "model.lora.targets")
    from mindrlhf.models.hf import export_hf

    cfg = pangu_cfg()
    with pytest.raises(ValueError, match="pangualpha model has no Hugging Face"):
        export_hf(cfg, state_dict(CausalLM(cfg, 0)), tmp_path / "out", source="art")


def test_init_config_takes_the_head_count_the_checkpoint_lacks(tmp_path, capsys):
    """`mindrlhf init-config --model pangualpha:F.ckpt` needs --n-heads (named when missing) and
    prints a config that says it, so the config loads as the checkpoint's model."""
    import mindspore as ms

    from mindrlhf.cli import main
    from mindrlhf.config import load_config

    path = tmp_path / "pangu.ckpt"
    ms.save_checkpoint(
        [{"name": k, "data": Tensor(v)} for k, v in mf_checkpoint().items()], str(path)
    )
    assert main(["init-config", "--model", f"pangualpha:{path}"]) == 2
    assert "--n-heads" in capsys.readouterr().err
    assert main(["init-config", "--model", f"pangualpha:{path}", "--n-heads", str(HEADS)]) == 0
    (tmp_path / "init.yaml").write_text(capsys.readouterr().out)
    (tmp_path / "reward.py").write_text("def correct(prompts, completions, **kw):\n    return []\n")
    (tmp_path / "data").mkdir()
    for f in ("sft", "pairs", "prompts"):
        (tmp_path / "data" / f"{f}.jsonl").write_text("")
    cfg = load_config(tmp_path / "init.yaml")
    assert (cfg.model.family, cfg.model.n_heads, cfg.model.n_layers) == ("pangualpha", HEADS, 3)
    assert cfg.tokenizer.kind == "hf" and cfg.tokenizer.path == str(tmp_path / "tokenizer")
