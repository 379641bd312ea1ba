"""Ring attention on one rank (no process group): causal attention, and its argument checks.

tests/integration/test_cp_attention_ranks.py runs it on 2 and 4 gloo ranks against one device.
"""

import pytest
import torch

from lh_dist.parallel.ring_attention import ring_attention

from cp_reference import float64_reference, ring_inputs

pytestmark = pytest.mark.usefixtures("nan_filled_empty")


def test_single_rank_is_causal_attention():
    q, k, v, dout = ring_inputs(1, 1, 4, 2, 8, 6)
    exact = float64_reference(q, k, v, dout)
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
    q, k, v, dout = (t.cuda() for t in ring_inputs(1, 1, 8, 2, 64, 128))
    exact = float64_reference(q, k, v, dout)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = ring_attention(qb, kb, vb, None)
    out.backward(dout.bfloat16())
    for ours, theirs in zip((out, qb.grad, kb.grad, vb.grad), exact):
        assert (ours.double() - theirs).abs().max() <= 4 * 2 ** -8 * theirs.abs().max()
