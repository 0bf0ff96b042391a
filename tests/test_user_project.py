"""A user's own model, tokenizer, data and reward functions through the whole pipeline: a project
outside the repository (tests/userproject.py: a random Qwen2 in bf16 shards written by
transformers, a trained tokenizer with Qwen2's chat template, JSONL chats, Parquet pairs under
other column names, math prompts with answers, two reward functions in reward.py), run with
`mindrlhf run` from another directory; export loads in transformers with our logits; a rerun is
all Cached; one edited pair re-runs exactly what reads it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from userproject import write_project

pytestmark = pytest.mark.slow  # launches stage processes, servers or large models

BIN = Path(sys.executable).parent


def run(cfg: Path, env: dict, cwd: Path) -> tuple[dict, str]:
    r = subprocess.run(
        [str(BIN / "mindrlhf"), "run", str(cfg)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("stages: "))
    return dict(kv.split("=") for kv in line[len("stages: ") :].split(", ")), r.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory, server):
    url, env = server
    d = tmp_path_factory.mktemp("user-project")
    cfg = write_project(d / "proj")
    elsewhere = tmp_path_factory.mktemp(
        "elsewhere"
    )  # relative paths resolve against the config, not here
    env = {**env, "PREFECT_API_URL": url}
    states, out = run(cfg, env, elsewhere)
    return d / "proj", cfg, env, elsewhere, states, out


def test_whole_pipeline_on_a_users_qwen2_and_files(project):
    root, cfg, env, elsewhere, states, out = project
    assert set(states) == {
        "prepare",
        "import",
        "sft",
        "rm",
        "ppo",
        "grpo",
        "reflogp",
        "dpo",
        "online_dpo_0",
        "online_dpo_1",
    }
    assert set(states.values()) == {"Completed"}
    from mindrlhf.data.store import ArtifactStore

    store = ArtifactStore(root / "artifacts")
    imp = store.get("mine-import")
    # lineage starts at the user's files: the shards, config and tokenizer, by sha256, no paths
    names = {f["name"] for f in imp.meta["source"]["files"]}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= names
    assert sum(n.endswith(".safetensors") for n in names) >= 2
    assert imp.meta["model"]["arch"] == "qwen2" and imp.meta["model"]["init"].startswith(
        "hf:sha256:"
    )
    assert str(root) not in json.dumps(imp.manifest)
    math = store.read_dataset(store.resolve("mine-prompts_math_train"))
    assert {"prompt_ids", "prompt", "answer"} <= set(
        math.column_names
    )  # the answer column reached the reward


def test_export_is_the_users_architecture_with_our_logits(project, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers
    from mindspore import Tensor

    from mindrlhf.config import ModelConfig
    from mindrlhf.data.store import ArtifactStore
    from mindrlhf.models.decoder import CausalLM, load_state_dict

    root, cfg, env, elsewhere, _, _ = project
    r = subprocess.run(
        [
            str(BIN / "mindrlhf"),
            "export",
            "mine-dpo",
            "--out",
            str(tmp_path / "out"),
            "--store",
            str(root / "artifacts"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32
    ).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True
    )
    store = ArtifactStore(root / "artifacts")
    art = store.get("mine-dpo")
    ours = CausalLM(ModelConfig(**art.meta["model"]), seed=0)
    load_state_dict(ours, store.read_checkpoint(art.id))
    mine = ours(Tensor(np.array([ids], np.int32)), Tensor(np.ones((1, len(ids)), np.int32)))[
        0
    ].asnumpy()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(mine, theirs, atol=2e-4)


def test_rerun_is_cached_and_an_edited_row_reruns_what_reads_it(project):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, cfg, env, elsewhere, _, _ = project
    again, _ = run(cfg, env, elsewhere)
    assert set(again.values()) == {"Cached"}
    prefs = root / "data" / "prefs.parquet"
    rows = pq.read_table(prefs).to_pylist()
    rows[3]["good"] = "I really like it, honestly."
    pq.write_table(pa.Table.from_pylist(rows), prefs)
    edited, _ = run(cfg, env, elsewhere)
    reran = {k for k, v in edited.items() if v == "Completed"}
    assert reran == {"prepare", "rm", "ppo", "reflogp", "dpo", "online_dpo_0", "online_dpo_1"}, (
        edited
    )
    assert edited["sft"] == edited["grpo"] == edited["import"] == "Cached"
    os.utime(prefs)  # touched, bytes unchanged: nothing re-runs
    assert set(run(cfg, env, elsewhere)[0].values()) == {"Cached"}
