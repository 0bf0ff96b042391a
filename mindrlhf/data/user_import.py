"""Import user data from JSONL or Parquet into a versioned Arrow dataset.

Accepted rows (one kind per file):
  sft    {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}
  pairs  {"prompt": str, "chosen": str, "rejected": str}
Chat messages are rendered with a plain template (``<|role|>\\ncontent\\n`` per turn, the last
assistant turn being the response). Every row is checked before anything is written: the first
bad row raises :class:`DataError` naming the file, the row (1-based line for JSONL, 0-based index
for Parquet) and the field.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa

from .schema import SCHEMAS, DataError, check_row
from .store import ArtifactStore, check_name

KINDS = {"sft": "sft_text", "pairs": "pairs_text"}
ROLES = ("system", "user", "assistant")


def render_chat(messages, where: str) -> tuple[str, str]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: field 'messages': needs at least a user and an assistant turn")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(
                f"{where}: field 'messages[{i}]': needs role in {ROLES} and text content"
            )
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages': the last turn must be the assistant's")
    prompt = (
        "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages[:-1]) + "<|assistant|>\n"
    )
    return prompt, messages[-1]["content"]


MAX_LINE_BYTES = 1 << 20  # a JSONL row longer than this is refused after reading this much


def _rows_jsonl(path: Path):
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)  # bounded: a huge single line is never held whole
            if not raw:
                break
            n += 1
            where = f"{path}: row {n}"
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(
                    f"{where}: longer than {MAX_LINE_BYTES} bytes (one JSON object per line "
                    "expected)"
                )
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 at byte {e.start}") from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _rows_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", row


def read_rows(path: str | Path, kind: str, max_chars: int = 20000) -> pa.Table:
    """Parse and check every row (errors name file, row and field); returns the text table."""
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: not readable (permission denied)")
    reader = _rows_parquet if path.suffix == ".parquet" else _rows_jsonl
    cols = list(SCHEMAS[KINDS[kind]])
    out = {c: [] for c in cols}
    for where, row in reader(path):
        if kind == "sft" and "messages" in row:
            row = dict(zip(("prompt", "response"), render_chat(row["messages"], where)))
        check_row(row, KINDS[kind], where, max_chars)
        for c in cols:
            out[c].append(row[c])
    if not out[cols[0]]:
        raise DataError(f"{path}: no rows")
    return pa.table({c: pa.array(v, pa.string()) for c, v in out.items()})


def import_file(
    path: str | Path,
    kind: str,
    store: ArtifactStore,
    name: str | None = None,
    max_chars: int = 20000,
):
    """Validate every row, then write one dataset artifact; nothing is written on any error."""
    if name is not None:
        check_name(name)  # before reading a row: a bad name fails first, and nothing is written
    else:  # derived from the file name: made valid rather than refused
        name = "user-" + re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem)[:180] + f"-{kind}"
    table = read_rows(path, kind, max_chars)
    return store.write_dataset(table, name=name, meta={"source": str(path), "kind": kind})
