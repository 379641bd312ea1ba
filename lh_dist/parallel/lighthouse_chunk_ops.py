"""Per-chunk Lighthouse gather and scatter on the Triton kernels, for context parallelism.

The same formulas as ops/lighthouse/fast.py, applied to one chunk of the
sequence, except that the scatter also returns the `spill` rows past the end
of the chunk that the chunk's last windows reach (they belong to the next
chunk, possibly on another rank), and its backward takes their gradient.
"""

import torch

from lh_dist.ops.lighthouse import level_offsets
from lh_dist.ops.lighthouse import triton_kernels as kernels


class _GatherChunk(torch.autograd.Function):
    """Window means of the selected entries: x [B, n, Hx, D] -> [B, S, Hx, D]."""

    @staticmethod
    def forward(ctx, x, index, inverse, levels, pooling):
        ctx.save_for_backward(inverse)
        ctx.config = (x.shape[1], levels, pooling)
        return kernels.segment(x.contiguous(), index, levels, pooling, shift=False, mean=True)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        n, levels, pooling = ctx.config
        grad_x = kernels.level_gather(grad.contiguous(), inverse, n, levels, pooling, scatter=False)
        return grad_x, None, None, None, None


class _ScatterChunk(torch.autograd.Function):
    """Entry outputs o [B, S, H, D] added after their windows: [B, n + spill, H, D] fp32."""

    @staticmethod
    def forward(ctx, o, index, inverse, n, levels, pooling, spill):
        ctx.save_for_backward(index, inverse)
        ctx.config = (n, levels, pooling, spill, o.dtype)
        return kernels.level_gather(o.contiguous(), inverse, n, levels, pooling, scatter=True,
                                    n_out=n + spill, out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        index, inverse = ctx.saved_tensors
        n, levels, pooling, spill, dtype = ctx.config
        grad = grad.float()
        # Sums over each entry's output rows inside the chunk...
        grad_o = kernels.segment(grad[:, :n].contiguous(), index, levels, pooling, shift=True, mean=False,
                                 out_dtype=torch.float32)  # [B, S, H, D]
        # ...plus the spill rows: at level l (c = p^l) only the chunk's last window reaches
        # past its end, onto rows [n, n + c - 1).
        b, _, heads, d = grad_o.shape
        group = heads // inverse.shape[1]
        offsets = level_offsets(n, levels, pooling)
        for lvl in range(1, levels):
            c = pooling**lvl
            pos = inverse[:, :, offsets[lvl] + n // c - 1].repeat_interleave(group, dim=1)  # [B, H]
            rows = grad[:, n:n + c - 1].sum(1) * (pos >= 0).unsqueeze(-1)  # [B, H, D]
            grad_o.scatter_add_(1, pos.clamp(min=0)[:, None, :, None].expand(b, 1, heads, d), rows[:, None])
        return grad_o.to(dtype), None, None, None, None, None, None


def gather_chunk(x, index, inverse, levels: int, pooling: int) -> torch.Tensor:
    """Gathered entries of one chunk x [B, n, Hx, D] -> [B, S, Hx, D]; differentiable in x."""
    return _GatherChunk.apply(x, index, inverse, levels, pooling)


def scatter_chunk(o, index, inverse, n: int, levels: int, pooling: int, spill: int) -> torch.Tensor:
    """Scatter o [B, S, H, D] back over a chunk of n tokens plus `spill` rows past it: fp32 [B, n + spill, H, D]."""
    return _ScatterChunk.apply(o, index, inverse, n, levels, pooling, spill)
