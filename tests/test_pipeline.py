"""The Prefect flow: a re-run with unchanged inputs is all Cached; one SFT hyperparameter change
re-runs SFT only; the launcher builds msrun commands for more than one worker."""
import time
from pathlib import Path

import pytest

from mindrlhf.config import ParallelConfig
from mindrlhf.launch import stage_command
from conftest import tiny_overrides


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_cached_rerun_and_selective_invalidation(prefect_server, tmp_path):
    from flows.pipeline import rlhf_pipeline

    over = tiny_overrides(tmp_path / "store")
    first = rlhf_pipeline("demo", over)
    assert first["states"] == {"prepare": "Completed", "sft": "Completed"}
    t = time.time()
    again = rlhf_pipeline("demo", over)
    assert again["states"] == {"prepare": "Cached", "sft": "Cached"}
    assert time.time() - t < 10
    assert again["sft"]["checkpoint"] == first["sft"]["checkpoint"]
    over["sft"]["lr"] = 0.005
    changed = rlhf_pipeline("demo", over)
    assert changed["states"] == {"prepare": "Cached", "sft": "Completed"}
    assert changed["sft"]["checkpoint"] != first["sft"]["checkpoint"]


def test_msrun_command():
    p = ParallelConfig(worker_num=4, local_worker_num=2, master_addr="10.0.0.1", master_port=9000, node_rank=1)
    cmd = stage_command("sft", Path("s.json"), Path("o.json"), p, Path("/runs/x"))
    assert Path(cmd[0]).name == "msrun"
    for flag in ("--worker_num=4", "--local_worker_num=2", "--master_addr=10.0.0.1", "--master_port=9000",
                 "--node_rank=1", "--log_dir=/runs/x/msrun_log", "--join=True"):
        assert flag in cmd
    assert cmd[-5].endswith("mindrlhf/stages/sft.py") and cmd[-4:] == ["--spec", "s.json", "--out", "o.json"]
    single = stage_command("sft", Path("s.json"), Path("o.json"), ParallelConfig(), Path("/r"))
    assert single[1:3] == ["-m", "mindrlhf.stages.sft"]
