"""Token scorers: parameter-free importance scores that drive Lighthouse selection.

A scorer maps q [B, N, H, D] and k [B, N, Hkv, D] to per-token scores
(q_score [B, H, N], k_score [B, Hkv, N]) in fp32. Scores carry no gradient.
Grouping query heads onto KV heads and pooling over windows happen outside the scorer.
"""

from __future__ import annotations

from typing import Callable

import torch

Scorer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def norm_scorer(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norm of every query and key vector: ([B, H, N], [B, Hkv, N]) fp32."""
    q_score = torch.linalg.vector_norm(q.float(), dim=-1).transpose(1, 2)  # [B, H, N]
    k_score = torch.linalg.vector_norm(k.float(), dim=-1).transpose(1, 2)  # [B, Hkv, N]
    return q_score.contiguous(), k_score.contiguous()


SCORERS: dict[str, Scorer] = {"norm": norm_scorer}


def get_scorer(name: str) -> Scorer:
    """The scorer called `name`; ValueError listing the known ones otherwise."""
    if name not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {name!r}")
    return SCORERS[name]
