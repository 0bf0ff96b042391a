"""Malformed configs and datasets are rejected before any training, with the file, the row or
key and the reason named, and nothing is written to the store."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mindrlhf.data.recipes import load_recipe
from mindrlhf.data.schema import DataError
from mindrlhf.data.store import ArtifactStore
from mindrlhf.data.user_import import import_file


def jsonl(tmp_path, rows, name="data.jsonl"):
    p = tmp_path / name
    p.write_bytes(
        b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
    )
    return p


GOOD = {"prompt": "Review:", "chosen": " Great film.", "rejected": " Dull film."}

BAD_ROWS = [  # (row, kind, expected words in the message)
    ({"prompt": "p"}, "sft", ["row 2", "response", "missing"]),
    ({"prompt": "p", "response": ""}, "sft", ["row 2", "response", "empty"]),
    ({"prompt": "p", "response": "   "}, "sft", ["row 2", "response", "empty"]),
    ({"prompt": "p", "response": "x" * 20001}, "sft", ["row 2", "response", "20001 characters"]),
    ({"prompt": "p", "response": 5}, "sft", ["row 2", "response", "must be text"]),
    ({"prompt": None, "response": "r"}, "sft", ["row 2", "prompt", "null"]),
    ({"prompt": "p", "response": "bad \ufffd char"}, "sft", ["row 2", "response", "UTF-8"]),
    (b'{"prompt": "p", "response": "\xff\xfe"}', "sft", ["row 2", "UTF-8"]),
    (b'{"prompt": "p", "response": ', "sft", ["row 2", "JSON"]),
    (b'["a", "b"]', "sft", ["row 2", "JSON object"]),
    ({"messages": [{"role": "user", "content": "hi"}]}, "sft", ["row 2", "messages"]),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
        "sft",
        ["row 2", "messages[1]", "role"],
    ),
    (
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        "sft",
        ["row 2", "last turn"],
    ),
    ({**GOOD, "rejected": " Great film. "}, "pairs", ["row 2", "rejected", "identical"]),
    ({"prompt": "p", "chosen": "c"}, "pairs", ["row 2", "rejected", "missing"]),
]


@pytest.mark.parametrize(
    "row, kind, words", BAD_ROWS, ids=[f"case{i}" for i in range(len(BAD_ROWS))]
)
def test_bad_jsonl_rows_are_named_and_nothing_is_written(tmp_path, store, row, kind, words):
    first = {"prompt": "p", "response": "fine"} if kind == "sft" else GOOD
    path = jsonl(tmp_path, [first, row, first])
    with pytest.raises(DataError) as e:
        import_file(path, kind, store)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg
    assert not list(store.objects.iterdir()) and not list(store.tmp.iterdir())


def test_good_jsonl_and_chat_and_parquet_import(tmp_path, store):
    path = jsonl(
        tmp_path,
        [
            {"prompt": "p", "response": "r"},
            {
                "messages": [
                    {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                ]
            },
        ],
    )
    art = import_file(path, "sft", store)
    t = store.read_dataset(art.id)
    assert t.num_rows == 2 and t.column("response").to_pylist() == ["r", "Hello!"]
    assert t.column("prompt")[1].as_py() == "<|system|>\nBe kind.\n<|user|>\nHi\n<|assistant|>\n"
    pq.write_table(pa.table({k: [v] for k, v in GOOD.items()}), tmp_path / "pairs.parquet")
    assert (
        store.read_dataset(import_file(tmp_path / "pairs.parquet", "pairs", store).id).num_rows == 1
    )


def test_bad_parquet(tmp_path, store):
    pq.write_table(
        pa.table({"prompt": ["a", "b"], "response": ["ok", None]}), tmp_path / "x.parquet"
    )
    with pytest.raises(DataError, match=r"x.parquet: row 1: field 'response': is null"):
        import_file(tmp_path / "x.parquet", "sft", store)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet"):
        import_file(tmp_path / "junk.parquet", "sft", store)
    with pytest.raises(DataError, match="not found"):
        import_file(tmp_path / "missing.jsonl", "sft", store)
    assert not list(store.objects.iterdir())


@pytest.mark.parametrize(
    "line, words",
    [
        (b"7\tnan\tA sentence.", ["row 2", "rating"]),
        (b"7\tgood\tA sentence.", ["row 2", "rating", "not a number"]),
        (b"7\t9.5\tA sentence.", ["row 2", "rating", "outside"]),
        (b"7\t1.0", ["row 2", "3 tab-separated"]),
        (b"7\t1.0\t   ", ["row 2", "text", "empty"]),
        (b"7\t1.0\t\xff bad", ["not UTF-8"]),
    ],
)
def test_movie_review_source_rows(line, words):
    parse = load_recipe("movie_reviews").parse
    with pytest.raises(DataError) as e:
        parse(b"1\t2.0\tFine sentence here.\n" + line + b"\n", "reviews.txt")
    for w in words:
        assert w in str(e.value)


text = st.one_of(
    st.none(), st.integers(), st.text(max_size=40), st.text(min_size=1, max_size=5).map(str.strip)
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.fixed_dictionaries({"prompt": text, "chosen": text, "rejected": text}),
        min_size=1,
        max_size=6,
    )
)
def test_property_import_accepts_exactly_the_valid_rows(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("prop")
    store = ArtifactStore(tmp / "store")
    path = jsonl(tmp, rows)

    def ok(v):
        return isinstance(v, str) and v.strip() != "" and "\ufffd" not in v

    valid = all(
        ok(r["prompt"])
        and ok(r["chosen"])
        and ok(r["rejected"])
        and r["chosen"].strip() != r["rejected"].strip()
        for r in rows
    )
    if valid:
        t = store.read_dataset(import_file(path, "pairs", store).id)
        assert t.column("chosen").to_pylist() == [r["chosen"] for r in rows]
    else:
        with pytest.raises(DataError) as e:
            import_file(path, "pairs", store)
        bad = next(
            i
            for i, r in enumerate(rows)
            if not (
                ok(r["prompt"])
                and ok(r["chosen"])
                and ok(r["rejected"])
                and r["chosen"].strip() != r["rejected"].strip()
            )
        )
        assert f"row {bad + 1}:" in str(e.value)  # the first bad row, by its line number
        assert not list(store.objects.iterdir())
