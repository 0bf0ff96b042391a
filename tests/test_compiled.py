"""The compiled paths (training step and decode step as mindspore.jit graphs, the default) give
the numbers of the eager PyNative paths, see weights that change after they compiled, and the
padding that keeps their shapes few changes no loss."""

import dataclasses

import numpy as np
import pytest
from mindspore import Tensor

from conftest import tiny_model_cfg
from mindrlhf.algos.sft import sft_loss
from mindrlhf.config import DPOConfig, GenerationConfig, OptimConfig
from mindrlhf.models.decoder import CausalLM, ScalarHeadModel, load_state_dict, state_dict
from mindrlhf.models.generation import generate, left_pad
from mindrlhf.runtime import Dist
from mindrlhf.stages.common import NumericalError, Trainer
from mindrlhf.stages.dpo import make_dpo_loss


def sft_fn(model):
    def loss_fn(ids, am, lm, denom):
        logits, _ = model(ids, am)
        loss = sft_loss(logits, ids, lm, denom)
        return loss, loss

    return loss_fn


def batches(rng, n, b=4, lengths=(9, 13, 16), vocab=97, pad_to=1):
    out = []
    for i in range(n):
        t = lengths[i % len(lengths)]
        lens = rng.integers(t // 2, t + 1, b)
        lens[0] = t
        width = -(-t // pad_to) * pad_to
        ids = rng.integers(4, vocab, (b, width)).astype(np.int32)
        am = (np.arange(width)[None] < lens[:, None]).astype(np.int32)
        ids[am == 0] = 0
        lm = (am * (np.arange(width)[None] >= 3)).astype(np.float32)
        out.append((ids, am, lm, np.float32(max(lm[:, 1:].sum(), 1.0))))
    return out


def train(compiled, family, data, warmup=2, loss=sft_fn, seed=3, trainer=None):
    m = CausalLM(tiny_model_cfg(family), seed=seed)
    m.set_train(True)
    t = Trainer(
        m.trainable_params(),
        loss(m),
        OptimConfig(lr=3e-3, warmup_steps=warmup, compiled=compiled),
        Dist(),
        10,
    )
    hist = [t.step(*[Tensor(x) for x in bt])[:2] for bt in data]
    if trainer is not None:
        trainer.append(t)
    return m, np.array(hist)


def compiled_graphs(trainer) -> list:
    """The graphs the pool holds for this trainer's step, with the MindSpore phases they
    compiled."""
    from mindrlhf.graphs import POOL

    return [g for g in POOL.live.values() if g.fn is trainer.graph]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_training_step_equals_eager(family, rng):
    """Same losses, gradient norms and weights after 6 steps over three batch lengths (three
    graphs), with warm-up and clipping: the graph is the eager step, not an approximation."""
    data = batches(rng, 3) * 2
    m_eager, h_eager = train(False, family, data)
    jit = []
    m_jit, h_jit = train(True, family, data, trainer=jit)
    graphs = compiled_graphs(jit[0])  # it really ran compiled: one MindSpore graph per batch length
    assert len(graphs) == 3 and all(g.phases for g in graphs)
    np.testing.assert_allclose(h_jit, h_eager, rtol=1e-5, atol=1e-6)
    assert (
        h_eager[3:, 0].sum() < h_eager[:3, 0].sum()
    )  # it trained: the second pass over the batches scores better
    for (name, a), b in zip(state_dict(m_eager).items(), state_dict(m_jit).values()):
        np.testing.assert_allclose(b, a, atol=2e-6, err_msg=name)


def test_compiled_dpo_step_with_aux_tuple_equals_eager(rng):
    def dpo(model):
        fn = make_dpo_loss(model, DPOConfig(beta=0.1))
        return lambda ids, am, rm, rc, rr: fn(ids, am, rm, rc, rr)

    data = []
    for ids, am, lm, _ in batches(rng, 4, b=4):
        data.append(
            (
                ids,
                am,
                lm,
                rng.normal(-20, 1, 2).astype(np.float32),
                rng.normal(-20, 1, 2).astype(np.float32),
            )
        )
    out = {}
    for compiled in (False, True):
        m = CausalLM(tiny_model_cfg(), seed=1)
        t = Trainer(m.trainable_params(), dpo(m), DPOConfig(lr=1e-2, compiled=compiled), Dist(), 10)
        out[compiled] = [
            (loss, g, float(acc.asnumpy()), float(mg.asnumpy()))
            for loss, g, (acc, mg) in (t.step(*[Tensor(x) for x in bt]) for bt in data)
        ]
    np.testing.assert_allclose(np.array(out[True]), np.array(out[False]), rtol=1e-5, atol=1e-6)


def test_compiled_step_stops_on_non_finite_without_touching_weights(rng):
    """A non-finite loss is kept off the weights inside the graph and raised on the host."""
    m = CausalLM(tiny_model_cfg(), seed=0)
    t = Trainer(m.trainable_params(), sft_fn(m), OptimConfig(lr=1e-2, compiled=True), Dist(), 10)
    ids, am, lm, d = batches(rng, 1)[0]
    t.step(Tensor(ids), Tensor(am), Tensor(lm), Tensor(d))
    before = state_dict(m)
    with pytest.raises(NumericalError, match="step 1"):
        t.step(Tensor(ids), Tensor(am), Tensor(lm), Tensor(np.float32(0.0)))  # loss / 0 -> inf
    for name, a in state_dict(m).items():
        np.testing.assert_array_equal(a, before[name], err_msg=name)


def test_padding_to_a_multiple_changes_no_loss(rng):
    """The stages pad batch lengths up to pad_multiple for the compiled step: extra pad columns
    (masked) leave the SFT loss, the RM rewards and the DPO log-probs as they were."""
    from mindrlhf.algos.dpo import sequence_logps
    from mindrlhf.algos.rm import gather_last

    m = CausalLM(tiny_model_cfg(), seed=2)
    rm = ScalarHeadModel(tiny_model_cfg(), seed=2)
    for ids, am, lm, d in batches(rng, 3, lengths=(9, 11, 13)):

        def P(x, pad=16 - ids.shape[1]):
            return np.pad(x, ((0, 0), (0, pad)))

        a = sft_fn(m)(Tensor(ids), Tensor(am), Tensor(lm), Tensor(d))[0]
        b = sft_fn(m)(Tensor(P(ids)), Tensor(P(am)), Tensor(P(lm)), Tensor(d))[0]
        assert float(b.asnumpy()) == pytest.approx(float(a.asnumpy()), rel=1e-5)
        la = sequence_logps(m(Tensor(ids), Tensor(am))[0], Tensor(ids), Tensor(lm)).asnumpy()
        lb = sequence_logps(
            m(Tensor(P(ids)), Tensor(P(am)))[0], Tensor(P(ids)), Tensor(P(lm))
        ).asnumpy()
        np.testing.assert_allclose(lb, la, rtol=1e-5)
        ra = gather_last(rm(Tensor(ids), Tensor(am)), Tensor(am)).asnumpy()
        rb = gather_last(rm(Tensor(P(ids)), Tensor(P(am))), Tensor(P(am))).asnumpy()
        np.testing.assert_allclose(rb, ra, rtol=1e-5, atol=1e-6)


def test_batches_are_padded_to_the_multiple():
    import pyarrow as pa

    from mindrlhf.data.tokenize import pair_batch, sft_batch

    t = pa.table({"input_ids": [[5] * 9, [6] * 3], "loss_mask": [[0, 1] + [1] * 7, [0, 1, 1]]})
    assert sft_batch(t, np.arange(2), 0)["input_ids"].shape == (2, 9)
    bt = sft_batch(t, np.arange(2), 0, 8)
    assert (
        bt["input_ids"].shape == (2, 16)
        and bt["attention_mask"].sum() == 12
        and bt["loss_mask"].sum() == 10
    )
    p = pa.table(
        {
            "chosen_ids": [[1, 2, 3]],
            "rejected_ids": [[1, 2, 4, 5, 6, 7, 8, 9, 10]],
            "prompt_len": [2],
        }
    )
    bp = pair_batch(p, np.arange(1), 0, 8)
    assert bp["input_ids"].shape == (2, 16) and bp["response_mask"].sum() == 1 + 7
    assert OptimConfig(compiled=False, pad_multiple=8).pad_to == 1 and OptimConfig().pad_to == 8


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_decoding_sees_new_weights(family, rng):
    """The compiled decode graph reads the parameters live: after the weights train in place and
    after they are loaded from a state dict, it generates what a fresh model with those weights
    generates (eager, no cache)."""
    m = CausalLM(tiny_model_cfg(family), seed=5)
    ids, mask = left_pad([list(rng.integers(4, 97, n)) for n in (5, 9, 2)], 0)
    gen = GenerationConfig(max_new_tokens=12, do_sample=False)
    first = generate(m, ids, mask, gen, -1, 0)

    def fresh_reference():
        ref = CausalLM(tiny_model_cfg(family), seed=99)
        load_state_dict(ref, state_dict(m))
        return generate(ref, ids, mask, gen, -1, 0, use_cache=False)

    t = Trainer(m.trainable_params(), sft_fn(m), OptimConfig(lr=5e-2), Dist(), 10)
    for bt in batches(rng, 3):
        t.step(*[Tensor(x) for x in bt])
    trained = generate(m, ids, mask, gen, -1, 0)
    np.testing.assert_array_equal(trained.sequences, fresh_reference().sequences)
    other = CausalLM(tiny_model_cfg(family), seed=123)
    load_state_dict(m, state_dict(other))
    loaded = generate(m, ids, mask, gen, -1, 0)
    np.testing.assert_array_equal(loaded.sequences, fresh_reference().sequences)
    # each change of weights changed what is generated, so a stale graph would have been caught
    assert not np.array_equal(trained.sequences, first.sequences)
    assert not np.array_equal(loaded.sequences, trained.sequences)


def test_compiled_decoding_equals_eager_under_prompt_bucketing(rng):
    """rollout.sample pads prompts on the left up to a multiple of 8 for the compiled decoder:
    the tokens drawn are those of the unpadded eager run, and training rollouts are padded on the
    right to the step's multiple with masked columns."""
    from types import SimpleNamespace

    from mindrlhf.stages.rollout import sample

    m = CausalLM(tiny_model_cfg("llama"), seed=4)
    rows = [list(rng.integers(4, 97, n)) for n in (5, 9, 2, 7)]
    tok = SimpleNamespace(pad_id=0, eos_id=3)
    gen = GenerationConfig(max_new_tokens=13, do_sample=True, temperature=1.2)
    eager = sample(m, rows, dataclasses.replace(gen, compiled=False), tok, seed=8)
    jit = sample(m, rows, gen, tok, seed=8, multiple=8)
    assert eager.prompt_len == 9 and jit.prompt_len == 16
    n = eager.responses.shape[1]
    assert jit.responses.shape[1] == min(-(-n // 8) * 8, 13)
    np.testing.assert_array_equal(jit.responses[:, :n], eager.responses)
    np.testing.assert_array_equal(jit.response_mask[:, :n], eager.response_mask)
    assert not jit.response_mask[:, n:].any()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_rollout_scoring_equals_eager(family, rng):
    """Old/reference log-probs and critic values of a rollout through score_rollout's graphs equal
    the eager forward's; response_logits (head on response positions only) equals slicing the full
    logits."""
    from mindrlhf.algos.common import token_logprobs
    from mindrlhf.stages.rollout import response_logprobs, response_values, score_rollout

    m, critic = (
        CausalLM(tiny_model_cfg(family), seed=6),
        ScalarHeadModel(tiny_model_cfg(family), seed=6),
    )
    ids, mask = left_pad([list(rng.integers(4, 97, n)) for n in (5, 9, 2, 7)], 0)
    g = generate(m, ids, mask, GenerationConfig(max_new_tokens=7), -1, 0, seed=3)
    seq, am, p = g.sequences, g.attention_mask, g.prompt_len
    full = m(Tensor(seq), Tensor(am))[0].asnumpy()[:, p - 1 : -1]
    np.testing.assert_allclose(
        m.response_logits(Tensor(seq), Tensor(am), p).asnumpy(), full, rtol=1e-5, atol=1e-5
    )
    want = token_logprobs(Tensor(full), Tensor(seq[:, p:])).asnumpy()
    for compiled in (False, True):
        got = score_rollout(response_logprobs, m, seq, am, p, compiled)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    v_eager = score_rollout(response_values, critic, seq, am, p, False)
    np.testing.assert_allclose(
        score_rollout(response_values, critic, seq, am, p, True), v_eager, rtol=1e-5, atol=1e-6
    )
    assert v_eager.shape == want.shape == (4, 7)
