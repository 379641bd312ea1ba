"""What the context-parallel attention tests of both tiers share: their inputs, the float64 single-device
references, and the bound on reordered float64 sums."""

import torch


def ring_inputs(world, batch, heads, kv_heads, head_dim, chunk):
    """q, k, v, dout of a sequence of 2 * world * chunk tokens, the same on every rank (fixed seed)."""
    generator = torch.Generator().manual_seed(1234)
    n = 2 * world * chunk
    q = torch.randn(batch, n, heads, head_dim, generator=generator)
    k = torch.randn(batch, n, kv_heads, head_dim, generator=generator)
    v = torch.randn(batch, n, kv_heads, head_dim, generator=generator)
    dout = torch.randn(batch, n, heads, head_dim, generator=generator)
    return q, k, v, dout


def reference_attention(q, k, v):
    """Literal causal softmax attention with GQA: q [B, N, H, D], k/v [B, N, Hkv, D]."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    n = q.shape[1]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def float64_reference(q, k, v, dout):
    """(out, dq, dk, dv) of `reference_attention` in float64."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = reference_attention(q, k, v)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def lighthouse_inputs(seq_len, heads, kv_heads, head_dim):
    """q, k, v, dout of one sequence of seq_len tokens, the same on every rank (fixed seed)."""
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(1, seq_len, heads, head_dim, generator=generator)
    k = torch.randn(1, seq_len, kv_heads, head_dim, generator=generator)
    v = torch.randn(1, seq_len, kv_heads, head_dim, generator=generator)
    dout = torch.randn(1, seq_len, heads, head_dim, generator=generator)
    return q, k, v, dout


def with_grads(q, k, v, dout, fn):
    """(out, dq, dk, dv) of out = fn(q, k, v) and the gradient dout."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def reordering_bound(result, params, seq_len):
    """Largest float64 difference allowed between two evaluations of one Lighthouse result that
    group and order its sums differently.

    CP evaluates the single-device sums in other groupings: softmax sums over a key prefix or
    merged ring blocks, dK/dV summed over ranks, a chunk's spill rows added after its own
    entries; the Triton kernels sum windows in another order than PyTorch. Reordering a sum of m
    terms moves it by at most about m unit roundoffs u times the sum of its terms' sizes (Higham,
    "Accuracy and Stability of Numerical Algorithms", §4.2). The longest sums run over the S
    gathered entries, and their terms sum to about the size of the result, so allow
    S * u * max|result|: 1e-13 to 4e-13 relative here, where the differences measured are ~1e-15
    (summing in float32 anywhere would leave 1e-7). A dropped or misrouted row is off by O(1).
    """
    unit_roundoff = torch.finfo(torch.float64).eps / 2
    return params.gathered_length(seq_len) * unit_roundoff * result.abs().max().item()
