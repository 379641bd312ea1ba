"""lh_dist.ops.attention: every backend that runs here against a float64 reference.

Checked: out, lse, dq, dk, dv; causal (bottom-right) and not; Nq == Nk, Nq < Nk, odd
lengths, Nq > Nk (non-causal); GQA (H=4 with Hkv 4, 2, 1); every dtype a backend takes.
The CPU tests cover cpu_flash and math; their `gpu` twins cover flash_attn (FlashAttention-4,
if installed), cudnn, flash and math on CUDA, and are skipped without a GPU.

Tolerance: the error of PyTorch's own plain SDPA (math backend, same dtype, same
device, explicit mask) against the same float64 reference sets the scale of what
rounding in that dtype costs. A backend's RMS error may be at most 2x the baseline's,
and its max error at most 4x (the max of rounding noise is a noisy statistic: in fp32
two equally good implementations differ by 2x at times; the max still catches a
localized bug, such as one wrong row, that RMS would dilute). Each bound adds a floor
of one rounding step (`eps` times the reference's RMS / max), because the baseline
can by chance land below the rounding every kernel must do on storing in the dtype.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lh_dist.ops.attention import flash_attn4, ops
from lh_dist.ops.attention import (
    BACKENDS,
    attention,
    attention_backward,
    attention_forward,
    merge_partials,
    resolve_backend,
)

# Kernel output buffers come NaN-filled: an element a kernel skips fails the comparisons.
pytestmark = pytest.mark.usefixtures("nan_filled_empty")

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

HALF = (torch.bfloat16, torch.float16)
ALL = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SUPPORTED = {"cpu_flash": ALL, "math": ALL, "cudnn": HALF, "flash": HALF, "flash_attn": HALF}
CPU_CASES = [(b, dt) for b in ("cpu_flash", "math") for dt in SUPPORTED[b]]
GPU_CASES = [(b, dt) for b in ("flash_attn", "cudnn", "flash", "math") for dt in SUPPORTED[b] if dt != torch.float64]

D = 64
SHAPES = [  # (B, Nq, Nk, H, Hkv)
    (2, 64, 64, 4, 4),
    (2, 64, 192, 4, 2),
    (1, 63, 77, 4, 1),
    (2, 77, 77, 4, 2),
    (1, 80, 48, 4, 4),  # Nq > Nk: non-causal only
]

SHAPE_CASES = [(s, c) for s in SHAPES for c in (True, False) if not (c and s[1] > s[2])]
SHAPE_IDS = ["B{}-Nq{}-Nk{}-H{}-Hkv{}".format(*s) + ("-causal" if c else "-full") for s, c in SHAPE_CASES]


def _ids(case):
    return f"{case[0]}-{str(case[1]).removeprefix('torch.')}"


def make_inputs(shape, dtype, device, seed=0):
    b, nq, nk, h, hkv = shape
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, nq, h, D, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, nk, hkv, D, generator=gen) for _ in range(2))
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v, dout))


def causal_mask(nq, nk, device):
    """Bottom-right aligned: True where query i may see key j."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i + (nk - nq)


def reference(q, k, v, dout, causal):
    """float64 on the CPU, written out and differentiated by autograd."""
    q, k, v = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(group, 2)) * D**-0.5
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[1], k.shape[1], "cpu"), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.repeat_interleave(group, 2))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.cpu().double())
    return out.detach(), s.logsumexp(-1).detach(), dq, dk, dv


@contextlib.contextmanager
def same_dtype_math():
    """PyTorch's math SDPA, computing in the input dtype (by default it upcasts fp16/bf16)."""
    flag = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(flag)


def plain_sdpa(q, k, v, dout, causal):
    """The baseline: plain SDPA in q.dtype on q.device; lse from same-dtype scores."""
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    mask = causal_mask(q.shape[1], k.shape[1], q.device) if causal else None
    with same_dtype_math():
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2])
        dq, dk, dv = torch.autograd.grad(out, (qt, kt, vt), dout.transpose(1, 2))
    group = q.shape[2] // k.shape[2]
    s = (qt @ kt.repeat_interleave(group, 1).transpose(-1, -2) * D**-0.5).float()
    if causal:
        s = s.masked_fill(~mask, float("-inf"))
    dq, dk, dv = (g.transpose(1, 2) for g in (dq, dk, dv))
    return out.detach().transpose(1, 2), s.logsumexp(-1).detach(), dq, dk, dv


def errors(x, ref):
    """(RMS error, max error) of x against the float64 reference."""
    diff = x.detach().cpu().double() - ref
    return diff.pow(2).mean().sqrt().item(), diff.abs().max().item()


