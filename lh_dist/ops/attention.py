"""Attention with log-sum-exp: one interface, several kernels chosen at run time.

Everything in lh_dist that needs softmax attention (dense layers, ring attention,
Lighthouse) goes through `attention_forward` / `attention_backward` or the autograd
wrapper `attention`.

Shapes (the FlashAttention layout):
    q    [B, Nq, H, D]          k, v [B, Nk, Hkv, D]    H % Hkv == 0 (GQA: query head h
                                                        reads KV head h // (H // Hkv))
    out  [B, Nq, H, D]  q.dtype lse  [B, H, Nq] float32 (float64 for float64 inputs),
                                     natural log of sum_j exp(scale * q_i . k_j)
Causal masking is bottom-right aligned: query i sees keys j <= i + (Nk - Nq).

Backends (`BACKENDS`):
    flash_attn  FlashAttention-4 (the flash-attn-4 package, `flash_attn.cute`), CUDA sm90+
                (Hopper, Blackwell), fp16/bf16, native GQA. Checked once per process (per
                device, dtype and head dim) against plain attention in float64 before its
                first use; a kernel that fails is never used.
    cudnn       torch.ops.aten._scaled_dot_product_cudnn_attention(+_backward), fp16/bf16.
    flash       torch.ops.aten._scaled_dot_product_flash_attention(+_backward), fp16/bf16.
    cpu_flash   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(+_backward).
    math        plain PyTorch in fp32 (fp64 for fp64 inputs); the readable definition.
"auto" takes the first of flash_attn, cudnn, flash, cpu_flash that can run the tensors, else
math; it warns once when an installed flash_attn does not import or fails its self-check.
The aten ops take [B, H, N, D], need Hkv == H and align `is_causal` top-left. We repeat
K/V heads (and sum dK/dV over each group), and for causal Nq < Nk split the keys into
the unmasked prefix [0, Nk - Nq) and the square causal diagonal block, then merge the
two partial results through their LSE (`merge_partials`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import threading
import warnings

import torch
from torch import Tensor

BACKENDS = ("auto", "flash_attn", "cudnn", "flash", "cpu_flash", "math")
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- LSE merge


def merge_partials(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    out_i [B, N, H, D], lse_i [B, H, N]. Returns (out, lse) in float32 (float64 if any
    input is float64), so that a ring can keep accumulating without rounding to bf16.
    Rows that see no key in either part (lse == -inf) come out as 0 with lse -inf.
    """
    acc = torch.promote_types(torch.promote_types(out1.dtype, out2.dtype), torch.float32)
    lse1, lse2 = lse1.to(acc), lse2.to(acc)
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w1 = torch.exp(lse1 - safe).transpose(1, 2).unsqueeze(-1)  # [B, N, H, 1]
    w2 = torch.exp(lse2 - safe).transpose(1, 2).unsqueeze(-1)
    return w1 * out1.to(acc) + w2 * out2.to(acc), lse


# ---------------------------------------------------------------- math reference


def _math_scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Upcast q, k to the accumulation dtype, repeat KV heads; scores s [B, H, Nq, Nk]."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[2] // k.shape[2]
    qf = q.to(acc).transpose(1, 2)  # [B, H, Nq, D]
    kf = k.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)  # [B, H, Nk, D]
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        nq, nk = q.shape[1], k.shape[1]
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (nk - nq), float("-inf"))
    return s, qf, kf


def _math_forward(q, k, v, causal, scale):
    s, _, _ = _math_scores(q, k, causal, scale)
    group = q.shape[2] // k.shape[2]
    vf = v.to(s.dtype).repeat_interleave(group, dim=2).transpose(1, 2)  # [B, H, Nk, D]
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Nq]
    out = torch.exp(s - lse.unsqueeze(-1)) @ vf  # [B, H, Nq, D]
    return out.transpose(1, 2).to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    # P = exp(S - lse); dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dO * O));
    # dQ = scale dS K; dK = scale dS^T Q. Uses the given out/lse (the flash identity).
    s, qf, kf = _math_scores(q, k, causal, scale)
    acc, group = s.dtype, q.shape[2] // k.shape[2]
    vf = v.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    do = dout.to(acc).transpose(1, 2)  # [B, H, Nq, D]
    p = torch.exp(s - lse.to(acc).unsqueeze(-1))
    delta = (do * out.to(acc).transpose(1, 2)).sum(-1, keepdim=True)  # [B, H, Nq, 1]
    ds = p * (do @ vf.transpose(-1, -2) - delta)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    dv = p.transpose(-1, -2) @ do
    return dq.transpose(1, 2).to(q.dtype), _sum_groups(dk.transpose(1, 2), k), _sum_groups(dv.transpose(1, 2), v)


