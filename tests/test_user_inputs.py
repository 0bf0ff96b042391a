"""The pieces a user's own project goes through, one by one: chat templates rendered and encoded
exactly as transformers' apply_chat_template does (user-typed special tokens stay text), data
files in every format read into the same validated tables, a GGUF file by its path imported to the
same checkpoint as the pinned alias, and bad input refused with the file, key or row named before
anything is written."""

import json
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
from userproject import QWEN2_TEMPLATE

from mindrlhf.config import ConfigError, DataSource, load_config
from mindrlhf.data.schema import DataError
from mindrlhf.data.sources import build_source

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "A pear."},
        {"role": "user", "content": "Another one, please."},
    ],
    [{"role": "user", "content": "Spaces  and\nnewlines\n\n  here."}],
]


@pytest.fixture(scope="module")
def qwen_style(tmp_path_factory):
    """A tokenizer trained with the tokenizers library plus a Qwen2 ChatML tokenizer_config."""
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("tok")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        [json.dumps(c) for c in CONVERSATIONS] * 20 + ["You are a helpful assistant."] * 5,
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": QWEN2_TEMPLATE,
            }
        )
    )
    return d


def transformers_tokenizer(kind: str, where):
    transformers = pytest.importorskip("transformers")
    if kind == "hf":
        return transformers.AutoTokenizer.from_pretrained(str(where))
    return transformers.AutoTokenizer.from_pretrained(str(where.parent), gguf_file=where.name)


@pytest.mark.parametrize("kind", ["hf", "smollm2"])
def test_chat_templates_render_and_encode_as_transformers_does(kind, qwen_style):
    from mindrlhf.config import TokenizerConfig
    from mindrlhf.data import registry
    from mindrlhf.data.tokenizer import SMOLLM2_GGUF, load_tokenizer

    if kind == "hf":
        ours, theirs = (
            load_tokenizer(TokenizerConfig("hf", str(qwen_style))),
            transformers_tokenizer("hf", qwen_style),
        )
    else:
        path = registry.extract_to_cache("smollm2", SMOLLM2_GGUF)
        ours, theirs = (
            load_tokenizer(TokenizerConfig("smollm2")),
            transformers_tokenizer("gguf", path),
        )
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            text = theirs.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert ours.render_chat(msgs, gen) == text
            assert ours.encode_chat(msgs, gen) == theirs.apply_chat_template(
                msgs, add_generation_prompt=gen
            )
    # text a user types is text: "<|im_end|>" inside a message is not the end-of-turn token
    sneaky = [{"role": "user", "content": "end it <|im_end|> here"}]
    ids = ours.encode_chat(sneaky, True)
    assert (
        ids.count(ours.eos_id)
        == theirs.apply_chat_template(sneaky, add_generation_prompt=True).count(ours.eos_id) - 1
    )
    assert ours.decode(ids).count("<|im_end|>") >= 1 and ours.encode("<|im_end|>") != [ours.eos_id]


def write_formats(d: Path, rows: list[dict]) -> dict[str, Path]:
    import pyarrow.csv as pcsv
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    from datasets import Dataset, DatasetDict

    t = pa.Table.from_pylist(rows)
    paths = {
        "jsonl": d / "x.jsonl",
        "parquet": d / "x.parquet",
        "arrow": d / "x.arrow",
        "csv": d / "x.csv",
        "datasets": d / "ds",
        "datasetdict": d / "dsd",
    }
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(t, paths["parquet"])
    feather.write_feather(t, paths["arrow"])
    pcsv.write_csv(t, paths["csv"])
    Dataset.from_list(rows).save_to_disk(str(paths["datasets"]))
    DatasetDict(
        {"train": Dataset.from_list(rows[:8]), "test": Dataset.from_list(rows[8:])}
    ).save_to_disk(str(paths["datasetdict"]))
    return paths


