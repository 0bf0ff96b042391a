"""Weight import/export: HF safetensors for GPT-2, LLaMA, Qwen2 (round trip through
transformers, logits equal ours) and Baichuan2's fused W_pack; GGUF q/k permutation; the real
SmolLM2-135M-Instruct GGUF from the pinned wheel against a NumPy reference forward pass."""

import dataclasses
import json

import numpy as np
import pytest
from mindspore import Tensor

from conftest import randomize, tiny_model_cfg
from mindrlhf.models.decoder import CausalLM, load_state_dict, state_dict
from mindrlhf.models.gguf_import import permute_rope, unpermute_rope
from mindrlhf.models.hf import export_hf, import_hf, to_hf

LAYOUTS = {
    "gpt2": dict(family="gpt2"),
    "llama": dict(family="llama", tie_embeddings=False),
    "qwen2": dict(family="llama", qkv_bias=True, tie_embeddings=True),
}


def our_logits(model, ids):
    return model(Tensor(ids), Tensor(np.ones_like(ids)))[0].asnumpy()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_loads_in_transformers_with_equal_logits(layout, tmp_path, rng):
    torch = pytest.importorskip("torch")
    import transformers

    cfg = tiny_model_cfg(**LAYOUTS[layout])
    model = CausalLM(cfg, seed=3)
    # every tensor non-trivial (norm gains != 1, biases != 0): at init a swapped norm or bias
    # mapping exports the same numbers and the logits cannot tell
    w = randomize(model, seed=4)
    export_hf(cfg, w, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    hf.eval()
    assert (
        type(hf).__name__
        == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
            layout
        ]
    )
    ids = rng.integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(our_logits(model, ids), theirs, atol=2e-4, rtol=1e-3)
    # and back: importing the export gives the same tensors
    cfg2, w2 = import_hf(tmp_path)
    assert (cfg2.family, cfg2.use_qkv_bias, cfg2.tie_embeddings) == (
        cfg.family,
        cfg.use_qkv_bias,
        cfg.tie_embeddings,
    )
    for k, v in w.items():
        np.testing.assert_array_equal(w2[k], v)


