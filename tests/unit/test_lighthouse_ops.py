"""The lh_dist::lighthouse_* custom ops on CPU (reference backend): opcheck, gradients against autograd
through the plain reference pieces, and torch.compile tracing the layer without a graph break.

test_lighthouse_triton.py runs `op_samples` through opcheck on the Triton backend, in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from lh_dist.ops.lighthouse import (
    LighthouseParams,
    gather_pyramid,
    lighthouse_attention,
    lighthouse_gather,
    lighthouse_reference,
    lighthouse_scatter,
    lighthouse_select,
    scatter_back,
)

# Kernel output buffers come NaN-filled: an element a kernel skips fails the comparisons.
pytestmark = pytest.mark.usefixtures("nan_filled_empty")

# The smallest valid layout (one tile of 128 coarsest windows per level, L = 3, p = 2): gathered
# entries at every level, and 3 spill rows past the end.
LEVELS, POOLING, TOPK, N = 3, 2, 128, 512


def _inputs(dtype=torch.float64, seed=0, b=1, h=2, hkv=1, d=8, n=N):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads, d, generator=gen, dtype=dtype) for heads in (h, hkv, hkv, h)]


def op_samples(backend: str, attention_backend="math", layout=(LEVELS, POOLING, TOPK, N), dtype=torch.float32):
    """(op, args) for every Lighthouse custom op, on small inputs that require grad where they can."""
    levels, pooling, topk, n = layout
    params = LighthouseParams(levels=levels, pooling=pooling, topk=topk, backend=backend)
    q, k, v, dout = _inputs(dtype, n=n)
    sq, sk = _inputs(dtype, seed=1, n=n)[:2]  # vectors scored in place of q, k
    sel = lighthouse_select(q, k, params)
    og = torch.randn(1, sel.length, 2, 8, dtype=dtype)
    common = (levels, pooling)
    forward = torch.ops.lh_dist.lighthouse_forward(q, k, v, sq, sk, *common, params.n_tiles, "norm", backend,
                                                   attention_backend)
    grad = lambda x: x.clone().requires_grad_()  # noqa: E731
    return [
        (torch.ops.lh_dist.lighthouse_select.default, (q, k, *common, params.n_tiles, "norm", backend)),
        (torch.ops.lh_dist.lighthouse_gather.default, (grad(k), sel.index, sel.inverse, *common, backend)),
        (torch.ops.lh_dist.lighthouse_gather_backward.default, (og, sel.inverse, n, *common, backend)),
        (torch.ops.lh_dist.lighthouse_scatter.default,
         (grad(og), sel.index, sel.inverse, n, *common, params.spill, torch.promote_types(dtype, torch.float32),
          backend)),
        (torch.ops.lh_dist.lighthouse_scatter.default, (grad(og), sel.index, sel.inverse, n, *common, 0, None, backend)),
        (torch.ops.lh_dist.lighthouse_scatter_backward.default, (dout, sel.index, n, *common, dtype, backend)),
        (torch.ops.lh_dist.lighthouse_forward.default,
         (grad(q), grad(k), grad(v), sq, sk, *common, params.n_tiles, "norm", backend, attention_backend)),
        (torch.ops.lh_dist.lighthouse_backward.default, (dout, *forward[1:], *common, backend, attention_backend)),
    ]


@pytest.mark.parametrize("attention_backend", ["math", "cpu_flash"])
def test_opcheck_reference(attention_backend):
    for op, args in op_samples("reference", attention_backend=attention_backend):
        torch.library.opcheck(op, args)


def _fwd_bwd(fn, q, k, v, dout):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def test_layer_equals_autograd_through_the_reference_pieces():
    # The op's backward is written out (scatter backward, attention backward, pool backward); the
    # reference's comes from autograd. Both sum the same float64 terms, at most in another order:
    # a few unit roundoffs (2^-53) of O(1) values, far below 1e-12; a wrong term is off by O(1).
    q, k, v, dout = _inputs(b=2, h=4, hkv=2)
    for attention_backend in ("math", "cpu_flash"):
        params = LighthouseParams(levels=LEVELS, pooling=POOLING, topk=TOPK, backend="reference",
                                  attention_backend=attention_backend)
        ours = _fwd_bwd(lambda *x: lighthouse_attention(*x, params), q, k, v, dout)
        theirs = _fwd_bwd(lambda *x: lighthouse_reference(*x, params), q, k, v, dout)
        for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
            assert b.abs().max() > 0.1, name


def test_pieces_with_spill_equal_autograd_through_the_reference_pieces():
    # lighthouse_scatter's spill rows and their gradient: the rows past the end that the last
    # windows reach, as scatter_back(length=n + spill) computes them. Same float64 sums: 1e-12.
    params = LighthouseParams(levels=LEVELS, pooling=POOLING, topk=TOPK, backend="reference")
    q, k, v, _ = _inputs()
    sel = lighthouse_select(q, k, params)
    o = torch.randn(1, sel.length, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(1, N + params.spill, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def chain(gather, scatter):
        leaves = [x.clone().requires_grad_() for x in (v, o)]
        out = scatter(leaves[1] + gather(leaves[0]).repeat_interleave(2, dim=2))  # [B, N + spill, H, D]
        return [out.detach(), *torch.autograd.grad(out, leaves, grad)]

    ours = chain(lambda x: lighthouse_gather(x, sel, params),
                 lambda x: lighthouse_scatter(x, sel, params, spill=params.spill))
    theirs = chain(lambda x: gather_pyramid(x, sel), lambda x: scatter_back(x, sel, N + params.spill))
    for name, a, b in zip(("out", "dv", "do"), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert ours[0][:, N:].abs().max() > 0.1  # the spill rows hold something to get right


def test_scatter_keeps_float64_and_sums_half_types_in_float32():
    params = LighthouseParams(levels=LEVELS, pooling=POOLING, topk=TOPK, backend="reference")
    q, k, _, _ = _inputs()
    sel = lighthouse_select(q, k, params)
    o = torch.randn(1, sel.length, 2, 8, dtype=torch.float64)
    assert lighthouse_scatter(o, sel, params, spill=1).dtype == torch.float64
    bf16 = lighthouse_scatter(o.bfloat16(), sel, params, spill=1, out_dtype=torch.float32)
    assert bf16.dtype == torch.float32
    # float32 sums of the bf16 rows: the float64 sums of the same rows, rounded once to float32.
    exact = lighthouse_scatter(o.bfloat16().double(), sel, params, spill=1)
    torch.testing.assert_close(bf16.double(), exact, rtol=2**-24, atol=0)


def test_compile_traces_the_layer_without_graph_breaks():
    params = LighthouseParams(levels=LEVELS, pooling=POOLING, topk=TOPK, backend="reference")
    q, k, v, dout = _inputs(torch.float32)

    def block(q_, k_, v_):
        return lighthouse_attention(q_ * 2, k_, v_, params) + 1

    assert torch._dynamo.explain(block)(q, k, v).graph_break_count == 0
    eager = _fwd_bwd(block, q, k, v, dout)
    compiled = _fwd_bwd(torch.compile(block, fullgraph=True, backend="aot_eager"), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # the same ops on the same values
