"""Triton Lighthouse attention: one differentiable op over the kernels in `triton_kernels`.

Forward: scores -> select -> gather-pool q, k, v -> causal attention -> scatter back.
Backward: scatter backward (window sums) -> attention backward -> pool backward (gathers).
Selection is integer-valued and carries no gradient. Forward and backward are torch.library
custom ops joined by `register_autograd`, so torch.compile treats the layer as one opaque op
(no graph break) and never traces into the kernels or the attention backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lh_dist.ops.attention import attention_backward, attention_forward

from . import triton_kernels as kernels
from .layout import gathered_length, level_offsets
from .reference import pyramid_scores
from .validation import TILE_SELECT


def select_fast(q: Tensor, k: Tensor, levels: int, pooling: int, n_tiles: int, scorer: str = "norm"):
    """(index [B, Hkv, S], inverse [B, Hkv, P]) int64 of the Lighthouse selection (see Selection)."""
    if scorer == "norm":
        q_scores, k_scores = kernels.pyramid_scores_triton(q, k, levels, pooling)
    else:
        q_scores, k_scores = pyramid_scores(q, k, levels, pooling, scorer)
    return kernels.select_triton(q_scores, k_scores, q.shape[1], levels, pooling, n_tiles)


@torch.library.custom_op("lh_dist::lighthouse_forward", mutates_args=())
def _forward(
    q: Tensor, k: Tensor, v: Tensor, levels: int, pooling: int, n_tiles: int, scorer: str, attention_backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v = (x.contiguous() for x in (q, k, v))
    index, inverse = select_fast(q, k, levels, pooling, n_tiles, scorer)
    qg, kg, vg = (kernels.segment(x, index, levels, pooling, shift=False, mean=True) for x in (q, k, v))
    og, lse = attention_forward(qg, kg, vg, causal=True, backend=attention_backend)
    out = kernels.level_gather(og, inverse, q.shape[1], levels, pooling, scatter=True)
    return out, index, inverse, qg, kg, vg, og, lse


@_forward.register_fake
def _(q, k, v, levels, pooling, n_tiles, scorer, attention_backend):
    b, n, h, d = q.shape
    hkv = k.shape[2]
    s = gathered_length(n, levels, pooling, n_tiles)
    total = level_offsets(n, levels, pooling)[-1]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (
        q.new_empty(b, n, h, d),
        q.new_empty(b, hkv, s, dtype=torch.int64),
        q.new_empty(b, hkv, total, dtype=torch.int64),
        q.new_empty(b, s, h, d),
        k.new_empty(b, s, hkv, d),
        v.new_empty(b, s, hkv, d),
        q.new_empty(b, s, h, d),
        q.new_empty(b, h, s, dtype=lse_dtype),
    )


@torch.library.custom_op("lh_dist::lighthouse_backward", mutates_args=())
def _backward(
    dout: Tensor, index: Tensor, inverse: Tensor, qg: Tensor, kg: Tensor, vg: Tensor, og: Tensor, lse: Tensor,
    levels: int, pooling: int, attention_backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    n = dout.shape[1]
    dog = kernels.segment(dout.contiguous(), index, levels, pooling, shift=True, mean=False)
    dqg, dkg, dvg = attention_backward(dog, qg, kg, vg, og, lse, causal=True, backend=attention_backend)
    return tuple(
        kernels.level_gather(dx.contiguous(), inverse, n, levels, pooling, scatter=False) for dx in (dqg, dkg, dvg)
    )


@_backward.register_fake
def _(dout, index, inverse, qg, kg, vg, og, lse, levels, pooling, attention_backend):
    b, n = dout.shape[:2]
    return dout.new_empty(b, n, *qg.shape[2:]), dout.new_empty(b, n, *kg.shape[2:]), dout.new_empty(b, n, *vg.shape[2:])


def _setup_context(ctx, inputs, output):
    _, _, _, levels, pooling, _, _, attention_backend = inputs
    ctx.save_for_backward(*output[1:])
    ctx.config = (levels, pooling, attention_backend)
    ctx.mark_non_differentiable(*output[1:])


def _backward_rule(ctx, dout, *_):
    dq, dk, dv = _backward(dout, *ctx.saved_tensors, *ctx.config)
    return dq, dk, dv, None, None, None, None, None


_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def lighthouse_triton(
    q: Tensor, k: Tensor, v: Tensor, *, levels: int, pooling: int, topk: int, scorer: str = "norm",
    attention_backend: str = "auto",
) -> Tensor:
    """Lighthouse attention through the Triton kernels, q [B, N, H, D], k/v [B, N, Hkv, D]; unchecked."""
    return _forward(q, k, v, levels, pooling, topk // TILE_SELECT, scorer, attention_backend)[0]
