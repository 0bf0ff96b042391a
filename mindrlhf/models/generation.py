"""Autoregressive generation with an incremental KV cache.

Prompts are left-padded so every row's last prompt token sits in the same column; the mask
carries the padding, and positions come from the mask's cumulative sum. With ``use_cache`` the
prompt is run once and each new token is fed alone with the cached keys and values; without it
the whole sequence is recomputed every step (the reference the cache must equal). Rows with the
same prompt (a GRPO group, an online DPO pair, several samples per prompt) share one prompt pass:
it runs once per distinct prompt and its keys, values and first logits are copied to each row.

With ``gen.compiled`` (the default) the cache has a fixed size, prompt + max_new_tokens columns,
and one decode step -- write the new key/value into its column, attend over every column with
the unfilled ones masked, project the last hidden state onto the vocabulary -- is a single
``mindspore.jit`` graph. Its shapes are the same at every step, so it compiles once per
(batch, prompt length, max_new_tokens) and PyNative's per-operator dispatch, which dominates a
small model's decode step on CPU, is gone. The eager growing cache stays as ``compiled=False``.

Sampling happens in NumPy on float64 logits, one uniform draw per row per step from that row's
own seeded stream -- ``(seed, row id)``, the row id being its place in the whole batch -- so the
cached and recomputed paths draw the same tokens from the same logits, and a row samples the
same tokens whichever data-parallel rank (and batch) it is generated in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Tensor

from ..config import GenerationConfig
from ..graphs import POOL
from .decoder import cache_rows, frozen_head, graph_cache, prompt_groups


@dataclass
class Generation:
    sequences: np.ndarray  # (B, P + N) prompt (left-padded) + response (right-padded)
    attention_mask: np.ndarray  # (B, P + N)
    response_mask: np.ndarray  # (B, N): 1 for generated tokens up to and including eos
    prompt_len: int
    # (B, N) float32, only with generate(logprobs=True): each response token's log-prob under the
    # generating model at temperature 1, untruncated -- what response_logprobs would compute on
    # the finished sequences -- read off the logits the sampler already has; 0 after a row's eos
    logprobs: np.ndarray | None = None

    @property
    def responses(self) -> np.ndarray:
        return self.sequences[:, self.prompt_len :]


def left_pad(
    rows: list[list[int]], pad_id: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    length = length or max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, r in enumerate(rows):
        r = r[-length:]
        if r:
            ids[i, length - len(r) :] = r
            mask[i, length - len(r) :] = 1
    return ids, mask


def row_streams(seed: int, row_ids) -> list[np.random.Generator]:
    """One random stream per row, keyed by the row's id in the whole batch."""
    return [np.random.default_rng([seed, int(r)]) for r in row_ids]


def _uniforms(rng, n: int) -> np.ndarray:
    if isinstance(rng, np.random.Generator):
        return rng.random(n)
    return np.array([g.random() for g in rng])


def sample_next(logits: np.ndarray, gen: GenerationConfig, rng) -> np.ndarray:
    """Pick one token per row from (B, V) logits: greedy, or temperature / top-k / top-p sampling.
    Float64, one uniform per row against the row's CDF; worked in place on one copy (this runs
    every decode step, over the whole vocabulary)."""
    if not gen.do_sample:
        return np.asarray(logits).argmax(-1).astype(np.int32)
    u = _uniforms(rng, logits.shape[0])  # drawn before any filtering so both paths consume the same
    x = np.array(logits, dtype=np.float64)
    if gen.temperature != 1.0:
        x /= gen.temperature
    if gen.top_k and gen.top_k < x.shape[-1]:
        kth = np.partition(x, -gen.top_k, axis=-1)[:, -gen.top_k][:, None]
        x[x < kth] = -np.inf
    x -= x.max(-1, keepdims=True)
    probs = np.exp(x, out=x)
    probs /= probs.sum(-1, keepdims=True)
    if gen.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p  # mass strictly before each token
        keep_sorted = before < gen.top_p  # the first token is always kept
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    cdf = np.cumsum(probs, -1, out=probs)
    # the first index whose CDF reaches u * total: the count of entries below it
    idx = np.array(
        [np.searchsorted(c, ui * c[-1], "left") for c, ui in zip(cdf, u)], dtype=np.int64
    )
    return np.minimum(idx, logits.shape[-1] - 1).astype(np.int32)


