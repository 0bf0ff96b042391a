"""The parallel section: msrun for multi-node, semi-auto sizes validated against the device count
and the model, and passed through to MindSpore's parallel context and shard strategies."""

from pathlib import Path

import mindspore as ms
import pytest

from mindrlhf.config import ConfigError, load_config
from mindrlhf.launch import stage_command
from mindrlhf.models.decoder import CausalLM
from mindrlhf.parallel import apply_parallel, auto_parallel_context, matmul_strategies

CLUSTER = Path(__file__).resolve().parents[1] / "mindrlhf" / "configs" / "cluster-2x8-ascend.yaml"


def test_shipped_cluster_example_is_valid_and_builds_msrun_per_node():
    cfg = load_config(CLUSTER)
    p = cfg.parallel
    assert (p.worker_num, p.local_worker_num, p.mode) == (16, 8, "semi_auto")
    assert p.data_parallel * p.model_parallel * p.pipeline_stages == 16
    cmd = stage_command("sft", Path("s.json"), Path("o.json"), p, Path("/r"))
    assert "--worker_num=16" in cmd and "--local_worker_num=8" in cmd and "--node_rank=0" in cmd
    kw = auto_parallel_context(p)
    assert kw["parallel_mode"] == ms.ParallelMode.SEMI_AUTO_PARALLEL
    assert kw["pipeline_stages"] == p.pipeline_stages and kw["enable_parallel_optimizer"] is True
    assert kw["device_num"] == 16


@pytest.mark.parametrize(
    "parallel, words",
    [
        (
            {
                "mode": "semi_auto",
                "worker_num": 16,
                "local_worker_num": 8,
                "data_parallel": 4,
                "model_parallel": 2,
                "pipeline_stages": 1,
            },
            [
                "parallel.data_parallel (4)",
                "parallel.model_parallel (2)",
                "= 8",
                "parallel.worker_num (16)",
            ],
        ),
        (
            {"worker_num": 16, "local_worker_num": 6},
            ["parallel.worker_num (16)", "multiple of parallel.local_worker_num"],
        ),
        (
            {"worker_num": 16, "local_worker_num": 8, "node_rank": 2},
            ["parallel.node_rank (2)", "node count (2)"],
        ),
        (
            {"worker_num": 2, "local_worker_num": 2, "model_parallel": 2},
            ["parallel.model_parallel", "semi_auto"],
        ),
        (
            {
                "mode": "semi_auto",
                "worker_num": 8,
                "local_worker_num": 8,
                "data_parallel": 2,
                "model_parallel": 2,
                "pipeline_stages": 2,
                "micro_batches": 1,
            },
            ["parallel.micro_batches (1)"],
        ),
    ],
)
def test_bad_parallel_sizes_are_named(tmp_path, parallel, words):
    p = tmp_path / "c.yaml"
    import yaml

    p.write_text(yaml.safe_dump({"device_target": "Ascend", "parallel": parallel}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_semi_auto_needs_divisible_model_and_ascend():
    base = {
        "device_target": "Ascend",
        "parallel": {
            "mode": "semi_auto",
            "worker_num": 8,
            "local_worker_num": 8,
            "data_parallel": 1,
            "model_parallel": 8,
            "pipeline_stages": 1,
        },
    }
    with pytest.raises(ConfigError, match="n_heads"):
        load_config("demo", base)  # 4 heads cannot split 8 ways
    with pytest.raises(ConfigError, match="Ascend"):
        load_config(
            "demo",
            {
                **base,
                "device_target": "CPU",
                "parallel": {**base["parallel"], "model_parallel": 2, "data_parallel": 4},
            },
        )


def test_shard_strategies_reach_the_model_primitives():
    cfg = load_config(CLUSTER)
    model = CausalLM(cfg.model, seed=0)  # built on CPU; strategies are attributes of the primitives
    apply_parallel(model, cfg.parallel)
    strat = matmul_strategies(cfg.parallel)
    q = model.model.layers[0].attn.q_proj.mm
    o = model.model.layers[0].attn.o_proj.mm
    assert q.in_strategy == strat["q_proj"] and o.in_strategy == strat["o_proj"]
    stages = [b.pipeline_stage for b in model.model.layers]
    assert stages == sorted(stages) and stages[-1] == cfg.parallel.pipeline_stages - 1


def test_pangu_top_query_layer_takes_the_last_pipeline_stage():
    """n_layers counts Pangu-alpha's top query layer: with 4 layers on 2 stages the three blocks
    and the top layer split 2 + 2, the top layer sharded like a block, on the last stage."""
    from dataclasses import replace

    cfg = load_config(CLUSTER)
    assert cfg.parallel.pipeline_stages == 2 and cfg.parallel.recompute
    mcfg = replace(cfg.model, family="pangualpha", n_layers=4, rope_theta=10000.0)
    model = CausalLM(mcfg, seed=0)
    apply_parallel(model, cfg.parallel)
    top = model.model.top_query_layer
    assert [b.pipeline_stage for b in model.model.layers] == [0, 0, 1]
    assert top.pipeline_stage == 1
    strat = matmul_strategies(cfg.parallel)
    assert top.attn.q_proj.mm.in_strategy == strat["q_proj"]
    assert top.mlp.down_proj.mm.in_strategy == strat["down_proj"]
