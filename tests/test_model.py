import numpy as np
import pytest
from mindspore import Tensor

from conftest import tiny_model_cfg
from mindrlhf.models.decoder import CausalLM, ScalarHeadModel, load_state_dict, state_dict


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_logits_equal_full_forward(family, rng):
    m = CausalLM(tiny_model_cfg(family), seed=1)
    ids = rng.integers(0, 97, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0
    full, _ = m(Tensor(ids), Tensor(mask))
    _, past = m(Tensor(ids[:, :7]), Tensor(mask[:, :7]))
    step, _ = m(Tensor(ids[:, 7:]), Tensor(mask), past)
    np.testing.assert_allclose(step.asnumpy(), full.asnumpy()[:, 7:], atol=2e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padding_does_not_change_logits(family, rng):
    m = CausalLM(tiny_model_cfg(family), seed=2)
    ids = rng.integers(0, 97, (1, 6)).astype(np.int32)
    plain, _ = m(Tensor(ids), Tensor(np.ones_like(ids)))
    padded = np.concatenate([np.full((1, 3), 5, np.int32), ids], 1)
    pmask = np.concatenate([np.zeros((1, 3), np.int32), np.ones_like(ids)], 1)
    out, _ = m(Tensor(padded), Tensor(pmask))
    np.testing.assert_allclose(out.asnumpy()[:, 3:], plain.asnumpy(), atol=2e-5)


def test_causality(rng):
    m = CausalLM(tiny_model_cfg("llama"), seed=3)
    ids = rng.integers(0, 97, (1, 8)).astype(np.int32)
    a, _ = m(Tensor(ids), Tensor(np.ones_like(ids)))
    ids2 = ids.copy()
    ids2[0, 5:] = (ids2[0, 5:] + 1) % 97
    b, _ = m(Tensor(ids2), Tensor(np.ones_like(ids)))
    np.testing.assert_allclose(a.asnumpy()[:, :5], b.asnumpy()[:, :5], atol=1e-6)
    assert np.abs(a.asnumpy()[:, 5:] - b.asnumpy()[:, 5:]).max() > 1e-4


def test_variants_have_their_parameters():
    g = state_dict(CausalLM(tiny_model_cfg("gpt2"), 0))
    q = state_dict(CausalLM(tiny_model_cfg("llama", qkv_bias=True, tie_embeddings=False), 0))
    assert "model.embed_positions" in g and "model.layers.0.attn.q_proj.bias" in g
    assert "model.layers.0.mlp.gate_proj.weight" not in g
    assert "model.embed_positions" not in q and "model.layers.0.mlp.gate_proj.weight" in q
    assert "model.layers.0.attn.q_proj.bias" in q and "model.layers.0.attn.o_proj.bias" not in q
    assert q["model.layers.0.attn.k_proj.weight"].shape == (16, 32)  # 2 kv heads x head_dim 8
    assert "lm_head.weight" in q and "lm_head.weight" not in g


def test_state_dict_roundtrip_and_shape_errors():
    a, b = CausalLM(tiny_model_cfg(), 0), CausalLM(tiny_model_cfg(), 1)
    load_state_dict(b, state_dict(a))
    for k, v in state_dict(a).items():
        np.testing.assert_array_equal(v, state_dict(b)[k])
    bad = state_dict(a)
    bad["model.embed_tokens"] = bad["model.embed_tokens"][:5]
    with pytest.raises(ValueError, match="embed_tokens"):
        load_state_dict(b, bad)
    with pytest.raises(KeyError, match="missing"):
        load_state_dict(b, {})


def test_scalar_head_shape(rng):
    m = ScalarHeadModel(tiny_model_cfg(), 0)
    ids = rng.integers(0, 97, (2, 5)).astype(np.int32)
    assert m(Tensor(ids), Tensor(np.ones_like(ids))).shape == (2, 5)
