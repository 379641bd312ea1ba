"""Kernels: attention with LSE (several backends), Lighthouse pool/score/select/scatter.

The autograd wrapper `attention` is not re-exported here, so that `lh_dist.ops.attention`
stays the module: use `from lh_dist.ops.attention import attention`.
"""

from lh_dist.ops.attention import (
    BACKENDS,
    attention_backward,
    attention_forward,
    merge_partials,
    resolve_backend,
)

__all__ = [
    "BACKENDS",
    "attention_backward",
    "attention_forward",
    "merge_partials",
    "resolve_backend",
]
