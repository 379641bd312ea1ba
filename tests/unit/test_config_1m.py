"""configs/paper-270m-1m.yaml: the paper's model at 1,048,576 tokens with the 1M Lighthouse flavor
(no always-dense layer). It validates and plans on a CPU, and a corpus too small for one sample
stops lh-train in one line before any work."""

from pathlib import Path

import pytest

from lh_dist.assembly.model import PhasedAttention, build_model, dense_layer_ids, lighthouse_length
from lh_dist.config import load_config
from lh_dist.train.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/paper-270m-1m.yaml")


def test_the_config_is_the_paper_model_with_the_1m_flavor():
    cfg, paper = load_config(CONFIG), load_config(REPO / "configs/paper-530m-98k.yaml")
    assert cfg.model == paper.model
    lh = cfg.lighthouse
    assert (lh.levels, lh.pooling, lh.topk, lh.dense_layers) == (4, 4, 4096, [])
    assert cfg.data.seq_len == 1 << 20
    assert (cfg.parallel.activation_checkpointing, cfg.parallel.compile) == ("full", True)
    assert lighthouse_length(cfg) == 65536  # N/64 + 3 * 4 * 4096


def test_dry_run_plans_it_on_a_cpu(capsys):
    assert main(["--config", CONFIG, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sequence 1,048,576 tokens, not sharded (cp 1)" in out
    assert "Lighthouse L=4 p=4 k=4096: S = 65,536 (0.062 N); dense layers []" in out


def test_no_dense_layers_builds_lighthouse_in_every_layer():
    small = ["model.dim=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=48",
             "data.seq_len=1024", "lighthouse.levels=2", "lighthouse.pooling=2", "lighthouse.topk=256"]
    cfg = load_config(CONFIG, small)
    assert dense_layer_ids(cfg) == set()
    attentions = [m for m in build_model(cfg).modules() if isinstance(m, PhasedAttention)]
    assert len(attentions) == 3 and all(a.lighthouse_fn is not None for a in attentions)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """Four documents of 3,000 bytes: 9,000 training and 3,000 validation tokens."""
    from lh_dist.data.cli import main as lh_data

    text = tmp_path_factory.mktemp("text")
    for i in range(4):
        (text / f"doc{i}.txt").write_text(f"document {i} " * 300)
    out = tmp_path_factory.mktemp("data") / "tiny"
    assert lh_data(["text", str(text), "--out", str(out), "--val-fraction", "0.25"]) == 0
    return out


def test_a_corpus_smaller_than_one_sample_stops_lh_train_in_one_line(tiny_corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--config", CONFIG, f"data.path={tiny_corpus}", f"logging.run_dir={run_dir}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"lh-train: config error: data.path: split 'train' of {tiny_corpus} holds ")
    assert lines[0].endswith("0 samples of data.seq_len + 1 = 1,048,577; the run needs 1 (1 batch(es) x "
                             "micro_batch 1 x dp 1)")
    assert not run_dir.exists()  # stopped before any work


def test_the_loader_says_the_same_in_one_line(tiny_corpus):
    from lh_dist.data.loader import PackedLoader

    with pytest.raises(ValueError) as error:
        PackedLoader(str(tiny_corpus), "train", seq_len=1 << 20, micro_batch=1, dp_rank=0, dp_degree=1, seed=0)
    assert str(error.value) == f"split 'train' of {tiny_corpus} has fewer than seq_len + 1 = 1048577 tokens"
