import pickle

import pytest
import yaml

from lh_dist.config import ConfigError, load_config, save_config
from lh_dist.ops.lighthouse.params import LighthouseArgError, LighthouseParams


def test_configs_in_repo_load():
    tiny = load_config("configs/tiny-cpu.yaml")
    assert tiny.parallel.cp_degree == 2
    paper = load_config("configs/paper-530m-98k.yaml")
    m = paper.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_hidden) == (1024, 30, 8, 8, 1536)
    assert paper.data.seq_len == 98304 and m.rope_theta == 10000.0


def test_overrides_apply_with_types():
    cfg = load_config("configs/tiny-cpu.yaml", ["optim.lr=0.01", "schedule.steps=70", "lighthouse.dense_layers=[0, -1]"])
    assert cfg.optim.lr == 0.01 and cfg.schedule.steps == 70 and cfg.lighthouse.dense_layers == [0, -1]


@pytest.mark.parametrize("override, field, allowed", [
    ("model.dimm=3", "model.dimm", "allowed keys under model"),
    ("optim.lr=fast", "optim.lr", "a number"),
    ("optim.lr=-1", "optim.lr", "positive"),
    ("schedule.steps=1.5", "schedule.steps", "an integer"),
    ("schedule.decay=exp", "schedule.decay", "'constant', 'linear', 'cosine'"),
    ("schedule.decay_steps=1000", "schedule.decay_steps", "in [0, schedule.steps - schedule.warmup_steps = "),
    ("schedule.decay_steps=half", "schedule.decay_steps", "an integer"),
    ("model.n_kv_heads=3", "model.n_kv_heads", "a divisor of model.n_heads"),
    ("parallel.zero_stage=4", "parallel.zero_stage", "one of 0, 1, 2, 3"),
    ("data.seq_len=1030", "data.seq_len", "multiple of topk/128 = 4 tiles"),
    ("lighthouse.pooling=3", "lighthouse.pooling", "a power of two"),
    ("lighthouse.topk=100", "lighthouse.topk", "multiple of 128"),
    ("model.tie_embeddings=1", "model.tie_embeddings", "true or false"),
    ("nonsense=1", "nonsense", "allowed keys under the top level"),
])
def test_bad_values_name_the_field(override, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny-cpu.yaml", [override])
    assert field in str(err.value) and allowed in str(err.value)


def test_lighthouse_shape_checked_only_when_used():
    dense = ["schedule.lighthouse_steps=0"]
    load_config("configs/tiny-cpu.yaml", dense + ["lighthouse.topk=4096"])  # dense run: not checked
    with pytest.raises(ConfigError, match="divisible by 2 \\* parallel.cp_degree"):
        load_config("configs/tiny-cpu.yaml", dense + ["data.seq_len=510"])
    with pytest.raises(ConfigError, match="lighthouse.topk"):  # 3 tiles cannot split into 4 zigzag chunks
        load_config("configs/tiny-cpu.yaml", ["lighthouse.topk=384"])
    with pytest.raises(ConfigError, match="data.seq_len"):
        load_config("configs/tiny-cpu.yaml", ["lighthouse.levels=3"])
    cfg = load_config("configs/tiny-cpu.yaml", ["lighthouse.levels=3", "data.seq_len=2048"])
    assert cfg.schedule.lighthouse_steps == 40


@pytest.mark.parametrize("override, message", [
    # tiny-cpu: data.seq_len 1024, Lighthouse levels 2, pooling 2, topk 512 (4 tiles), CP 2 (4 zigzag chunks)
    ("lighthouse.topk=384", "lighthouse.topk: topk/128 = 3 tiles must be divisible by chunks = 4"),
    ("data.seq_len=1028", "data.seq_len: tile length n*128/topk = 257 must be divisible by pooling**(levels-1) = 2"),
    ("lighthouse.levels=3", "data.seq_len: each tile needs at least 128 coarsest windows, got 64"),
])
def test_lighthouse_shape_errors_name_the_field_of_the_failed_rule(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny-cpu.yaml", [override])
    assert str(err.value).startswith(message)
    assert str(err.value).endswith("(here n = data.seq_len, chunks = 2 * parallel.cp_degree)")


def test_lighthouse_arg_error_carries_its_argument_through_pickling():
    with pytest.raises(LighthouseArgError) as err:
        LighthouseParams(levels=2, pooling=2, topk=512).check(1024, chunks=0)
    again = pickle.loads(pickle.dumps(err.value))  # as it crosses process boundaries
    assert (err.value.arg, again.arg, str(again)) == ("chunks", "chunks", "chunks must be >= 1, got 0")


def test_resolved_config_round_trips(tmp_path):
    for decay_steps in ("null", "10"):  # a field typed int | None, both ways
        cfg = load_config("configs/tiny-cpu.yaml", ["optim.lr=0.02", f"schedule.decay_steps={decay_steps}"])
        save_config(cfg, tmp_path / "c.yaml")
        again = load_config(tmp_path / "c.yaml")
        assert again == cfg
        assert again.schedule.decay_steps == (None if decay_steps == "null" else 10)
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["optim"]["lr"] == 0.02


def test_yaml_that_does_not_parse_is_one_line_naming_where(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: 64\n data: x\n")  # a key indented less than its neighbour
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"config file {bad} is not valid YAML: ")
    assert " at line 3, column 2" in str(e.value)

    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.sources=[{path: a"])
    assert str(e.value) == ("override 'data.sources=[{path: a': the value is not valid YAML: expected ',' or '}', "
                            "but got '<stream end>' at line 1, column 10 (while parsing a flow mapping)")


def test_an_emptied_data_path_without_sources_is_refused_not_defaulted():
    for overrides in (["data.path="], ["data.path=", "data.sources=[]"], ["data.path=null"]):
        with pytest.raises(ConfigError, match=r"^data.path is empty and data.sources is not set: name a dataset"):
            load_config("configs/tiny-cpu.yaml", overrides)
    assert load_config(None).data.path == "runs/data/stdlib"  # left out: the default
    mixture = load_config(None, ["data.path=", "data.sources=[{path: a}, {path: b}]"])
    assert mixture.data.path == "" and [s.path for s in mixture.data.sources] == ["a", "b"]


def test_the_built_in_defaults_train_in_their_own_run_dir():
    # Not configs/tiny-cpu.yaml's, whose model differs: a run of one would refuse to resume the other's.
    assert load_config(None).logging.run_dir != load_config("configs/tiny-cpu.yaml").logging.run_dir