def _sum_groups(dx: Tensor, x: Tensor) -> Tensor:
    """[B, N, H, D] gradient of repeated KV heads -> [B, N, Hkv, D] in x.dtype (summed in fp32+)."""
    b, n, h, d = dx.shape
    hkv = x.shape[2]
    acc = torch.promote_types(dx.dtype, torch.float32)
    return dx.to(acc).view(b, n, hkv, h // hkv, d).sum(3).to(x.dtype)


# ---------------------------------------------------------------- aten kernels


def _cudnn_fwd(q, k, v, is_causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, is_causal, False, scale=scale
    )[:2]
    return out, lse.reshape(lse.shape[:3])  # cuDNN gives lse as [B, H, Nq, 1]


def _cudnn_bwd(dout, q, k, v, out, lse, is_causal, scale):
    seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)  # unused: no dropout
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, None, None,
        q.shape[2], k.shape[2], 0.0, is_causal, scale=scale,
    )


def _flash_fwd(q, k, v, is_causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, is_causal, False, scale=scale
    )[:2]
    return out, lse


def _flash_bwd(dout, q, k, v, out, lse, is_causal, scale):
    seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)  # unused: no dropout
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, is_causal,
        seed, offset, scale=scale,
    )


def _cpu_flash_fwd(q, k, v, is_causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)


def _cpu_flash_bwd(dout, q, k, v, out, lse, is_causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, is_causal, scale=scale
    )


