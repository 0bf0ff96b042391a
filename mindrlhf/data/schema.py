"""Row-level validation of Arrow tables: every error names the source, the row and the field."""

from __future__ import annotations

import math

import pyarrow as pa


class DataError(ValueError):
    """A dataset row is malformed. The message names the file (or artifact), row and field."""


# column kinds: "text" (non-empty str), "number" (finite float), "int", "bool" (true / false),
# "ids" (non-empty list of ints)
SCHEMAS: dict[str, dict[str, str]] = {
    "sft_text": {"prompt": "text", "response": "text"},
    "pairs_text": {"prompt": "text", "chosen": "text", "rejected": "text"},
    "prompts_text": {"prompt": "text"},
    "unpaired_text": {"prompt": "text", "completion": "text", "label": "bool"},
    "sft_tokens": {"input_ids": "ids", "loss_mask": "ids", "prompt_len": "int"},
    "prompt_tokens": {"prompt_ids": "ids"},
}


def check_row(row: dict, schema: str | dict[str, str], where: str, max_chars: int = 20000) -> None:
    """One row; ``where`` names its file and row in the error."""
    spec = SCHEMAS[schema] if isinstance(schema, str) else schema
    for col, kind in spec.items():
        if col not in row:
            raise DataError(f"{where}: field {col!r}: missing")
        err = _check(row[col], kind, max_chars)
        if err:
            raise DataError(f"{where}: field {col!r}: {err}")
    if "chosen" in spec and "rejected" in spec and row["chosen"].strip() == row["rejected"].strip():
        raise DataError(f"{where}: field 'rejected': identical to 'chosen'")


def validate_table(
    table: pa.Table, schema: str | dict[str, str], source: str, max_chars: int = 20000
) -> None:
    spec = SCHEMAS[schema] if isinstance(schema, str) else schema
    missing = [c for c in spec if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; has {table.column_names}")
    if table.num_rows == 0:
        raise DataError(f"{source}: no rows")
    for i, row in enumerate(table.select(list(spec)).to_pylist()):
        check_row(row, spec, f"{source}: row {i}", max_chars)


def _check(v, kind: str, max_chars: int) -> str | None:
    if v is None:
        return "is null"
    if kind == "text":
        if not isinstance(v, str):
            return f"must be text, got {type(v).__name__}"
        if not v.strip():
            return "is empty"
        if len(v) > max_chars:
            return f"is {len(v)} characters, over the limit of {max_chars}"
        if "\ufffd" in v:
            return "contains invalid UTF-8 (replacement character)"
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to text UTF-8 cannot hold
            return (
                f"contains a lone surrogate {v[e.start]!r} at character {e.start} "
                "(not encodable as UTF-8)"
            )
    elif kind == "number":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {v!r}"
        if not math.isfinite(v):
            return f"must be finite, got {v!r}"
    elif kind == "bool":
        if not isinstance(v, bool):
            return f"must be a boolean (true: desirable, false: undesirable), got {v!r}"
    elif kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
    elif kind == "ids":
        if not isinstance(v, list) or not v:
            return "must be a non-empty list of token ids"
    return None
