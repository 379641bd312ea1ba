"""Plain PyTorch Lighthouse attention: the definition of correctness (docs/DESIGN.md §2).

Runs on CPU and GPU with autograd end to end. The pieces are separate so that context
parallelism can run them per chunk of the sequence:

    q_scores, k_scores = pyramid_scores(q, k, levels, pooling)          # no grad
    sel = select(q_scores, k_scores, n, levels, pooling, n_tiles)       # integers, no grad
    qg, kg, vg = (gather_pyramid(x, sel) for x in (q, k, v))             # [B, S, *, D]
    og = causal attention over (qg, kg, vg)
    out = scatter_back(og, sel)                                          # [B, N, H, D]

`segment` and `level_gather` are the twins of the Triton launchers of the same names (same
arguments, same results up to rounding): the reference backend of the custom ops in ops.py.
"""

from __future__ import annotations

import torch

from lh_dist.ops.attention import attention

from .layout import TILE_SELECT, Selection, level_offsets
from .params import LighthouseParams
from .scorers import get_scorer

HALF = TILE_SELECT // 2  # picked by query score, then the same number by key score


def pool(x: torch.Tensor, levels: int, pooling: int) -> torch.Tensor:
    """Mean-pooled pyramid of x [B, N, Hx, D], levels concatenated: [B, P, Hx, D]."""
    b, n, h, d = x.shape
    parts = [x.view(b, n // pooling**lvl, pooling**lvl, h, d).mean(2) for lvl in range(levels)]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def pool_scores(score: torch.Tensor, levels: int, pooling: int) -> torch.Tensor:
    """Max-pooled pyramid of per-token scores [B, Hkv, N]: [B, Hkv, P]."""
    b, h, n = score.shape
    parts = [score.view(b, h, n // pooling**lvl, pooling**lvl).amax(-1) for lvl in range(levels)]
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def pyramid_scores(
    q: torch.Tensor, k: torch.Tensor, levels: int, pooling: int, scorer: str = "norm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key score pyramids per KV head, ([B, Hkv, P], [B, Hkv, P]) fp32.

    The query score of a KV head is the max over the query heads of its group; a window's
    score is the max of its tokens' scores.
    """
    q_score, k_score = get_scorer(scorer)(q, k)  # [B, H, N], [B, Hkv, N]
    b, h, n = q_score.shape
    hkv = k_score.shape[1]
    q_score = q_score.view(b, hkv, h // hkv, n).amax(2)  # [B, Hkv, N]
    return pool_scores(q_score.float(), levels, pooling), pool_scores(k_score.float(), levels, pooling)


def _pick(q_score: torch.Tensor, k_score: torch.Tensor) -> torch.Tensor:
    """Mask of the 64 best candidates by query score plus the 64 best of the rest by key score.

    Candidates lie along the last dim in ascending window order, so the stable sort breaks ties
    by lower index.
    """
    by_q = torch.sort(q_score, dim=-1, descending=True, stable=True).indices[..., :HALF]
    picked = torch.zeros_like(q_score, dtype=torch.bool).scatter_(-1, by_q, True)
    rest = k_score.masked_fill(picked, float("-inf"))
    by_k = torch.sort(rest, dim=-1, descending=True, stable=True).indices[..., :HALF]
    return picked.scatter_(-1, by_k, True)


@torch.no_grad()
def select(
    q_scores: torch.Tensor, k_scores: torch.Tensor, n: int, levels: int, pooling: int, n_tiles: int
) -> Selection:
    """Per-tile coarse-to-fine selection of the pyramid entries to gather, in causal order.

    q_scores, k_scores: [B, Hkv, P] score pyramids of a sequence (or chunk) of n tokens,
    cut into n_tiles equal tiles that are selected independently.
    """
    b, hkv, _ = q_scores.shape
    offsets = level_offsets(n, levels, pooling)
    device = q_scores.device
    coarsest = levels - 1
    per_tile = n // pooling**coarsest // n_tiles
    # Sort keys in units of 1 / 2^(L-1) token so that every key is an integer.
    unit = 2 ** (levels - 1)
    # Candidate windows per (batch, head, tile), ascending.
    cand = torch.arange(n_tiles * per_tile, device=device).view(1, 1, n_tiles, per_tile).expand(b, hkv, -1, -1)
    flat_parts, key_parts = [], []
    for lvl in range(coarsest, -1, -1):
        c = pooling**lvl
        flat = cand + offsets[lvl]  # [B, Hkv, tiles, candidates]
        if lvl == 0:
            picked = torch.zeros_like(cand, dtype=torch.bool)
        else:
            qs = q_scores.unsqueeze(2).expand(-1, -1, n_tiles, -1).gather(-1, flat)
            ks = k_scores.unsqueeze(2).expand(-1, -1, n_tiles, -1).gather(-1, flat)
            picked = _pick(qs, ks)
        # A leaf sorts at its window start; a picked entry just before its window end,
        # after all of its descendants.
        key = torch.where(picked, (cand + 1) * c * unit - 2 ** (coarsest - lvl), cand * c * unit)
        flat_parts.append(flat)
        key_parts.append(key)
        if lvl > 0:
            parents = cand[picked].view(b, hkv, n_tiles, TILE_SELECT)  # ascending: boolean indexing keeps order
            cand = (parents.unsqueeze(-1) * pooling + torch.arange(pooling, device=device)).flatten(-2)
    flat = torch.cat(flat_parts, dim=-1)
    order = torch.cat(key_parts, dim=-1).argsort(dim=-1)  # keys are distinct
    index = flat.gather(-1, order).flatten(2)  # [B, Hkv, S]
    inverse = torch.full((b, hkv, offsets[-1]), -1, dtype=torch.int64, device=device)
    positions = torch.arange(index.shape[-1], device=device).expand(b, hkv, -1)
    inverse.scatter_(-1, index, positions)
    return Selection(index=index, inverse=inverse, n=n, levels=levels, pooling=pooling)


def select_indices(q: torch.Tensor, k: torch.Tensor, levels: int, pooling: int, n_tiles: int,
                   scorer: str = "norm") -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, Hkv, S], inverse [B, Hkv, P]) int64 of the selection of q, k (see Selection)."""
    selection = select(*pyramid_scores(q, k, levels, pooling, scorer), q.shape[1], levels, pooling, n_tiles)
    return selection.index, selection.inverse


def _per_head(index: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """[B, Hkv, M] indices -> [B, M, heads, d], query head h taking KV head h // (heads // Hkv)."""
    group = heads // index.shape[1]
    return index.repeat_interleave(group, dim=1).transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, d)


def segment(x: torch.Tensor, index: torch.Tensor, n: int, levels: int, pooling: int, *, shift: bool, mean: bool,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Row s, head h of the result reduces x [B, >= n, Hx, D] over the window of entry index[b, h // G, s].

    mean and not shift: window means (gather-pool); shift and not mean: sums over the rows
    [start + c - 1, start + 2c - 1) that the entry's output was scattered to, as far as x reaches
    (the scatter's backward; rows past n are a chunk's spill). n is the length the pyramid was
    built on. Returns [B, S, Hx, D] in out_dtype (default x.dtype).
    """
    b, rows, hx, d = x.shape
    if mean and not shift:
        pyramid = pool(x[:, :n], levels, pooling)  # [B, P, Hx, D]
    else:
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        parts = []
        for lvl in range(levels):
            c = pooling**lvl
            start = c - 1 if shift else 0
            window_rows = x[:, start:start + n].to(acc_dtype)
            if window_rows.shape[1] < n:  # the last windows reach past the rows given: those add nothing
                window_rows = torch.cat([window_rows, window_rows.new_zeros(b, n - window_rows.shape[1], hx, d)], 1)
            part = window_rows.view(b, n // c, c, hx, d).sum(2)  # [B, n / c, Hx, D]
            parts.append(part / c if mean else part)
        pyramid = torch.cat(parts, dim=1)  # [B, P, Hx, D]
    return pyramid.gather(1, _per_head(index, hx, d)).to(out_dtype or x.dtype)


def level_gather(y: torch.Tensor, inverse: torch.Tensor, n: int, levels: int, pooling: int, *, scatter: bool,
                 n_out: int | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Token rows from gathered rows y [B, S, Hx, D] through the inverse maps: [B, n_out, Hx, D].

    scatter: out[t] = sum_l y[inv_l[(t+1)//c - 1]] (the scatter-back; n_out > n keeps the rows
    past the end that the last windows reach); else: out[t] = sum_l y[inv_l[t//c]] / c (the
    backward of the window means). Sums in (at least) fp32; returns out_dtype (default y.dtype).
    """
    n_out = n if n_out is None else n_out
    b, _, h, d = y.shape
    t = torch.arange(n_out, device=y.device)
    acc_dtype = torch.promote_types(y.dtype, torch.float32)
    out = torch.zeros(b, n_out, h, d, dtype=acc_dtype, device=y.device)
    for lvl, offset in enumerate(level_offsets(n, levels, pooling)[:-1]):
        c = pooling**lvl
        window = (t + 1) // c - 1 if scatter else t // c
        valid = (window >= 0) & (window < n // c)
        pos = inverse[:, :, offset + window.clamp(0, n // c - 1)]  # [B, Hkv, n_out]
        valid = valid & (pos >= 0)
        contrib = y.gather(1, _per_head(pos.clamp(min=0), h, d)).to(acc_dtype)  # [B, n_out, Hx, D]
        out = out + (contrib if scatter else contrib / c) * _per_head(valid, h, 1)
    return out.to(out_dtype or y.dtype)


def gather_pyramid(x: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Window means of the selected entries, x [B, N, Hx, D] -> [B, S, Hx, D] (Hx = H or Hkv)."""
    return segment(x, selection.index, selection.n, selection.levels, selection.pooling, shift=False, mean=True)


def scatter_back(o: torch.Tensor, selection: Selection, length: int | None = None) -> torch.Tensor:
    """Add each entry's output o [B, S, H, D] to the positions after its window: [B, length, H, D].

    Entry (l, i) covers positions [i*c + c - 1, i*c + 2c - 1) with c = p^l; equivalently
    out[t] = sum_l o[inverse_l[(t + 1) // c - 1]]. length defaults to n; a larger length keeps the
    positions past the end of this sequence (chunk) that its last windows reach. Sums in (at least) fp32.
    """
    return level_gather(o, selection.inverse, selection.n, selection.levels, selection.pooling, scatter=True,
                        n_out=length)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Causal attention over the gathered sequence, [B, S, H, D] with GQA."""
    return attention(q, k, v, causal=True, backend=backend)


def lighthouse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: LighthouseParams, *,
                         score_q: torch.Tensor | None = None, score_k: torch.Tensor | None = None) -> torch.Tensor:
    """Lighthouse attention, q [B, N, H, D], k/v [B, N, Hkv, D] -> [B, N, H, D], by autograd through the
    pieces above (params.backend is not read); scoring score_q/score_k where given, as
    `lighthouse_attention`. Arguments unchecked."""
    n = q.shape[1]
    q_scores, k_scores = pyramid_scores(q if score_q is None else score_q, k if score_k is None else score_k,
                                        params.levels, params.pooling, params.scorer)
    selection = select(q_scores, k_scores, n, params.levels, params.pooling, params.n_tiles)
    qg, kg, vg = (gather_pyramid(x, selection) for x in (q, k, v))
    og = causal_attention(qg, kg, vg, params.attention_backend)
    return scatter_back(og, selection)
