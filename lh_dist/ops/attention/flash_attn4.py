"""FlashAttention-4 (the flash-attn-4 package, `flash_attn.cute`) behind this package's interface,
and the self-check it passes before its first use.

The check runs once per process for each (device, dtype, head dim), against plain attention in
float64; a kernel that fails it is never used.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import threading

import torch

from .reference import sum_groups

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


def flash_attn_version() -> str:
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


def forward(q, k, v, causal, scale):
    """(out [B, Nq, H, D], lse [B, H, Nq]) from FlashAttention-4, with no autograd node."""
    cute, _ = _flash_attn()
    with torch.no_grad():  # no autograd node: the backward is explicit (`backward`)
        out, lse = cute.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_lse=True)
    return out, lse


def backward(dout, q, k, v, out, lse, causal, scale):
    """(dq, dk, dv) from FlashAttention-4's backward, for the given (possibly merged) out and lse."""
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
            sum_groups(dk.transpose(1, 2), k), sum_groups(dv.transpose(1, 2), v))


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
            out, lse = forward(q, k, v, causal, scale)
            grads = backward(dout, q, k, v, out, lse, causal, scale)
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
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn supports float16/bfloat16 only, got dtype {dtype}"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "flash_attn (FlashAttention-4) needs an sm90+ GPU (Hopper or Blackwell)"
    if head_dim is not None and (head_dim % 8 or not 8 <= head_dim <= 256):
        return f"flash_attn needs head dim D % 8 == 0 and 8 <= D <= 256, got D={head_dim}"
    return None


def flash_attn_problem(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> tuple[str, bool] | None:
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
    return (f"{flash_attn_version()} failed lh_dist's self-check on {where} "
            f"({str(dtype).removeprefix('torch.')}, D={key[2]}): {failure}"), True
