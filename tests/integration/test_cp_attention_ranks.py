"""Context-parallel attention on 2 and 4 gloo ranks equals attention on one device: ring attention
(the dense phase) and Lighthouse-CP (the Lighthouse phase), both in one spawn of the ranks.

Every rank builds the same full-length inputs (same seed), runs the CP op on its zigzag shards and
compares its output and dq/dk/dv shards with the zigzag shards of the single-device results.

Ring attention: against a float64 reference, the ring's error may be at most twice the error of
single-device attention in the same dtype, plus W roundings to the dtype at the magnitude of the
result: each of the <= W per-block partials (outputs, dK/dV) is rounded to the dtype once before its
fp32 merge.

Lighthouse-CP, with each K/V exchange: selection reads fp32 token norms, so a float64 reference made
from the same dtype-rounded inputs selects the same entries; against it, the CP error may be at most
twice the single-device error in the same dtype, plus W unit roundoffs at the result's magnitude
(each of <= W partial outputs or dK/dV blocks is rounded to the dtype once before its fp32 merge or
sum). In float64 the CP path keeps float64 throughout, so it must agree with the single-device float64
result to reordering error (`reordering_bound`).

Kernel output buffers are NaN-filled on every rank (conftest's `nan_filled_allocations`).
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist

from lh_dist.ops.attention import attention_backward, attention_forward
from lh_dist.ops.lighthouse import LighthouseParams, lighthouse_attention
from lh_dist.parallel.comm import RingExchange
from lh_dist.parallel.lighthouse_cp import lighthouse_cp_attention
from lh_dist.parallel.ring_attention import ring_attention
from lh_dist.parallel.sharding import zigzag_shard

from conftest import nan_filled_allocations
from cp_reference import float64_reference, lighthouse_inputs, reordering_bound, ring_inputs, with_grads
from spawn import spawn_ranks

# ---------------------------------------------------------------- ring attention


def _single_device(q, k, v, dout, dtype):
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    out, lse = attention_forward(q, k, v, causal=True)
    return (out, *attention_backward(dout, q, k, v, out, lse, causal=True))


def _compare_ring(rank, world, dtype, shape, device="cpu"):
    q, k, v, dout = (t.to(device) for t in ring_inputs(world, *shape))
    reference = float64_reference(q, k, v, dout)
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
RING_SHAPES = [(2, 4, 4, 16, 8), (1, 4, 2, 16, 8)]

# ---------------------------------------------------------------- Lighthouse-CP


def _compare_lighthouse(rank, world, dtype, config, exchanges=("allgather", "ring"), device="cpu"):
    seq_len, heads, kv_heads, head_dim, levels, pooling, topk = config
    q, k, v, dout = (t.to(device=device, dtype=dtype) for t in lighthouse_inputs(seq_len, heads, kv_heads, head_dim))
    params = LighthouseParams(levels=levels, pooling=pooling, topk=topk)  # CP: Triton on CUDA
    one_device = dataclasses.replace(params, backend="reference")
    exact = with_grads(*(t.double() for t in (q, k, v, dout)), lambda *x: lighthouse_attention(*x, one_device))
    single = with_grads(q, k, v, dout, lambda *x: lighthouse_attention(*x, one_device))

    def shard(t):
        return zigzag_shard(t, 1, world, rank)

    rounding = torch.finfo(dtype).eps / 2  # unit roundoff
    for exchange in exchanges:
        ours = with_grads(
            *(shard(t) for t in (q, k, v, dout)),
            lambda *x, exchange=exchange: lighthouse_cp_attention(*x, dist.group.WORLD, params, exchange=exchange))
        for name, mine, theirs, reference in zip(("out", "dq", "dk", "dv"), ours, single, exact):
            assert mine.dtype == dtype and mine.shape == shard(reference).shape, name
            cp_error = (mine.double() - shard(reference)).abs().max().item()
            if dtype == torch.float64:  # the reference is the single-device result itself
                bound = reordering_bound(reference, params, seq_len)
            else:
                single_error = (theirs.double() - reference).abs().max().item()
                bound = 2 * single_error + world * rounding * reference.abs().max().item()
            assert cp_error <= bound, f"rank {rank} {exchange} {dtype} {name}: {cp_error:.3g} > {bound:.3g}"


# (seq_len, heads, kv_heads, head_dim, levels, pooling, topk): the smallest layouts whose
# 2W chunks hold whole tiles of >= 128 coarsest windows. Spills of 1 and 3 rows.
TWO_RANK_CONFIGS = [(1024, 4, 2, 16, 2, 2, 512), (2048, 2, 2, 8, 3, 2, 512)]
FOUR_RANK_CONFIG = (2048, 2, 1, 8, 2, 2, 1024)

# ---------------------------------------------------------------- the spawns


def _two_rank_suite(rank, world):
    with nan_filled_allocations():
        for dtype in (torch.float32, torch.bfloat16):
            for shape in RING_SHAPES:
                _compare_ring(rank, world, dtype, shape)
        _count_transfers(rank, world)

        q = torch.zeros(1, 512, 2, 8)
        with pytest.raises(ValueError, match="chunks = 4"):  # 2 tiles cannot split into 4 chunks
            lighthouse_cp_attention(q, q, q, dist.group.WORLD, LighthouseParams(levels=2, pooling=2, topk=256))
        for config in TWO_RANK_CONFIGS:
            _compare_lighthouse(rank, world, torch.float64, config)
            _compare_lighthouse(rank, world, torch.float32, config)
        _compare_lighthouse(rank, world, torch.bfloat16, TWO_RANK_CONFIGS[0])


def _four_rank_suite(rank, world):
    with nan_filled_allocations():
        for dtype in (torch.float32, torch.bfloat16):
            _compare_ring(rank, world, dtype, RING_SHAPES[1])
        _count_transfers(rank, world)
        _compare_lighthouse(rank, world, torch.float64, FOUR_RANK_CONFIG)
        _compare_lighthouse(rank, world, torch.float32, FOUR_RANK_CONFIG)


def test_two_ranks():
    spawn_ranks(_two_rank_suite, 2)


def test_four_ranks():
    spawn_ranks(_four_rank_suite, 4)


def _nccl_suite(rank, world):
    with nan_filled_allocations():
        for dtype in (torch.float32, torch.bfloat16):
            _compare_ring(rank, world, dtype, (1, 8, 2, 64, 256), device=f"cuda:{rank}")
        _compare_lighthouse(rank, world, torch.bfloat16, (16384, 8, 2, 64, 3, 4, 1024), device=f"cuda:{rank}")


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_two_gpus():
    spawn_ranks(_nccl_suite, 2, backend="nccl")