def check_against_reference(backend, dtype, device, shape, causal):
    q, k, v, dout = make_inputs(shape, dtype, device)
    out, lse = attention_forward(q, k, v, causal=causal, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grads = attention_backward(dout, q, k, v, out, lse, causal=causal, backend=backend)
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype and g.device == x.device

    refs = reference(q, k, v, dout, causal)
    base = plain_sdpa(q, k, v, dout, causal)
    eps = torch.finfo(dtype).eps
    for name, got, b, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), base, refs):
        assert torch.isfinite(got).all(), name
        (rms, mx), (base_rms, base_mx) = errors(got, ref), errors(b, ref)
        tol_rms = 2 * base_rms + eps * ref.pow(2).mean().sqrt().item()
        tol_max = 4 * base_mx + eps * ref.abs().max().item()
        assert rms <= tol_rms, f"{name}: RMS error {rms:.3g} > {tol_rms:.3g} (plain SDPA's: {base_rms:.3g})"
        assert mx <= tol_max, f"{name}: max error {mx:.3g} > {tol_max:.3g} (plain SDPA's: {base_mx:.3g})"


# ------------------------------------------------------------------ correctness


@pytest.mark.parametrize("shape, causal", SHAPE_CASES, ids=SHAPE_IDS)
@pytest.mark.parametrize("case", CPU_CASES, ids=_ids)
def test_backend_matches_reference_cpu(case, shape, causal):
    check_against_reference(*case, "cpu", shape, causal)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape, causal", SHAPE_CASES, ids=SHAPE_IDS)
@pytest.mark.parametrize("case", GPU_CASES, ids=_ids)
def test_backend_matches_reference_gpu(case, shape, causal):
    if case[0] == "flash_attn" and flash_attn4._flash_attn() == flash_attn4._FA_NOT_INSTALLED:
        pytest.skip("FlashAttention-4 is not installed")
    check_against_reference(*case, "cuda", shape, causal)


# Each device's kernels, in the dtype a training run gives them there.
ON_EACH_DEVICE = (
    [pytest.param(b, torch.float32, "cpu", id=f"cpu-{b}") for b in ("cpu_flash", "math")]
    + [pytest.param(b, torch.bfloat16, "cuda", id=f"cuda-{b}", marks=[gpu, needs_cuda]) for b in ("cudnn", "flash", "math")]
)


@pytest.mark.parametrize("backend, dtype, device", ON_EACH_DEVICE)
def test_autograd_matches_explicit_backward(backend, dtype, device):
    q, k, v, dout = make_inputs((2, 48, 80, 4, 2), dtype, device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, causal=True, backend=backend)
    out.backward(dout)
    ref_out, lse = attention_forward(q.detach(), k.detach(), v.detach(), causal=True, backend=backend)
    grads = attention_backward(dout, q.detach(), k.detach(), v.detach(), ref_out, lse, causal=True, backend=backend)
    torch.testing.assert_close(out.detach(), ref_out, rtol=0, atol=0)
    for x, g in zip((q, k, v), grads):
        torch.testing.assert_close(x.grad, g, rtol=0, atol=0)


def test_math_backward_gradcheck():
    # the explicit math backward against finite differences (float64)
    q, k, v, _ = make_inputs((1, 5, 9, 2, 1), torch.float64, "cpu")
    q, k, v = (x[..., :8].contiguous().requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, causal=True, backend="math"), (q, k, v))


@pytest.mark.parametrize("backend, dtype, device", ON_EACH_DEVICE)
def test_noncontiguous_inputs(backend, dtype, device):
    # q, k, v as strided views of one packed projection, as a fused QKV linear gives them
    b, n, h = 2, 40, 4
    qkv = torch.randn(b, n, 3, h, D, device=device, dtype=dtype)
    q, k, v = qkv.unbind(2)
    dout = torch.randn(b, n, h, D, device=device, dtype=dtype)
    out, lse = attention_forward(q, k, v, causal=True, backend=backend)
    grads = attention_backward(dout, q, k, v, out, lse, causal=True, backend=backend)
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    out_c, lse_c = attention_forward(qc, kc, vc, causal=True, backend=backend)
    grads_c = attention_backward(dout, qc, kc, vc, out_c, lse_c, causal=True, backend=backend)
    for got, want in zip((out, lse, *grads), (out_c, lse_c, *grads_c)):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ merge_partials


@pytest.mark.parametrize("split", [1, 17, 40])
def test_merge_partials_equals_attention_over_union(split):
    q, k, v, _ = make_inputs((2, 24, 48, 4, 2), torch.float64, "cpu")
    out, lse = attention_forward(q, k, v, causal=False, backend="math")
    o1, l1 = attention_forward(q, k[:, :split], v[:, :split], causal=False, backend="math")
    o2, l2 = attention_forward(q, k[:, split:], v[:, split:], causal=False, backend="math")
    merged, merged_lse = merge_partials(o1, l1, o2, l2)
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)


