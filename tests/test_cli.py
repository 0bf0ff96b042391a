import json

from mindrlhf.cli import main, parse_sets


def test_parse_sets():
    assert parse_sets(["sft.lr=0.001", "pipeline.stages=[prepare, sft]", "name=x"]) == {
        "sft": {"lr": 0.001}, "pipeline": {"stages": ["prepare", "sft"]}, "name": "x"}


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
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.models.decoder import CausalLM, state_dict
    from mindrlhf.models.hf import import_hf
    from conftest import tiny_model_cfg
    import dataclasses
    import numpy as np

    cfg = tiny_model_cfg("llama")
    store = ArtifactStore(tmp_path / "s")
    w = state_dict(CausalLM(cfg, 0))
    store.write_checkpoint(w, name="pol", meta={"model": dataclasses.asdict(cfg)})
    assert main(["export", "pol", "--out", str(tmp_path / "hf"), "--store", str(tmp_path / "s")]) == 0
    cfg2, w2 = import_hf(tmp_path / "hf")
    assert cfg2.n_layers == cfg.n_layers and np.array_equal(w2["model.embed_tokens"], w["model.embed_tokens"])
