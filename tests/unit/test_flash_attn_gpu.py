"""FlashAttention-4 (backend "flash_attn") on every attention path, against the cuDNN backend.

Paths: dense attention through the autograd wrapper (the dense layers), ring attention under
CP with its LSE merges and its backward from the merged out/lse, and Lighthouse's inner
attention over the gathered sequence. Each runs with "cudnn" and with "flash_attn" on the same
inputs, and both are measured against float64.

Tolerance: flash_attn's RMS error may be at most 2x cuDNN's and its max error at most 4x, each
plus one rounding step of bf16 at the reference's size (the rule of test_attention_ops.py with
cuDNN as the baseline: both keep fp32 accumulators and round P and the results to bf16, so
they should land within a small factor of each other; a masking or LSE bug misses by O(1)).

Ring attention runs its real code with W ranks as W threads of this process on the one GPU,
the ring transfers handed over through queues (NCCL wants one GPU per rank; the transport
itself is tested with gloo and NCCL processes in test_ring_attention.py). Kernel calls are
serialized by a lock, so only the ring's own logic runs concurrently.

All tests need CUDA and FlashAttention-4 and are skipped without them.
"""

import importlib
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lh_dist.ops.attention import flash_attn4
from lh_dist.ops.attention import attention, attention_backward, attention_forward, resolve_backend
from lh_dist.parallel.sharding import zigzag_shard

# The module, not the function of the same name that lh_dist.parallel exports.
ring_module = importlib.import_module("lh_dist.parallel.ring_attention")

HAS_FA4 = (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
           and flash_attn4._flash_attn() != flash_attn4._FA_NOT_INSTALLED)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_FA4, reason="needs an sm90+ GPU and FlashAttention-4 (lh_dist[flash])")]

BACKENDS = ("cudnn", "flash_attn")
EPS = torch.finfo(torch.bfloat16).eps


def _randn(*shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).to("cuda", torch.bfloat16) for s in shapes]


def assert_as_close_as_cudnn(results, exact, names):
    """results: backend -> tensors; exact: float64 tensors. flash_attn within the rule above."""
    for name, fa, cu, ex in zip(names, results["flash_attn"], results["cudnn"], exact):
        assert torch.isfinite(fa).all(), name
        fa_err, cu_err = fa.double() - ex, cu.double() - ex
        rms, base_rms, ref_rms = (x.pow(2).mean().sqrt().item() for x in (fa_err, cu_err, ex))
        mx, base_mx, ref_mx = (x.abs().max().item() for x in (fa_err, cu_err, ex))
        assert rms <= 2 * base_rms + EPS * ref_rms, f"{name}: RMS error {rms:.3g}, cudnn's {base_rms:.3g}"
        assert mx <= 4 * base_mx + EPS * ref_mx, f"{name}: max error {mx:.3g}, cudnn's {base_mx:.3g}"


def test_auto_picks_flash_attn_after_its_self_check():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        for dtype in (torch.bfloat16, torch.float16):
            assert resolve_backend("auto", torch.device("cuda"), dtype, 128) == "flash_attn"
    assert flash_attn4._self_checks[(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, 128)] is None


# ------------------------------------------------------------------ dense layers


@pytest.mark.parametrize("b, nq, nk, h, hkv, causal", [
    (1, 4099, 4099, 8, 2, True),  # a long causal layer with GQA; N no multiple of a tile
    (2, 1000, 3000, 8, 8, True),  # bottom-right aligned (Nq < Nk)
    (1, 1536, 2560, 8, 4, False),
])
def test_dense_against_cudnn(b, nq, nk, h, hkv, causal):
    d = 128
    q, dout = _randn((b, nq, h, d), (b, nq, h, d), seed=nq)
    k, v = _randn((b, nk, hkv, d), (b, nk, hkv, d), seed=nk)
    results = {}
    for backend in BACKENDS:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = attention(*leaves, causal=causal, backend=backend)  # the dense layers' path
        grads = torch.autograd.grad(out, leaves, dout)
        _, lse = attention_forward(q, k, v, causal=causal, backend=backend)
        results[backend] = (out.detach(), lse, *grads)
    qd, kd, vd, dd = (x.double() for x in (q, k, v, dout))
    out, lse = attention_forward(qd, kd, vd, causal=causal, backend="math")
    exact = (out, lse, *attention_backward(dd, qd, kd, vd, out, lse, causal=causal, backend="math"))
    assert_as_close_as_cudnn(results, exact, ("out", "lse", "dq", "dk", "dv"))


# ------------------------------------------------------------------ ring attention


