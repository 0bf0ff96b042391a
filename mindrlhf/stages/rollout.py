"""Rollout helpers shared by PPO, GRPO and online DPO: sample responses with the KV cache and
score them token by token with the policy, the reference and the critic."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa

from ..algos.common import token_logprobs
from ..config import GenerationConfig
from ..data.store import atomic_write_bytes
from ..data.tokenize import bucket_length
from ..graphs import POOL
from ..models.decoder import graph_cache
from ..models.generation import Generation, generate, left_pad
from .common import all_max

F32 = pa.list_(pa.float32())
I32 = pa.list_(pa.int32())
I8 = pa.list_(pa.int8())


def rollout_config(
    gen_cfg, temperature: float = 1.0, max_new_tokens: int | None = None
) -> GenerationConfig:
    """Sampling for RL: the policy's own distribution at ``temperature``, no top-k/top-p
    truncation, so the log-probs the losses use are those of the tokens' true sampling law."""
    return dataclasses.replace(
        gen_cfg,
        max_new_tokens=max_new_tokens or gen_cfg.max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
    )


def greedy_config(gen_cfg, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding for evaluation, by the configured engine and compile setting."""
    return dataclasses.replace(
        gen_cfg, max_new_tokens=max_new_tokens, do_sample=False, temperature=1.0, top_k=0, top_p=1.0
    )


PROMPT_BUCKET = (
    8  # compiled decoding: prompt lengths padded to a rung of bucket_length's ladder on 8
)


def prompt_block(prompt_rows: list[list[int]], gen_cfg, model_cfg) -> int:
    """The prompt width of a batch: its longest prompt, padded (with compiled decoding) to a
    :func:`bucket_length` rung on PROMPT_BUCKET, so a stage meets a few decode graphs, not one per
    prompt length. Data-parallel ranks compute it over the whole batch, so they agree."""
    longest = max(len(r) for r in prompt_rows)
    if not gen_cfg.compiled:
        return longest
    return max(
        longest,
        bucket_length(longest, PROMPT_BUCKET, model_cfg.max_seq_len - gen_cfg.max_new_tokens),
    )


def pad_responses(g: Generation, width: int, pad_id: int) -> Generation:
    """The response block right-padded (pad tokens, masks 0) to ``width`` columns."""
    extra = width - g.responses.shape[1]
    if extra <= 0:
        return g
    return Generation(
        np.pad(g.sequences, ((0, 0), (0, extra)), constant_values=pad_id),
        np.pad(g.attention_mask, ((0, 0), (0, extra))),
        np.pad(g.response_mask, ((0, 0), (0, extra))),
        g.prompt_len,
        None if g.logprobs is None else np.pad(g.logprobs, ((0, 0), (0, extra))),
    )


def sample(
    policy,
    prompt_rows: list[list[int]],
    gen_cfg,
    tok,
    seed: int,
    multiple: int = 1,
    row_ids=None,
    batch_prompts: list[list[int]] | None = None,
    dist=None,
    logprobs: bool = False,
) -> Generation:
    """Sample responses for left-padded prompts (see :func:`prompt_block`). ``multiple`` > 1 pads
    the response block to a rung on it, for the compiled training step that consumes the rollout.

    Data parallel: this rank's rows of a batch, ``row_ids`` their places in it (they key the random
    streams, so a row samples the same tokens on any rank), ``batch_prompts`` the whole batch's
    prompts and ``dist`` the ranks, which agree on the prompt and response widths. ``logprobs``:
    record the sampled tokens' log-probs (Generation.logprobs)."""
    length = prompt_block(batch_prompts or prompt_rows, gen_cfg, policy.cfg)
    ids, mask = left_pad(prompt_rows, tok.pad_id, length)
    g = generate(
        policy,
        ids,
        mask,
        gen_cfg,
        tok.eos_id,
        tok.pad_id,
        seed=seed,
        use_cache=True,
        row_ids=row_ids,
        logprobs=logprobs,
    )
    steps = g.responses.shape[1] if dist is None else all_max(g.responses.shape[1], dist)
    return pad_responses(g, bucket_length(steps, multiple, gen_cfg.max_new_tokens), tok.pad_id)


def response_logprobs(model, seq, mask, prompt_len: int, temperature: float = 1.0, **kw):
    """Log-probs of the response tokens seq[:, P:] under ``model`` (Tensors in, (B, N) Tensor
    out); ``kw``: CausalLM.response_logits' (share_prompts)."""
    logits = model.response_logits(seq, mask, prompt_len, **kw)
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits, seq[:, prompt_len:])