def test_merge_partials_empty_parts():
    q, k, v, _ = make_inputs((1, 8, 8, 2, 2), torch.bfloat16, "cpu")
    o1, l1 = attention_forward(q, k, v, causal=False, backend="math")
    empty_lse = torch.full_like(l1, float("-inf"))
    out, lse = merge_partials(o1, l1, torch.zeros_like(o1), empty_lse)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, o1.float())
    torch.testing.assert_close(lse, l1)
    out, lse = merge_partials(torch.zeros_like(o1), empty_lse, torch.zeros_like(o1), empty_lse)
    assert (out == 0).all() and torch.isneginf(lse).all()


# ------------------------------------------------------------------ dispatch and errors


def test_resolve_backend_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.bfloat16) == "cpu_flash"
    assert resolve_backend("math", cpu, torch.bfloat16) == "math"
    assert resolve_backend("auto", cpu, torch.float32) == "cpu_flash"
    for name in ("cudnn", "flash", "flash_attn"):
        with pytest.raises(RuntimeError, match=f"backend '{name}' is unavailable"):
            resolve_backend(name, cpu, torch.bfloat16)


def test_bad_backend_name_lists_backends():
    q, k, v, _ = make_inputs((1, 4, 4, 2, 2), torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend") as info:
        attention_forward(q, k, v, causal=True, backend="flash2")
    assert all(name in str(info.value) for name in BACKENDS)


def test_input_errors_name_the_parameter():
    q, k, v, dout = make_inputs((1, 8, 6, 4, 2), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"causal.*Nk >= Nq.*Nq=8, Nk=6"):
        attention_forward(q, k, v, causal=True)
    attention_forward(q, k, v, causal=False)  # fine without the mask
    k3, v3 = make_inputs((1, 8, 8, 3, 3), torch.float32, "cpu")[1:3]
    with pytest.raises(ValueError, match=r"H=4.*Hkv=3"):
        attention_forward(q, k3, v3, causal=False)
    with pytest.raises(ValueError, match=r"k\.dtype"):
        attention_forward(q, k.double(), v, causal=False)
    with pytest.raises(ValueError, match=r"v\.device"):
        attention_forward(q, k, v.to("meta"), causal=False)
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        attention_forward(q[0], k, v, causal=False)
    out, lse = attention_forward(q, k, v, causal=False)
    with pytest.raises(ValueError, match=r"lse must"):
        attention_backward(dout, q, k, v, out, lse[:, :2], causal=False)
    with pytest.raises(ValueError, match=r"dout must"):
        attention_backward(dout.half(), q, k, v, out, lse, causal=False)


@gpu
@needs_cuda
def test_resolve_backend_gpu():
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.bfloat16) in ("flash_attn", "cudnn", "flash")
    assert resolve_backend("auto", cuda, torch.float32) == "math"
    assert resolve_backend("auto", cuda, torch.bfloat16, head_dim=512) == "math"
    with pytest.raises(RuntimeError, match="cpu_flash"):
        resolve_backend("cpu_flash", cuda, torch.bfloat16)
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        resolve_backend("cudnn", cuda, torch.float32)


# ------------------------------------------------------------------ the custom ops under compile


@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
@pytest.mark.parametrize("shape", [(2, 37, 37, 4, 2), (1, 21, 50, 2, 1)], ids=["square-gqa", "prefix-mqa"])
def test_attention_ops_pass_opcheck(backend, shape):
    # The fake (meta) implementations, schemas and autograd registration agree with the real kernels.
    q, k, v, dout = make_inputs(shape, torch.float32, "cpu")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    scale = q.shape[-1] ** -0.5
    torch.library.opcheck(ops._forward_op, (q, k, v, True, scale, backend))
    out, lse = attention_forward(q.detach(), k.detach(), v.detach(), causal=True, backend=backend)
    torch.library.opcheck(ops._backward_op, (dout, q.detach(), k.detach(), v.detach(), out, lse, True,
                                                          scale, backend))


def test_attention_compiles_without_graph_breaks_and_matches_eager():
    # Dense layers call `attention` inside compiled, checkpointed blocks: it must trace as one op.
    q, k, v, _ = make_inputs((1, 33, 33, 4, 2), torch.float32, "cpu")

    def layer(q, k, v):
        return (attention(q * 2, k, v, causal=True, backend="math") * 3).sum(-1)

    explained = torch._dynamo.explain(layer)(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    eager_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    compiled(*leaves).sum().backward()
    layer(*eager_leaves).sum().backward()
    for got, want in zip(leaves, eager_leaves):  # the same ops in the same order: equal bit for bit
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)
