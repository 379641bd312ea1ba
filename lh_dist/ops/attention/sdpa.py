"""PyTorch's fused SDPA kernels (cuDNN, flash, CPU flash) behind this package's interface.

The aten ops take [B, H, N, D], need Hkv == H and align `is_causal` top-left. We repeat
K/V heads (and sum dK/dV over each group), and for causal Nq < Nk split the keys into
the unmasked prefix [0, Nk - Nq) and the square causal diagonal block, then merge the
two partial results through their LSE (`merge_partials`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .reference import lse_dtype, merge_partials, sum_groups


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


def _expand_kv(x: Tensor, num_heads: int) -> Tensor:
    return x.repeat_interleave(num_heads // x.shape[2], dim=2) if x.shape[2] != num_heads else x


def _aten_forward(fwd, q, k, v, causal, scale):
    nq, nk, h = q.shape[1], k.shape[1], q.shape[2]
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    if not causal or nq == nk:
        out, lse = fwd(_bhnd(q), _bhnd(k), _bhnd(v), causal, scale)
        return out.transpose(1, 2), lse[..., :nq].to(lse_dtype(q))
    p = nk - nq  # keys [0, p) are seen by every query; keys [p, nk) form a square causal block
    qh = _bhnd(q)
    out1, lse1 = fwd(qh, _bhnd(k[:, :p]), _bhnd(v[:, :p]), False, scale)
    out2, lse2 = fwd(qh, _bhnd(k[:, p:]), _bhnd(v[:, p:]), True, scale)
    out, lse = merge_partials(out1.transpose(1, 2), lse1[..., :nq], out2.transpose(1, 2), lse2[..., :nq])
    return out.to(q.dtype), lse.to(lse_dtype(q))


def _aten_backward(bwd, dout, q, k, v, out, lse, causal, scale):
    nq, nk, h = q.shape[1], k.shape[1], q.shape[2]
    ke, ve = _expand_kv(k, h), _expand_kv(v, h)
    qh, oh, doh, lse_c = _bhnd(q), _bhnd(out), _bhnd(dout), lse.to(lse_dtype(q)).contiguous()
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
    return dq.to(q.dtype), sum_groups(dk, k), sum_groups(dv, v)


# backend -> (forward(q, k, v, causal, scale), backward(dout, q, k, v, out, lse, causal, scale))
KERNELS = {
    "cudnn": (functools.partial(_aten_forward, _cudnn_fwd), functools.partial(_aten_backward, _cudnn_bwd)),
    "flash": (functools.partial(_aten_forward, _flash_fwd), functools.partial(_aten_backward, _flash_bwd)),
    "cpu_flash": (functools.partial(_aten_forward, _cpu_flash_fwd),
                  functools.partial(_aten_backward, _cpu_flash_bwd)),
}