def response_values(critic, seq, mask, prompt_len: int):
    """Critic value of the state before each response token: positions P-1 .. P+N-2."""
    return critic(seq, mask)[:, prompt_len - 1 : -1]


def score_rollout(
    fn,
    model,
    seq: np.ndarray,
    mask: np.ndarray,
    prompt_len: int,
    compiled: bool,
    share_prompts: bool = False,
) -> np.ndarray:
    """``fn(model, seq, mask, prompt_len)`` (response_logprobs / response_values) on a rollout,
    without gradients, as NumPy. ``compiled``: one mindspore.jit graph per (fn, prompt length)
    and batch shape, kept on the model; rollout shapes are bucketed, so a stage meets few.
    ``share_prompts`` (response_logprobs, eager): rows with the same prompt run it once
    (CausalLM.response_logits), as GRPO's eager training step does; a graph runs every row
    whole."""
    from mindspore import Tensor

    if not compiled:
        kw = {"share_prompts": True} if share_prompts else {}
        return fn(model, Tensor(seq), Tensor(mask), prompt_len, **kw).asnumpy()
    graphs = graph_cache(model, "_score_graphs")
    key = (fn.__name__, prompt_len)
    if key not in graphs:
        import mindspore as ms

        def forward(s, m):
            return fn(model, s, m, prompt_len)

        graphs[key] = ms.jit(forward)
    return POOL.call(
        "score", (id(model), *key, seq.shape), graphs[key], Tensor(seq), Tensor(mask)
    ).asnumpy()


def score_mask(g: Generation, eos_id: int) -> np.ndarray:
    """Attention mask for reward scoring: eos and padding excluded, the last content token read."""
    m = g.attention_mask.copy()
    m[:, g.prompt_len :][g.responses == eos_id] = 0
    return m


def decode_responses(g: Generation, tok) -> list[str]:
    return [tok.decode(r[m > 0]) for r, m in zip(g.responses, g.response_mask)]


def experience_table(g: Generation, cols: dict[str, np.ndarray]) -> pa.Table:
    """One row per sample: the full sequence and masks plus per-token (B, N) and per-sample (B,)
    arrays, so a rollout can be inspected or replayed without sampling again."""
    out = {
        "sequence": pa.array(g.sequences.tolist(), I32),
        "attention_mask": pa.array(g.attention_mask.astype(np.int8).tolist(), I8),
        "response_mask": pa.array(g.response_mask.astype(np.int8).tolist(), I8),
        "prompt_len": pa.array([g.prompt_len] * len(g.sequences), pa.int32()),
    }
    for k, v in cols.items():
        v = np.asarray(v)
        out[k] = (
            pa.array(v.astype(np.float32).tolist(), F32)
            if v.ndim == 2
            else pa.array(v.astype(np.float32))
        )
    return pa.table(out)


def table_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Inverse of :func:`experience_table` (rows of one rollout share their lengths)."""
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_list(col.type):
            out[name] = np.array(
                col.to_pylist(),
                dtype=np.int32
                if name == "sequence"
                else (np.int32 if col.type.value_type == pa.int8() else np.float32),
            )
        else:
            out[name] = col.to_numpy()
    return out


class RolloutLog:
    """Which rollout dataset each iteration used, kept in the run directory (atomically) the
    moment a rollout is written, so a crashed update resumes from the same rollout instead of
    sampling again. Every data-parallel rank holds the whole rollout; rank 0 writes it to the
    store and the log, and a resumed rank reads it back from there."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.path = ctx.run_dir / "experience.json"
        self.ids: dict[str, str] = json.loads(self.path.read_text()) if self.path.exists() else {}
        # every rank has read the log before rank 0 can add to it: they agree on what exists
        if all_max(len(self.ids), ctx.dist) != len(self.ids):
            raise RuntimeError(f"ranks disagree on the rollouts recorded in {self.path}")

    def get_or_make(self, it: int, make) -> tuple[str | None, dict[str, np.ndarray]]:
        """``make() -> (table, write_dataset kwargs)`` runs only when iteration ``it`` has no
        rollout."""
        if str(it) in self.ids:
            exp_id = self.ids[str(it)]
            self.ctx.log(f"iteration {it}: reusing rollout {exp_id[:12]}")
            return exp_id, table_arrays(self.ctx.store.read_dataset(exp_id))
        table, kwargs = make()
        exp_id = None
        if self.ctx.dist.is_main:
            exp_id = self.ctx.store.write_dataset(table, **kwargs).id
            self.ids[str(it)] = exp_id
            atomic_write_bytes(self.path, json.dumps(self.ids).encode())
        return exp_id, table_arrays(table)
