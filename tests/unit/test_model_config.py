"""The model options of Hugging Face checkpoints in the config: head_dim, attention_bias, qk_norm
and the model.rope_scaling section round-trip through YAML, and bad values name their field."""

import pytest
import yaml

from lh_dist.config import ConfigError, ModelConfig, load_config, save_config

BASE = "configs/tiny-cpu.yaml"  # model.dim 256, model.n_heads 4
LLAMA3 = ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8", "model.rope_scaling.low_freq_factor=1",
          "model.rope_scaling.high_freq_factor=4", "model.rope_scaling.original_max_position_embeddings=8192"]
YARN = ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4", "model.rope_scaling.beta_fast=16",
        "model.rope_scaling.beta_slow=2", "model.rope_scaling.mscale=0.707", "model.rope_scaling.mscale_all_dim=0.707",
        "model.rope_scaling.original_max_position_embeddings=32768", "model.rope_scaling.truncate=false"]


def test_head_dim_defaults_to_dim_over_heads_and_may_differ():
    assert load_config(BASE).model.head_dim == 64
    assert ModelConfig(dim=64, n_heads=4).head_dim == 16
    qwen3 = load_config(BASE, ["model.head_dim=128", "model.dim=200"]).model  # 4 heads x 128 != 200
    assert (qwen3.head_dim, qwen3.dim) == (128, 200)


@pytest.mark.parametrize("overrides, expected", [
    (["model.head_dim=96"], {"head_dim": 96}),
    (["model.attention_bias=true"], {"attention_bias": True}),
    (["model.qk_norm=true"], {"qk_norm": True}),
    (["model.rope_scaling.type=linear", "model.rope_scaling.factor=2.5"],
     {"rope_scaling": {"type": "linear", "factor": 2.5}}),
    (LLAMA3, {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}),
    (YARN, {"rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.707,
                             "mscale_all_dim": 0.707, "original_max_position_embeddings": 32768,
                             "truncate": False}}),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4", "model.rope_scaling.attention_factor=1.2",
      "model.rope_scaling.original_max_position_embeddings=4096"],
     {"rope_scaling": {"type": "yarn", "factor": 4.0, "attention_factor": 1.2,
                       "original_max_position_embeddings": 4096}}),
], ids=["head_dim", "attention_bias", "qk_norm", "linear", "llama3", "yarn", "yarn-attention-factor"])
def test_option_round_trips_through_yaml(tmp_path, overrides, expected):
    cfg = load_config(BASE, overrides)
    written = cfg.to_dict()["model"]
    for key, value in expected.items():
        if isinstance(value, dict):
            assert {k: written[key][k] for k in value} == value
        else:
            assert written[key] == value
    save_config(cfg, tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["model"]["rope_scaling"]["type"] == \
        expected.get("rope_scaling", {}).get("type", "none")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_config_without_the_new_keys_keeps_todays_model():
    tree = yaml.safe_load(open(BASE))
    assert "head_dim" not in tree["model"] and "rope_scaling" not in tree["model"]
    m = load_config(BASE).model
    assert (m.head_dim, m.attention_bias, m.qk_norm, m.rope_scaling.type) == (64, False, False, "none")


@pytest.mark.parametrize("overrides, field, allowed", [
    (["model.head_dim=-2"], "model.head_dim", "a positive even integer"),
    (["model.head_dim=13"], "model.head_dim", "a positive even integer"),
    (["model.dim=250"], "model.dim", "divisible by model.n_heads=4 (or model.head_dim set)"),
    (["model.attention_bias=2"], "model.attention_bias", "true or false"),
    (["model.qk_norm=maybe"], "model.qk_norm", "true or false"),
    (["model.rope_scaling=3"], "model.rope_scaling", "must be a mapping"),
    (["model.rope_scaling.kind=yarn"], "model.rope_scaling.kind", "allowed keys under model.rope_scaling"),
    (["model.rope_scaling.type=dynamic"], "model.rope_scaling.type", "'none', 'linear', 'llama3', 'yarn'"),
    (["model.rope_scaling.factor=8"], "model.rope_scaling.factor", "left unset (type 'none' does not read it)"),
    (["model.rope_scaling.type=linear"], "model.rope_scaling.factor", ">= 1 with type 'linear'"),
    (["model.rope_scaling.type=linear", "model.rope_scaling.factor=0.5"], "model.rope_scaling.factor", ">= 1"),
    (["model.rope_scaling.type=linear", "model.rope_scaling.factor=2", "model.rope_scaling.beta_fast=8"],
     "model.rope_scaling.beta_fast", "left unset (type 'linear' does not read it)"),
    (LLAMA3[:2], "model.rope_scaling.original_max_position_embeddings", "a positive integer with type 'llama3'"),
    (LLAMA3[:2] + LLAMA3[4:], "model.rope_scaling.low_freq_factor", "positive"),
    ([*LLAMA3, "model.rope_scaling.high_freq_factor=1"], "model.rope_scaling.high_freq_factor",
     "greater than model.rope_scaling.low_freq_factor=1.0"),
    ([*LLAMA3, "model.rope_scaling.mscale=1"], "model.rope_scaling.mscale", "left unset"),
    (YARN[:2], "model.rope_scaling.original_max_position_embeddings", "a positive integer with type 'yarn'"),
    ([*YARN, "model.rope_scaling.beta_slow=0"], "model.rope_scaling.beta_slow", "positive"),
    ([*YARN, "model.rope_scaling.beta_fast=1"], "model.rope_scaling.beta_fast", ">= model.rope_scaling.beta_slow"),
    ([*YARN, "model.rope_scaling.attention_factor=-1"], "model.rope_scaling.attention_factor", ">= 0"),
    ([*YARN, "model.rope_scaling.mscale_all_dim=-0.5"], "model.rope_scaling.mscale_all_dim", ">= 0"),
    ([*YARN, "model.rope_scaling.truncate=1"], "model.rope_scaling.truncate", "true or false"),
    ([*YARN, "model.rope_scaling.low_freq_factor=1"], "model.rope_scaling.low_freq_factor", "left unset"),
])
def test_bad_values_give_one_line_naming_the_field(overrides, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, overrides)
    message = str(err.value)
    assert message.startswith((field, f"unknown key {field}")) and allowed in message and "\n" not in message, message
