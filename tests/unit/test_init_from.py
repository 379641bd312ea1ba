"""What lh-train checks before a run starts from an imported model's weights (`--init-from`), in one process:
the model fields that must match, the data's tokenizer, the flags that do not go together. Every refusal
is one line, before any process group, engine or data loader exists. The runs themselves are in
tests/integration/test_init_from_run.py."""

import json
import shutil

import pytest

from lh_dist.config import ConfigError, load_config
from lh_dist.data.tokenizer import load_tokenizer
from lh_dist.hf.mapping import read_origin
from lh_dist.train.cli import main as lh_train
from lh_dist.train.init_from import open_init_source

from hf_models import hf_dataset, hf_run  # noqa: F401  (fixtures)


def _train(capsys, run, data, tmp_path, *args) -> str:
    argv = ["--config", str(run / "config.yaml"), "--init-from", str(run), f"data.path={data}",
            f"logging.run_dir={tmp_path / 'new'}", "data.seq_len=128", "device=cpu", *args]
    assert lh_train(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()  # nothing written, no work done
    return err


def test_data_records_the_tokenizer_identity_of_the_model(hf_run, hf_dataset):
    info = json.loads((hf_dataset / "lh_data.json").read_text())
    assert info["tokenizer_identity"] == read_origin(hf_run[1])["tokenizer"]
    # A folder means its tokenizer.json, with the eos of its tokenizer_config.json.
    assert load_tokenizer(str(hf_run[0])).identity() == load_tokenizer(str(hf_run[0] / "tokenizer.json")).identity()
    assert info["eod_id"] == json.loads((hf_run[0] / "config.json").read_text())["eos_token_id"]


def test_data_of_another_tokenizer_is_refused(hf_run, stdlib_dataset, capsys, tmp_path):
    err = _train(capsys, hf_run[1], stdlib_dataset, tmp_path)
    assert err.startswith("lh-train: config error: data.path: ") and "another tokenizer than the model's" in err
    assert f"lh-data --tokenizer {hf_run[1] / 'hf'}" in err
    # Data written before lh-data recorded identities: compared by vocabulary size.
    old = tmp_path / "old"
    shutil.copytree(stdlib_dataset, old)
    info = json.loads((old / "lh_data.json").read_text())
    del info["tokenizer_identity"]
    (old / "lh_data.json").write_text(json.dumps(info))
    assert "another tokenizer than the model's (vocab_size 257 vs 300;" in _train(capsys, hf_run[1], old, tmp_path)


def test_a_larger_vocabulary_than_the_model_is_refused(hf_run, hf_dataset, capsys, tmp_path):
    err = _train(capsys, hf_run[1], hf_dataset, tmp_path, "model.vocab_size=299")
    assert "model.vocab_size must be >= the data's vocabulary (300 in" in err


def test_the_model_must_match_but_rope_may_change(hf_run, hf_dataset, capsys, tmp_path):
    err = _train(capsys, hf_run[1], hf_dataset, tmp_path, "model.n_layers=3")
    assert f"--init-from {hf_run[1]}: model.n_layers is 2 there, 3 here" in err
    cfg = load_config(hf_run[1] / "config.yaml", ["model.rope_theta=80000", "model.attention_backend=math",
                                                    "model.init_std=0.01"])
    assert open_init_source(str(hf_run[1]), cfg).folder.name == "step_00000000"
    with pytest.raises(ConfigError, match="model.norm_eps is 1e-05 there, 1e-06 here"):
        open_init_source(str(hf_run[1]), load_config(hf_run[1] / "config.yaml", ["model.norm_eps=1e-6"]))


def test_flags_that_do_not_go_together(hf_run, hf_dataset, capsys, tmp_path):
    step0 = hf_run[1] / "checkpoints" / "step_00000000"
    assert "does not go with --resume" in _train(capsys, hf_run[1], hf_dataset, tmp_path, "--resume", str(step0))
    missing = tmp_path / "missing"
    assert lh_train(["--config", str(hf_run[1] / "config.yaml"), "--init-from", str(missing),
                     f"data.path={hf_dataset}", f"logging.run_dir={tmp_path / 'new'}", "data.seq_len=128"]) == 2
    assert f"--init-from {missing}: {missing} does not exist" in capsys.readouterr().err
    # The Hugging Face folder itself, rather than its import.
    with pytest.raises(ConfigError, match=f"--init-from {hf_run[0]}: {hf_run[0]} is a Hugging Face model folder, "
                                          f"not a checkpoint: lh-import it"):
        open_init_source(str(hf_run[0]), load_config(hf_run[1] / "config.yaml"))
    # An empty folder is no run directory.
    with pytest.raises(ConfigError, match="is neither a checkpoint folder"):
        open_init_source(str(tmp_path), load_config(hf_run[1] / "config.yaml"))


def test_free_model_settings_that_differ_from_the_source_are_named(hf_run):
    # The source has rope_theta 5000 and no RoPE scaling (hf_models.KINDS["llama"]); the lines of `notes`
    # are what lh-train prints as "--init-from <source>: <line>" before step 0.
    same = open_init_source(str(hf_run[1]), load_config(hf_run[1] / "config.yaml", ["model.init_std=0.01"]))
    assert same.notes == []  # init_std is not named: the weights replace the initialization
    cfg = load_config(hf_run[1] / "config.yaml", ["model.rope_theta=10000", "model.rope_scaling.type=linear",
                                                    "model.rope_scaling.factor=2.0"])
    lines = open_init_source(str(hf_run[1]), cfg).notes
    assert lines == ["model settings differ from the source's (source -> this run): model.rope_scaling.factor "
                     "0.0 -> 2.0, model.rope_scaling.type 'none' -> 'linear', model.rope_theta 5000.0 -> 10000.0"]
