"""Kernels: attention with LSE (several backends), Lighthouse pool/score/select/scatter.

The autograd wrapper `attention` is not re-exported here, so that `lh_dist.ops.attention`
stays the package: use `from lh_dist.ops.attention import attention`.
"""

from lh_dist.ops.attention import BACKENDS, merge_partials, resolve_backend

# Imported on first use (lh_dist.ops.attention says why).
_OPS = ("attention_backward", "attention_forward")


def __getattr__(name: str):
    if name in _OPS:
        from lh_dist.ops.attention import ops

        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "attention_backward", "attention_forward", "merge_partials", "resolve_backend"]