def _bhnd(x: Tensor) -> Tensor:
    """[B, N, H, D] -> [B, H, N, D] view, copied only if the fused kernels can't read it."""
    if x.stride(-1) != 1 or x.data_ptr() % 16:  # they need unit stride in D, 16-byte alignment
        x = x.clone(memory_format=torch.contiguous_format)
    return x.transpose(1, 2)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _expand_kv(x: Tensor, num_heads: int) -> Tensor:
    return x.repeat_interleave(num_heads // x.shape[2], dim=2) if x.shape[2] != num_heads else x


def _aten_forward(fwd, q, k, v, causal, scale):
    nq, nk, h = q.shape[1], k.shape[1], q.shape[2]
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    if not causal or nq == nk:
        out, lse = fwd(_bhnd(q), _bhnd(k), _bhnd(v), causal, scale)
        return out.transpose(1, 2), lse[..., :nq].to(_lse_dtype(q))
    p = nk - nq  # keys [0, p) are seen by every query; keys [p, nk) form a square causal block
    qh = _bhnd(q)
    out1, lse1 = fwd(qh, _bhnd(k[:, :p]), _bhnd(v[:, :p]), False, scale)
    out2, lse2 = fwd(qh, _bhnd(k[:, p:]), _bhnd(v[:, p:]), True, scale)
    out, lse = merge_partials(out1.transpose(1, 2), lse1[..., :nq], out2.transpose(1, 2), lse2[..., :nq])
    return out.to(q.dtype), lse.to(_lse_dtype(q))


def _aten_backward(bwd, dout, q, k, v, out, lse, causal, scale):
    nq, nk, h = q.shape[1], k.shape[1], q.shape[2]
    ke, ve = _expand_kv(k, h), _expand_kv(v, h)
    qh, oh, doh, lse_c = _bhnd(q), _bhnd(out), _bhnd(dout), lse.to(_lse_dtype(q)).contiguous()
    if not causal or nq == nk:
        dq, dk, dv = bwd(doh, qh, _bhnd(ke), _bhnd(ve), oh, lse_c, causal, scale)[:3]
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    else:
        # Each part's gradient, computed with the merged out/lse, is the gradient of that
        # part's keys in the full softmax (P and rowsum(dO * O) are the full ones).
        p = nk - nq
        dq1, dk1, dv1 = bwd(doh, qh, _bhnd(ke[:, :p]), _bhnd(ve[:, :p]), oh, lse_c, False, scale)[:3]
        dq2, dk2, dv2 = bwd(doh, qh, _bhnd(ke[:, p:]), _bhnd(ve[:, p:]), oh, lse_c, True, scale)[:3]
        acc = torch.promote_types(dq1.dtype, torch.float32)
        dq = (dq1.to(acc) + dq2.to(acc)).transpose(1, 2)
        dk = torch.cat([dk1, dk2], dim=2).transpose(1, 2)
        dv = torch.cat([dv1, dv2], dim=2).transpose(1, 2)
    return dq.to(q.dtype), _sum_groups(dk, k), _sum_groups(dv, v)


# ---------------------------------------------------------------- FlashAttention-4

# flash_attn.cute (the flash-attn-4 package) exposes forward with LSE as `flash_attn_func(...,
# return_lse=True)`, but its backward only inside that function's autograd node. Ring attention
# and Lighthouse take the backward of an out/lse they merged themselves, which only the
# interface module's `_flash_attn_bwd` accepts. Both are called with explicit keywords and
# strict unpacking, so a release that renames a parameter or changes a return raises (and
# fails the self-check below) instead of computing something else.


_FA_NOT_INSTALLED = "FlashAttention-4 is not installed (pip install 'lh_dist[flash]')"


@functools.lru_cache(maxsize=None)
def _flash_attn() -> tuple[object, object] | str:
    """(flash_attn.cute, flash_attn.cute.interface), or why they do not import."""
    try:
        return importlib.import_module("flash_attn.cute"), importlib.import_module("flash_attn.cute.interface")
    except Exception as err:  # absent, or built for another torch / CUDA, a missing shared library, ...
        if isinstance(err, ModuleNotFoundError) and err.name in ("flash_attn", "flash_attn.cute"):
            return _FA_NOT_INSTALLED
        return f"flash_attn.cute does not import: {type(err).__name__}: {err}"


def _flash_attn_version() -> str:
    """The installed versions, for messages: 'flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1'."""
    parts = []
    module_version = getattr(_flash_attn()[0], "__version__", None)
    if module_version not in (None, "0.0.0"):  # 4.0.0b36 reports 0.0.0 (it asks for the wrong name)
        parts.append(f"flash_attn.cute {module_version}")
    for dist in ("flash-attn-4", "nvidia-cutlass-dsl"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts) or "flash_attn.cute of unknown version"


def _fa_forward(q, k, v, causal, scale):
    cute, _ = _flash_attn()
    with torch.no_grad():  # no autograd node: the backward is explicit (`_fa_backward`)
        out, lse = cute.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_lse=True)
    return out, lse


def _fa_backward(dout, q, k, v, out, lse, causal, scale):
    _, interface = _flash_attn()
    dq, dk, dv = interface._flash_attn_bwd(q=q, k=k, v=v, out=out, dout=dout, lse=lse.float(),
                                           softmax_scale=scale, causal=causal)
    return dq, dk, dv


# The self-check: small problems whose lengths are no multiple of any tile size, with GQA, MQA
# and plain heads; (B, Nq, Nk, H, Hkv, causal).
_SELF_CHECK_CASES = (
    (2, 203, 203, 4, 2, True),  # square causal (dense layers, Lighthouse)
    (1, 77, 203, 2, 2, True),  # bottom-right aligned causal (the gathered prefix under CP)
    (1, 77, 203, 4, 1, False),  # unmasked (ring attention's off-diagonal blocks)
)
_self_checks: dict[tuple, str | None] = {}  # (device, dtype, head dim) -> failure, None if passed
_self_check_lock = threading.Lock()


