"""Rotary position embedding (RoPE): cos/sin tables for explicit token positions, with the
frequency scalings that Hugging Face checkpoints use (`model.rope_scaling`: linear, llama3, yarn).

Tables are computed in float64 from global positions: a context-parallel shard, whose
positions are two separate runs of the sequence, gets exactly the rows of the full
sequence, and angles stay exact at long context (float32 loses ~0.01 rad at 100K positions).
Each scaling type has the semantics of transformers' `modeling_rope_utils`; YaRN's
attention factor multiplies cos and sin, as there, so it scales q.k by its square.

Shape legend: B batch, N tokens, H heads, D head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lh_dist.config import ModelConfig


def _yarn_ramp(cfg: ModelConfig, device) -> Tensor:
    """Per frequency index [D/2] (float64): 0 where a frequency keeps its value, 1 where it is divided by
    factor, linear between. The ends are the indices whose frequency turns beta_fast and beta_slow
    times over the original context."""
    s, d, context = cfg.rope_scaling, cfg.head_dim, cfg.rope_scaling.original_max_position_embeddings

    def index_of(turns: float) -> float:
        # Frequency j (of theta^(-2j/d)) turns `turns` times over the context where
        # j = d ln(context / (2 pi turns)) / (2 ln theta).
        return d * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = index_of(s.beta_fast), index_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # a step instead of a ramp, without dividing by zero
    return ((torch.arange(d // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)


def inverse_frequencies(cfg: ModelConfig, device=None) -> tuple[Tensor, float]:
    """RoPE's rotation speeds [D/2] (radians per position, float64, on `device`) after
    `cfg.rope_scaling`, and the multiplier of cos and sin (1 except for YaRN)."""
    s, d = cfg.rope_scaling, cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)  # [D/2]
    if s.type == "linear":
        return inv / s.factor, 1.0
    if s.type == "llama3":
        wavelength = 2 * math.pi / inv
        # 1 at the short-wavelength end (kept), 0 at the long one (divided by factor).
        smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * inv / s.factor + smooth * inv
        short = wavelength < s.original_max_position_embeddings / s.high_freq_factor
        long = wavelength > s.original_max_position_embeddings / s.low_freq_factor
        return torch.where(short, inv, torch.where(long, inv / s.factor, blended)), 1.0
    if s.type == "yarn":
        ramp = _yarn_ramp(cfg, device)
        inv = inv / s.factor * ramp + inv * (1 - ramp)
        return inv, s.yarn_attention_factor()
    return inv, 1.0


def rope_tables(positions: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos, sin [N, D/2] (float64, on positions' device) for explicit global token positions [N],
    the rotation of every frequency pair, each multiplied by the scaling's attention factor."""
    # Built on positions' device: a copy from the host would make the step wait for the GPU.
    inv, scale = inverse_frequencies(cfg, positions.device)
    angles = positions.to(torch.float64)[:, None] * inv[None, :]  # [N, D/2]
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, N, H, D] by cos/sin [N, D/2], computed in at least float32 and returned in x's
    dtype. Pairs are (x[i], x[i + D/2]), as in Hugging Face Llama, so weights need no permutation."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)  # [B, N, H, D/2] each
    c, s = cos.to(dtype)[None, :, None, :], sin.to(dtype)[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).type_as(x)
