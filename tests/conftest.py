import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MINDRLHF_CACHE", str(REPO / ".cache"))
os.environ.setdefault("GLOG_v", "3")


@pytest.fixture(scope="session", autouse=True)
def mindspore_cpu():
    from mindrlhf.runtime import init_runtime

    init_runtime("CPU", seed=0)


@pytest.fixture
def store(tmp_path):
    from mindrlhf.data.store import ArtifactStore

    return ArtifactStore(tmp_path / "store")


def tiny_model_cfg(family="gpt2", **kw):
    from mindrlhf.config import ModelConfig

    base = dict(family=family, vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    if family == "llama":
        base.update(n_kv_heads=2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def randomize(model, seed: int = 0, qk_scale: float = 1.0) -> dict:
    """Give every parameter a non-trivial value, as a trained model has: norm gains around 1 but
    not 1, non-zero biases, weights ~N(0, 0.1); ``qk_scale`` > 1 sharpens attention. Tiny models
    at their init (unit norms, zero biases, near-uniform attention) hide mapping and position
    bugs: a swapped norm, a key without RoPE, score the same. Returns the new state dict."""
    from mindrlhf.models.decoder import load_state_dict, state_dict

    r = np.random.default_rng(seed)
    w = {}
    for name, v in state_dict(model).items():
        if name.endswith("norm.weight"):
            w[name] = r.uniform(0.5, 1.5, v.shape)
        elif name.endswith("bias") or name.endswith("norm.bias"):
            w[name] = r.normal(0.0, 0.2, v.shape)
        else:
            w[name] = r.normal(0.0, 0.1, v.shape)
            if any(k in name for k in ("q_proj.weight", "k_proj.weight")):
                w[name] *= qk_scale
        w[name] = w[name].astype(np.float32)
    load_state_dict(model, w)
    return w


TINY_SETS = {
    "model.d_model": 16,
    "model.n_layers": 1,
    "model.n_heads": 2,
    "model.max_seq_len": 64,
    "data.max_len": 32,
    "data.max_prompt_len": 12,
    "sft.batch_size": 4,
    "generation.max_new_tokens": 6,
}


def tiny_sft_stage_args(root, inputs: dict, sets: dict, run_dir=None) -> list[str]:
    """Arguments of `mindrlhf stage sft demo` for the tiny model on ``inputs`` (train, heldout
    ids) in the store ``root``, with ``sets`` (dotted key -> value) over TINY_SETS."""
    args = ["stage", "sft", "demo"] + (["--run-dir", str(run_dir)] if run_dir else [])
    args += ["--input", f"train={inputs['train']}", "--input", f"heldout={inputs['heldout']}"]
    for k, v in {"store.root": root, **TINY_SETS, **sets}.items():
        args += ["--set", f"{k}={v}"]
    return args


# The tiny stages train and decode eagerly: at this size compiling a graph per shape costs more
# than every step it would save (a tiny SFT stage: 13.3 s compiled, 4.7 s eager; RM 7.3 s vs
# 3.2 s). The compiled paths are the subject of test_compiled.py, test_memory.py and the tests
# that pass ``compiled=True`` here; the shipped profiles keep their own settings.
EAGER = {"compiled": False}


def tiny_overrides(root, **sft):
    """A config small enough that a stage process finishes in seconds."""
    return {
        "name": "tiny",
        "store": {"root": str(root)},
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
        "data": {
            "limit": 64,
            "max_prompt_len": 12,
            "max_len": 32,
            "pairs": 64,
            "arithmetic_size": 40,
        },
        "sft": {
            "steps": 6,
            "batch_size": 4,
            "ckpt_every": 2,
            "log_every": 2,
            "eval_batches": 1,
            "warmup_steps": 0,
            "lr": 0.01,
            **EAGER,
            **sft,
        },
        "generation": {"max_new_tokens": 6, **EAGER},
        "pipeline": {"stages": ["prepare", "sft"]},
    }


def tiny_full_overrides(root):
    """Every stage, each a few steps: the whole chain in a couple of minutes."""
    o = tiny_overrides(root)
    o.update(
        {
            "pipeline": {"stages": ["prepare", "sft", "rm", "ppo", "grpo", "dpo", "online_dpo"]},
            "rm": {"steps": 4, "batch_size": 4, "ckpt_every": 2, "log_every": 2, **EAGER},
            "ppo": {
                **EAGER,
                "iterations": 2,
                "rollout_batch": 8,
                "mini_batch": 4,
                "ppo_epochs": 1,
                "ckpt_every": 1,
                "eval_prompts": 8,
            },
            "grpo": {
                **EAGER,
                "iterations": 2,
                "prompts_per_iter": 2,
                "group_size": 4,
                "mini_batch": 4,
                "ckpt_every": 1,
                "eval_prompts": 8,
                "max_new_tokens": 4,
            },
            "dpo": {"steps": 4, "batch_size": 4, "ckpt_every": 2, "log_every": 2, **EAGER},
            "online_dpo": {
                "rounds": 2,
                "prompts_per_round": 8,
                "steps_per_round": 2,
                "eval_prompts": 8,
            },
        }
    )
    return o


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
    """prepare, SFT, RM and reference log-probs of the tiny full config, run once for the whole
    session as stage processes (no Prefect) in one store; tests that need a stage's inputs take
    them from here instead of rebuilding them. Tests add artifacts to this store and must not
    corrupt the ones here (those that corrupt use a store of their own).

    Under xdist the first worker to get here builds it (the others wait on a lock) and every
    worker gets its own copy of the store, so no worker sees another's artifacts."""
    import fcntl
    import json
    import shutil
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("chain")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        built = build_tiny_chain(root)
    else:
        shared = tmp_path_factory.getbasetemp().parent / "tiny-chain"  # this run's, all workers'
        with open(str(shared) + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (shared / "built.json").exists():
                shared.mkdir(exist_ok=True)
                built = build_tiny_chain(shared / "root")
                (shared / "built.json").write_text(json.dumps(built))
            built = json.loads((shared / "built.json").read_text())
        shutil.copytree(shared / "root", root, dirs_exist_ok=True)
    d, sft, rm, ref = built["data"], built["sft"], built["rm"], built["ref"]
    return SimpleNamespace(
        root=root, data=d, sft=sft, rm=rm, ref=ref, inputs=chain_inputs(d, sft, rm, ref)
    )


def build_tiny_chain(root: Path) -> dict:
    from mindrlhf.config import load_config
    from mindrlhf.launch import run_stage

    cfg = load_config("demo", tiny_full_overrides(root))
    quiet = dict(log=lambda s: None)
    d = run_stage("prepare", cfg, {}, root, root / "runs" / "prepare", **quiet)["outputs"]
    sft = run_stage(
        "sft",
        cfg,
        {"train": d["sft_train"], "heldout": d["sft_heldout"]},
        root,
        root / "runs" / "sft",
        **quiet,
    )["outputs"]["checkpoint"]
    rm = run_stage(
        "rm",
        cfg,
        {"train": d["pairs_train"], "heldout": d["pairs_heldout"], "sft": sft},
        root,
        root / "runs" / "rm",
        **quiet,
    )["outputs"]["checkpoint"]
    ref = run_stage(
        "reflogp",
        cfg,
        {"train": d["pairs_train"], "heldout": d["pairs_heldout"], "model": sft},
        root,
        root / "runs" / "reflogp",
        **quiet,
    )["outputs"]
    return {"data": d, "sft": sft, "rm": rm, "ref": ref}


def chain_inputs(d: dict, sft: str, rm: str, ref: dict) -> dict:
    """Each training stage's inputs on the tiny chain's artifacts (``tiny_chain.inputs``)."""
    return {
        "sft": {"train": d["sft_train"], "heldout": d["sft_heldout"]},
        "rm": {"train": d["pairs_train"], "heldout": d["pairs_heldout"], "sft": sft},
        "dpo": {
            "train": d["pairs_train"],
            "heldout": d["pairs_heldout"],
            "sft": sft,
            "ref_train": ref["train"],
            "ref_heldout": ref["heldout"],
        },
        "ppo": {
            "prompts": d["prompts_movie_reviews_train"],
            "heldout": d["prompts_movie_reviews_heldout"],
            "sft": sft,
            "rm": rm,
        },
        "grpo": {
            "prompts": d["prompts_arithmetic_train"],
            "heldout": d["prompts_arithmetic_heldout"],
            "sft": sft,
        },
        "online_dpo": {
            "policy": sft,
            "reference": sft,
            "rm": rm,
            "round": 0,
            "prompts": d["prompts_movie_reviews_train"],
            "heldout": d["prompts_movie_reviews_heldout"],
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server():
    """An in-process Prefect API (test harness) for flows called from the tests, one per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
    }
    prefect = str(Path(sys.executable).parent / "prefect")
    proc = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("prefect server did not start")
    yield url, env
    proc.terminate()
    proc.wait(timeout=30)


def assert_config_rejects(tmp_path, text: str, key: str) -> None:
    """The config YAML ``text`` is refused with an error naming its file and ``key``."""
    from mindrlhf.config import ConfigError, load_config

    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and key in str(e.value)


def assert_rollout_logprobs_of(
    store, rollout_id: str, policy_id: str, cfg, column: str = "logprobs"
) -> None:
    """The rollout table's stored log-probs (``column``: the policy's, or ref_logprobs) are
    those a full forward pass of the checkpoint ``policy_id`` gives on its stored sequences,
    token by token; 0 off the response mask."""
    from mindspore import Tensor

    from mindrlhf.stages.ppo import load_policy
    from mindrlhf.stages.rollout import response_logprobs, table_arrays

    ex = table_arrays(store.read_dataset(rollout_id))
    policy = load_policy(store, policy_id, cfg.model, train=False, parallel=cfg.parallel)
    p = int(ex["prompt_len"][0])
    want = response_logprobs(
        policy, Tensor(ex["sequence"]), Tensor(ex["attention_mask"]), p
    ).asnumpy()
    m = ex["response_mask"] > 0
    assert m.sum() > 20 and np.std(want[m]) > 0.1  # enough tokens, log-probs that differ
    np.testing.assert_allclose(ex[column][m], want[m], atol=5e-5)
    assert not ex[column][~m].any()
