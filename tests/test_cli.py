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