def _plain_attention(q, k, v, dout, causal, scale):
    """Attention and its gradients written out, every op in q.dtype (no autograd, which may be
    off where the check runs, e.g. inside a custom op): (out, lse, dq, dk, dv)."""
    group = q.shape[2] // k.shape[2]
    qt, do = q.transpose(1, 2), dout.transpose(1, 2)  # [B, H, Nq, D]
    kt, vt = (x.repeat_interleave(group, 2).transpose(1, 2) for x in (k, v))  # [B, H, Nk, D]
    s = (qt @ kt.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    if causal:
        nq, nk = q.shape[1], k.shape[1]
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (nk - nq), float("-inf"))
    p = s.softmax(-1)
    out = p @ vt  # [B, H, Nq, D]
    ds = p * (do @ vt.transpose(-1, -2) - (do * out).sum(-1, keepdim=True))
    dq = (ds @ kt) * scale
    dk, dv = (ds.transpose(-1, -2) @ qt) * scale, p.transpose(-1, -2) @ do  # [B, H, Nk, D]
    lse = s.to(torch.promote_types(s.dtype, torch.float32)).logsumexp(-1)  # [B, H, Nq]
    return (out.transpose(1, 2), lse, dq.transpose(1, 2),
            _sum_groups(dk.transpose(1, 2), k), _sum_groups(dv.transpose(1, 2), v))