def chosen_logprobs(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log softmax(logits)[row, token] per row: the model's own distribution, whatever temperature
    or truncation the sampler applied. The exponentials in float32 (4x faster than float64 over
    a 49k vocabulary, ~2e-6 nats apart), their sum and the rest in float64."""
    x = np.asarray(logits, dtype=np.float32)
    top = x.max(-1)
    total = np.exp(x - top[:, None]).sum(-1, dtype=np.float64)
    chosen = x[np.arange(len(tokens)), tokens].astype(np.float64)
    return (chosen - top - np.log(total)).astype(np.float32)


def check_fits(model_cfg, prompt_len: int, max_new_tokens: int) -> None:
    """A prompt block and its responses must fit the model's positions."""
    limit = model_cfg.max_seq_len
    if prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len ({limit})"
        )


def generate(
    model,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    gen: GenerationConfig,
    eos_id: int,
    pad_id: int,
    seed: int = 0,
    use_cache: bool = True,
    compiled: bool | None = None,
    row_ids=None,
    logprobs: bool = False,
) -> Generation:
    """Generate up to ``gen.max_new_tokens`` for a left-padded batch; stop rows at ``eos_id``.
    ``row_ids``: each row's id in the whole batch (default 0..B-1), which keys its random stream.
    A model of another backend (``model.backend: mindformers``) decodes with its
    ``shared_decoder``: our decoder on the same Parameter objects, so nothing is copied; with
    ``gen.engine: mindformers``, MindFormers' own incremental inference decodes instead
    (models/mindformers_generation.py; Ascend). ``logprobs``: also record each sampled token's
    log-prob (:class:`Generation`), so the policy's old log-probs need no second forward pass."""
    if gen.engine == "mindformers":
        if logprobs:
            raise ValueError(
                "generation.engine mindformers does not record the sampled tokens' log-probs; "
                "recompute them (ppo/grpo.old_logprobs: recompute) or use generation.engine: native"
            )
        from .mindformers_generation import generator

        return generator(model, len(prompt_ids)).generate(
            prompt_ids, prompt_mask, gen, eos_id, pad_id, seed, row_ids
        )
    model = getattr(model, "shared_decoder", model)
    model.set_train(False)
    b, p = prompt_ids.shape
    rng = row_streams(seed, range(b) if row_ids is None else row_ids)
    n = gen.max_new_tokens
    check_fits(model.cfg, p, n)
    seq = np.concatenate([prompt_ids.astype(np.int32), np.full((b, n), pad_id, np.int32)], 1)
    mask = np.concatenate([prompt_mask.astype(np.int32), np.zeros((b, n), np.int32)], 1)
    compiled = gen.compiled if compiled is None else compiled
    lp = np.zeros((b, n), np.float32) if logprobs else None
    if use_cache and compiled:  # in a graph the projection reads the weight as it is: no copy
        steps = _decode_static(model, seq, mask, p, n, gen, eos_id, pad_id, rng, lp)
    else:
        with frozen_head(model):
            steps = _decode(model, seq, mask, p, n, gen, eos_id, pad_id, rng, use_cache, lp)
    seq, mask = seq[:, : p + steps], mask[:, : p + steps]
    return Generation(seq, mask, mask[:, p:].copy(), p, None if lp is None else lp[:, :steps])


def _fill(seq, mask, p, n, gen, eos_id, pad_id, rng, next_logits, lp=None) -> int:
    """Fill ``seq``/``mask`` columns p.. in place, ``next_logits(t)`` giving the (B, V) logits of
    step t, and ``lp`` (B, n) with the chosen tokens' log-probs if given; returns the number of
    steps taken."""
    done = np.zeros(seq.shape[0], dtype=bool)
    steps = 0
    for t in range(n):
        cur = p + t  # number of tokens known so far
        logits = next_logits(t)
        tok = sample_next(logits, gen, rng)
        if lp is not None:
            lp[:, t] = np.where(done, 0.0, chosen_logprobs(logits, tok))
        tok = np.where(done, pad_id, tok)
        seq[:, cur] = tok
        mask[:, cur] = (~done).astype(np.int32)
        done |= tok == eos_id
        steps += 1
        if done.all():
            break
    return steps


