"""models/head.py: a preference loss's sequence log-probs with the vocabulary projection run only
at the positions that predict a response token. Its values against NumPy's log-softmax of the
model's own hidden states and output weights (float64), its gradients against the full-logits
path's (``algos.dpo.sequence_logps``), and the projection's row count: what it saves."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor
from test_layer_graphs import FAMILIES

from conftest import randomize, tiny_model_cfg
from mindrlhf.algos.dpo import sequence_logps as logits_sequence_logps
from mindrlhf.models import head
from mindrlhf.models.decoder import CausalLM


def batch(rng, vocab):
    """Four rows, right-padded to 11: prompts of 3, 1, 4 and 2 tokens, responses of 5, 7, 2 and
    0 tokens (the last row scores nothing); response weights 1 but one 0.5 (a weighted token)."""
    ids = np.zeros((4, 11), np.int32)
    am, rm = np.zeros_like(ids), np.zeros((4, 11), np.float32)
    for r, (p, n) in enumerate([(3, 5), (1, 7), (4, 2), (2, 0)]):
        ids[r, : p + n] = rng.integers(4, vocab, p + n)
        am[r, : p + n] = 1
        rm[r, p : p + n] = 1
    rm[1, 5] = 0.5
    return ids, am, rm


@pytest.fixture
def model():
    m = CausalLM(tiny_model_cfg("llama", n_layers=2), seed=1)
    randomize(m, seed=2, qk_scale=3.0)  # distinct hidden states at each position
    m.set_train(True)
    return m


def test_sums_are_numpys_log_softmax_at_the_scored_positions(model, rng):
    ids, am, rm = batch(rng, model.cfg.vocab_size)
    got = head.sequence_logps(model, Tensor(ids), Tensor(am), Tensor(rm)).asnumpy()
    h = model.model(Tensor(ids), Tensor(am))[0].asnumpy().astype(np.float64)
    w = model.model.embed_tokens if model.lm_head is None else model.lm_head.weight
    logits = h @ w.asnumpy().astype(np.float64).T
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    want = [
        sum(rm[r, t] * logp[r, t - 1, ids[r, t]] for t in range(1, ids.shape[1]))
        for r in range(len(ids))
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got[3] == 0.0 and want[1] != pytest.approx(0.0)


@pytest.mark.parametrize(
    "family,per_row,graphs,max_len",
    [("llama", 1, False, None), ("llama", 2, False, None), ("llama", 3, False, None)]
    + [("llama", 2, True, None), ("llama", 4, True, 12), ("gpt2", 4, False, 12)]
    + [(f, 2, False, None) for f in FAMILIES if f != "llama"],
)
def test_gradients_are_the_full_logits_paths(family, per_row, graphs, max_len, rng):
    """Packed (per_row > 1: segments, positions restarting) and not, eagerly and through layer
    graphs, for every decoder family (learned positions, an untied head, a top query layer);
    ``max_len`` 12: the four sequences (8, 8, 6 and 2 tokens) packed into one row of 24, wider
    than max_seq_len, each within it."""
    kwargs = dict(FAMILIES[family], **({} if max_len is None else {"max_seq_len": max_len}))
    model = CausalLM(tiny_model_cfg(**kwargs), seed=1)
    randomize(model, seed=2, qk_scale=3.0)
    model.model.use_layer_graphs(graphs, span=2)
    model.set_train(True)
    ids, am, rm = batch(rng, model.cfg.vocab_size)
    weight = Tensor(np.float32([0.7, -1.3, 2.0, 0.4]))
    params = model.trainable_params()

    def run(scored_only):
        def loss(i, a, r):
            if scored_only:
                lp = head.sequence_logps(model, i, a, r, per_row)
            else:
                lp = logits_sequence_logps(model(i, a)[0], i, r)
            return (lp * weight).sum()

        v, g = ms.value_and_grad(loss, None, params)(Tensor(ids), Tensor(am), Tensor(rm))
        return float(v.asnumpy()), [x.asnumpy() for x in g]

    (v_scored, g_scored), (v_full, g_full) = run(True), run(False)
    assert v_scored == pytest.approx(v_full, rel=1e-5)
    for (name, _), a, b in zip(model.parameters_and_names(), g_scored, g_full):
        assert np.abs(b).max() > 0, name
        np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=max(1e-4 * np.abs(b).max(), 1e-6), err_msg=name
        )


def test_the_projection_runs_at_the_scored_positions_only(model, rng, monkeypatch):
    ids, am, rm = batch(rng, model.cfg.vocab_size)
    rows = []
    project = type(model).logits_from_hidden

    def spy(self, h):
        rows.append(h.shape[0])
        return project(self, h)

    monkeypatch.setattr(type(model), "logits_from_hidden", spy)
    head.sequence_logps(model, Tensor(ids), Tensor(am), Tensor(rm))
    assert rows == [int((rm[:, 1:] > 0).sum())] == [14]  # of 4 x 11 = 44 positions


def test_mean_divides_by_the_response_length(model, rng):
    ids, am, rm = batch(rng, model.cfg.vocab_size)
    args = (Tensor(ids), Tensor(am), Tensor(rm))
    total = head.sequence_logps(model, *args).asnumpy()
    mean = head.sequence_mean_logps(model, *args, 2).asnumpy()
    np.testing.assert_allclose(mean, total / np.maximum(rm[:, 1:].sum(-1), 1), rtol=1e-5)


def test_packing_lays_sequences_out_without_padding(model, rng, monkeypatch):
    """Four sequences of 8, 8, 6 and 2 real tokens, two to a row: the longest first, each into
    the emptier row, 8 + 6 and 8 + 2, width 14 (against 4 x 11 padded); every real token once and
    in order under its sequence's segment number; more rows where a row would not fit."""
    ids, am, rm = batch(rng, model.cfg.vocab_size)
    seen = []
    run = type(model.model).construct

    def spy(self, input_ids, attention_mask, past=None, segments=None):
        seen.append((input_ids.asnumpy(), None if segments is None else segments.asnumpy()))
        return run(self, input_ids, attention_mask, past, segments)

    monkeypatch.setattr(type(model.model), "construct", spy)
    head.sequence_logps(model, Tensor(ids), Tensor(am), Tensor(rm), per_row=2)
    ((tokens, seg),) = seen
    assert tokens.shape == (2, 14)
    for i in range(4):
        assert list(tokens[seg == i + 1]) == list(ids[i][am[i] > 0])
    assert (seg > 0).sum() == am.sum()
    # four to a row would be one row of 24: over a 12-token model, three rows of 8
    tokens, seg, *_ = head.packed_layout(ids, am, rm, 4, 12)
    assert tokens.shape == (3, 8) and (seg > 0).sum() == am.sum()
