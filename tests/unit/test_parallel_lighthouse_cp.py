"""Lighthouse under context parallelism on one rank (no process group): the single-device result, the
Triton per-chunk path (in Triton's interpreter), and the argument checks.

tests/integration/test_cp_attention_ranks.py runs it on 2 and 4 gloo ranks against one device.
"""

import pytest
import torch

from lh_dist.ops.lighthouse import LighthouseParams, lighthouse_attention
from lh_dist.parallel.lighthouse_cp import lighthouse_cp_attention

from cp_reference import lighthouse_inputs, reordering_bound, with_grads

pytestmark = pytest.mark.usefixtures("nan_filled_empty")


@pytest.mark.parametrize("exchange", ["allgather", "ring"])
def test_single_rank_equals_reference(exchange):
    q, k, v, dout = (t.double() for t in lighthouse_inputs(1024, 4, 2, 16))
    params = LighthouseParams(levels=2, pooling=2, topk=512)
    ours = with_grads(q, k, v, dout, lambda *x: lighthouse_cp_attention(*x, None, params, exchange=exchange))
    single = with_grads(q, k, v, dout, lambda *x: lighthouse_attention(*x, params))
    for name, mine, theirs in zip(("out", "dq", "dk", "dv"), ours, single):
        assert mine.dtype == torch.float64, name
        error, bound = (mine - theirs).abs().max().item(), reordering_bound(theirs, params, 1024)
        assert error <= bound, f"{exchange} {name}: {error:.3g} > {bound:.3g}"


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_chunk_ops_match_reference(dtype):
    # One rank holds chunks 0 and 1, so chunk 0's spill rows cross to chunk 1 (and their gradient back).
    q, k, v, dout = (t.to(dtype) for t in lighthouse_inputs(1024, 2, 1, 16))
    results = [with_grads(q, k, v, dout, lambda *x, backend=backend: lighthouse_cp_attention(
        *x, None, LighthouseParams(levels=2, pooling=2, topk=256, backend=backend)))
        for backend in ("reference", "triton")]
    for name, reference, triton in zip(("out", "dq", "dk", "dv"), *results):
        assert triton.dtype == dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(triton, reference, rtol=1e-5, atol=1e-5)
        else:  # float64 kernels sum in float64: only the order of the sums differs
            error = (triton - reference).abs().max().item()
            bound = reordering_bound(reference, LighthouseParams(levels=2, pooling=2, topk=256), 1024)
            assert error <= bound, f"{name}: {error:.3g} > {bound:.3g}"


def test_bad_arguments_are_rejected():
    q = torch.zeros(1, 1024, 2, 8)
    with pytest.raises(ValueError, match="exchange"):
        lighthouse_cp_attention(q, q, q, None, LighthouseParams(levels=2, pooling=2, topk=512), exchange="alltoall")
    with pytest.raises(ValueError, match="topk"):  # 3 tiles, 2 chunks
        lighthouse_cp_attention(q, q, q, None, LighthouseParams(levels=2, pooling=2, topk=384))
