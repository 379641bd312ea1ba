"""Lighthouse under context parallelism equals single-device Lighthouse (CP invariance).

Every rank builds the same full-length inputs, runs Lighthouse-CP on its zigzag
shards with each K/V exchange, and compares its output and input-gradient
shards with the zigzag shards of single-device Lighthouse on the whole sequence.

Selection reads fp32 token norms, so a float64 reference made from the same
dtype-rounded inputs selects the same entries; against it, the CP error may be
at most twice the single-device error in the same dtype, plus W unit roundoffs
at the result's magnitude (each of <= W partial outputs or dK/dV blocks is
rounded to the dtype once before its fp32 merge or sum).

In float64 the CP path keeps float64 throughout, so it must agree with the
single-device float64 result to reordering error (`_reordering_bound`).
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from lh_dist.ops.lighthouse import LighthouseParams, lighthouse_attention
from lh_dist.parallel.lighthouse_cp import lighthouse_cp_attention
from lh_dist.parallel.sharding import zigzag_shard

from spawn import spawn_ranks


def _inputs(seq_len, heads, kv_heads, head_dim):
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(1, seq_len, heads, head_dim, generator=generator)
    k = torch.randn(1, seq_len, kv_heads, head_dim, generator=generator)
    v = torch.randn(1, seq_len, kv_heads, head_dim, generator=generator)
    dout = torch.randn(1, seq_len, heads, head_dim, generator=generator)
    return q, k, v, dout


def _lighthouse_with_grads(q, k, v, dout, fn):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _reordering_bound(result, params, seq_len):
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


def _compare(rank, world, dtype, config, exchanges=("allgather", "ring"), device="cpu"):
    seq_len, heads, kv_heads, head_dim, levels, pooling, topk = config
    q, k, v, dout = (t.to(device=device, dtype=dtype) for t in _inputs(seq_len, heads, kv_heads, head_dim))
    params = LighthouseParams(levels=levels, pooling=pooling, topk=topk)  # CP: Triton on CUDA
    one_device = dataclasses.replace(params, backend="reference")
    exact = _lighthouse_with_grads(*(t.double() for t in (q, k, v, dout)),
                                   lambda *x: lighthouse_attention(*x, one_device))
    single = _lighthouse_with_grads(q, k, v, dout, lambda *x: lighthouse_attention(*x, one_device))

    def shard(t):
        return zigzag_shard(t, 1, world, rank)

    rounding = torch.finfo(dtype).eps / 2  # unit roundoff
    for exchange in exchanges:
        ours = _lighthouse_with_grads(
            *(shard(t) for t in (q, k, v, dout)),
            lambda *x, exchange=exchange: lighthouse_cp_attention(*x, dist.group.WORLD, params, exchange=exchange))
        for name, mine, theirs, reference in zip(("out", "dq", "dk", "dv"), ours, single, exact):
            assert mine.dtype == dtype and mine.shape == shard(reference).shape, name
            cp_error = (mine.double() - shard(reference)).abs().max().item()
            if dtype == torch.float64:  # the reference is the single-device result itself
                bound = _reordering_bound(reference, params, seq_len)
            else:
                single_error = (theirs.double() - reference).abs().max().item()
                bound = 2 * single_error + world * rounding * reference.abs().max().item()
            assert cp_error <= bound, f"rank {rank} {exchange} {dtype} {name}: {cp_error:.3g} > {bound:.3g}"


# (seq_len, heads, kv_heads, head_dim, levels, pooling, topk): the smallest layouts whose
# 2W chunks hold whole tiles of >= 128 coarsest windows. Spills of 1 and 3 rows.
TWO_RANK_CONFIGS = [(1024, 4, 2, 16, 2, 2, 512), (2048, 2, 2, 8, 3, 2, 512)]
FOUR_RANK_CONFIG = (2048, 2, 1, 8, 2, 2, 1024)


def _two_rank_suite(rank, world):
    q = torch.zeros(1, 512, 2, 8)
    with pytest.raises(ValueError, match="chunks = 4"):  # 2 tiles cannot split into 4 chunks
        lighthouse_cp_attention(q, q, q, dist.group.WORLD, LighthouseParams(levels=2, pooling=2, topk=256))
    for config in TWO_RANK_CONFIGS:
        _compare(rank, world, torch.float64, config)
        _compare(rank, world, torch.float32, config)
    _compare(rank, world, torch.bfloat16, TWO_RANK_CONFIGS[0])


def _four_rank_suite(rank, world):
    _compare(rank, world, torch.float64, FOUR_RANK_CONFIG)
    _compare(rank, world, torch.float32, FOUR_RANK_CONFIG)


def test_lighthouse_cp_two_ranks():
    spawn_ranks(_two_rank_suite, 2)


def test_lighthouse_cp_four_ranks():
    spawn_ranks(_four_rank_suite, 4)


@pytest.mark.parametrize("exchange", ["allgather", "ring"])
def test_single_rank_equals_reference(exchange):
    q, k, v, dout = (t.double() for t in _inputs(1024, 4, 2, 16))
    params = LighthouseParams(levels=2, pooling=2, topk=512)
    ours = _lighthouse_with_grads(
        q, k, v, dout, lambda *x: lighthouse_cp_attention(*x, None, params, exchange=exchange))
    single = _lighthouse_with_grads(q, k, v, dout, lambda *x: lighthouse_attention(*x, params))
    for name, mine, theirs in zip(("out", "dq", "dk", "dv"), ours, single):
        assert mine.dtype == torch.float64, name
        error, bound = (mine - theirs).abs().max().item(), _reordering_bound(theirs, params, 1024)
        assert error <= bound, f"{exchange} {name}: {error:.3g} > {bound:.3g}"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs inside test_triton_chunk_ops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_chunk_ops_match_reference(dtype):
    # One rank holds chunks 0 and 1, so chunk 0's spill rows cross to chunk 1 (and their gradient back).
    q, k, v, dout = (t.to(dtype) for t in _inputs(1024, 2, 1, 16))
    results = [_lighthouse_with_grads(q, k, v, dout, lambda *x, backend=backend: lighthouse_cp_attention(
        *x, None, LighthouseParams(levels=2, pooling=2, topk=256, backend=backend)))
        for backend in ("reference", "triton")]
    for name, reference, triton in zip(("out", "dq", "dk", "dv"), *results):
        assert triton.dtype == dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(triton, reference, rtol=1e-5, atol=1e-5)
        else:  # float64 kernels sum in float64: only the order of the sums differs
            error = (triton - reference).abs().max().item()
            bound = _reordering_bound(reference, LighthouseParams(levels=2, pooling=2, topk=256), 1024)
            assert error <= bound, f"{name}: {error:.3g} > {bound:.3g}"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the subprocess")
def test_triton_chunk_ops():
    """The Triton per-chunk path on CPU: the interpreter must be set before triton is imported."""
    pytest.importorskip("triton")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "match_reference"],
        env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]


def test_bad_arguments_are_rejected():
    q = torch.zeros(1, 1024, 2, 8)
    with pytest.raises(ValueError, match="exchange"):
        lighthouse_cp_attention(q, q, q, None, LighthouseParams(levels=2, pooling=2, topk=512), exchange="alltoall")
    with pytest.raises(ValueError, match="topk"):  # 3 tiles, 2 chunks
        lighthouse_cp_attention(q, q, q, None, LighthouseParams(levels=2, pooling=2, topk=384))


def _nccl_suite(rank, world):
    _compare(rank, world, torch.bfloat16, (16384, 8, 2, 64, 3, 4, 1024), device=f"cuda:{rank}")


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_lighthouse_cp_nccl_two_gpus():
    spawn_ranks(_nccl_suite, 2, backend="nccl")