def _self_check_failure(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Run flash_attn forward and backward on `_SELF_CHECK_CASES`; None if it is right, else what is wrong.

    The reference is plain attention in float64 (float32 would do, but TF32 matmuls, if enabled,
    would blur it). What a correct kernel may miss by is set, as in the test suite, by plain
    attention computed in `dtype` itself on the same inputs and device: RMS error at most 2x its
    RMS error, max error at most 4x its max error, each plus one rounding step of `dtype` at the
    reference's size. A wrong mask or a dropped causal flag misses by O(1).
    """
    gen = torch.Generator().manual_seed(0)  # a private generator: the caller's random stream stays as it was
    eps = torch.finfo(dtype).eps
    for b, nq, nk, h, hkv, causal in _SELF_CHECK_CASES:
        case = f"B={b} Nq={nq} Nk={nk} H={h} Hkv={hkv} {'causal' if causal else 'unmasked'}"
        q, dout = (torch.randn(b, nq, h, head_dim, generator=gen) for _ in range(2))
        k, v = (torch.randn(b, nk, hkv, head_dim, generator=gen) for _ in range(2))
        q, k, v, dout = (x.to(device=device, dtype=dtype) for x in (q, k, v, dout))
        scale = head_dim**-0.5
        try:
            out, lse = _fa_forward(q, k, v, causal, scale)
            grads = _fa_backward(dout, q, k, v, out, lse, causal, scale)
        except Exception as err:
            return f"{case}: {type(err).__name__}: {err}"
        with torch.autocast(device.type, enabled=False):
            ref = _plain_attention(*(x.double() for x in (q, k, v, dout)), causal, scale)
            base = _plain_attention(q, k, v, dout, causal, scale)
        want = [(q.shape, dtype), ((b, h, nq), torch.float32), (q.shape, dtype), (k.shape, dtype), (v.shape, dtype)]
        for name, x, (shape, x_dtype), r, bs in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want,
                                                   ref, base):
            if tuple(x.shape) != tuple(shape) or x.dtype != x_dtype:
                return f"{case}: {name} is {tuple(x.shape)} {x.dtype}, expected {tuple(shape)} {x_dtype}"
            diff, base_diff = (y.double() - r for y in (x, bs))
            rms, base_rms, ref_rms = (y.pow(2).mean().sqrt().item() for y in (diff, base_diff, r))
            mx, base_mx, ref_mx = (y.abs().max().item() for y in (diff, base_diff, r))
            tol_rms, tol_max = 2 * base_rms + eps * ref_rms, 4 * base_mx + eps * ref_mx
            if not (rms <= tol_rms and mx <= tol_max):  # also false for NaN
                return (f"{case}: {name} misses float64 attention by {mx:.3g} max, {rms:.3g} RMS; "
                        f"allowed {tol_max:.3g} max, {tol_rms:.3g} RMS")
    return None


def _flash_attn_hardware(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str | None:
    """Why FlashAttention-4 cannot take these tensors, or None."""
    if device.type != "cuda":
        return f"flash_attn needs CUDA tensors, got device {device}"
    if dtype not in _HALF:
        return f"flash_attn supports float16/bfloat16 only, got dtype {dtype}"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "flash_attn (FlashAttention-4) needs an sm90+ GPU (Hopper or Blackwell)"
    if head_dim is not None and (head_dim % 8 or not 8 <= head_dim <= 256):
        return f"flash_attn needs head dim D % 8 == 0 and 8 <= D <= 256, got D={head_dim}"
    return None


def _flash_attn_problem(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> tuple[str, bool] | None:
    """(why flash_attn cannot run here, whether "auto" should say so), or None if it can.

    "auto" is quiet when the package is simply absent or the tensors don't fit it, and warns
    when an installed package does not import or fails its self-check.
    """
    reason = _flash_attn_hardware(device, dtype, head_dim)
    if reason is not None:
        return reason, False
    modules = _flash_attn()
    if isinstance(modules, str):
        return modules, modules != _FA_NOT_INSTALLED
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device()) if device.type == "cuda" else device
    key = (device, dtype, head_dim or 128)
    if key not in _self_checks:
        with _self_check_lock:
            if key not in _self_checks:
                _self_checks[key] = _self_check_failure(*key)
    failure = _self_checks[key]
    if failure is None:
        return None
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return (f"{_flash_attn_version()} failed lh_dist's self-check on {where} "
            f"({str(dtype).removeprefix('torch.')}, D={key[2]}): {failure}"), True


# ---------------------------------------------------------------- dispatch


_KERNELS = {  # name -> (forward(q, k, v, causal, scale), backward(dout, q, k, v, out, lse, causal, scale))
    "flash_attn": (_fa_forward, _fa_backward),
    "cudnn": (functools.partial(_aten_forward, _cudnn_fwd), functools.partial(_aten_backward, _cudnn_bwd)),
    "flash": (functools.partial(_aten_forward, _flash_fwd), functools.partial(_aten_backward, _flash_bwd)),
    "cpu_flash": (functools.partial(_aten_forward, _cpu_flash_fwd),
                  functools.partial(_aten_backward, _cpu_flash_bwd)),
    "math": (_math_forward, _math_backward),
}


def _unavailable(name: str, device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str | None:
    """Why backend `name` cannot run on (device, dtype, head_dim), or None if it can."""
    if name == "math":
        return None
    if name == "cpu_flash":
        return None if device.type == "cpu" else f"cpu_flash runs on CPU tensors, got device {device}"
    if name == "flash_attn":
        problem = _flash_attn_problem(device, dtype, head_dim)
        return None if problem is None else problem[0]
    if device.type != "cuda":
        return f"{name} needs CUDA tensors, got device {device}"
    if dtype not in _HALF:
        return f"{name} supports float16/bfloat16 only, got dtype {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"{name} needs an sm80+ GPU"
    if name == "cudnn":
        if not torch.backends.cudnn.is_available() or (torch.backends.cudnn.version() or 0) < 90000:
            return "cudnn attention needs cuDNN >= 9"
        if head_dim is not None and (head_dim % 8 or head_dim > 128):
            return f"cudnn attention needs head dim D % 8 == 0 and D <= 128, got D={head_dim}"
    if name == "flash" and head_dim is not None and head_dim > 256:
        return f"flash attention needs head dim D <= 256, got D={head_dim}"
    return None


_AUTO_ORDER = ("flash_attn", "cudnn", "flash", "cpu_flash")  # then math
_warned: set[str] = set()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str:
    """The concrete backend that `backend` means for tensors on `device` of `dtype`.

    "auto": the first of `_AUTO_ORDER` that can run
    here (on CUDA: flash_attn once its self-check has passed, else cudnn, else flash; cpu_flash
    on CPU), else math. An explicit backend that cannot run here raises RuntimeError saying why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        problem = _flash_attn_problem(device, dtype, head_dim)
        if problem is None:
            return "flash_attn"
        chosen = next((c for c in _AUTO_ORDER[1:] if _unavailable(c, device, dtype, head_dim) is None), "math")
        reason, loud = problem
        if loud and reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"attention backend 'auto' uses {chosen} instead of flash_attn: {reason}", stacklevel=2)
        return chosen
    reason = _unavailable(backend, device, dtype, head_dim)
    if reason is not None:
        raise RuntimeError(f"attention backend {backend!r} is unavailable: {reason}")
    return backend


