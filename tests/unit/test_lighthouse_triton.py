"""Triton Lighthouse kernels vs the PyTorch reference.

On CPU the kernels run in the Triton interpreter, which needs TRITON_INTERPRET=1 before triton
is imported; `test_interpreter_suite` therefore reruns this file in a subprocess with it set,
leaving the main test process untouched. GPU tests run compiled kernels in bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys

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

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs inside test_interpreter_suite's subprocess")

# (levels, pooling, topk, n, H, Hkv): tiny, since the interpreter sorts element by element.
INTERPRETER_CONFIGS = [(3, 2, 128, 512, 2, 1), (2, 2, 256, 512, 2, 1)]


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_interpreter_suite():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "4 passed" in result.stdout, result.stdout[-2000:]


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
        assert torch.isfinite(f).all(), name
        f_err = (f.double() - e).norm() / e.norm()
        r_err = (r.double() - e).norm() / e.norm()
        # Same math with different summation order: allow twice the reference's own error.
        assert f_err <= 2 * r_err + 1e-6, f"{name}: triton {f_err:.3g} vs reference {r_err:.3g}"


@interpreter_only
@pytest.mark.parametrize("levels,pooling,topk,n,h,hkv", INTERPRETER_CONFIGS)
def test_interpreter_matches_reference_fp32(levels, pooling, topk, n, h, hkv):
    _check_against_float64(levels, pooling, topk, n, h, hkv, 16, torch.float32, "cpu", seed=levels)


@interpreter_only
def test_interpreter_compiles_without_graph_break():
    levels, pooling, topk, n = 2, 2, 128, 256
    q, k, v = _inputs(1, n, 2, 1, 16, torch.float32, "cpu", seed=9)

    def block(q_, k_, v_):
        return lighthouse_attention(q_ * 2, k_, v_, LighthouseParams(levels=levels, pooling=pooling, topk=topk,
                                                                     backend="triton"))

    eager = block(q, k, v)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@interpreter_only
def test_interpreter_opcheck():
    from test_lighthouse_ops import op_samples

    for op, args in op_samples("triton", layout=(2, 2, 128, 256)):  # the smallest layout: the interpreter is slow
        torch.library.opcheck(op, args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("levels,pooling,topk,n,h,hkv,d", [(3, 4, 256, 4096, 4, 2, 64), (3, 4, 512, 16384, 8, 2, 128),
                                                           (2, 2, 256, 512, 2, 2, 128), (4, 2, 256, 2048, 4, 1, 128),
                                                           (3, 4, 2048, 131072, 2, 1, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_reference(levels, pooling, topk, n, h, hkv, d, dtype):
    _check_against_float64(levels, pooling, topk, n, h, hkv, d, dtype, "cuda", seed=levels + n)
