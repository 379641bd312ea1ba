"""PackedLoader on two real ranks (processes sharing mosaicml-streaming's per-node state): DP ranks read
different samples, CP ranks the same ones. tests/unit/test_data_loader.py checks it in one process."""

import itertools
import os

import torch

from conftest import packed_loader
from spawn import spawn_ranks


def _batches_on_rank(rank, world_size, path, out):
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    result = {}
    for dp, cp in ((2, 1), (1, 2)):
        loader = packed_loader(path, dp_rank=rank // cp, dp_degree=dp)  # CP innermost: a CP group shares its dp_rank
        result[f"dp{dp}_cp{cp}"] = torch.stack([next(loader) for _ in range(4)])
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def test_two_ranks_dp_get_different_cp_get_identical_samples(packed_dataset, tmp_path):
    spawn_ranks(_batches_on_rank, 2, str(packed_dataset), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    dp0, dp1 = ranks[0]["dp2_cp1"], ranks[1]["dp2_cp1"]
    assert not any(torch.equal(a, b) for a, b in zip(dp0.flatten(0, 1), dp1.flatten(0, 1)))
    # Interleaved, the two DP ranks' batches are the single-process global batches.
    single = packed_loader(packed_dataset, micro_batch=4)
    assert all(torch.equal(torch.cat([a, b]), next(single)) for a, b in zip(dp0, dp1))
    cp0, cp1 = ranks[0]["dp1_cp2"], ranks[1]["dp1_cp2"]
    assert torch.equal(cp0, cp1)
    assert torch.equal(cp0, torch.stack(list(itertools.islice(packed_loader(packed_dataset), 4))))
