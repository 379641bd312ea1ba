"""Attention written out in PyTorch (the "math" backend), and the LSE merge of partial results.

The readable definition every kernel is held to: computed in float32 (float64 for float64
inputs), GQA by repeating K/V heads, bottom-right aligned causal mask.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lse_dtype(q: Tensor) -> torch.dtype:
    """The dtype of the LSE that attention over q returns: float64 for float64 q, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


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


def sum_groups(dx: Tensor, x: Tensor) -> Tensor:
    """[B, N, H, D] gradient of repeated KV heads -> [B, N, Hkv, D] in x.dtype (summed in fp32+)."""
    b, n, h, d = dx.shape
    hkv = x.shape[2]
    acc = torch.promote_types(dx.dtype, torch.float32)
    return dx.to(acc).view(b, n, hkv, h // hkv, d).sum(3).to(x.dtype)


def _math_scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Upcast q, k to the accumulation dtype, repeat KV heads; scores s [B, H, Nq, Nk]."""
    acc = lse_dtype(q)
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


def math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, Nq, H, D] in q.dtype, lse [B, H, Nq]) of q [B, Nq, H, D] over k/v [B, Nk, Hkv, D]."""
    s, _, _ = _math_scores(q, k, causal, scale)
    group = q.shape[2] // k.shape[2]
    vf = v.to(s.dtype).repeat_interleave(group, dim=2).transpose(1, 2)  # [B, H, Nk, D]
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Nq]
    out = torch.exp(s - lse.unsqueeze(-1)) @ vf  # [B, H, Nq, D]
    return out.transpose(1, 2).to(q.dtype), lse


def math_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the inputs' dtypes, from the given out/lse (which may be merged ones)."""
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
    return dq.transpose(1, 2).to(q.dtype), sum_groups(dk.transpose(1, 2), k), sum_groups(dv.transpose(1, 2), v)
