import numpy as np
import pytest

from conftest import randomize, tiny_model_cfg
from mindrlhf.config import GenerationConfig
from mindrlhf.models.decoder import CausalLM
from mindrlhf.models.generation import generate, left_pad, sample_next

EOS, PAD = 3, 0


def prompts(rng):
    rows = [list(rng.integers(4, 97, n)) for n in (5, 9, 2, 7)]
    return left_pad(rows, PAD)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "gen",
    [
        GenerationConfig(max_new_tokens=20, do_sample=False),
        GenerationConfig(max_new_tokens=20, do_sample=True, temperature=0.9),
        GenerationConfig(max_new_tokens=20, do_sample=True, temperature=1.3, top_k=10, top_p=0.9),
    ],
    ids=["greedy", "temperature", "topk-topp"],
)
def test_kv_cache_generation_equals_full_recompute(family, gen, rng):
    m = CausalLM(tiny_model_cfg(family), seed=7)
    ids, mask = prompts(rng)
    a = generate(m, ids, mask, gen, EOS, PAD, seed=11, use_cache=True)
    b = generate(m, ids, mask, gen, EOS, PAD, seed=11, use_cache=False)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    np.testing.assert_array_equal(a.response_mask, b.response_mask)
    assert a.sequences.shape[1] > ids.shape[1]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-cache", "eager-cache"])
def test_cached_decoding_of_a_sharp_model_equals_full_recompute(family, compiled, rng):
    """The same check on non-trivial weights with sharp attention (q/k scaled up): at init the
    attention of a tiny model is nearly uniform, so a key cached without its rotary position or
    written to the wrong column rarely changes a token; here it does."""
    m = CausalLM(tiny_model_cfg(family), seed=7)
    randomize(m, seed=1, qk_scale=4.0)
    ids, mask = prompts(rng)
    for gen in (
        GenerationConfig(max_new_tokens=24, do_sample=False),
        GenerationConfig(max_new_tokens=24, do_sample=True, temperature=0.7),
    ):
        a = generate(m, ids, mask, gen, EOS, PAD, seed=11, use_cache=True, compiled=compiled)
        b = generate(m, ids, mask, gen, EOS, PAD, seed=11, use_cache=False)
        np.testing.assert_array_equal(a.sequences, b.sequences)
        assert len({tuple(r) for r in a.responses.tolist()}) > 1  # not a degenerate constant output


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-cache", "eager-cache"])
def test_rows_sharing_a_prompt_run_it_once_and_decode_as_if_alone(family, compiled, rng):
    """Repeated prompts (a GRPO group, interleaved here with others of other lengths) run their
    prompt pass once per distinct prompt; every row still decodes what full recomputation gives
    it, with its own random stream, so the copies of one prompt sample different responses."""
    m = CausalLM(tiny_model_cfg(family), seed=7)
    randomize(m, seed=1, qk_scale=4.0)
    rows = [list(rng.integers(4, 97, n)) for n in (5, 9, 2)]
    order = [0, 1, 0, 2, 1, 0, 0, 2]
    ids, mask = left_pad([rows[i] for i in order], PAD)

    gen = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.8)
    a = generate(m, ids, mask, gen, EOS, PAD, seed=11, use_cache=True, compiled=compiled)
    b = generate(m, ids, mask, gen, EOS, PAD, seed=11, use_cache=False)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    np.testing.assert_array_equal(a.response_mask, b.response_mask)
    assert len({tuple(a.responses[i]) for i in (0, 2, 5, 6)}) > 2  # one prompt, own samples
    with pytest.MonkeyPatch.context() as mp:
        calls = []
        mp.setattr(m.model, "construct", _counting(m.model.construct, calls))
        generate(m, ids, mask, gen, EOS, PAD, seed=11, use_cache=True, compiled=compiled)
    assert calls[0] == 4  # the prompt pass: three distinct prompts (padded to 4), not 8 rows


def _counting(construct, calls):
    def wrapped(input_ids, *a, **k):
        calls.append(input_ids.shape[0])
        return construct(input_ids, *a, **k)

    return wrapped


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("path", ["compiled-cache", "eager-cache", "no-cache"])
def test_recorded_logprobs_are_a_forward_pass_over_the_result(family, path, rng):
    """generate(logprobs=True) records each response token's log-prob under the model at
    temperature 1, untruncated -- what ppo/grpo.old_logprobs: recompute gets from a forward pass
    over the finished sequences (response_logprobs) -- whatever temperature, top-k and top-p the
    sampler used; the eos token has its own log-prob, the padding after it 0."""
    from mindspore import Tensor

    from mindrlhf.stages.rollout import response_logprobs

    m = CausalLM(tiny_model_cfg(family), seed=7)
    randomize(m, seed=1, qk_scale=4.0)
    ids, mask = prompts(rng)
    gen = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.6, top_k=20, top_p=0.9)
    kw = dict(seed=11, use_cache=path != "no-cache", compiled=path == "compiled-cache")
    eos = int(generate(m, ids, mask, gen, -1, PAD, **kw).responses[1, 3])  # row 1 stops there
    g = generate(m, ids, mask, gen, eos, PAD, logprobs=True, **kw)
    rm = g.response_mask > 0
    assert 0 < rm[1].sum() <= 4 and rm.all(1).any()  # a row stopped early, another ran on
    want = response_logprobs(m, Tensor(g.sequences), Tensor(g.attention_mask), g.prompt_len)
    want = want.asnumpy()
    assert want[rm].std() > 0.3  # log-probs that differ from token to token
    np.testing.assert_allclose(g.logprobs[rm], want[rm], atol=2e-5)
    assert not g.logprobs[~rm].any()
    assert g.logprobs.shape == g.response_mask.shape
    assert generate(m, ids, mask, gen, eos, PAD, **kw).logprobs is None  # only when asked


