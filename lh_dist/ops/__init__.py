"""Kernels: attention with LSE (several backends), Lighthouse pool/score/select/scatter."""

from lh_dist.ops.attention import (
    BACKENDS,
    attention,
    attention_backward,
    attention_forward,
    merge_partials,
    resolve_backend,
    set_default_backend,
)

__all__ = [
    "BACKENDS",
    "attention",
    "attention_backward",
    "attention_forward",
    "merge_partials",
    "resolve_backend",
    "set_default_backend",
]
