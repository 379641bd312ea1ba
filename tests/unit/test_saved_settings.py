"""A checkpoint written before a setting existed resumes: the missing setting reads as its default."""

from pathlib import Path

import pytest

from lh_dist.config import ConfigError, load_config
from lh_dist.runtime.checkpoint import FIXED_FIELDS, saved_settings
from lh_dist.train.checkpoint import check_resume, data_location


def _manifest(cfg, drop_model_keys=()):
    config = cfg.to_dict()
    for key in drop_model_keys:
        del config["model"][key]
    return {"config": config, "data": {"path": data_location(cfg.data.path), "samples_seen": 4},
            "world": {"world_size": 1, "dp_degree": 1, "cp_degree": 1}}


def test_settings_added_later_take_their_defaults():
    cfg = load_config(None, ["model.dim=64", "model.n_heads=4"])
    old = _manifest(cfg, drop_model_keys=("head_dim", "attention_bias", "qk_norm", "rope_scaling"))
    settings = saved_settings(old)
    assert settings["model.head_dim"] == 16 and settings["model.qk_norm"] is False
    assert settings["model.rope_scaling.type"] == "none"
    assert all(k in settings for k in FIXED_FIELDS)
    check_resume(old, Path("step_00000002"), cfg, world_size=1, dp_degree=1)  # no refusal


def test_a_changed_setting_is_still_refused():
    cfg = load_config(None, ["model.dim=64", "model.n_heads=4"])
    old = _manifest(cfg, drop_model_keys=("qk_norm",))
    with pytest.raises(ConfigError, match="model.qk_norm False -> True"):
        check_resume(old, Path("step_00000002"), load_config(None, ["model.dim=64", "model.n_heads=4",
                                                                     "model.qk_norm=true"]), 1, 1)


def test_a_checkpoint_from_before_the_checkpointing_modes_resumes():
    # Manifests (format_version 1) and run config.yaml files written when activation_checkpointing was a
    # bool hold true/false; config_from_dict reads them as "full"/"none", so those runs resume.
    cfg = load_config(None, ["model.dim=64", "model.n_heads=4"])
    for saved, meant in ((True, "full"), (False, "none")):
        old = _manifest(cfg)
        old["config"]["parallel"]["activation_checkpointing"] = saved
        assert saved_settings(old)["parallel.activation_checkpointing"] == meant
        check_resume(old, Path("step_00000002"), cfg, world_size=1, dp_degree=1)  # no refusal
