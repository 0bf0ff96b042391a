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
    for name in ("smollm2-135m", "cluster-2x8-ascend"):
        load_config(name)


@pytest.mark.parametrize("text, key", [
    ("sft:\n  lrr: 0.1\n", "sft.lrr"),
    ("sft:\n  lr: -0.1\n", "lr"),
    ("sft:\n  batch_size: eight\n", "sft.batch_size"),
    ("model:\n  family: gpt5\n", "model.family"),
    ("model:\n  d_model: 30\n  n_heads: 4\n", "d_model"),
    ("bogus: 1\n", "bogus"),
    ("sft:\n  batch_size: 7\nparallel:\n  worker_num: 2\n", "worker_num"),
    ("generation:\n  top_p: 1.5\n", "top_p"),
    ("sft:\n  lr: .nan\n", "sft.lr"),
    ("seed: true\n", "seed"),
    ("grpo:\n  reward: vibes\n", "grpo.reward"),
    ("ppo:\n  gold_reward: vibes\n", "ppo.gold_reward"),
    ("data:\n  recipes: [movie_reviews, gsm8k]\n", "recipes"),
])
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
