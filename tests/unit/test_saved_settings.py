"""A checkpoint written before a setting existed resumes: the missing setting reads as its default."""

from pathlib import Path

import pytest

from lh_dist.checkpoint.checkpointer import check_resume
from lh_dist.checkpoint.format import FIXED_FIELDS, saved_settings
from lh_dist.config import ConfigError, load_config
from lh_dist.data.sources import data_location


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


def test_a_checkpoint_without_the_datas_content_hash_resumes_saying_so(tmp_path):
    from lh_dist.data.shards import write_dataset
    from lh_dist.data.sources import data_sources
    from lh_dist.data.tokenizer import ByteTokenizer

    docs = [(f"d{i}", "text " * (i + 20)) for i in range(12)]
    write_dataset(docs, tmp_path / "data", ByteTokenizer(), source="test", val_fraction=0.25, log=lambda _: None)
    cfg = load_config(None, ["model.dim=64", "model.n_heads=4", f"data.path={tmp_path / 'data'}"])
    sources = data_sources(cfg.data)
    old = _manifest(cfg)  # an older lh_dist recorded the path and the loader's position only
    old["data"]["num_documents"] = sources[0].info["splits"]["train"]["documents"]
    notes = check_resume(old, Path("step_00000002"), cfg, 1, 1, sources)
    assert notes == [f"step_00000002 records no content hash of data.path {tmp_path / 'data'} (written by an older "
                     f"lh_dist): resuming as if the data were unchanged"]
    # Its document count still tells a dataset rebuilt with another number of documents.
    documents = old["data"]["num_documents"]
    old["data"]["num_documents"] += 1
    with pytest.raises(ConfigError, match=rf"data.path .* \(train documents {documents + 1} -> {documents}\) differs"):
        check_resume(old, Path("step_00000002"), cfg, 1, 1, sources)
    notes = check_resume(old, Path("step_00000002"), cfg, 1, 1, sources, accept_changed_data=True)
    assert len(notes) == 1 and notes[0].startswith("--accept-changed-data: data.path ")
    assert "the data order restarts from the recorded sample counter (4 samples) over different documents" in notes[0]
