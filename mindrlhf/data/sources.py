"""Data from the user's files (``data.sources``) as validated text tables, beside the built-in
recipes (a recipe is one kind of source).

Formats, told by the path: ``.jsonl`` / ``.json`` (one object per line), ``.parquet``, ``.arrow``
/ ``.feather`` (Arrow IPC), ``.csv``, and a directory written by Hugging Face ``datasets``'
``save_to_disk`` (a Dataset, or a DatasetDict whose splits become train / held-out). ``fields``
maps our column names to the file's; ``format: chat`` reads a ``messages`` list per row (the
model's chat template renders it at tokenization). Rows are split train / held-out by a stable
hash of their prompt unless ``split_field`` names a column saying so. Every row is checked before
anything is written, and an error names the file, the row and the field.

Kinds and the columns they need (others are kept: a prompt file's ``answer`` reaches reward
functions by name):

    sft       prompt, response            | messages (chat: the last turn is the assistant's)
    pairs     prompt, chosen, rejected    | messages (chat: the conversation before the answers)
    prompts   prompt                      | messages (chat)
    unpaired  prompt, completion, label   | messages, completion, label (chat: as pairs)
              label: a boolean, true for a desirable completion, false for an undesirable one
              (KTO's data: ``dpo.loss: kto``)
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from .recipes import heldout_split
from .schema import DataError, check_row

NEEDED = {
    "sft": ("prompt", "response"),
    "pairs": ("prompt", "chosen", "rejected"),
    "prompts": ("prompt",),
    "unpaired": ("prompt", "completion", "label"),
}
TRAIN_SPLITS = {"train", "training"}
HELDOUT_SPLITS = {"heldout", "held_out", "test", "validation", "valid", "eval", "dev"}
ROLES = ("system", "user", "assistant", "tool")


def read_table(path: Path) -> tuple[pa.Table, str]:
    """The file (or datasets directory) as an Arrow table, and how rows are numbered in errors."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        return _read_hf_datasets(path), "row"
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            from .user_import import _rows_jsonl

            items = list(_rows_jsonl(path))
            if not items:
                raise DataError(f"{path}: no rows")
            try:
                return pa.Table.from_pylist([row for _, row in items]), "line"
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise DataError(
                    _mixed_types(path, items) or f"{path}: not a readable jsonl file ({e})"
                ) from None
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path), "row"
        if suffix in (".arrow", ".feather", ".ipc"):
            import pyarrow.feather as feather

            return feather.read_table(path), "row"
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path), "row"
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise DataError(f"{path}: not a readable {suffix[1:]} file ({e})") from None
    raise DataError(
        f"{path}: unknown format {suffix!r} (jsonl, parquet, arrow, csv, or a datasets directory)"
    )


def _mixed_types(path: Path, items) -> str | None:
    """The first JSONL line whose field has another type than on the first line that has it (a
    column holds one type: a label 1 among true / false), as an error naming line and field."""
    first: dict[str, tuple[str, str]] = {}
    for where, row in items:
        line = where.rsplit(" ", 1)[-1]
        for k, v in row.items():
            if v is None:
                continue
            t = "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else None
            t = t or type(v).__name__
            if k not in first:
                first[k] = (t, line)
            elif first[k][0] != t:
                return (
                    f"{path}: line {line}: field {k!r}: {v!r} is a {t} where line {first[k][1]} "
                    f"has a {first[k][0]} (one type per field)"
                )
    return None


