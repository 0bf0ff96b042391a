import pytest

from mindrlhf.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_shipped_demo_loads():
    cfg = load_config("demo")
    assert cfg.model.family == "gpt2" and cfg.sft.steps > 0 and cfg.device_target == "CPU"
    assert cfg.ppo.gold_reward == "movie_reviews"


def test_shipped_profiles_load():
    smol = load_config("smollm2-135m")
    assert (smol.model.init, smol.model.n_layers, smol.model.d_model, smol.model.kv_heads) == (
        "gguf:smollm2",
        30,
        576,
        3,
    )
    assert smol.tokenizer.kind == "smollm2" and smol.model.rope_theta == 100000.0
    assert (
        not smol.sft.compiled and smol.generation.compiled
    )  # eager training, compiled decoding (see the file)
    cluster = load_config("cluster-2x8-ascend")
    p = cluster.parallel
    assert (
        cluster.device_target == "Ascend"
        and p.data_parallel * p.model_parallel * p.pipeline_stages == p.worker_num
    )


@pytest.mark.parametrize(
    "text, key",
    [  # the full dotted key: a bare "lr" could be any section's
        ("sft:\n  lrr: 0.1\n", "sft.lrr"),
        ("sft:\n  lr: -0.1\n", "sft.lr must be > 0"),
        ("rm:\n  lr: -0.1\n", "rm.lr must be > 0"),
        ("sft:\n  batch_size: eight\n", "sft.batch_size"),
        ("model:\n  family: gpt5\n", "model.family"),
        (
            "model:\n  d_model: 30\n  n_heads: 4\n",
            "model.d_model (30) must be divisible by model.n_heads (4)",
        ),
        ("bogus: 1\n", "bogus"),
        ("sft:\n  batch_size: 7\nparallel:\n  worker_num: 2\n", "sft.batch_size (7)"),
        ("generation:\n  top_p: 1.5\n", "generation.top_p"),
        ("sft:\n  lr: .nan\n", "sft.lr"),
        ("seed: true\n", "seed"),
        ("grpo:\n  reward: vibes\n", "grpo.reward"),
        ("ppo:\n  gold_reward: vibes\n", "ppo.gold_reward"),
        ("data:\n  recipes: [movie_reviews, gsm8k]\n", "data.recipes: unknown recipe 'gsm8k'"),
        (
            "ppo:\n  rollout_batch: 30\n  mini_batch: 8\n",
            "ppo.rollout_batch (30) must be divisible by ppo.mini_batch",
        ),
        ("sft:\n  eval_batches: 0\n", "sft.eval_batches must be > 0"),
        ("name: .x\n", "name: bad artifact name '.x'"),
        ("name: team/a\n", "name: bad artifact name 'team/a'"),
        ("generation:\n  max_new_tokens: 500\n", "generation.max_new_tokens (500)"),
        ("data:\n  max_len: 300\n", "data.max_len (300) must be <= model.max_seq_len (256)"),
        ("resources:\n  graph_memory_fraction: 1.5\n", "resources.graph_memory_fraction"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and key in str(e.value)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    p = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(p)


def test_overrides_merge_and_int_widens_to_float():
    cfg = load_config("demo", {"sft": {"lr": 1}})
    assert cfg.sft.lr == 1.0 and isinstance(cfg.sft.lr, float)
    assert cfg.sft.steps == load_config("demo").sft.steps


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads `lr: 1e-5` as the string '1e-5'; a float field takes it as 1e-05."""
    cfg = load_config(write(tmp_path, "sft:\n  lr: 1e-5\nrm:\n  lr: 2E+3\n"))
    assert cfg.sft.lr == 1e-5 and cfg.rm.lr == 2000.0
    with pytest.raises(ConfigError, match="sft.lr must be a number"):
        load_config(write(tmp_path, "sft:\n  lr: 1e-5x\n"))


def test_the_flow_form_offers_exactly_the_known_stages():
    from typing import get_args

    from flows.pipeline import Stage
    from mindrlhf.config import STAGES

    assert get_args(Stage) == STAGES


def test_gate_settings_are_checked_against_the_pipeline():
    from mindrlhf.config import ConfigError, load_config

    every = ["prepare", "sft", "rm", "ppo", "grpo", "dpo", "online_dpo", "evaluate"]
    cfg = load_config("demo", {"promote": {"candidate": "grpo"}})
    assert (cfg.evaluate.prompts, cfg.evaluate.judge) == ("arithmetic", "arithmetic")
    assert cfg.evaluate.max_new_tokens == cfg.grpo.max_new_tokens
    with pytest.raises(ConfigError, match="promote.candidate: ppo is not in pipeline.stages"):
        load_config("demo", {"pipeline": {"stages": ["prepare", "sft", "evaluate"]}})
    with pytest.raises(ConfigError, match="evaluate.judge: empty"):
        load_config("demo", {"ppo": {"gold_reward": ""}, "pipeline": {"stages": every}})
    with pytest.raises(ConfigError, match="promote.confidence must be in"):
        load_config("demo", {"promote": {"confidence": 1.5}})
