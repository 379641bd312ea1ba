"""Lighthouse attention under context parallelism (docs/DESIGN.md §3).

Each rank holds two zigzag chunks of the sequence (chunks r and 2W-1-r of 2W).
Tiles never straddle chunks, so pooling, scoring and selection run per chunk
with no communication, and the per-chunk gathered sequences, taken in chunk
order, are the single-device gathered sequence: the local gathered q/k/v are
its zigzag shards. Causal attention over it needs the other ranks' gathered
K/V, exchanged in one of two ways:
  - "allgather": all-gather the gathered K/V once (they are short: S ~ N/16..N/64),
    attend each local chunk of queries to its causal prefix, reduce-scatter dK/dV;
  - "ring": ring attention over the gathered sequence.
Scattering an entry's output back is local, except that an entry covering the
end of a chunk also writes up to p^(L-1)-1 rows at the start of the next chunk:
those rows go to the rank holding that chunk (and their gradients come back).
The result equals single-device Lighthouse on the full sequence (CP invariance).
"""

import torch

from lh_dist.ops.attention import attention_backward, attention_forward
from lh_dist.ops.lighthouse import (
    gather_pyramid,
    pyramid_scores,
    scatter_back,
    select,
    validate_lighthouse_args,
    validate_lighthouse_inputs,
)
from lh_dist.ops.lighthouse.validation import TILE_SELECT
from lh_dist.parallel.comm import all_gather_stacked, exchange_with_neighbors, group_coords, reduce_scatter_stacked
from lh_dist.parallel.ring_attention import ring_attention
from lh_dist.parallel.sharding import check_zigzag_length, zigzag_chunk_ids, zigzag_shard, zigzag_unshard

EXCHANGES = ("allgather", "ring")
BACKENDS = ("auto", "reference", "triton")



class _AllGatherCausalAttention(torch.autograd.Function):
    """Causal attention of zigzag-sharded gathered queries over all-gathered K/V."""

    @staticmethod
    def forward(ctx, q, k, v, group, backend):
        world, rank = group_coords(group)
        chunk = q.shape[1] // 2
        kv = torch.stack([k, v])  # [2, B, 2Sc, Hkv, D]
        shards = all_gather_stacked(kv, group) if world > 1 else kv[None]  # [W, 2, B, 2Sc, Hkv, D]
        kv = zigzag_unshard(list(shards), dim=2)  # [2, B, S, Hkv, D], in sequence order
        outs, lses = [], []
        for j, chunk_id in enumerate(zigzag_chunk_ids(world, rank)):
            prefix = (chunk_id + 1) * chunk  # bottom-right aligned causal mask over the prefix
            out, lse = attention_forward(q[:, j * chunk:(j + 1) * chunk], kv[0, :, :prefix], kv[1, :, :prefix],
                                         causal=True, backend=backend)
            outs.append(out)
            lses.append(lse)
        out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=2)  # [B, 2Sc, H, D], [B, H, 2Sc]
        ctx.save_for_backward(q, kv, out, lse)
        ctx.group, ctx.backend, ctx.world, ctx.rank = group, backend, world, rank
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors
        chunk = q.shape[1] // 2
        dq = torch.empty_like(q)
        dkv = torch.zeros_like(kv, dtype=torch.float32)  # [2, B, S, Hkv, D]: summed in fp32 over ranks
        for j, chunk_id in enumerate(zigzag_chunk_ids(ctx.world, ctx.rank)):
            rows, prefix = slice(j * chunk, (j + 1) * chunk), (chunk_id + 1) * chunk
            dq[:, rows], dk, dv = attention_backward(
                dout[:, rows].contiguous(), q[:, rows], kv[0, :, :prefix], kv[1, :, :prefix],
                out[:, rows], lse[:, :, rows].contiguous(), causal=True, backend=ctx.backend)
            dkv[0, :, :prefix] += dk
            dkv[1, :, :prefix] += dv
        per_rank = torch.stack([zigzag_shard(dkv, 2, ctx.world, r) for r in range(ctx.world)])  # [W, 2, B, 2Sc, ..]
        mine = reduce_scatter_stacked(per_rank, ctx.group) if ctx.world > 1 else per_rank[0]
        return dq, mine[0].to(kv.dtype), mine[1].to(kv.dtype), None, None


class _SpillToNeighbors(torch.autograd.Function):
    """Send the rows spilling past chunk r to rank r+1 and those past chunk 2W-1-r to rank r-1."""

    @staticmethod
    def forward(ctx, to_prev, to_next, group):
        ctx.group = group
        world, rank = group_coords(group)
        from_prev, from_next = exchange_with_neighbors(
            to_prev if rank > 0 else None, to_next if rank < world - 1 else None, group)
        zeros = torch.zeros_like(to_prev)
        return (zeros if from_prev is None else from_prev), (zeros if from_next is None else from_next)

    @staticmethod
    def backward(ctx, grad_from_prev, grad_from_next):
        # The rows came from the neighbors, so their gradients go back the opposite way.
        world, rank = group_coords(ctx.group)
        grad_to_prev, grad_to_next = exchange_with_neighbors(
            grad_from_prev.contiguous() if rank > 0 else None,
            grad_from_next.contiguous() if rank < world - 1 else None, ctx.group)
        zeros = torch.zeros_like(grad_from_prev)
        grad_to_prev = zeros if grad_to_prev is None else grad_to_prev
        grad_to_next = zeros if grad_to_next is None else grad_to_next
        return grad_to_prev, grad_to_next, None