def _check(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> float:
    """Validate shapes, dtypes and devices; return the softmax scale."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, N, H, D], got shape {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}.dtype ({x.dtype}) must equal q.dtype ({q.dtype})")
        if x.device != q.device:
            raise ValueError(f"{name}.device ({x.device}) must equal q.device ({q.device})")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    (b, nq, h, d), (bk, nk, hkv, dk) = q.shape, k.shape
    if bk != b or dk != d:
        raise ValueError(f"k must be [B={b}, Nk, Hkv, D={d}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if h % hkv:
        raise ValueError(f"q heads H={h} must be a multiple of k/v heads Hkv={hkv} (GQA)")
    if causal and nk < nq:
        raise ValueError(f"causal attention needs Nk >= Nq (bottom-right aligned), got Nq={nq}, Nk={nk}")
    return d**-0.5 if scale is None else float(scale)


def _lse_shape(q: Tensor) -> tuple[int, int, int]:
    b, nq, h, _ = q.shape
    return b, h, nq


# The kernels run inside torch.library custom ops: torch.compile and activation checkpointing see
# one opaque op per call (no graph break; the dispatch, which reads device properties and data
# pointers, is never traced), and a selective checkpointing policy can keep their outputs.
# Outputs are contiguous, as the fake implementations declare (compile relies on it).


@torch.library.custom_op("lh_dist::attention_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    name = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    out, lse = _KERNELS[name][0](q, k, v, causal, scale)
    return out.contiguous(), lse.contiguous()


@_forward_op.register_fake
def _(q, k, v, causal, scale, backend):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q), dtype=_lse_dtype(q))


@torch.library.custom_op("lh_dist::attention_backward", mutates_args=())
def _backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                 scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    name = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    dq, dk, dv = _KERNELS[name][1](dout, q, k, v, out, lse, causal, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.config = (causal, scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout.contiguous(), q, k, v, out, lse, *ctx.config)
    return dq, dk, dv, None, None, None


_forward_op.register_autograd(_backward_rule, setup_context=_setup_context)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None,
                      backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Softmax attention. q [B, Nq, H, D], k/v [B, Nk, Hkv, D] -> (out [B, Nq, H, D], lse [B, H, Nq]).

    Differentiable in q, k and v through out (lse carries no gradient); `attention_backward`
    is the same backward, for callers that merge several partial results themselves."""
    scale = _check(q, k, v, causal, scale)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return _forward_op(q, k, v, causal, scale, backend)


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                       causal: bool, scale: float | None = None, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of attention, given the forward's out and lse (or merged ones)."""
    scale = _check(q, k, v, causal, scale)
    for name, x in (("dout", dout), ("out", out)):
        if x.shape != q.shape or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}), "
                             f"got {tuple(x.shape)}, {x.dtype}, {x.device}")
    if lse.shape != _lse_shape(q) or not lse.is_floating_point() or lse.device != q.device:
        raise ValueError(f"lse must be a float tensor of shape {_lse_shape(q)} on {q.device}, "
                         f"got {tuple(lse.shape)} {lse.dtype} on {lse.device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return _backward_op(dout, q, k, v, out, lse, causal, scale, backend)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
              backend: str = "auto") -> Tensor:
    """Differentiable attention q [B, Nq, H, D], k/v [B, Nk, Hkv, D] -> out [B, Nq, H, D]."""
    return attention_forward(q, k, v, causal=causal, scale=scale, backend=backend)[0]


__all__ = ["BACKENDS", "attention", "attention_backward", "attention_forward", "merge_partials",
           "resolve_backend"]
