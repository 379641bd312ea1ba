"""`lighthouse_attention`: the public entry point, dispatching to the reference or Triton path."""

from __future__ import annotations

import os

import torch

from .reference import lighthouse_reference
from .scorers import get_scorer
from .validation import BACKENDS, validate_lighthouse_args, validate_lighthouse_inputs


def lighthouse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    levels: int,
    pooling: int,
    topk: int,
    scorer: str = "norm",
    backend: str = "auto",
    attention_backend: str = "auto",
) -> torch.Tensor:
    """Lighthouse attention (docs/DESIGN.md §2): q [B, N, H, D], k/v [B, N, Hkv, D] -> [B, N, H, D].

    Causal given the selection. backend: "auto" (Triton on CUDA, else reference), "reference"
    or "triton"; attention_backend picks the kernel of the inner attention (lh_dist.ops.attention).
    """
    validate_lighthouse_inputs(q, k, v)
    validate_lighthouse_args(q.shape[1], levels, pooling, topk)
    get_scorer(scorer)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "triton" and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1); use 'reference' or 'auto'")
    args = dict(levels=levels, pooling=pooling, topk=topk, scorer=scorer, attention_backend=attention_backend)
    if backend == "reference":
        return lighthouse_reference(q, k, v, **args)
    from .fast import lighthouse_triton

    return lighthouse_triton(q, k, v, **args)