def test_baichuan2_w_pack_and_normhead(tmp_path, rng):
    """A Baichuan2-layout checkpoint (W_pack = [q; k; v], NormHead) imports to the model whose
    separate projections and normalised head it encodes."""
    from safetensors.numpy import save_file

    cfg = tiny_model_cfg("llama", n_kv_heads=None, tie_embeddings=False)
    model = CausalLM(cfg, seed=5)
    w = state_dict(model)
    hf, _ = to_hf(cfg, w)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}.self_attn."
        hf[p + "W_pack.weight"] = np.concatenate([hf.pop(p + f"{n}_proj.weight") for n in "qkv"], 0)
    hf["lm_head.weight"] = hf["lm_head.weight"] * 3.0  # NormHead normalises rows at inference
    save_file(hf, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "baichuan",
                "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.d_model,
                "intermediate_size": cfg.ffn_dim,
                "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads,
                "max_position_embeddings": cfg.max_seq_len,
                "rms_norm_eps": cfg.norm_eps,
                "tie_word_embeddings": False,
            }
        )
    )
    cfg2, w2 = import_hf(tmp_path)
    for n in "qkv":
        np.testing.assert_array_equal(
            w2[f"model.layers.1.attn.{n}_proj.weight"], w[f"model.layers.1.attn.{n}_proj.weight"]
        )
    norms = np.linalg.norm(w2["lm_head.weight"], axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def rope_rotate_half(q, pos, base=10000.0):
    """Hugging Face LLaMA: dimension i pairs with i + d/2."""
    d = q.shape[-1]
    ang = pos * base ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(np.concatenate([ang, ang])), np.sin(np.concatenate([ang, ang]))
    return q * cos + np.concatenate([-q[d // 2 :], q[: d // 2]]) * sin


def rope_interleaved(q, pos, base=10000.0):
    """llama.cpp / GGUF (GPT-J style): dimension 2i pairs with 2i + 1."""
    d = q.shape[-1]
    ang = pos * base ** (-np.arange(0, d, 2) / d)
    x, y = q[0::2], q[1::2]
    out = np.empty_like(q)
    out[0::2], out[1::2] = x * np.cos(ang) - y * np.sin(ang), x * np.sin(ang) + y * np.cos(ang)
    return out


def test_gguf_rope_permutation_means_the_same_attention(rng):
    """What the permutation is for, checked from the two RoPE conventions rather than from the
    code's own inverse: rotate-half RoPE on the Hugging Face rows scores every (query, key) pair
    exactly as interleaved RoPE does on the GGUF (permuted) rows, head by head."""
    heads, hd, d = 3, 8, 5
    wq, wk = rng.normal(size=(heads * hd, d)), rng.normal(size=(heads * hd, d))
    x1, x2 = rng.normal(size=d), rng.normal(size=d)
    gq, gk = permute_rope(wq, heads), permute_rope(wk, heads)
    for h in range(heads):
        rows = slice(h * hd, (h + 1) * hd)
        for p1, p2 in ((0, 0), (3, 1), (7, 2)):
            hf = rope_rotate_half(wq[rows] @ x1, p1) @ rope_rotate_half(wk[rows] @ x2, p2)
            gg = rope_interleaved(gq[rows] @ x1, p1) @ rope_interleaved(gk[rows] @ x2, p2)
            assert hf == pytest.approx(gg, rel=1e-10, abs=1e-12)
    np.testing.assert_array_equal(unpermute_rope(gq, heads), wq)


@pytest.fixture(scope="module")
def smollm2():
    from mindrlhf.data import registry
    from mindrlhf.data.tokenizer import SMOLLM2_GGUF
    from mindrlhf.models.gguf_import import load_gguf

    return load_gguf(str(registry.extract_to_cache("smollm2", SMOLLM2_GGUF)))


def test_smollm2_gguf_equals_transformers_own_gguf_loader(smollm2):
    """An independent reference: transformers reads the same GGUF file itself (its own tensor
    names, q/k un-permutation, rope_theta, norm eps and tokenizer from the file's metadata) and its
    logits must equal ours on a passage long enough that a wrong rotary base shows."""
    torch = pytest.importorskip("torch")
    import transformers

    from mindrlhf.data import registry
    from mindrlhf.data.tokenizer import SMOLLM2_GGUF

    path = registry.extract_to_cache("smollm2", SMOLLM2_GGUF)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    )
    hf.eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = (
        "The reviewers agreed that the second half of the film was slower than the first, but the "
        "final scene, set in a quiet train station at dawn, made up for every minute of it: 12 + "
        "7 = 19."
    )
    ids = smollm2.tokenizer.encode(text).ids
    assert ids == hf_tok(text, add_special_tokens=False).input_ids  # the tokenizer too
    assert len(ids) > 40
    model = CausalLM(smollm2.config, seed=0)
    load_state_dict(model, smollm2.tensors)
    ours = our_logits(model, np.array([ids], np.int32))[0]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() < 5e-3, np.abs(ours - theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_smollm2_gguf_matches_numpy_reference_and_answers(smollm2):
    from mindrlhf.config import GenerationConfig
    from mindrlhf.models.generation import generate, left_pad
    from mindrlhf.models.gguf_import import numpy_forward, render_chat

    g = smollm2
    assert (
        g.config.n_layers,
        g.config.d_model,
        g.config.n_heads,
        g.config.kv_heads,
        g.config.vocab_size,
    ) == (30, 576, 9, 3, 49152) and g.config.tie_embeddings
    model = CausalLM(g.config, seed=0)
    load_state_dict(model, g.tensors)
    ids = np.array([g.tokenizer.encode("The capital of France is").ids], np.int32)
    ref = numpy_forward(g.config, g.tensors, ids[0].tolist())
    ours = our_logits(model, ids)[0]
    assert np.abs(ours - ref).max() < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    prompt = render_chat(
        g.chat_template, [{"role": "user", "content": "What is the capital of France?"}]
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    pi, pm = left_pad([g.tokenizer.encode(prompt).ids], g.eos_id)
    out = generate(
        model, pi, pm, GenerationConfig(max_new_tokens=12, do_sample=False), g.eos_id, g.eos_id
    )
    answer = g.tokenizer.decode(out.responses[0].tolist())
    assert "Paris" in answer, answer


def hf_model(arch: str, torch, transformers):
    """A small random model of ``arch`` as transformers builds it, every weight non-trivial."""
    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "qwen3":  # an explicit head_dim that is not hidden / heads, and per-head q/k norms
        cfg = transformers.Qwen3Config(
            **common, head_dim=16, tie_word_embeddings=True, rope_theta=1000.0
        )
        model = transformers.Qwen3ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "arch, how", [("qwen3", "fp32"), ("mistral", "fp32"), ("qwen2", "bf16-sharded")]
)
def test_hf_directories_written_by_transformers_import_and_export(arch, how, tmp_path, rng):
    """Model directories as users have them -- written by transformers' save_pretrained, Qwen3 with
    its per-head q/k norms and own head_dim, Mistral, a Qwen2 in bf16 across several shards with
    an index -- import to our model with transformers' logits, and export back to the same
    architecture, which transformers loads with the same logits."""
    torch = pytest.importorskip("torch")
    import transformers

    src = tmp_path / "src"
    hf = hf_model(arch, torch, transformers)
    if how == "bf16-sharded":
        hf = hf.to(torch.bfloat16)
        hf.save_pretrained(src, max_shard_size="40KB")
        assert (src / "model.safetensors.index.json").exists() and len(
            list(src.glob("*.safetensors"))
        ) >= 2
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            src, torch_dtype=torch.float32
        ).eval()
    else:
        hf.save_pretrained(src)
    cfg, w = import_hf(src)
    assert cfg.arch == arch and (cfg.qk_norm, cfg.head_dim) == (
        arch == "qwen3",
        16 if arch == "qwen3" else 8,
    )
    model = CausalLM(cfg, seed=0)
    load_state_dict(model, w)
    ids = rng.integers(0, 97, (2, 11)).astype(np.int32)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(our_logits(model, ids), theirs, atol=2e-4, rtol=1e-3)
    export_hf(cfg, w, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == arch
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", torch_dtype=torch.float32
    ).eval()
    assert type(back).__name__ == type(hf).__name__
    with torch.no_grad():
        np.testing.assert_allclose(
            back(torch.tensor(ids, dtype=torch.long)).logits.numpy(), theirs, atol=2e-4, rtol=1e-3
        )


def test_rope_base_read_from_transformers_5_configs(tmp_path):
    """transformers 5 writes the RoPE base only inside ``rope_parameters`` (TRL's save of a SmolLM2
    did): it imports with that base, not the 10,000 default; scaled RoPE is refused by name."""
    cfg = dataclasses.replace(tiny_model_cfg("llama"), rope_theta=100000.0)
    hf, config = to_hf(cfg, state_dict(CausalLM(cfg, 0)))
    config.pop("rope_theta")
    config["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import save_file

    save_file(hf, str(d / "model.safetensors"))
    assert import_hf(d)[0].rope_theta == 100000.0
    config["rope_parameters"]["rope_type"] = "llama3"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: rope_parameters.rope_type 'llama3'"):
        import_hf(d)


def test_bad_model_directories_are_named(tmp_path):
    """Unsupported architecture, a shard missing from its index, a tensor of the wrong shape: each
    refused naming the file and what is wrong."""
    from safetensors.numpy import save_file

    from mindrlhf.models.safetensors_io import CheckpointError

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "falcon", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'falcon'"):
        import_hf(d)
    cfg = tiny_model_cfg("llama")
    hf, config = to_hf(cfg, state_dict(CausalLM(cfg, 0)))
    (d / "config.json").write_text(json.dumps(config))
    names = sorted(hf)
    save_file({k: hf[k] for k in names[:5]}, str(d / "model-00001-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    **{k: "model-00001-of-00002.safetensors" for k in names[:5]},
                    **{k: "model-00002-of-00002.safetensors" for k in names[5:]},
                }
            }
        )
    )
    with pytest.raises(
        CheckpointError, match=r"shard\(s\) \['model-00002-of-00002.safetensors'\] listed"
    ):
        import_hf(d)
    bad = dict(hf)
    bad["model.norm.weight"] = np.ones(cfg.d_model + 1, np.float32)
    (d / "model.safetensors.index.json").unlink()
    (d / "model-00001-of-00002.safetensors").unlink()
    save_file(bad, str(d / "model.safetensors"))
    cfg2, w2 = import_hf(d)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(33,\)"):
        load_state_dict(CausalLM(cfg2, 0), w2, source=str(d))
