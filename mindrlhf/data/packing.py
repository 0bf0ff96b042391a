"""Sequence packing for SFT (``sft.packing``): several tokenized examples share one row.

A mixture of very different lengths (review sentences of ~25 tokens next to worked maths solutions
of ~300) padded to each batch's longest row spends most of its compute on padding. Packing puts
whole examples one after another into rows of at most ``capacity`` tokens; each token carries the
number of the example it belongs to (``segment_ids``: 1, 2, ... within a row, 0 for padding), and
the model (``CausalLM(..., segments=...)``) lets a token attend only to earlier tokens of its own
example and restarts positions at each example's first token. Each packed example's loss is then
its unpacked loss: nothing crosses from one example into the next (tests/test_packing.py).

The first token of an example is never a training target: the logits that would score it sit at
the previous example's last token. Its ``loss_mask`` is cleared (an SFT example starts with its
prompt, whose mask is 0 already)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .tokenize import IDS, MASK, bucket_length, right_pad


def pack_groups(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into packs of at most ``capacity`` tokens: first fit over the rows
    taken longest first (ties in row order), so the result depends on the lengths alone. A row
    longer than ``capacity`` is an error (the tokenizer caps rows at data.max_len)."""
    if capacity <= 0:
        raise ValueError(f"packing capacity must be positive, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"row {i} has {n} tokens, more than the packing capacity {capacity}")
        for k, r in enumerate(room):
            if n <= r:
                packs[k].append(i)
                room[k] -= n
                break
        else:
            packs.append([i])
            room.append(capacity - n)
    return [sorted(p) for p in packs]


def pack_sft_table(table: pa.Table, capacity: int) -> pa.Table:
    """An SFT token table (input_ids, loss_mask, prompt_len) as packed rows: input_ids, loss_mask
    (each example's first token cleared), segment_ids (1.. per example) and examples (the source
    row numbers, in order)."""
    ids = table.column("input_ids").to_pylist()
    lm = table.column("loss_mask").to_pylist()
    out: dict[str, list] = {"input_ids": [], "loss_mask": [], "segment_ids": [], "examples": []}
    for group in pack_groups([len(r) for r in ids], capacity):
        row_ids, row_lm, row_seg = [], [], []
        for s, i in enumerate(group, 1):
            row_ids += ids[i]
            row_lm += [0] + list(lm[i][1:])
            row_seg += [s] * len(ids[i])
        out["input_ids"].append(row_ids)
        out["loss_mask"].append(row_lm)
        out["segment_ids"].append(row_seg)
        out["examples"].append(group)
    return pa.table(
        {
            "input_ids": pa.array(out["input_ids"], IDS),
            "loss_mask": pa.array(out["loss_mask"], MASK),
            "segment_ids": pa.array(out["segment_ids"], IDS),
            "examples": pa.array(out["examples"], pa.list_(pa.int64())),
        }
    )


def packed_batch(
    table: pa.Table, idx: np.ndarray, pad_id: int, multiple: int = 1, cap: int | None = None
) -> dict[str, np.ndarray]:
    """Packed rows right-padded to one bucket length: input_ids, segment_ids (0 on padding; the
    model's attention mask and example boundaries at once) and loss_mask."""
    sub = table.take(pa.array(idx))
    ids = sub.column("input_ids").to_pylist()
    t = bucket_length(max(len(r) for r in ids), multiple, cap)
    return {
        "input_ids": right_pad(ids, pad_id, t),
        "segment_ids": right_pad(sub.column("segment_ids").to_pylist(), 0, t),
        "loss_mask": right_pad(sub.column("loss_mask").to_pylist(), 0, t, dtype=np.float32),
    }


def balance_rows(lengths, rows: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Sequences of ``lengths`` laid out in ``rows`` rows as evenly as can be (longest first, each
    into the emptiest row, ties to the lower row): (row of each sequence, its first column, the
    fullest row's length). Depends on the lengths alone."""
    lengths = np.asarray(lengths, np.int64)
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    fill = np.zeros(rows, np.int64)
    row, start = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = int(np.argmin(fill))
        row[i], start[i] = r, fill[r]
        fill[r] += lengths[i]
    return row, start, int(fill.max()) if len(lengths) else 0
