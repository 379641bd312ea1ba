"""The Lighthouse pieces as torch.library custom ops, each behind one backend switch (api.py calls them).

    lh_dist::lighthouse_select     q, k -> (index, inverse) of the selection of the vectors scored; no gradient
    lh_dist::lighthouse_gather     x -> window means of the selected entries; backward: pool backward
    lh_dist::lighthouse_scatter    o -> token rows (plus `spill` rows past the end); backward: window sums
    lh_dist::lighthouse_forward    the whole layer on one device: select (scoring sq, sk), gather q/k/v,
                                   attention_forward, scatter; returns (out, index, inverse, qg, kg, vg, og, lse)
    lh_dist::lighthouse_backward   its backward: scatter backward, attention_backward, pool backward

backend "reference" runs reference.py, "triton" the launchers of triton_kernels.py: the same
functions with the same arguments. Forward and backward are separate ops joined by
`register_autograd`, and every op has a fake implementation, so torch.compile traces through the
layer without a graph break and never into the kernels. The single-device layer is one op
(rather than the pieces in a row) so that its saved tensors are exactly the attention's inputs and
outputs, and so that an activation-checkpointing policy can name the op that holds them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lh_dist.ops.attention import attention_backward, attention_forward

from . import reference
from .layout import gathered_length, level_offsets


def _kernels(backend: str):
    """The module that implements `select_indices`, `segment` and `level_gather` for `backend`."""
    if backend == "triton":
        from . import triton_kernels  # imports triton: only when asked for

        return triton_kernels
    if backend != "reference":
        raise ValueError(f"backend must be 'reference' or 'triton' here, got {backend!r}")
    return reference


def _select(q: Tensor, k: Tensor, levels: int, pooling: int, n_tiles: int, scorer: str,
            backend: str) -> tuple[Tensor, Tensor]:
    return _kernels(backend).select_indices(q, k, levels, pooling, n_tiles, scorer)


def _unit_stride(x: Tensor) -> Tensor:
    """x, copied only if its last dim is strided (the kernels take any other strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _gather(x: Tensor, index: Tensor, levels: int, pooling: int, backend: str) -> Tensor:
    return _kernels(backend).segment(_unit_stride(x), index, x.shape[1], levels, pooling, shift=False, mean=True)


def _gather_grad(grad: Tensor, inverse: Tensor, n: int, levels: int, pooling: int, backend: str) -> Tensor:
    return _kernels(backend).level_gather(_unit_stride(grad), inverse, n, levels, pooling, scatter=False)


def _scatter(o: Tensor, inverse: Tensor, n: int, levels: int, pooling: int, spill: int,
             out_dtype: torch.dtype | None, backend: str) -> Tensor:
    return _kernels(backend).level_gather(_unit_stride(o), inverse, n, levels, pooling, scatter=True,
                                          n_out=n + spill, out_dtype=out_dtype)


def _scatter_grad(grad: Tensor, index: Tensor, n: int, levels: int, pooling: int, out_dtype: torch.dtype,
                  backend: str) -> Tensor:
    return _kernels(backend).segment(_unit_stride(grad), index, n, levels, pooling, shift=True, mean=False,
                                     out_dtype=out_dtype)


# ---------------------------------------------------------------- select


@torch.library.custom_op("lh_dist::lighthouse_select", mutates_args=())
def _select_op(q: Tensor, k: Tensor, levels: int, pooling: int, n_tiles: int, scorer: str,
               backend: str) -> tuple[Tensor, Tensor]:
    return _select(q, k, levels, pooling, n_tiles, scorer, backend)


@_select_op.register_fake
def _(q, k, levels, pooling, n_tiles, scorer, backend):
    b, n, hkv = k.shape[0], k.shape[1], k.shape[2]
    s = gathered_length(n, levels, pooling, n_tiles)
    total = level_offsets(n, levels, pooling)[-1]
    return q.new_empty(b, hkv, s, dtype=torch.int64), q.new_empty(b, hkv, total, dtype=torch.int64)


# ---------------------------------------------------------------- gather


@torch.library.custom_op("lh_dist::lighthouse_gather", mutates_args=())
def _gather_op(x: Tensor, index: Tensor, inverse: Tensor, levels: int, pooling: int, backend: str) -> Tensor:
    return _gather(x, index, levels, pooling, backend)


@_gather_op.register_fake
def _(x, index, inverse, levels, pooling, backend):
    return x.new_empty(x.shape[0], index.shape[-1], *x.shape[2:])


@torch.library.custom_op("lh_dist::lighthouse_gather_backward", mutates_args=())
def _gather_backward_op(grad: Tensor, inverse: Tensor, n: int, levels: int, pooling: int, backend: str) -> Tensor:
    return _gather_grad(grad, inverse, n, levels, pooling, backend)


@_gather_backward_op.register_fake
def _(grad, inverse, n, levels, pooling, backend):
    return grad.new_empty(grad.shape[0], n, *grad.shape[2:])


def _gather_setup(ctx, inputs, output):
    x, _, inverse, levels, pooling, backend = inputs
    ctx.save_for_backward(inverse)
    ctx.config = (x.shape[1], levels, pooling, backend)


def _gather_backward_rule(ctx, grad):
    (inverse,) = ctx.saved_tensors
    return _gather_backward_op(grad, inverse, *ctx.config), None, None, None, None, None


_gather_op.register_autograd(_gather_backward_rule, setup_context=_gather_setup)


# ---------------------------------------------------------------- scatter


@torch.library.custom_op("lh_dist::lighthouse_scatter", mutates_args=())
def _scatter_op(o: Tensor, index: Tensor, inverse: Tensor, n: int, levels: int, pooling: int, spill: int,
                out_dtype: torch.dtype | None, backend: str) -> Tensor:
    return _scatter(o, inverse, n, levels, pooling, spill, out_dtype, backend)


@_scatter_op.register_fake
def _(o, index, inverse, n, levels, pooling, spill, out_dtype, backend):
    return o.new_empty(o.shape[0], n + spill, *o.shape[2:], dtype=out_dtype or o.dtype)


@torch.library.custom_op("lh_dist::lighthouse_scatter_backward", mutates_args=())
def _scatter_backward_op(grad: Tensor, index: Tensor, n: int, levels: int, pooling: int, out_dtype: torch.dtype,
                         backend: str) -> Tensor:
    return _scatter_grad(grad, index, n, levels, pooling, out_dtype, backend)


@_scatter_backward_op.register_fake
def _(grad, index, n, levels, pooling, out_dtype, backend):
    return grad.new_empty(grad.shape[0], index.shape[-1], *grad.shape[2:], dtype=out_dtype)


def _scatter_setup(ctx, inputs, output):
    o, index, _, n, levels, pooling, _, _, backend = inputs
    ctx.save_for_backward(index)
    ctx.config = (n, levels, pooling, o.dtype, backend)


def _scatter_backward_rule(ctx, grad):
    (index,) = ctx.saved_tensors
    return (_scatter_backward_op(grad, index, *ctx.config),) + (None,) * 8


_scatter_op.register_autograd(_scatter_backward_rule, setup_context=_scatter_setup)


# ---------------------------------------------------------------- the layer on one device


@torch.library.custom_op("lh_dist::lighthouse_forward", mutates_args=())
def _forward_op(
    q: Tensor, k: Tensor, v: Tensor, sq: Tensor, sk: Tensor, levels: int, pooling: int, n_tiles: int, scorer: str,
    backend: str, attention_backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v = (x.contiguous() for x in (q, k, v))
    n = q.shape[1]
    index, inverse = _select(sq.contiguous(), sk.contiguous(), levels, pooling, n_tiles, scorer, backend)
    qg, kg, vg = (_gather(x, index, levels, pooling, backend) for x in (q, k, v))  # [B, S, H | Hkv, D]
    og, lse = attention_forward(qg, kg, vg, causal=True, backend=attention_backend)
    # FlashAttention-4, cuDNN and flash return both contiguous already (no copy); math returns og as a
    # transposed view. Contiguous outputs are what the fake promises.
    og, lse = og.contiguous(), lse.contiguous()
    out = _scatter(og, inverse, n, levels, pooling, 0, None, backend)  # [B, N, H, D]
    return out, index, inverse, qg, kg, vg, og, lse


@_forward_op.register_fake
def _(q, k, v, sq, sk, levels, pooling, n_tiles, scorer, backend, attention_backend):
    b, n, h = q.shape[:3]
    hkv = k.shape[2]
    s = gathered_length(n, levels, pooling, n_tiles)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (
        q.new_empty(q.shape),
        q.new_empty(b, hkv, s, dtype=torch.int64),
        q.new_empty(b, hkv, level_offsets(n, levels, pooling)[-1], dtype=torch.int64),
        q.new_empty(b, s, *q.shape[2:]),
        k.new_empty(b, s, *k.shape[2:]),
        v.new_empty(b, s, *v.shape[2:]),
        q.new_empty(b, s, *q.shape[2:]),
        q.new_empty(b, h, s, dtype=lse_dtype),
    )


@torch.library.custom_op("lh_dist::lighthouse_backward", mutates_args=())
def _backward_op(
    dout: Tensor, index: Tensor, inverse: Tensor, qg: Tensor, kg: Tensor, vg: Tensor, og: Tensor, lse: Tensor,
    levels: int, pooling: int, backend: str, attention_backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    n = dout.shape[1]
    dog = _scatter_grad(dout.contiguous(), index, n, levels, pooling, dout.dtype, backend)  # [B, S, H, D]
    dgathered = attention_backward(dog, qg, kg, vg, og, lse, causal=True, backend=attention_backend)
    return tuple(_gather_grad(dx.contiguous(), inverse, n, levels, pooling, backend) for dx in dgathered)


@_backward_op.register_fake
def _(dout, index, inverse, qg, kg, vg, og, lse, levels, pooling, backend, attention_backend):
    b, n = dout.shape[:2]
    return tuple(dout.new_empty(b, n, *x.shape[2:]) for x in (qg, kg, vg))


def _forward_setup(ctx, inputs, output):
    _, _, _, _, _, levels, pooling, _, _, backend, attention_backend = inputs
    ctx.save_for_backward(*output[1:])
    ctx.config = (levels, pooling, backend, attention_backend)
    ctx.mark_non_differentiable(*output[1:])


def _forward_backward_rule(ctx, dout, *_):
    dq, dk, dv = _backward_op(dout, *ctx.saved_tensors, *ctx.config)
    return dq, dk, dv, None, None, None, None, None, None, None, None  # the scored sq, sk get none


_forward_op.register_autograd(_forward_backward_rule, setup_context=_forward_setup)
