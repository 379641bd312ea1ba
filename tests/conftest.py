import pytest
import torch

# A model small enough for a CPU training step in well under a second (about 0.1M parameters)...
TINY_MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128"]
# ...and a short dense run of it that logs every step. Tests import these (`from conftest import
# SMALL_RUN`) and append what they need; later overrides win.
SMALL_RUN = [*TINY_MODEL, "data.seq_len=128", "data.micro_batch=2", "schedule.warmup_steps=2",
             "schedule.decay=constant", "schedule.lighthouse_steps=0", "logging.log_interval=1",
             "logging.eval_batches=1"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture(scope="session")
def stdlib_dataset(tmp_path_factory):
    """A small real dataset: the first standard-library sources, tokenized into MDS shards by lh-data."""
    from lh_dist.data.cli import main as lh_data

    out = tmp_path_factory.mktemp("data") / "stdlib"
    assert lh_data(["stdlib", "--out", str(out), "--max-docs", "120", "--val-fraction", "0.05"]) == 0
    return out