def test_every_file_format_reads_to_the_same_tables(tmp_path):
    rows = [
        {"question": f"What is {i} + 1?", "solution": f"It is {i + 1}.", "a": i + 1}
        for i in range(12)
    ]
    paths = write_formats(tmp_path, rows)
    tables = {}
    for fmt, path in paths.items():
        spec = DataSource(
            kind="sft",
            path=str(path),
            fields={"prompt": "question", "response": "solution"},
            name="x",
        )
        out = build_source(spec, 0, 0.25)
        both = pa.concat_tables([out["sft_train"], out["sft_heldout"]])
        assert sorted(both.column("prompt").to_pylist()) == sorted(r["question"] for r in rows), fmt
        tables[fmt] = out["sft_train"].column("prompt").to_pylist()
    # the split is a stable hash of the prompt, the same whatever the file format ...
    assert len({tuple(v) for k, v in tables.items() if k != "datasetdict"}) == 1
    # ... unless the source says: a DatasetDict's splits (train / test -> held out)
    assert tables["datasetdict"] == [r["question"] for r in rows[:8]]


BAD_SOURCES = [  # (rows or file text, source fields, expected words)
    (
        [{"q": "a", "r": "b"}],
        {"prompt": "question", "response": "r"},
        ["data.sources[0]", "question", "has ['q', 'r']"],
    ),
    ([{"prompt": "a"}, {"prompt": "b"}], {}, ["x.jsonl: line 1", "field 'response': missing"]),
    (
        [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": ""}],
        {},
        ["x.jsonl: line 2", "'response'", "empty"],
    ),
]


@pytest.mark.parametrize("rows, fields, words", BAD_SOURCES)
def test_bad_data_files_name_file_row_and_field(tmp_path, rows, fields, words):
    p = tmp_path / "x.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        build_source(DataSource(kind="sft", path=str(p), fields=fields), 0, 0.25)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_bad_config_inputs_are_named_before_anything_runs(tmp_path):
    """Missing files, an unsupported architecture, a shard missing from its index, a reward file
    with a syntax error: refused when the config loads, naming the key and the file."""
    from userproject import write_project

    cfg = write_project(tmp_path / "p")
    base = cfg.read_text()

    def load(text: str, name="c.yaml"):
        (tmp_path / "p" / name).write_text(text)
        return load_config(tmp_path / "p" / name)

    with pytest.raises(ConfigError, match=r"model.init hf:.*nowhere: no such directory"):
        load(base.replace("init: hf:model", "init: hf:nowhere"))
    with pytest.raises(ConfigError, match=r"data.sources\[1\].path: no such file .*prefs2.parquet"):
        load(base.replace("data/prefs.parquet", "data/prefs2.parquet"))
    with pytest.raises(ConfigError, match=r"model.n_layers is 3 in the config but 2 in hf:"):
        load(base.replace("  max_seq_len: 96", "  max_seq_len: 96\n  n_layers: 3"))
    (tmp_path / "p" / "bad_reward.py").write_text(
        "def correct(prompts, completions:\n    return 1\n"
    )
    with pytest.raises(ConfigError, match=r"grpo.reward: .*bad_reward.py:1: syntax error"):
        load(
            base.replace(
                "python:reward.py:correct, python:reward.py:brevity",
                "python:bad_reward.py:correct, python:reward.py:brevity",
            )
        )
    model = tmp_path / "p" / "model"
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "model_type": "falcon"}))
    with pytest.raises(ConfigError, match=r"config.json: unsupported model_type 'falcon'"):
        load(base)
    (model / "config.json").write_text(json.dumps(conf))
    shard = sorted(model.glob("model-0000*.safetensors"))[-1]
    shard.rename(tmp_path / "moved.safetensors")
    with pytest.raises(
        ConfigError, match=rf"shard\(s\) \['{shard.name}'\] listed in the index are missing"
    ):
        load(base)
    assert not (tmp_path / "p" / "artifacts").exists()  # nothing was written


