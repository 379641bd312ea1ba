"""The attention custom ops and the public functions over them.

The kernels run inside torch.library custom ops: torch.compile and activation checkpointing see
one opaque op per call (no graph break; the dispatch, which reads device properties and data
pointers, is never traced), and a selective checkpointing policy can keep their outputs.
Outputs are contiguous, as the fake implementations declare (compile relies on it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import KERNELS, check_backend, resolve_backend
from .reference import lse_dtype


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


@torch.library.custom_op("lh_dist::attention_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    name = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    out, lse = KERNELS[name][0](q, k, v, causal, scale)
    return out.contiguous(), lse.contiguous()


@_forward_op.register_fake
def _(q, k, v, causal, scale, backend):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q), dtype=lse_dtype(q))


@torch.library.custom_op("lh_dist::attention_backward", mutates_args=())
def _backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                 scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    name = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    dq, dk, dv = KERNELS[name][1](dout, q, k, v, out, lse, causal, scale)
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
    check_backend(backend)
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
    check_backend(backend)
    return _backward_op(dout, q, k, v, out, lse, causal, scale, backend)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
              backend: str = "auto") -> Tensor:
    """Differentiable attention q [B, Nq, H, D], k/v [B, Nk, Hkv, D] -> out [B, Nq, H, D]."""
    return attention_forward(q, k, v, causal=causal, scale=scale, backend=backend)[0]

