"""Triton Lighthouse kernels vs the PyTorch reference.

On CPU the kernels run in Triton's interpreter, in this process (conftest's `triton_interpreter`).
GPU tests run compiled kernels in bf16. Output buffers come NaN-filled (conftest's `nan_filled_empty`),
so an output element that a kernel skips fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from lh_dist.ops.lighthouse import (
    LighthouseParams,
    gather_pyramid,
    lighthouse_attention,
    lighthouse_select,
    pyramid_scores,
    scatter_back,
    select,
)
from lh_dist.ops.lighthouse.reference import causal_attention

pytestmark = pytest.mark.usefixtures("nan_filled_empty")
interpreted = pytest.mark.usefixtures("triton_interpreter")

# (levels, pooling, topk, n, H, Hkv): tiny, since the interpreter sorts element by element.
INTERPRETER_CONFIGS = [(3, 2, 128, 512, 2, 1), (2, 2, 256, 512, 2, 1)]


def _inputs(b, n, h, hkv, d, dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(b, n, heads, d, generator=gen).to(device=device, dtype=dtype) for heads in (h, hkv, hkv)]


def _fwd_bwd(fn, q, k, v, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_out))


def _reference_given(selection, q, k, v):
    """Reference layer with a fixed selection (so precision changes cannot change it)."""
    return scatter_back(causal_attention(*(gather_pyramid(x, selection) for x in (q, k, v))), selection)


def _check_against_float64(levels, pooling, topk, n, h, hkv, d, dtype, device, seed):
    """Triton output and grads must be as close to float64 as the reference in the same dtype."""
    params = LighthouseParams(levels=levels, pooling=pooling, topk=topk, backend="triton")
    # One sequence at long lengths: the float64 baseline materializes S x S scores per head.
    b = 2 if device == "cuda" and n < 65536 else 1
    q, k, v = _inputs(b, n, h, hkv, d, dtype, device, seed)
    sel = lighthouse_select(q, k, params)
    ref_sel = select(*pyramid_scores(q, k, levels, pooling), n, levels, pooling, params.n_tiles)
    if dtype == torch.float32:
        assert torch.equal(sel.index, ref_sel.index) and torch.equal(sel.inverse, ref_sel.inverse)
    else:  # bf16 norms may round differently in the last bit; nearly all entries must agree
        assert (sel.index == ref_sel.index).float().mean() > 0.99
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)

    def triton_layer(q_, k_, v_):
        return lighthouse_attention(q_, k_, v_, params)

    fast = _fwd_bwd(triton_layer, q, k, v, grad_out.to(dtype))
    same_dtype = _fwd_bwd(lambda *x: _reference_given(sel, *x), q, k, v, grad_out.to(dtype))
    exact = _fwd_bwd(lambda *x: _reference_given(sel, *x), *(x.double() for x in (q, k, v)), grad_out.double())
    for name, f, r, e in zip(("out", "dq", "dk", "dv"), fast, same_dtype, exact):
        assert torch.isfinite(f).all(), name  # an element no kernel wrote is NaN (nan_filled_empty)
        f_err = (f.double() - e).norm() / e.norm()
        r_err = (r.double() - e).norm() / e.norm()
        # Same math with different summation order: allow twice the reference's own error.
        assert f_err <= 2 * r_err + 1e-6, f"{name}: triton {f_err:.3g} vs reference {r_err:.3g}"


@interpreted
@pytest.mark.parametrize("levels,pooling,topk,n,h,hkv", INTERPRETER_CONFIGS)
def test_interpreter_matches_reference_fp32(levels, pooling, topk, n, h, hkv):
    _check_against_float64(levels, pooling, topk, n, h, hkv, 16, torch.float32, "cpu", seed=levels)


@interpreted
def test_interpreter_compiles_without_graph_break():
    levels, pooling, topk, n = 2, 2, 128, 256
    q, k, v = _inputs(1, n, 2, 1, 16, torch.float32, "cpu", seed=9)

    def block(q_, k_, v_):
        return lighthouse_attention(q_ * 2, k_, v_, LighthouseParams(levels=levels, pooling=pooling, topk=topk,
                                                                     backend="triton"))

    eager = block(q, k, v)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@interpreted
def test_interpreter_opcheck():
    from test_lighthouse_ops import op_samples

    # The ops' schemas and fake implementations hold for the Triton kernels too. Their autograd and
    # compile registrations do not depend on the backend: test_lighthouse_ops checks them, on the reference.
    for op, args in op_samples("triton", layout=(2, 2, 128, 256)):  # the smallest layout: the interpreter is slow
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_an_output_block_that_a_kernel_skips_fails_the_check(triton_interpreter, monkeypatch):
    # A scatter kernel launched without its last block of 32 rows: those rows keep what their buffer
    # was allocated with, NaN under `nan_filled_empty`, so the check fails however the memory happened
    # to look, and it fails on them.
    kernel = triton_interpreter._level_gather_kernel

    class WithoutLastBlock:
        def __getitem__(self, grid):
            return kernel[(grid[0] - 1, *grid[1:])]

    monkeypatch.setattr(triton_interpreter, "_level_gather_kernel", WithoutLastBlock())
    q, k, v = _inputs(1, 256, 2, 1, 16, torch.float32, "cpu", seed=2)
    params = LighthouseParams(levels=2, pooling=2, topk=128, backend="triton")
    out = lighthouse_attention(q, k, v, params)
    assert out[:, -32:].isnan().all() and not out[:, :-32].isnan().any()
    with pytest.raises(AssertionError, match=r"^out\n"):  # the isfinite check, not the error bound
        _check_against_float64(2, 2, 128, 256, 2, 1, 16, torch.float32, "cpu", seed=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("levels,pooling,topk,n,h,hkv,d", [(3, 4, 256, 4096, 4, 2, 64), (3, 4, 512, 16384, 8, 2, 128),
                                                           (2, 2, 256, 512, 2, 2, 128), (4, 2, 256, 2048, 4, 1, 128),
                                                           (3, 4, 2048, 131072, 2, 1, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_reference(levels, pooling, topk, n, h, hkv, d, dtype):
    _check_against_float64(levels, pooling, topk, n, h, hkv, d, dtype, "cuda", seed=levels + n)