def _read_hf_datasets(d: Path) -> pa.Table:
    """A ``save_to_disk`` directory: state.json lists Arrow stream files; a DatasetDict holds one
    such directory per split (its split becomes the ``split`` column)."""
    if (d / "dataset_dict.json").is_file():
        splits = json.loads((d / "dataset_dict.json").read_text()).get("splits", [])
        parts = []
        for s in splits:
            t = _read_hf_datasets(d / s)
            parts.append(t.append_column("split", pa.array([s] * t.num_rows, pa.string())))
        if not parts:
            raise DataError(f"{d}/dataset_dict.json: no splits")
        return pa.concat_tables(parts, promote_options="permissive")
    state = d / "state.json"
    if not state.is_file():
        raise DataError(
            f"{d}: a directory source must be a datasets save_to_disk directory (no state.json)"
        )
    files = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    tables = []
    for name in files:
        with pa.memory_map(str(d / name), "r") as src:
            tables.append(pa.ipc.open_stream(src).read_all())
    if not tables:
        raise DataError(f"{state}: lists no data files")
    return pa.concat_tables(tables)


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(
                f"{where}: field 'messages': not a list of messages (nor JSON of one)"
            ) from None
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: field 'messages': needs a non-empty list of {{role, content}} turns"
        )
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(
                f"{where}: field 'messages[{i}]': needs role in {ROLES} and text content"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def build_source(
    spec, index: int, heldout_fraction: float, max_chars: int = 20000
) -> dict[str, pa.Table]:
    """``{kind}_train`` / ``{kind}_heldout`` text tables from one file source (validated whole)."""
    path = Path(spec.path)
    table, unit = read_table(path)
    # a DatasetDict's own splits say which rows are held out
    split_field = spec.split_field or ("split" if (path / "dataset_dict.json").is_file() else "")
    fields = dict(spec.fields)
    missing = [theirs for theirs in fields.values() if theirs not in table.column_names]
    if missing:
        raise DataError(
            f"data.sources[{index}] ({path}): fields maps to column(s) {missing} the file does not "
            f"have; it has {table.column_names}"
        )
    if split_field and split_field not in table.column_names:
        raise DataError(
            f"data.sources[{index}] ({path}): split_field {split_field!r} is not a column; "
            f"it has {table.column_names}"
        )
    rename = {theirs: ours for ours, theirs in fields.items()}
    needed = NEEDED[spec.kind]
    if spec.format == "chat":  # the conversation replaces prompt (and sft's response)
        needed = ("messages", *(c for c in needed if c not in ("prompt", "response")))
    cols, splits = {}, []
    first = 1 if unit == "line" else 0
    for n, raw in enumerate(table.to_pylist()):
        where = f"{path}: {unit} {n + first}"
        row = {rename.get(k, k): v for k, v in raw.items()}
        for c in needed:
            if c not in row:
                raise DataError(
                    f"{where}: field {c!r}: missing (map it with data.sources[{index}].fields)"
                )
        if spec.format == "chat":
            msgs = _messages(row["messages"], where)
            if spec.kind == "sft" and msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: field 'messages': the last turn must be the assistant's")
            if spec.kind in ("pairs", "prompts", "unpaired") and msgs[-1]["role"] == "assistant":
                answers = {
                    "pairs": "are chosen / rejected",
                    "prompts": "are to be sampled",
                    "unpaired": "are in 'completion'",
                }[spec.kind]
                raise DataError(
                    f"{where}: field 'messages': ends with an assistant turn; the answers {answers}"
                )
            row["messages"] = json.dumps(msgs, ensure_ascii=False)
            prompt_turns = msgs[:-1] if spec.kind == "sft" else msgs
            row["prompt"] = "\n".join(m["content"] for m in prompt_turns)
            if spec.kind == "sft":
                row["response"] = msgs[-1]["content"]
        check_row(row, f"{spec.kind}_text", where, max_chars)
        if split_field:
            s = str(row.get(split_field, "")).lower()
            if s not in TRAIN_SPLITS | HELDOUT_SPLITS:
                raise DataError(
                    f"{where}: field {split_field!r}: {s!r} is neither a train split "
                    f"{sorted(TRAIN_SPLITS)} nor a held-out one {sorted(HELDOUT_SPLITS)}"
                )
            splits.append("train" if s in TRAIN_SPLITS else "heldout")
        else:
            splits.append(heldout_split(spec.name or path.stem, row["prompt"], heldout_fraction))
        for k, v in row.items():
            cols.setdefault(k, []).append(v)
    if not splits:
        raise DataError(f"{path}: no rows")
    keep = [c for c in cols if c not in (split_field, "split")]
    full = pa.table({c: cols[c] for c in keep})
    out = {}
    for split in ("train", "heldout"):
        idx = [i for i, s in enumerate(splits) if s == split]
        out[f"{spec.kind}_{split}"] = full.take(pa.array(idx, pa.int64()))
    if out[f"{spec.kind}_train"].num_rows == 0:
        raise DataError(f"{path}: every row is held out; nothing to train on")
    return out
