"""Rows that share a prompt (a GRPO group) run it once: CausalLM.response_logits(share_prompts=
True) runs each distinct prompt, gathers its keys and values into every row's place and runs the
responses against them as a cache. Its log-probs and -- what GRPO's eager training step takes
from it -- its gradients are the full pass's, for each family and weight layout, eagerly and
through layer graphs (whose block-after-a-cache graph it then uses). Generation's and the
reference scoring's side is in test_generation.py."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor
from test_layer_graphs import FAMILIES, phases

from conftest import randomize, tiny_model_cfg
from mindrlhf.models.decoder import CausalLM
from mindrlhf.models.generation import left_pad
from mindrlhf.stages.rollout import response_logprobs


def rollout(cfg, rng):
    """Three prompts of 5, 9 and 2 tokens, interleaved 8 rows deep, left-padded; 6 response
    tokens each, one row's last three masked (stopped at eos)."""
    rows = [list(rng.integers(4, cfg.vocab_size, n)) for n in (5, 9, 2)]
    ids, mask = left_pad([rows[i] for i in [0, 1, 0, 2, 1, 0, 0, 2]], 0)
    resp = rng.integers(4, cfg.vocab_size, (8, 6)).astype(np.int32)
    rmask = np.ones((8, 6), np.int32)
    rmask[3, 3:] = 0
    seq = np.concatenate([ids, np.where(rmask > 0, resp, 0)], 1).astype(np.int32)
    return seq, np.concatenate([mask, rmask], 1).astype(np.int32), ids.shape[1]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "layer-graphs"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_shared_prompt_gradients_are_the_full_passes(family, graphs, rng):
    cfg = tiny_model_cfg(**FAMILIES[family])
    model = CausalLM(cfg, seed=3)
    randomize(model, seed=4, qk_scale=3.0)
    model.model.use_layer_graphs(graphs, span=2)  # 3 layers: spans of 2 and 1, caches and all
    model.set_train(True)  # a training step's forward: layer graphs serve it
    seq, mask, p = rollout(cfg, rng)
    weight = Tensor(rng.standard_normal((8, seq.shape[1] - p)).astype(np.float32) * mask[:, p:])
    params = model.trainable_params()

    def run(share):
        def loss(s, m):
            return (response_logprobs(model, s, m, p, share_prompts=share) * weight).sum()

        v, g = ms.value_and_grad(loss, None, params)(Tensor(seq), Tensor(mask))
        return float(v.asnumpy()), [x.asnumpy() for x in g]

    before = phases("layer_graph_past")
    full, shared = run(False), run(True)
    assert (phases("layer_graph_past") > before) == graphs  # the response block's graph
    assert shared[0] == pytest.approx(full[0], rel=1e-5)
    for (name, _), a, b in zip(model.parameters_and_names(), shared[1], full[1]):
        assert np.abs(b).max() > 0 or "bias" in name, name  # every weight reached
        np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=max(1e-4 * np.abs(b).max(), 1e-6), err_msg=name
        )


def test_prompt_groups_pad_to_few_shapes():
    """The distinct prompts' rows, padded to a power of two with a repeat (the prompt pass meets
    few batch shapes); every row maps back to its own prompt; no sharing when padding leaves
    nothing to save."""
    from mindrlhf.models.decoder import prompt_groups

    rng = np.random.default_rng(0)
    prompts = rng.integers(1, 50, (5, 4))
    order = np.array([3, 0, 4, 4, 1, 2, 0, 3, 1, 2, 2, 4])  # 5 distinct in 12 rows
    ids = np.concatenate([prompts[order], rng.integers(1, 50, (12, 3))], 1)
    mask = np.ones_like(ids)
    first, inverse = prompt_groups(ids, mask, 4)
    assert len(first) == 8 and len(set(first.tolist())) == 5
    np.testing.assert_array_equal(ids[first[inverse], :4], ids[:, :4])
    mask[0, 0] = 0  # the same tokens under another mask: another prompt
    assert len(set(prompt_groups(ids, mask, 4)[0].tolist())) == 6
    # 3 distinct in 4 rows: a padded pass of 4 saves nothing
    np.testing.assert_array_equal(prompt_groups(ids[:4], mask[:4], 4)[0], np.arange(4))
