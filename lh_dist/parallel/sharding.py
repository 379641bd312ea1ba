"""Zigzag sequence sharding for context parallelism.

The sequence is cut into 2W equal chunks for CP degree W; rank r keeps chunks
r and 2W-1-r. Under a causal mask every rank then does the same amount of
attention work (an early chunk is paired with a late one).
"""

import torch


def check_zigzag_length(seq_len: int, cp_degree: int) -> int:
    """Validate that seq_len splits into 2*cp_degree equal chunks; return the chunk length."""
    if cp_degree < 1:
        raise ValueError(f"cp_degree must be >= 1, got {cp_degree}")
    if seq_len <= 0 or seq_len % (2 * cp_degree) != 0:
        raise ValueError(
            f"seq_len={seq_len} must be a positive multiple of 2 * cp_degree = {2 * cp_degree} "
            f"(zigzag sharding cuts the sequence into 2 * cp_degree equal chunks); "
            f"pad or pack samples to such a length"
        )
    return seq_len // (2 * cp_degree)


def zigzag_chunk_ids(cp_degree: int, cp_rank: int) -> tuple[int, int]:
    """The two global chunk indices held by cp_rank."""
    if not 0 <= cp_rank < cp_degree:
        raise ValueError(f"cp_rank must be in [0, {cp_degree}), got {cp_rank}")
    return cp_rank, 2 * cp_degree - 1 - cp_rank


def zigzag_shard(x: torch.Tensor, dim: int, cp_degree: int, cp_rank: int) -> torch.Tensor:
    """Rank cp_rank's zigzag shard of x along dim: [.., N, ..] -> [.., N / cp_degree, ..]."""
    chunk = check_zigzag_length(x.shape[dim], cp_degree)
    first, second = zigzag_chunk_ids(cp_degree, cp_rank)
    return torch.cat([x.narrow(dim, first * chunk, chunk), x.narrow(dim, second * chunk, chunk)], dim=dim)


def zigzag_unshard(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of zigzag_shard: shards[r] is rank r's shard; returns the full sequence along dim."""
    cp_degree = len(shards)
    if cp_degree == 0:
        raise ValueError("shards must hold one tensor per CP rank, got an empty list")
    local_len = shards[0].shape[dim]
    if local_len % 2 != 0 or any(s.shape[dim] != local_len for s in shards):
        raise ValueError(
            f"every shard must have the same even length along dim {dim}, "
            f"got {[s.shape[dim] for s in shards]}"
        )
    chunk = local_len // 2
    chunks = [None] * (2 * cp_degree)
    for rank, shard in enumerate(shards):
        first, second = zigzag_chunk_ids(cp_degree, rank)
        chunks[first] = shard.narrow(dim, 0, chunk)
        chunks[second] = shard.narrow(dim, chunk, chunk)
    return torch.cat(chunks, dim=dim)


def zigzag_positions(seq_len: int, cp_degree: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global token positions of cp_rank's shard (for RoPE): int64 [seq_len / cp_degree]."""
    chunk = check_zigzag_length(seq_len, cp_degree)
    first, second = zigzag_chunk_ids(cp_degree, cp_rank)
    return torch.cat([
        torch.arange(first * chunk, (first + 1) * chunk, device=device),
        torch.arange(second * chunk, (second + 1) * chunk, device=device),
    ])
