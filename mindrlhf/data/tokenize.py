"""Turn text datasets into token datasets (Arrow) and token datasets into padded batches."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from .schema import DataError
from .tokenizer import Tokenizer

IDS = pa.list_(pa.int32())
MASK = pa.list_(pa.int8())


def _prompt_tokens(tok: Tokenizer, prompts: list[str], max_prompt_len: int) -> list[list[int]]:
    # keep the end of an over-long prompt: it is what the response continues
    return [ids[-max_prompt_len:] for ids in tok.encode_batch(prompts)]


def _chat(table: pa.Table) -> list[list[dict]] | None:
    """The rows' conversations when the table came from a chat source (a ``messages`` column)."""
    if "messages" not in table.column_names:
        return None
    return [json.loads(m) for m in table.column("messages").to_pylist()]


def _after(tok: Tokenizer, prompt: list[int], full: list[int], row: int) -> list[int]:
    """The answer's ids: what the rendered conversation adds after its rendered prompt."""
    if full[: len(prompt)] != prompt:
        raise DataError(
            f"row {row}: the chat template does not render the conversation as its prompt "
            "followed by the answer; the answer's tokens cannot be told apart"
        )
    return full[len(prompt) :]


def tokenize_sft(table: pa.Table, tok: Tokenizer, max_prompt_len: int, max_len: int) -> pa.Table:
    """prompt/response text -> input_ids, loss_mask (1 on response tokens and eos), prompt_len. A
    chat table's rows are rendered by the chat template: the prompt is every turn before the last
    with the assistant's header, the response the last turn as the template closes it."""
    chats = _chat(table)
    if chats is None:
        prompts = _prompt_tokens(tok, table.column("prompt").to_pylist(), max_prompt_len)
        responses = [
            r + [tok.eos_id] for r in tok.encode_batch(table.column("response").to_pylist())
        ]
    else:
        prompts, responses = [], []
        for i, msgs in enumerate(chats):
            p = tok.encode_chat(msgs[:-1], add_generation_prompt=True)
            responses.append(_after(tok, p, tok.encode_chat(msgs, add_generation_prompt=False), i))
            prompts.append(p[-max_prompt_len:])
    ids_col, mask_col, plen_col = [], [], []
    for p, r in zip(prompts, responses):
        room = max_len - len(p)
        r = r[:room]
        ids_col.append(p + r)
        mask_col.append([0] * len(p) + [1] * len(r))
        plen_col.append(len(p))
    return pa.table(
        {
            "input_ids": pa.array(ids_col, IDS),
            "loss_mask": pa.array(mask_col, MASK),
            "prompt_len": pa.array(plen_col, pa.int32()),
        }
    )


def _prompt_answers(
    table: pa.Table, tok: Tokenizer, max_prompt_len: int, columns: tuple[str, ...]
) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
    """(prompt ids, {column: answer ids}) of a table whose rows hold a prompt and one or more
    answers (pairs: chosen and rejected; unpaired: completion). A plain row's answer is its text
    and eos; a chat row's the assistant turn the template renders after the conversation."""
    chats = _chat(table)
    texts = {c: table.column(c).to_pylist() for c in columns}
    if chats is None:
        prompts = _prompt_tokens(tok, table.column("prompt").to_pylist(), max_prompt_len)
        return prompts, {
            c: [a + [tok.eos_id] for a in tok.encode_batch(t)] for c, t in texts.items()
        }
    prompts, answers = [], {c: [] for c in columns}
    for i, msgs in enumerate(chats):  # the conversation so far, then each answer as the assistant
        p = tok.encode_chat(msgs, add_generation_prompt=True)
        for c in columns:
            full = tok.encode_chat(
                msgs + [{"role": "assistant", "content": texts[c][i]}], add_generation_prompt=False
            )
            answers[c].append(_after(tok, p, full, i))
        prompts.append(p[-max_prompt_len:])
    return prompts, answers


def tokenize_pairs(table: pa.Table, tok: Tokenizer, max_prompt_len: int, max_len: int) -> pa.Table:
    """prompt/chosen/rejected text -> chosen_ids, rejected_ids (prompt + response + eos, cut at
    max_len) and prompt_len; the response part is what RM scores and DPO compares."""
    prompts, answers = _prompt_answers(table, tok, max_prompt_len, ("chosen", "rejected"))
    out = {
        f"{c}_ids": pa.array([(p + a)[:max_len] for p, a in zip(prompts, answers[c])], IDS)
        for c in ("chosen", "rejected")
    }
    out["prompt_len"] = pa.array([len(p) for p in prompts], pa.int32())
    if "margin" in table.column_names:
        out["margin"] = table.column("margin")
    return pa.table(out)


