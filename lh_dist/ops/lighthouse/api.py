"""The public Lighthouse functions: the layer, and the pieces that context parallelism runs per chunk.

Each checks its arguments, resolves params.backend for the tensors' device and calls one of the
`lh_dist::lighthouse_*` custom ops of ops.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops as _ops  # noqa: F401  (registers the torch.ops.lh_dist.lighthouse_* ops)
from .layout import Selection
from .params import LighthouseParams, validate_lighthouse_inputs


def lighthouse_attention(q: Tensor, k: Tensor, v: Tensor, params: LighthouseParams, *,
                         score_q: Tensor | None = None, score_k: Tensor | None = None) -> Tensor:
    """Lighthouse attention (docs/DESIGN.md §2): q [B, N, H, D], k/v [B, N, Hkv, D] -> [B, N, H, D].

    score_q [B, N, H, D], score_k [B, N, Hkv, D]: the vectors the scorer reads instead of q, k
    (a QK-norm model passes its projections before the norm); None scores q or k itself. They
    carry no gradient. Causal given the selection. One `lh_dist::lighthouse_forward` op (and its
    backward op); its outputs include the inner attention's output and LSE.
    """
    validate_lighthouse_inputs(q, k, v, score_q, score_k)
    params.check(q.shape[1])
    backend = params.kernel_backend(q.device)
    sq = (q if score_q is None else score_q).detach()
    sk = (k if score_k is None else score_k).detach()
    return torch.ops.lh_dist.lighthouse_forward(q, k, v, sq, sk, params.levels, params.pooling, params.n_tiles,
                                                params.scorer, backend, params.attention_backend)[0]


def lighthouse_select(q: Tensor, k: Tensor, params: LighthouseParams, *, chunks: int = 1) -> Selection:
    """The selection that scoring q [B, n, H, D], k [B, n, Hkv, D] gives (a layer's q/k, or its score
    inputs): one of `chunks` equal chunks of a sequence of n * chunks tokens (context parallelism),
    which holds params.n_tiles / chunks of its tiles."""
    params.check(q.shape[1] * chunks, chunks=chunks)
    index, inverse = torch.ops.lh_dist.lighthouse_select(q.detach(), k.detach(), params.levels, params.pooling,
                                                         params.n_tiles // chunks, params.scorer,
                                                         params.kernel_backend(q.device))
    return Selection(index=index, inverse=inverse, n=q.shape[1], levels=params.levels, pooling=params.pooling)


def lighthouse_gather(x: Tensor, selection: Selection, params: LighthouseParams) -> Tensor:
    """Window means of the selected entries, x [B, n, Hx, D] -> [B, S, Hx, D]; differentiable in x."""
    return torch.ops.lh_dist.lighthouse_gather(x, selection.index, selection.inverse, selection.levels,
                                               selection.pooling, params.kernel_backend(x.device))


def lighthouse_scatter(o: Tensor, selection: Selection, params: LighthouseParams, *, spill: int = 0,
                       out_dtype: torch.dtype | None = None) -> Tensor:
    """Each entry's output o [B, S, H, D] added to the rows after its window: [B, n + spill, H, D].

    The `spill` rows past the chunk's end receive what its last windows reach there (nothing past
    params.spill rows). Sums in fp32 (fp64 for fp64); returns out_dtype (default o.dtype).
    Differentiable in o.
    """
    return torch.ops.lh_dist.lighthouse_scatter(o, selection.index, selection.inverse, selection.n, selection.levels,
                                                selection.pooling, spill, out_dtype, params.kernel_backend(o.device))