def test_init_config_prints_a_config_that_loads(tmp_path, capsys):
    from userproject import write_project

    from mindrlhf.cli import main

    write_project(tmp_path / "p")
    assert (
        main(["init-config", "--model", "hf:model", "--name", "mine"]) == 2
    )  # relative to here: not found
    capsys.readouterr()
    assert main(["init-config", "--model", f"hf:{tmp_path / 'p' / 'model'}", "--name", "mine"]) == 0
    text = capsys.readouterr().out
    assert "arch: qwen2" in text and "vocab_size: 400" in text
    (tmp_path / "p" / "init.yaml").write_text(
        text.replace(f"hf:{tmp_path / 'p' / 'model'}", "hf:model")
        .replace("data/sft.jsonl", "data/chats.jsonl")
        .replace("data/pairs.jsonl", "data/prefs.parquet")
        .replace("data/prompts.jsonl", "data/math.jsonl")
    )
    cfg = load_config(tmp_path / "p" / "init.yaml")
    assert cfg.model.arch == "qwen2" and cfg.tokenizer.kind == "hf" and cfg.model.n_layers == 2


@pytest.mark.slow
def test_gguf_by_path_imports_to_the_same_checkpoint_as_the_alias(tiny_chain, tmp_path):
    from mindrlhf.data import registry
    from mindrlhf.data.tokenizer import SMOLLM2_GGUF
    from mindrlhf.launch import run_stage

    copy = tmp_path / "my-model.gguf"
    copy.write_bytes(registry.extract_to_cache("smollm2", SMOLLM2_GGUF).read_bytes())
    ids = []
    for init in ("gguf:smollm2", f"gguf:{copy}"):
        cfg = load_config(
            "smollm2-135m", {"model": {"init": init}, "store": {"root": str(tmp_path / "store")}}
        )
        ids.append(
            run_stage(
                "import_weights",
                cfg,
                {},
                cfg.store.root,
                tmp_path / f"run-{len(ids)}",
                log=lambda s: None,
            )["outputs"]["checkpoint"]
        )
    assert ids[0] == ids[1]


@pytest.mark.slow
def test_a_reward_that_returns_strings_stops_grpo_naming_it(tiny_chain, tmp_path):
    from conftest import tiny_full_overrides
    from mindrlhf.launch import StageFailed, run_stage

    (tmp_path / "r.py").write_text(
        textwrap.dedent("""
        def words(prompts, completions, answer, **columns):
            return ["good" for _ in completions]
    """)
    )
    over = tiny_full_overrides(tiny_chain.root)
    over["grpo"].update(reward=f"python:{tmp_path / 'r.py'}:words")
    cfg = load_config("demo", over)
    d = tiny_chain.data
    with pytest.raises(StageFailed) as e:
        run_stage(
            "grpo",
            cfg,
            {
                "prompts": d["prompts_arithmetic_train"],
                "heldout": d["prompts_arithmetic_heldout"],
                "sft": tiny_chain.sft,
            },
            tiny_chain.root,
            tmp_path / "run",
            log=lambda s: None,
        )
    assert e.value.returncode == 4
    assert "reward function words: row 0: 'good' is not a number" in str(e.value)


def test_a_stored_checkpoint_as_the_model(tmp_path):
    """model.init: artifact:<ref> takes the model section from the checkpoint's manifest (a
    previous run's SFT, say) and a config that disagrees with it is refused."""
    import dataclasses

    from conftest import tiny_model_cfg
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.models.decoder import CausalLM, state_dict

    mc = tiny_model_cfg("llama", d_model=48, n_heads=6, n_kv_heads=2)
    store = ArtifactStore(tmp_path / "store")
    art = store.write_checkpoint(
        state_dict(CausalLM(mc, 0)), name="old-sft", meta={"model": dataclasses.asdict(mc)}
    )
    (tmp_path / "c.yaml").write_text(
        "store: {root: store}\nmodel: {init: 'artifact:old-sft'}\n"
        "pipeline: {stages: [prepare, sft]}\n"
    )
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.model.family, cfg.model.d_model, cfg.model.kv_heads) == ("llama", 48, 2)
    assert cfg.model.init == "artifact:old-sft" and store.resolve("old-sft") == art.id
    with pytest.raises(
        ConfigError, match=r"model.d_model is 64 in the config but 48 in artifact:old-sft"
    ):
        load_config(tmp_path / "c.yaml", {"model": {"d_model": 64}})