def tokenize_unpaired(
    table: pa.Table, tok: Tokenizer, max_prompt_len: int, max_len: int
) -> pa.Table:
    """prompt/completion/label text -> completion_ids (prompt + completion + eos, cut at
    max_len), prompt_len and desirable (1: label true, 0: false), KTO's examples."""
    prompts, answers = _prompt_answers(table, tok, max_prompt_len, ("completion",))
    return pa.table(
        {
            "completion_ids": pa.array(
                [(p + a)[:max_len] for p, a in zip(prompts, answers["completion"])], IDS
            ),
            "prompt_len": pa.array([len(p) for p in prompts], pa.int32()),
            "desirable": pa.array([int(b) for b in table.column("label").to_pylist()], pa.int8()),
        }
    )


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_length(n: int, multiple: int, cap: int | None = None) -> int:
    """The length a batch whose longest row has ``n`` tokens is padded to. ``multiple`` 1: ``n``.
    Otherwise the first rung at or above ``n`` of a ladder on the multiple that grows by about half
    each rung (8, 16, 24, 40, 64, 96, 144, 216, 328, ... for 8), held at ``cap`` when ``n`` fits it:
    a compiled step compiles once per length, and 9 rungs cover 8..320 tokens where multiples of 8
    would be 40 graphs, for at most half a batch of padding."""
    if multiple <= 1:
        return n
    b = multiple
    while b < n:
        b = round_up(-(-3 * b // 2), multiple)
    if cap is not None and b > cap >= n:
        b = cap
    return b


def longest_row(table: pa.Table, *columns: str) -> int:
    """The most tokens in any row of ``columns``: the cap of a stage's batch lengths."""
    import pyarrow.compute as pc

    return max(int(pc.max(pc.list_value_length(table.column(c))).as_py() or 0) for c in columns)


def pair_batch(
    table: pa.Table,
    idx: np.ndarray,
    pad_id: int,
    multiple: int = 1,
    cap: int | None = None,
    columns: tuple[str, str] = ("chosen_ids", "rejected_ids"),
) -> dict[str, np.ndarray]:
    """Chosen rows then rejected rows (or the two ``columns``, which share each row's
    prompt_len), right-padded to one :func:`bucket_length`: (2B, T)."""
    sub = table.take(pa.array(idx))
    rows = sub.column(columns[0]).to_pylist() + sub.column(columns[1]).to_pylist()
    plen = sub.column("prompt_len").to_numpy()
    t = bucket_length(max(len(r) for r in rows), multiple, cap)
    resp = np.zeros((len(rows), t), np.float32)
    for i, r in enumerate(rows):
        resp[i, plen[i % len(plen)] : len(r)] = 1.0
    return {
        "input_ids": right_pad(rows, pad_id, t),
        "attention_mask": right_pad([[1] * len(r) for r in rows], 0, t),
        "response_mask": resp,
    }


def tokenize_prompts(table: pa.Table, tok: Tokenizer, max_prompt_len: int) -> pa.Table:
    chats = _chat(table)
    if chats is None:
        prompts = _prompt_tokens(tok, table.column("prompt").to_pylist(), max_prompt_len)
    else:
        prompts = [tok.encode_chat(m, add_generation_prompt=True)[-max_prompt_len:] for m in chats]
    cols = {"prompt_ids": pa.array(prompts, IDS)}
    for extra in table.column_names:  # keep text and labels (answer, rating) next to the ids
        cols[extra] = table.column(extra)
    return pa.table(cols)


def right_pad(
    rows: list[list[int]], pad: int, length: int | None = None, dtype=np.int32
) -> np.ndarray:
    length = length or max(len(r) for r in rows)
    out = np.full((len(rows), length), pad, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:length]
    return out


def sft_batch(
    table: pa.Table, idx: np.ndarray, pad_id: int, multiple: int = 1, cap: int | None = None
) -> dict[str, np.ndarray]:
    sub = table.take(pa.array(idx))
    ids = sub.column("input_ids").to_pylist()
    lm = sub.column("loss_mask").to_pylist()
    t = bucket_length(max(len(r) for r in ids), multiple, cap)
    return {
        "input_ids": right_pad(ids, pad_id, t),
        "attention_mask": right_pad([[1] * len(r) for r in ids], 0, t),
        "loss_mask": right_pad(lm, 0, t, dtype=np.float32),
    }
