"""Ring attention on 2 and 4 gloo ranks equals single-device causal attention.

Every rank builds the same full-length inputs (same seed), runs ring attention
on its zigzag shards and compares its output and dq/dk/dv shards with the
zigzag shards of single-device results.

Tolerance: against a float64 reference, the ring's error may be at most twice
the error of single-device attention in the same dtype, plus W roundings to
the dtype at the magnitude of the result: each of the <= W per-block partials
(outputs, dK/dV) is rounded to the dtype once before its fp32 merge.
"""

import pytest
import torch
import torch.distributed as dist

from lh_dist.ops.attention import attention_backward, attention_forward
from lh_dist.parallel.comm import RingExchange
from lh_dist.parallel.ring_attention import ring_attention
from lh_dist.parallel.sharding import zigzag_shard

from spawn import spawn_ranks


def reference_attention(q, k, v):
    """Literal causal softmax attention with GQA: q [B, N, H, D], k/v [B, N, Hkv, D]."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    n = q.shape[1]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def _inputs(world, batch, heads, kv_heads, head_dim, chunk):
    generator = torch.Generator().manual_seed(1234)
    n = 2 * world * chunk
    q = torch.randn(batch, n, heads, head_dim, generator=generator)
    k = torch.randn(batch, n, kv_heads, head_dim, generator=generator)
    v = torch.randn(batch, n, kv_heads, head_dim, generator=generator)
    dout = torch.randn(batch, n, heads, head_dim, generator=generator)
    return q, k, v, dout


def _float64_reference(q, k, v, dout):
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = reference_attention(q, k, v)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _single_device(q, k, v, dout, dtype):
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    out, lse = attention_forward(q, k, v, causal=True)
    return (out, *attention_backward(dout, q, k, v, out, lse, causal=True))


def _compare_ring(rank, world, dtype, shape, device="cpu"):
    q, k, v, dout = (t.to(device) for t in _inputs(world, *shape))
    reference = _float64_reference(q, k, v, dout)
    single = _single_device(q, k, v, dout, dtype)

    def shard(t):
        return zigzag_shard(t, 1, world, rank)

    q_l, k_l, v_l = (shard(t).to(dtype).requires_grad_() for t in (q, k, v))
    out_l = ring_attention(q_l, k_l, v_l, dist.group.WORLD)
    out_l.backward(shard(dout).to(dtype))
    ring = (out_l, q_l.grad, k_l.grad, v_l.grad)

    rounding = torch.finfo(dtype).eps / 2  # unit roundoff
    for name, ours, theirs, exact in zip(("out", "dq", "dk", "dv"), ring, single, reference):
        assert ours.dtype == dtype and ours.shape == shard(exact).shape, name
        single_error = (theirs.double() - exact).abs().max().item()
        ring_error = (ours.double() - shard(exact)).abs().max().item()
        bound = 2 * single_error + world * rounding * exact.abs().max().item()
        assert ring_error <= bound, f"rank {rank} {dtype} {name}: {ring_error:.3g} > {bound:.3g}"


def _count_transfers(rank, world):
    """Forward moves K/V W-1 times; backward moves K/V W-1 times and dK/dV W times."""
    starts = []
    original = RingExchange.start

    def counting_start(self, send, tag=0):
        starts.append((tag, send.dtype, tuple(send.shape)))
        return original(self, send, tag)

    RingExchange.start = counting_start
    try:
        q = torch.randn(1, 8, 4, 8, requires_grad=True)
        k = torch.randn(1, 8, 2, 8, dtype=torch.float32, requires_grad=True)
        v = torch.randn(1, 8, 2, 8, requires_grad=True)
        out = ring_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), dist.group.WORLD)
        assert starts == [(0, torch.bfloat16, (2, 1, 8, 2, 8))] * (world - 1)  # only the 2 KV heads move
        out.float().sum().backward()
        kv_moves = [s for s in starts if s[0] == 0]
        dkv_moves = [s for s in starts if s[0] == 1]
        assert len(kv_moves) == 2 * (world - 1)
        assert dkv_moves == [(1, torch.float32, (2, 1, 8, 2, 8))] * world
    finally:
        RingExchange.start = original


# (batch, heads, kv_heads, head_dim, chunk): plain MHA and GQA.
SHAPES = [(2, 4, 4, 16, 8), (1, 4, 2, 16, 8)]


def _two_rank_suite(rank, world):
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            _compare_ring(rank, world, dtype, shape)
    _count_transfers(rank, world)


def _four_rank_suite(rank, world):
    for dtype in (torch.float32, torch.bfloat16):
        _compare_ring(rank, world, dtype, SHAPES[1])
    _count_transfers(rank, world)


def test_ring_two_ranks():
    spawn_ranks(_two_rank_suite, 2)


def test_ring_four_ranks():
    spawn_ranks(_four_rank_suite, 4)


def _nccl_suite(rank, world):
    for dtype in (torch.float32, torch.bfloat16):
        _compare_ring(rank, world, dtype, (1, 8, 2, 64, 256), device=f"cuda:{rank}")


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_ring_nccl_two_gpus():
    spawn_ranks(_nccl_suite, 2, backend="nccl")


def test_single_rank_is_causal_attention():
    q, k, v, dout = _inputs(1, 1, 4, 2, 8, 6)
    exact = _float64_reference(q, k, v, dout)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, None)
    out.backward(dout)
    for ours, theirs in zip((out, q.grad, k.grad, v.grad), exact):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_shape,kv_shape,match", [
    ((1, 7, 4, 8), (1, 7, 4, 8), "even"),
    ((1, 8, 4, 8), (1, 8, 3, 8), "multiple of k/v heads"),
    ((1, 8, 4, 8), (1, 6, 4, 8), "local length"),
    ((8, 4, 8), (8, 4, 8), r"\[B, N, H, D\]"),
])
def test_bad_inputs_are_rejected(q_shape, kv_shape, match):
    with pytest.raises(ValueError, match=match):
        ring_attention(torch.zeros(q_shape), torch.zeros(kv_shape), torch.zeros(kv_shape), None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_single_rank_cuda_bf16():
    q, k, v, dout = (t.cuda() for t in _inputs(1, 1, 8, 2, 64, 128))
    exact = _float64_reference(q, k, v, dout)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = ring_attention(qb, kb, vb, None)
    out.backward(dout.bfloat16())
    for ours, theirs in zip((out, qb.grad, kb.grad, vb.grad), exact):
        assert (ours.double() - theirs).abs().max() <= 4 * 2 ** -8 * theirs.abs().max()
