import json

import pytest

from mindrlhf.cli import main, parse_sets


def test_parse_sets():
    assert parse_sets(["sft.lr=0.001", "pipeline.stages=[prepare, sft]", "name=x"]) == {
        "sft": {"lr": 0.001},
        "pipeline": {"stages": ["prepare", "sft"]},
        "name": "x",
    }


def test_import_list_show_lineage(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": " yes", "rejected": " no"}) + "\n")
    store = str(tmp_path / "store")
    assert main(["import", str(data), "--kind", "pairs", "--store", store, "--name", "mine"]) == 0
    art_id = capsys.readouterr().out.split()[0]
    assert main(["artifacts", "--store", store]) == 0
    assert "mine" in capsys.readouterr().out
    assert main(["show", "mine", "--store", store, "--rows", "1"]) == 0
    assert '"chosen": " yes"' in capsys.readouterr().out
    assert main(["lineage", art_id[:12], "--store", store]) == 0
    assert "(source)" in capsys.readouterr().out


def test_bad_input_exits_2_with_reason(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "chosen": "a"}\n')
    assert main(["import", str(bad), "--kind", "pairs", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: row 1" in err and "rejected" in err


def test_export_checkpoint(tmp_path, capsys):
    import dataclasses

    import numpy as np

    from conftest import tiny_model_cfg
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.models.decoder import CausalLM, state_dict
    from mindrlhf.models.hf import import_hf

    cfg = tiny_model_cfg("llama")
    store = ArtifactStore(tmp_path / "s")
    w = state_dict(CausalLM(cfg, 0))
    store.write_checkpoint(w, name="pol", meta={"model": dataclasses.asdict(cfg)})
    assert (
        main(["export", "pol", "--out", str(tmp_path / "hf"), "--store", str(tmp_path / "s")]) == 0
    )
    cfg2, w2 = import_hf(tmp_path / "hf")
    assert cfg2.n_layers == cfg.n_layers and np.array_equal(
        w2["model.embed_tokens"], w["model.embed_tokens"]
    )


def test_export_skips_ancestors_no_longer_in_the_store(tmp_path, capsys):
    """A checkpoint whose training data was removed still exports, with the tokenizer of the
    import it descends from (found by walking its lineage past the missing dataset)."""
    import dataclasses

    import pyarrow as pa

    from conftest import tiny_model_cfg
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.models.decoder import CausalLM, state_dict

    cfg = tiny_model_cfg("llama")
    store = ArtifactStore(tmp_path / "s")
    meta = {"model": dataclasses.asdict(cfg)}
    w = state_dict(CausalLM(cfg, 0))
    tok = b'{"model": {"type": "BPE"}}'
    base = store.write_checkpoint(w, name="imp", meta=meta, extra_files={"tokenizer.json": tok})
    data = store.write_dataset(pa.table({"x": [1, 2]}), name="train")
    store.write_checkpoint(w, name="sft", parents=[data.id, base.id], meta=meta)
    store.remove(data.id)
    out = tmp_path / "hf"
    assert main(["export", "sft", "--out", str(out), "--store", str(tmp_path / "s")]) == 0
    assert (out / "tokenizer.json").read_bytes() == tok
    with pytest.raises(Exception, match=data.id[:12]):
        store.lineage("sft")  # without skip_missing a missing ancestor is still an error


def cli(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def test_messages_not_tracebacks(tmp_path, capsys):
    """Each of these used to end in a Python traceback; now one line says what is wrong."""
    import os

    store = str(tmp_path / "s")
    sur = tmp_path / "sur.jsonl"
    sur.write_text(
        '{"prompt": "p", "response": "ok"}\n{"prompt": "p", "response": "bad \\ud800 text"}\n'
    )
    rc, _, err = cli(["import", str(sur), "--kind", "sft", "--store", store], capsys)
    assert rc == 2 and "sur.jsonl: row 2: field 'response'" in err and "lone surrogate" in err
    rc, _, err = cli(["import", str(tmp_path), "--kind", "sft", "--store", store], capsys)
    assert rc == 2 and "not a regular file" in err
    rc, _, err = cli(["run", "demo", "--set", "seed=[1"], capsys)
    assert rc == 2 and "--set 'seed=[1'" in err and "not valid YAML" in err
    rc, _, err = cli(["run", str(tmp_path)], capsys)
    assert rc == 2 and "not a config file" in err
    rc, _, err = cli(["stage", "nonsense", "demo"], capsys)
    assert rc == 2 and "unknown stage 'nonsense'" in err and "sft" in err
    rc, _, err = cli(["lineage", "/etc", "--store", store], capsys)
    assert rc == 2 and "no artifact '/etc'" in err
    os.makedirs(f"{store}/objects", exist_ok=True)
    open(f"{store}/objects/.DS_Store", "wb").write(b"\0")
    rc, out, _ = cli(["artifacts", "--store", store], capsys)
    assert rc == 0


def test_bad_name_fails_before_anything_is_written(tmp_path, capsys):
    from mindrlhf.data.store import ArtifactStore

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": " yes", "rejected": " no"}) + "\n")
    rc, _, err = cli(
        [
            "import",
            str(data),
            "--kind",
            "pairs",
            "--store",
            str(tmp_path / "s"),
            "--name",
            "../evil",
        ],
        capsys,
    )
    assert rc == 2 and "bad artifact name '../evil'" in err
    s = ArtifactStore(tmp_path / "s")
    assert not s.ids() and not list(s.refs.iterdir())


def test_huge_single_line_is_refused_without_reading_it_whole(tmp_path):
    """A 64 MB one-line file is refused after 1 MB, never held in memory whole."""
    import tracemalloc

    from mindrlhf.data.schema import DataError
    from mindrlhf.data.user_import import read_rows

    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.write(b'{"prompt": "p", "response": "')
        chunk = b"x" * (1 << 20)
        for _ in range(64):
            f.write(chunk)
        f.write(b'"}\n')
    tracemalloc.start()
    try:
        read_rows(big, "sft")
        raise AssertionError("not refused")
    except DataError as e:
        assert "big.jsonl: row 1: longer than 1048576 bytes" in str(e)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MB held to refuse one line"


def test_stage_failure_is_one_message_with_the_stage_output(tmp_path, capsys):
    from conftest import tiny_overrides, tiny_sft_stage_args
    from mindrlhf.config import load_config
    from mindrlhf.launch import run_stage

    root = tmp_path / "store"
    cfg = load_config("demo", tiny_overrides(root))
    d = run_stage("prepare", cfg, {}, root, root / "runs" / "prepare", log=lambda s: None)[
        "outputs"
    ]
    inputs = {"train": d["sft_train"], "heldout": d["sft_heldout"]}
    rc, out, err = cli(
        tiny_sft_stage_args(root, inputs, {"sft.lr": 1e9, "sft.grad_clip": 0, "sft.steps": 20}),
        capsys,
    )
    assert rc == 1, err
    assert "mindrlhf: stage sft exited with code 3" in err and "numerical error" in err


EXPORT_CASES = [  # (change to a good 2-layer GPT-2 checkpoint, words of the refusal)
    ("positions", ["model.embed_positions has shape (32, 16)", "(64, 16)"]),
    ("layers", ["unexpected", "model.layers.1"]),
    ("width", ["has shape", "model config gives"]),
    ("heads", ["model.n_heads must be > 0"]),
    ("int8", ["dtype int8"]),
    ("nan", ["non-finite"]),
]


@pytest.mark.parametrize("case, words", EXPORT_CASES, ids=[c for c, _ in EXPORT_CASES])
def test_export_refuses_tensors_that_disagree_with_the_config(tmp_path, capsys, case, words):
    import dataclasses

    import numpy as np

    from conftest import tiny_model_cfg
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.models.decoder import CausalLM, state_dict

    cfg = tiny_model_cfg("gpt2", d_model=16, n_heads=2, max_seq_len=64)
    w = state_dict(CausalLM(cfg, 0))
    meta = dataclasses.asdict(cfg)
    if case == "positions":
        w["model.embed_positions"] = w["model.embed_positions"][:32]
    elif case == "layers":
        meta["n_layers"] = 1
    elif case == "width":
        meta["d_model"] = 32
    elif case == "heads":
        meta["n_heads"] = 0
    elif case == "int8":
        w["model.norm.weight"] = w["model.norm.weight"].astype(np.int8)
    elif case == "nan":
        w["model.layers.0.mlp.up_proj.weight"][0, 0] = np.nan
    ArtifactStore(tmp_path / "s").write_checkpoint(w, name="pol", meta={"model": meta})
    rc, _, err = cli(
        ["export", "pol", "--out", str(tmp_path / "hf"), "--store", str(tmp_path / "s")], capsys
    )
    assert rc == 2, err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "hf").exists()
