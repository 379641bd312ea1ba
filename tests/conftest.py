import pytest
import torch


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