def prefill(model, seq, mask, p: int):
    """The prompt pass of cached decoding: the last prompt position's logits (B, V) as NumPy and
    each layer's keys and values. Rows whose prompt and padding are identical run once, and
    their results are gathered back into every row's place: at a group size of 8 the prompt
    costs an eighth."""
    import mindspore as ms

    first, inverse = prompt_groups(seq, mask, p)
    if len(first) == len(seq):
        logits, presents = model(Tensor(seq[:, :p]), Tensor(mask[:, :p]), None, True)
        return logits.asnumpy()[:, -1], presents
    logits, presents = model(Tensor(seq[first, :p]), Tensor(mask[first, :p]), None, True)
    idx = Tensor(inverse.astype(np.int32), ms.int32)
    return logits.asnumpy()[:, -1][inverse], cache_rows(presents, idx)


def _decode(model, seq, mask, p, n, gen, eos_id, pad_id, rng, use_cache, lp=None) -> int:
    """The eager paths: a cache grown by concatenation, or the whole sequence every step."""
    past = None

    def next_logits(t):
        nonlocal past
        cur = p + t
        if not use_cache:
            logits, _ = model(Tensor(seq[:, :cur]), Tensor(mask[:, :cur]), None, True)
        elif past is None:
            first, past = prefill(model, seq, mask, p)
            return first
        else:
            logits, past = model(Tensor(seq[:, cur - 1 : cur]), Tensor(mask[:, :cur]), past, True)
        return logits.asnumpy()[:, -1]

    return _fill(seq, mask, p, n, gen, eos_id, pad_id, rng, next_logits, lp)


def _step_graph(model, batch: int, length: int):
    """The compiled decode step of ``model`` for a (batch, length) cache, built once per model
    object and shape with its own StaticCache: graphs are cached by the jitted function, so a new
    closure per call would compile again every time. Parameters, the model's and the cache's, are
    read live (the transposed head copy of the eager path is not used: a tensor attribute would
    be frozen into the graph, and the graph's MatMul(transpose_b) costs no more). When the graph
    pool releases the graph, its cache goes with it."""
    per_model = graph_cache(model, "_decode_graphs")
    spans = getattr(model.model, "layer_graphs", None) is not None
    if (batch, length, spans) not in per_model:
        import mindspore as ms

        from .decoder import StaticCache

        body, cache = model.model, StaticCache(model.cfg, batch, length)

        def step(ids, key_mask, pos):
            return model.logits_from_hidden(body.decode_static(ids, key_mask, pos, cache)[:, 0])

        # with layer graphs (use_layer_graphs) the step runs eagerly, its layers as the shared
        # decode span graphs: one compiled span instead of the whole model's graph (SmolLM2, 64
        # rows: ~0.45 GB of compiled state and ~9 s of compile for the whole one); the
        # projection eager through MatMul(transpose_b) (a transposed copy: no faster at 64 rows)
        per_model[(batch, length, spans)] = (step if spans else ms.jit(step), cache)
    return per_model[(batch, length, spans)]


def _decode_static(model, seq, mask, p, n, gen, eos_id, pad_id, rng, lp=None) -> int:
    """As ``_decode`` with the fixed-size cache: the prompt runs once eagerly (:func:`prefill`),
    its keys and values go into columns 0..p-1, then every new token is one call of the compiled
    step."""
    first, presents = prefill(model, seq, mask, p)
    step, cache = _step_graph(model, *seq.shape)
    cache.fill(presents)
    graphs = graph_cache(model, "_decode_graphs")
    key = (id(model), *seq.shape)

    spans = getattr(model.model, "layer_graphs", None) is not None

    def next_logits(t):
        if t == 0:
            return first
        cur = p + t
        args = (Tensor(seq[:, cur - 1 : cur]), Tensor(mask), Tensor(np.array([cur - 1], np.int32)))
        if spans:  # eager, its spans compiled (_step_graph): nothing for the graph pool
            return step(*args).asnumpy()
        return POOL.call(
            "decode", key, step, *args, on_release=lambda: graphs.pop((*seq.shape, False), None)
        ).asnumpy()

    return _fill(seq, mask, p, n, gen, eos_id, pad_id, rng, next_logits, lp)