class ThreadRing:
    """A CP group of W threads: stands in for `group_coords` and `RingExchange` in ring_attention."""

    def __init__(self, world):
        self.world = world
        self.local = threading.local()
        self.boxes = {(rank, tag): queue.Queue() for rank in range(world) for tag in (0, 1)}

    def coords(self, group):
        return self.world, self.local.rank

    def exchange(self, group):
        ring = self

        class Exchange:
            def start(self, send, tag=0):
                rank = ring.local.rank
                ring.boxes[((rank + 1) % ring.world, tag)].put(send.clone())  # to the next rank
                box = ring.boxes[(rank, tag)]  # from the previous one, in order

                class Pending:
                    def wait(self):
                        return box.get(timeout=120)

                return Pending()

        return Exchange()

    def run(self, fn, *per_rank_args):
        def on_rank(rank):
            self.local.rank = rank
            return fn(rank, *per_rank_args)

        with ThreadPoolExecutor(self.world) as pool:
            return list(pool.map(on_rank, range(self.world)))


def _serialized(fn, lock):
    def call(*args, **kwargs):
        with lock:
            return fn(*args, **kwargs)

    return call


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_against_cudnn(world, monkeypatch):
    b, chunk, h, hkv, d = 1, 300, 8, 2, 128
    n = 2 * world * chunk
    q, dout = _randn((b, n, h, d), (b, n, h, d), seed=world)
    k, v = _randn((b, n, hkv, d), (b, n, hkv, d), seed=world + 10)
    ring = ThreadRing(world)
    lock = threading.Lock()
    monkeypatch.setattr(ring_module, "group_coords", ring.coords)
    monkeypatch.setattr(ring_module, "RingExchange", ring.exchange)
    monkeypatch.setattr(ring_module, "attention_forward", _serialized(attention_forward, lock))
    monkeypatch.setattr(ring_module, "attention_backward", _serialized(attention_backward, lock))

    def shard(x, rank):
        return zigzag_shard(x, 1, world, rank)

    def one_rank(rank, backend):
        q_l, k_l, v_l, do_l = (shard(x, rank) for x in (q, k, v, dout))
        out, lse = ring_module.ring_attention_forward(q_l, k_l, v_l, None, backend=backend)
        grads = ring_module.ring_attention_backward(do_l, q_l, k_l, v_l, out, lse, None, backend=backend)
        return out, lse, *grads

    results = {}
    for backend in BACKENDS:
        per_rank = ring.run(one_rank, backend)
        results[backend] = [torch.cat([r[i].flatten() for r in per_rank]) for i in range(5)]
    qd, kd, vd, dd = (x.double() for x in (q, k, v, dout))
    out, lse = attention_forward(qd, kd, vd, causal=True, backend="math")
    full = (out, lse, *attention_backward(dd, qd, kd, vd, out, lse, causal=True, backend="math"))
    dims = (1, 2, 1, 1, 1)  # the sequence dim of out, lse, dq, dk, dv
    exact = [torch.cat([shard(x, r).flatten() for r in range(world)]) if dim == 1 else
             torch.cat([zigzag_shard(x, 2, world, r).flatten() for r in range(world)]) for x, dim in zip(full, dims)]
    assert_as_close_as_cudnn(results, exact, ("out", "lse", "dq", "dk", "dv"))


# ------------------------------------------------------------------ Lighthouse


def test_lighthouse_inner_attention_against_cudnn():
    from lh_dist.ops.lighthouse import (
        LighthouseParams,
        gather_pyramid,
        lighthouse_attention,
        lighthouse_select,
        scatter_back,
    )
    from lh_dist.ops.lighthouse.reference import causal_attention

    levels, pooling, topk, n, h, hkv, d = 3, 4, 512, 16384, 8, 2, 128
    q, dout = _randn((1, n, h, d), (1, n, h, d), seed=5)
    k, v = _randn((1, n, hkv, d), (1, n, hkv, d), seed=6)
    results = {}
    for backend in BACKENDS:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = lighthouse_attention(*leaves, LighthouseParams(levels=levels, pooling=pooling, topk=topk,
                                                             backend="triton", attention_backend=backend))
        results[backend] = (out.detach(), *torch.autograd.grad(out, leaves, dout))
    # The selection depends on q and k only, so one float64 layer over it is exact for both.
    sel = lighthouse_select(q, k, LighthouseParams(levels=levels, pooling=pooling, topk=topk, backend="triton"))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out = scatter_back(causal_attention(*(gather_pyramid(x, sel) for x in leaves), backend="math"), sel)
    exact = (out.detach(), *torch.autograd.grad(out, leaves, dout.double()))
    assert_as_close_as_cudnn(results, exact, ("out", "dq", "dk", "dv"))
