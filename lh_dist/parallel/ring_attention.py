"""Causal ring attention over a zigzag-sharded sequence.

Every rank holds two chunks of q, k and v (see sharding.py): chunk r and chunk
2W-1-r, each `c` tokens long. K/V blocks travel around the CP group; at ring
step s a rank holds the K/V of rank src = r - s (mod W). Zigzag order makes
most of the causal mask trivial:
  - src == r: the local sequence is in causal order, so one causal block;
  - src <  r: both local q chunks come after src's first chunk and before its
    second, so all local q attends src's first kv chunk, unmasked;
  - src >  r: only the local second chunk comes after src's chunks, and it
    attends all of src's kv, unmasked; the first chunk sees none of it.
So every step after the first costs half a block, and all ranks do the same work.

Partial outputs merge through their log-sum-exp in fp32. The backward reuses
the final output and LSE for every block (the block softmax is exp(s - lse)),
and sends fp32 dK/dV accumulators around the ring with the K/V they belong to,
so each block's gradient arrives back at its owner after W steps. (Every
accumulator is fp64 instead for fp64 inputs.)
"""

import torch

from lh_dist.ops.attention import attention_backward, attention_forward, merge_partials
from lh_dist.parallel.comm import RingExchange, group_coords

_KV_TAG, _DKV_TAG = 0, 1


def check_ring_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate local zigzag shards q [B, 2c, H, D], k/v [B, 2c, Hkv, D]; raise ValueError."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, N, H, D], got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, local_len, heads, head_dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, local_len, head_dim):
        raise ValueError(
            f"k/v must match q in batch, local length and head dim: q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if heads % k.shape[2] != 0:
        raise ValueError(f"q heads ({heads}) must be a multiple of k/v heads ({k.shape[2]}) for GQA")
    if local_len % 2 != 0:
        raise ValueError(
            f"local sequence length must be even (two zigzag chunks per rank), got {local_len}; "
            f"the global seq_len must be a multiple of 2 * cp_degree"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _accumulator(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def ring_attention_forward(q, k, v, group, *, scale=None, backend="auto"):
    """Forward only. Returns out [B, 2c, H, D] (q's dtype) and lse [B, H, 2c] (fp32; fp64 for fp64)."""
    world, rank = group_coords(group)
    chunk = q.shape[1] // 2
    ring = RingExchange(group) if world > 1 else None
    kv = torch.stack([k, v])  # [2, B, 2c, Hkv, D]: one message per step
    out, lse = None, None
    for step in range(world):
        pending = ring.start(kv, _KV_TAG) if step + 1 < world else None  # prefetch the next block
        src = (rank - step) % world
        if step == 0:
            out, lse = attention_forward(q, k, v, causal=True, scale=scale, backend=backend)  # [B, 2c, H, D]
        elif src < rank:
            block_out, block_lse = attention_forward(
                q, kv[0, :, :chunk], kv[1, :, :chunk], causal=False, scale=scale, backend=backend)
            out, lse = merge_partials(out, lse, block_out, block_lse)
        else:
            block_out, block_lse = attention_forward(
                q[:, chunk:], kv[0], kv[1], causal=False, scale=scale, backend=backend)
            tail_out, tail_lse = merge_partials(out[:, chunk:], lse[:, :, chunk:], block_out, block_lse)
            out[:, chunk:] = tail_out
            lse[:, :, chunk:] = tail_lse
        out = out.to(_accumulator(q))  # partials stay unrounded until the end
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


def ring_attention_backward(dout, q, k, v, out, lse, group, *, scale=None, backend="auto"):
    """Backward of ring_attention_forward. Returns dq, dk, dv in the dtypes of q, k, v."""
    world, rank = group_coords(group)
    chunk = q.shape[1] // 2
    ring = RingExchange(group) if world > 1 else None
    kv = torch.stack([k, v])  # [2, B, 2c, Hkv, D]
    dq = torch.zeros_like(q, dtype=_accumulator(q))  # [B, 2c, H, D]
    dkv_pending = None
    for step in range(world):
        kv_pending = ring.start(kv, _KV_TAG) if step + 1 < world else None
        src = (rank - step) % world
        dkv = torch.zeros_like(kv, dtype=_accumulator(q))  # [2, B, 2c, Hkv, D]: this block's gradient
        if step == 0:
            dq_b, dk_b, dv_b = attention_backward(
                dout, q, k, v, out, lse, causal=True, scale=scale, backend=backend)
            dq += dq_b
            dkv[0] += dk_b
            dkv[1] += dv_b
        elif src < rank:
            dq_b, dk_b, dv_b = attention_backward(
                dout, q, kv[0, :, :chunk], kv[1, :, :chunk], out, lse,
                causal=False, scale=scale, backend=backend)
            dq += dq_b
            dkv[0, :, :chunk] += dk_b
            dkv[1, :, :chunk] += dv_b
        else:
            dq_b, dk_b, dv_b = attention_backward(
                dout[:, chunk:], q[:, chunk:], kv[0], kv[1], out[:, chunk:],
                lse[:, :, chunk:].contiguous(), causal=False, scale=scale, backend=backend)
            dq[:, chunk:] += dq_b
            dkv[0] += dk_b
            dkv[1] += dv_b
        if dkv_pending is not None:
            dkv += dkv_pending.wait()  # what earlier ranks accumulated for this block
        if kv_pending is not None:
            kv = kv_pending.wait()
        if ring is not None:
            # Travels one hop behind its K/V; after the last step it lands at the block's owner.
            dkv_pending = ring.start(dkv, _DKV_TAG)
    if dkv_pending is not None:
        dkv = dkv_pending.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale, backend):
        out, lse = ring_attention_forward(q, k, v, group, scale=scale, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.backend = group, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_attention_backward(
            dout.contiguous(), q, k, v, out, lse, ctx.group, scale=ctx.scale, backend=ctx.backend)
        return dq, dk, dv, None, None, None


@torch.compiler.disable  # point-to-point traffic stays eager; compiled layers call it as an opaque step
def ring_attention(q, k, v, group, *, scale=None, backend="auto"):
    """Causal attention of zigzag-sharded q [B, 2c, H, D] over k, v [B, 2c, Hkv, D] across `group`.

    Every rank of `group` (the CP group) passes its own shards (sharding.zigzag_shard);
    returns this rank's output shard [B, 2c, H, D]. Differentiable in q, k, v.
    group None means a single rank (plain causal attention).
    """
    check_ring_inputs(q, k, v)
    return _RingAttention.apply(q, k, v, group, scale, backend)