def test_eos_stops_rows_and_pads_after():
    m = CausalLM(tiny_model_cfg(), seed=0)
    ids, mask = left_pad([[5, 6, 7], [8, 9], [40, 41, 42, 43]], PAD)
    gen = GenerationConfig(max_new_tokens=12, do_sample=False)
    free = generate(m, ids, mask, gen, eos_id=-1, pad_id=PAD)
    eos = int(free.responses[0, 2])  # row 0 will now stop at its third token
    out = generate(m, ids, mask, gen, eos_id=eos, pad_id=PAD)
    stopped = 0
    for row, rm in zip(out.responses, out.response_mask):
        toks = row.tolist()
        if eos in toks:
            k = toks.index(eos)
            assert rm[: k + 1].all() and not rm[k + 1 :].any()
            assert (row[k + 1 :] == PAD).all()
            stopped += 1
        else:
            assert rm.all()
    assert out.response_mask[0].sum() <= 3 and stopped >= 1
    # rows that did not stop are unchanged by another row's eos
    for i in range(3):
        if eos not in out.responses[i].tolist():
            np.testing.assert_array_equal(
                out.responses[i], free.responses[i, : out.responses.shape[1]]
            )


def test_sample_next_semantics():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    greedy = sample_next(logits, GenerationConfig(do_sample=False), rng)
    assert (greedy == 0).all()
    top2 = sample_next(logits, GenerationConfig(do_sample=True, top_k=2), rng)
    assert set(top2.tolist()) == {0, 1}
    assert abs((top2 == 0).mean() - 0.5 / 0.8) < 0.03
    topp = sample_next(logits, GenerationConfig(do_sample=True, top_p=0.7), rng)
    assert set(topp.tolist()) == {0, 1}  # 0.5 < 0.7, 0.5+0.3 >= 0.7: token 2 is cut
    free = sample_next(logits, GenerationConfig(do_sample=True), rng)
    np.testing.assert_allclose(
        np.bincount(free, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03
    )


def test_prompt_too_long_for_model():
    m = CausalLM(tiny_model_cfg(max_seq_len=16), seed=0)
    ids, mask = left_pad([[5] * 10], PAD)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(m, ids, mask, GenerationConfig(max_new_tokens=10), EOS, PAD)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scoring_rows_sharing_a_prompt_runs_it_once(family, rng):
    """response_logits(share_prompts=True), as the GRPO reference scores a rollout: repeated
    prompts of several lengths, interleaved, left-padded; the responses attend to a gathered
    cache of their own prompt. The same log-probs as the full pass, one prompt pass of 4 rows
    (3 distinct, padded to a power of two)."""
    from mindspore import Tensor

    from mindrlhf.stages.rollout import response_logprobs

    m = CausalLM(tiny_model_cfg(family), seed=7)
    randomize(m, seed=1, qk_scale=4.0)
    rows = [list(rng.integers(4, 97, n)) for n in (5, 9, 2)]
    ids, mask = left_pad([rows[i] for i in [0, 1, 0, 2, 1, 0, 0, 2]], PAD)
    gen = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.0)
    eos = int(generate(m, ids, mask, gen, -1, PAD, seed=5).responses[1, 3])  # row 1 stops there
    g = generate(m, ids, mask, gen, eos, PAD, seed=5, use_cache=False)
    seq, am, p = Tensor(g.sequences), Tensor(g.attention_mask), g.prompt_len
    assert (g.response_mask == 0).any()  # a row stopped at eos: masked keys after it
    full = response_logprobs(m, seq, am, p).asnumpy()
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m.model, "construct", _counting(m.model.construct, calls))
        shared = response_logprobs(m, seq, am, p, share_prompts=True).asnumpy()
    rm = g.response_mask > 0
    assert full[rm].std() > 0.3
    np.testing.assert_allclose(shared[rm], full[rm], atol=2e-5)
    assert calls == [4, 8]  # the distinct prompts (3, padded to 4), then every row's response