def _chunk_reference(qc, kc, vc, levels, pooling, tiles, scorer, spill):
    """Gathered (q, k, v) of one chunk, and its scatter (-> fp32 [B, n + spill, H, D]), in plain PyTorch."""
    q_scores, k_scores = pyramid_scores(qc, kc, levels, pooling, scorer)
    selection = select(q_scores, k_scores, qc.shape[1], levels, pooling, tiles)
    gathered = [gather_pyramid(x, selection) for x in (qc, kc, vc)]
    return gathered, lambda og: scatter_back(og.float(), selection, qc.shape[1] + spill)


def _chunk_triton(qc, kc, vc, levels, pooling, tiles, scorer, spill):
    """As _chunk_reference, on the Triton kernels."""
    from lh_dist.ops.lighthouse.fast import select_fast
    from lh_dist.parallel.lighthouse_chunk_ops import gather_chunk, scatter_chunk

    qc, kc, vc = (x.contiguous() for x in (qc, kc, vc))
    index, inverse = select_fast(qc, kc, levels, pooling, tiles, scorer)
    gathered = [gather_chunk(x, index, inverse, levels, pooling) for x in (qc, kc, vc)]
    return gathered, lambda og: scatter_chunk(og, index, inverse, qc.shape[1], levels, pooling, spill)


@torch.compiler.disable  # selection and communication stay eager; compiled layers call it as an opaque step
def lighthouse_cp_attention(q, k, v, group, *, levels: int, pooling: int, topk: int, scorer: str = "norm",
                            exchange: str = "allgather", backend: str = "auto",
                            attention_backend: str = "auto") -> torch.Tensor:
    """Lighthouse attention of zigzag-sharded q [B, N/W, H, D], k/v [B, N/W, Hkv, D] over the CP group.

    Every rank of `group` (W ranks; None means one) passes its shards of a sequence of N
    tokens; returns this rank's output shard [B, N/W, H, D], equal to the zigzag shard of
    single-device Lighthouse with the same levels, pooling and topk. topk/128 tiles must
    divide into 2W chunks. exchange: "allgather" or "ring" (how gathered K/V travel).
    backend: per-chunk select/gather/scatter, "reference", "triton" or "auto" (Triton on CUDA).
    """
    validate_lighthouse_inputs(q, k, v)
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    world, rank = group_coords(group)
    seq_len = q.shape[1] * world
    chunk = check_zigzag_length(seq_len, world)
    validate_lighthouse_args(seq_len, levels, pooling, topk, chunks=2 * world)
    tiles_per_chunk = topk // TILE_SELECT // (2 * world)

    # Pool, score, select and gather each local chunk on its own.
    spill = pooling ** (levels - 1) - 1  # rows past a chunk's end that its last windows reach
    per_chunk = _chunk_triton if backend == "triton" else _chunk_reference
    gathered, scatters = [], []
    for j in range(2):
        parts, scatter = per_chunk(*(x[:, j * chunk:(j + 1) * chunk] for x in (q, k, v)),
                                   levels, pooling, tiles_per_chunk, scorer, spill)
        gathered.append(parts)
        scatters.append(scatter)
    qg, kg, vg = (torch.cat(parts, dim=1) for parts in zip(*gathered))  # [B, 2Sc, H or Hkv, D]

    if exchange == "ring":
        og = ring_attention(qg, kg, vg, group, backend=attention_backend)
    else:
        og = _AllGatherCausalAttention.apply(qg, kg, vg, group, attention_backend)  # [B, 2Sc, H, D]

    # Scatter each chunk in fp32, keeping the rows its last windows spill into the next chunk.
    gathered_chunk = og.shape[1] // 2
    first, second = (scatters[j](og[:, j * gathered_chunk:(j + 1) * gathered_chunk])
                     for j in range(2))  # [B, chunk + spill, H, D] each
    # Chunk r spills into chunk r+1: rank r+1's first chunk, or for r = W-1 the local second
    # chunk 2W-1-r = r+1. Chunk 2W-1-r spills into chunk 2W-r: rank r-1's second chunk
    # (nothing for r = 0: it is the last chunk of the sequence).
    second_head = second[:, :spill]
    if rank == world - 1:
        second_head = second_head + first[:, chunk:]
    if world > 1:
        from_prev, from_next = _SpillToNeighbors.apply(second[:, chunk:], first[:, chunk:], group)
        first_head = first[:, :spill] + from_prev
        if rank < world - 1:
            second_head = second_head + from_next
    else:
        first_head = first[:, :spill]
    out = torch.cat([first_head, first[:, spill:chunk], second_head, second[:, spill:chunk]], dim=1)
    return out.to(q.dtype)  # [B, 2 * chunk, H, D]
