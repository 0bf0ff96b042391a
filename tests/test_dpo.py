"""DPO losses by hand, and: for a fixed tiny model and batch, loss and gradients are the same
whether the reference log-probs come from the stored Arrow dataset or are recomputed."""

import math

import mindspore as ms
import numpy as np
import pyarrow as pa
import pytest
from mindspore import Tensor

from conftest import tiny_model_cfg
from mindrlhf.algos.dpo import dpo_loss, preference_accuracy, sequence_logps
from mindrlhf.config import DPOConfig
from mindrlhf.data.tokenize import IDS, pair_batch
from mindrlhf.models.decoder import CausalLM
from mindrlhf.stages.dpo import make_dpo_loss, pair_logps, reference_table


def T(x):
    return Tensor(np.asarray(x, dtype=np.float32))


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_sigmoid_dpo_by_hand():
    # h = (-1 - -2) - (-3 - -2.5) = 1 - (-0.5) = 1.5 ; beta 0.5 -> -log sigmoid(0.75)
    loss, rc, rr = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.5]), beta=0.5)
    assert float(loss.asnumpy()) == pytest.approx(-math.log(sig(0.75)), rel=1e-6)
    assert float(rc.asnumpy()[0]) == pytest.approx(0.5) and float(rr.asnumpy()[0]) == pytest.approx(
        -0.25
    )


def test_label_smoothing_and_ipo_by_hand():
    args = (T([-1.0]), T([-3.0]), T([-2.0]), T([-2.5]))
    loss, _, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.2)
    assert float(loss.asnumpy()) == pytest.approx(
        -0.8 * math.log(sig(0.75)) - 0.2 * math.log(sig(-0.75)), rel=1e-6
    )
    ipo, _, _ = dpo_loss(*args, beta=0.5, loss_type="ipo")
    assert float(ipo.asnumpy()) == pytest.approx((1.5 - 1.0) ** 2, rel=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(*args, beta=0.5, loss_type="nope")


def test_preference_accuracy_counts_ties_half():
    assert float(
        preference_accuracy(T([1.0, 0.0, 2.0]), T([0.0, 0.0, 3.0])).asnumpy()
    ) == pytest.approx(0.5)


def test_sequence_logps_masks_prompt_and_padding():
    logits = Tensor(np.zeros((1, 4, 5), np.float32))  # uniform: every token log(1/5)
    ids = Tensor(np.array([[1, 2, 3, 0]], np.int32))
    resp = Tensor(np.array([[0, 1, 1, 0]], np.float32))  # two response tokens
    assert float(sequence_logps(logits, ids, resp).asnumpy()[0]) == pytest.approx(
        2 * math.log(0.2), rel=1e-5
    )


def random_pairs(rng, n=6, vocab=97):
    rows = {"chosen_ids": [], "rejected_ids": [], "prompt_len": []}
    for _ in range(n):
        p = list(rng.integers(4, vocab, rng.integers(2, 5)))
        rows["chosen_ids"].append(p + list(rng.integers(4, vocab, rng.integers(2, 7))))
        rows["rejected_ids"].append(p + list(rng.integers(4, vocab, rng.integers(2, 7))))
        rows["prompt_len"].append(len(p))
    return pa.table(
        {
            "chosen_ids": pa.array(rows["chosen_ids"], IDS),
            "rejected_ids": pa.array(rows["rejected_ids"], IDS),
            "prompt_len": pa.array(rows["prompt_len"], pa.int32()),
        }
    )


def test_cached_reference_logps_equal_recomputed(store, rng):
    cfg = tiny_model_cfg("llama")
    policy, ref = CausalLM(cfg, seed=1), CausalLM(cfg, seed=2)
    table = random_pairs(rng)
    c, r = pair_logps(ref, table, pad_id=0)
    cached = store.read_dataset(store.write_dataset(reference_table(c, r), name="ref").id)

    idx = np.array([4, 1, 3])
    bt = pair_batch(table, idx, 0)
    ids, am, resp = (
        Tensor(bt["input_ids"]),
        Tensor(bt["attention_mask"]),
        Tensor(bt["response_mask"]),
    )
    live = sequence_logps(ref(ids, am)[0], ids, resp)
    k = len(idx)
    loss_fn = make_dpo_loss(policy, DPOConfig(beta=0.3))
    grad_fn = ms.value_and_grad(loss_fn, None, policy.trainable_params(), has_aux=True)
    (l_cache, *_), g_cache = grad_fn(
        ids,
        am,
        resp,
        Tensor(cached.column("ref_chosen_logp").to_numpy()[idx]),
        Tensor(cached.column("ref_rejected_logp").to_numpy()[idx]),
    )
    (l_live, *_), g_live = grad_fn(ids, am, resp, live[:k], live[k:])
    assert float(l_cache.asnumpy()) == pytest.approx(float(l_live.asnumpy()), abs=1e-6)
    assert (
        abs(float(l_live.asnumpy()) - math.log(2)) > 1e-4
    )  # policy != ref, so the loss is not trivial
    for a, b in zip(g_cache, g_live):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-7)
    assert max(float(np.abs(g.asnumpy()).max()) for g in g_live) > 0
