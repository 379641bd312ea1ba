"""Zigzag sharding: layout, inverse, positions and length validation."""

import pytest
import torch

from lh_dist.parallel.sharding import zigzag_positions, zigzag_shard, zigzag_unshard


@pytest.mark.parametrize("cp_degree", [1, 2, 3, 4])
def test_shard_holds_chunks_r_and_mirror(cp_degree):
    seq_len = 2 * cp_degree * 3
    tokens = torch.arange(seq_len)
    chunks = tokens.chunk(2 * cp_degree)
    for rank in range(cp_degree):
        expected = torch.cat([chunks[rank], chunks[2 * cp_degree - 1 - rank]])
        assert torch.equal(zigzag_shard(tokens, 0, cp_degree, rank), expected)


@pytest.mark.parametrize("cp_degree,dim", [(1, 1), (2, 1), (4, 1), (4, 2)])
def test_unshard_inverts_shard(cp_degree, dim):
    x = torch.randn(2, 16, 8, 3)
    shards = [zigzag_shard(x, dim, cp_degree, r) for r in range(cp_degree)]
    assert all(s.shape[dim] == x.shape[dim] // cp_degree for s in shards)
    assert torch.equal(zigzag_unshard(shards, dim), x)


def test_every_rank_gets_the_same_causal_work():
    # The number of (query, key) pairs under a causal mask is balanced by the zigzag layout.
    seq_len, cp_degree = 64, 4
    work = [int((zigzag_positions(seq_len, cp_degree, r) + 1).sum()) for r in range(cp_degree)]
    assert len(set(work)) == 1


def test_positions_are_the_shard_of_arange():
    for rank in range(3):
        assert torch.equal(zigzag_positions(24, 3, rank), zigzag_shard(torch.arange(24), 0, 3, rank))


@pytest.mark.parametrize("seq_len,cp_degree", [(30, 4), (6, 2), (0, 1)])
def test_indivisible_length_is_rejected(seq_len, cp_degree):
    with pytest.raises(ValueError, match=f"seq_len={seq_len}.*{2 * cp_degree}"):
        zigzag_shard(torch.zeros(1, seq_len), 1, cp_degree, 0)
    with pytest.raises(ValueError, match=f"seq_len={seq_len}"):
        zigzag_positions(seq_len, cp_degree, 0)


def test_bad_rank_and_shards_are_rejected():
    with pytest.raises(ValueError, match="cp_rank"):
        zigzag_shard(torch.zeros(8), 0, 2, 2)
    with pytest.raises(ValueError, match="cp_degree"):
        zigzag_shard(torch.zeros(8), 0, 0, 0)
    with pytest.raises(ValueError, match="same even length"):
        zigzag_unshard([torch.zeros(4), torch.zeros(2)], 0)
