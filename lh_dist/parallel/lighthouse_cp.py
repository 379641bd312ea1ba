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
    LighthouseParams,
    lighthouse_gather,
    lighthouse_scatter,
    lighthouse_select,
    validate_lighthouse_inputs,
)
from lh_dist.parallel.comm import (
    EXCHANGES,
    all_gather_stacked,
    exchange_with_neighbors,
    group_coords,
    reduce_scatter_stacked,
)
from lh_dist.parallel.ring_attention import ring_attention
from lh_dist.parallel.sharding import check_zigzag_length, zigzag_chunk_ids, zigzag_shard, zigzag_unshard


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
        # [2, B, S, Hkv, D]: summed over ranks in fp32 (fp64 for fp64)
        dkv = torch.zeros_like(kv, dtype=torch.promote_types(kv.dtype, torch.float32))
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


@torch.compiler.disable  # selection and communication stay eager; compiled layers call it as an opaque step
def lighthouse_cp_attention(q, k, v, group, params: LighthouseParams, *, exchange: str = "allgather",
                            score_q=None, score_k=None) -> torch.Tensor:
    """Lighthouse attention of zigzag-sharded q [B, N/W, H, D], k/v [B, N/W, Hkv, D] over the CP group.

    Every rank of `group` (W ranks; None means one) passes its shards of a sequence of N
    tokens; returns this rank's output shard [B, N/W, H, D], equal to the zigzag shard of
    single-device Lighthouse with the same params. params.n_tiles must divide into 2W chunks.
    exchange: "allgather" or "ring" (how gathered K/V travel). score_q/score_k: the shards of the
    vectors scored instead of q/k, as in `lighthouse_attention`. params.backend runs the per-chunk
    select, gather and scatter. The output has q's dtype; partial sums stay in fp32 (fp64 for fp64).
    """
    validate_lighthouse_inputs(q, k, v, score_q, score_k)
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    world, rank = group_coords(group)
    chunk = check_zigzag_length(q.shape[1] * world, world)

    # Select and gather each local chunk on its own.
    sq, sk = q if score_q is None else score_q, k if score_k is None else score_k
    selections = [lighthouse_select(sq[:, j * chunk:(j + 1) * chunk], sk[:, j * chunk:(j + 1) * chunk], params,
                                    chunks=2 * world) for j in range(2)]
    qg, kg, vg = (torch.cat([lighthouse_gather(x[:, j * chunk:(j + 1) * chunk], selections[j], params)
                             for j in range(2)], dim=1) for x in (q, k, v))  # [B, 2Sc, H or Hkv, D]

    if exchange == "ring":
        og = ring_attention(qg, kg, vg, group, backend=params.attention_backend)
    else:
        og = _AllGatherCausalAttention.apply(qg, kg, vg, group, params.attention_backend)  # [B, 2Sc, H, D]

    # Scatter each chunk, keeping the rows its last windows spill into the next chunk, unrounded
    # until the rows from the neighbours are added.
    spill, acc_dtype = params.spill, torch.promote_types(q.dtype, torch.float32)
    gathered_chunk = og.shape[1] // 2
    first, second = (lighthouse_scatter(og[:, j * gathered_chunk:(j + 1) * gathered_chunk], selections[j], params,
                                        spill=spill, out_dtype=acc_dtype)
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
