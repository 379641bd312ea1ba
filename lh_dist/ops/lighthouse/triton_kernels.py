"""Triton kernels of the Lighthouse fast path, and thin launchers around them.

Four kernels, each one pass and free of atomics (docs/DESIGN.md §4):
    scores        q, k -> query/key score pyramids (norms, group max, window max), fp32
    select        per (batch, KV head, tile): coarse-to-fine selection, sorted into causal order
    segment       gathered rows from token windows: window means (gather-pool) or, shifted by
                  c - 1, window sums (the backward of the scatter)
    level_gather  token rows from gathered rows through the inverse maps: the scatter
                  out[t] = sum_l o[inv_l[(t+1)//c - 1]] or the pool backward dx[t] = sum_l dx~[inv_l[t//c]] / c
Flat pyramid index of entry (l, i): offset_l + i with offset_l = sum_{j<l} n / p^j.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import TILE_SELECT
from .reference import pyramid_scores

_POS_BITS = 24  # low bits of a selection sort key hold the candidate's position in the tile


@triton.jit
def _level_offset(n, lvl: tl.constexpr, LOG2P: tl.constexpr):
    off = n * 0
    for j in tl.static_range(lvl):
        off += n >> (j * LOG2P)
    return off


@triton.jit
def _scores_kernel(
    q_ptr, k_ptr, qs_ptr, ks_ptr, n, P,
    sqb, sqn, sqh, skb, skn, skh,
    HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, CHUNK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, LEVELS: tl.constexpr, LOG2P: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    g = bh % HKV
    t = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, CHUNK_D)
    k_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in tl.static_range(0, D, CHUNK_D):
        mask = (d0 + dd)[None, :] < D
        x = tl.load(k_ptr + b * skb + t[:, None] * skn + g * skh + d0 + dd[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        k_sq += tl.sum(x * x, axis=1)
    q_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(GROUP):
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in tl.static_range(0, D, CHUNK_D):
            mask = (d0 + dd)[None, :] < D
            x = tl.load(q_ptr + b * sqb + t[:, None] * sqn + (g * GROUP + j) * sqh + d0 + dd[None, :],
                        mask=mask, other=0.0)
            x = x.to(tl.float32)
            acc += tl.sum(x * x, axis=1)
        q_sq = tl.maximum(q_sq, acc)
    q_norm = tl.sqrt(q_sq)
    k_norm = tl.sqrt(k_sq)
    base = bh.to(tl.int64) * P
    for lvl in tl.static_range(LEVELS):
        _store_window_max(qs_ptr + base, q_norm, n, pid_n, lvl, LOG2P, BLOCK_N)
        _store_window_max(ks_ptr + base, k_norm, n, pid_n, lvl, LOG2P, BLOCK_N)


@triton.jit
def _store_window_max(ptr, norms, n, pid_n, lvl: tl.constexpr, LOG2P: tl.constexpr, BLOCK_N: tl.constexpr):
    C: tl.constexpr = 1 << (lvl * LOG2P)
    w = pid_n * (BLOCK_N // C) + tl.arange(0, BLOCK_N // C)
    tl.store(ptr + _level_offset(n, lvl, LOG2P) + w, tl.max(tl.reshape(norms, [BLOCK_N // C, C]), axis=1))


@triton.jit
def _descending_key(score, pos):
    """int64 keys that sort by score descending, then by position ascending."""
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, -(bits & 0x7FFFFFFF)).to(tl.int64)  # monotone in the float
    return ((2147483647 - ordered) << 24) | pos.to(tl.int64)


@triton.jit
def _kth_smallest(keys, lanes, K: tl.constexpr):
    ranked = tl.sort(keys)
    return tl.sum(tl.where(lanes == K - 1, ranked, 0), axis=0)


@triton.jit
def _pick(q_score, k_score, pos, valid, HALF: tl.constexpr):
    """Mask of the HALF best lanes by query score plus the HALF best of the rest by key score."""
    NONE: tl.constexpr = 2**62
    by_q_key = tl.where(valid, _descending_key(q_score, pos), NONE)
    by_q = by_q_key <= _kth_smallest(by_q_key, pos, HALF)
    by_k_key = tl.where(valid & ~by_q, _descending_key(k_score, pos), NONE)
    by_k = by_k_key <= _kth_smallest(by_k_key, pos, HALF)
    return by_q | by_k


@triton.jit
def _emit_key(window, picked, lvl: tl.constexpr, LEVELS: tl.constexpr, LOG2P: tl.constexpr, tile_start, flat):
    """(causal sort key relative to the tile) << 32 | flat index; keys in units of 2^-(L-1) token."""
    C: tl.constexpr = 1 << (lvl * LOG2P)
    UNIT: tl.constexpr = 1 << (LEVELS - 1)
    EPS: tl.constexpr = 1 << (LEVELS - 1 - lvl)
    start = window * C - tile_start
    key = tl.where(picked, (start + C) * UNIT - EPS, start * UNIT)
    return (key.to(tl.int64) << 32) | flat.to(tl.int64)


@triton.jit
def _refine(qs_ptr, ks_ptr, emit_ptr, parent_ptr, n, tile_start,
            lvl: tl.constexpr, LEVELS: tl.constexpr, LOG2P: tl.constexpr, SEL: tl.constexpr):
    """One level below the coarsest: emit the children of the current parents, pick the next parents."""
    PP: tl.constexpr = 1 << LOG2P
    FINE: tl.constexpr = SEL * PP
    fine = tl.arange(0, FINE)
    window = tl.load(parent_ptr + fine // PP) * PP + fine % PP
    flat = _level_offset(n, lvl, LOG2P) + window
    if lvl > 0:
        picked = _pick(tl.load(qs_ptr + flat), tl.load(ks_ptr + flat), fine, fine < FINE, SEL // 2)
    else:
        picked = fine < 0
    tl.store(emit_ptr + fine, _emit_key(window, picked, lvl, LEVELS, LOG2P, tile_start, flat))
    if lvl > 0:
        ranked = tl.sort(tl.where(picked, fine, FINE))
        parents = tl.load(parent_ptr + ranked // PP, mask=fine < SEL) * PP + ranked % PP
        tl.debug_barrier()  # every lane has read the old parents
        tl.store(parent_ptr + fine, parents, mask=fine < SEL)
    tl.debug_barrier()


@triton.jit
def _select_kernel(
    qs_ptr, ks_ptr, index_ptr, inverse_ptr, emit_ptr, parent_ptr,
    n, P, n_tiles, per_tile,
    LEVELS: tl.constexpr, LOG2P: tl.constexpr, SEL: tl.constexpr,
    M_PAD: tl.constexpr, E_PAD: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    PP: tl.constexpr = 1 << LOG2P
    FINE: tl.constexpr = SEL * PP  # candidates at every level below the coarsest
    NONE: tl.constexpr = 2**62
    COARSEST: tl.constexpr = LEVELS - 1
    per_tile_emit = per_tile + COARSEST * FINE
    scores_base = bh.to(tl.int64) * P
    scratch = bh.to(tl.int64) * n_tiles + tile
    emit_base = emit_ptr + scratch * E_PAD
    parent_base = parent_ptr + scratch * SEL
    tile_start = tile * per_tile << (COARSEST * LOG2P)  # first token of the tile

    # Coarsest level: every window of the tile is a candidate.
    lanes = tl.arange(0, M_PAD)
    valid = lanes < per_tile
    window = tile * per_tile + lanes
    flat = _level_offset(n, COARSEST, LOG2P) + window
    q_score = tl.load(qs_ptr + scores_base + flat, mask=valid, other=0.0)
    k_score = tl.load(ks_ptr + scores_base + flat, mask=valid, other=0.0)
    picked = _pick(q_score, k_score, lanes, valid, SEL // 2)
    tl.store(emit_base + lanes, _emit_key(window, picked, COARSEST, LEVELS, LOG2P, tile_start, flat), mask=valid)
    # Picked windows in ascending order: their lanes sort first.
    ranked = tl.sort(tl.where(picked, lanes, M_PAD))
    tl.store(parent_base + lanes, tile * per_tile + ranked, mask=lanes < SEL)
    tl.debug_barrier()

    # Finer levels: the PP children of each picked parent, ascending.
    for step in tl.static_range(COARSEST):
        _refine(qs_ptr + scores_base, ks_ptr + scores_base, emit_base + per_tile + step * FINE, parent_base,
                n, tile_start, COARSEST - 1 - step, LEVELS, LOG2P, SEL)

    # Sort the tile's emitted entries into causal order.
    lanes = tl.arange(0, E_PAD)
    valid = lanes < per_tile_emit
    keys = tl.sort(tl.load(emit_base + lanes, mask=valid, other=NONE))
    flat = keys - ((keys >> 32) << 32)
    position = tile * per_tile_emit + lanes
    tl.store(index_ptr + bh.to(tl.int64) * n_tiles * per_tile_emit + position, flat, mask=valid)
    tl.store(inverse_ptr + scores_base + flat, position.to(tl.int64), mask=valid)


@triton.jit
def _decode(f, n, LEVELS: tl.constexpr, LOG2P: tl.constexpr):
    """Flat pyramid index -> (window start token, window length)."""
    level = f * 0
    off = f * 0
    for lvl in tl.static_range(1, LEVELS):
        o = _level_offset(n, lvl, LOG2P)
        above = f >= o
        level = tl.where(above, lvl, level)
        off = tl.where(above, o, off)
    c = (f * 0 + 1) << (level * LOG2P)
    return (f - off) * c, c


@triton.jit
def _segment_kernel(
    x_ptr, index_ptr, out_ptr, n, n_rows, S,
    sxb, sxn, sxh, sob, son, soh,
    HX: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    LEVELS: tl.constexpr, LOG2P: tl.constexpr, SHIFT: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr,
):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HX
    h = bh % HX
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    dd = tl.arange(0, BLOCK_D)
    in_s = s < S
    f = tl.load(index_ptr + (b * (HX // GROUP) + h // GROUP).to(tl.int64) * S + s, mask=in_s, other=0)
    start, c = _decode(f, n, LEVELS, LOG2P)
    if SHIFT:
        start += c - 1  # the entry's output lands on [start + c - 1, start + 2c - 1)
    c = tl.where(in_s, c, 0)
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=ACC)
    x_base = x_ptr + b.to(tl.int64) * sxb + h * sxh
    for j in range(0, tl.max(c, axis=0)):
        row = start + j
        ok = (j < c) & (row < n_rows)
        x = tl.load(x_base + row[:, None].to(tl.int64) * sxn + dd[None, :], mask=ok[:, None] & (dd[None, :] < D),
                    other=0.0)
        acc += x.to(ACC)
    if MEAN:
        acc = acc / tl.maximum(c, 1).to(ACC)[:, None]
    out = out_ptr + b.to(tl.int64) * sob + s[:, None].to(tl.int64) * son + h * soh + dd[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=in_s[:, None] & (dd[None, :] < D))


@triton.jit
def _level_gather_kernel(
    y_ptr, inverse_ptr, out_ptr, n, n_out, P,
    syb, sy_s, syh, sob, son, soh,
    HX: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    LEVELS: tl.constexpr, LOG2P: tl.constexpr, SCATTER: tl.constexpr, ACC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HX
    h = bh % HX
    t = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    inv_base = inverse_ptr + (b * (HX // GROUP) + h // GROUP).to(tl.int64) * P
    y_base = y_ptr + b.to(tl.int64) * syb + h * syh
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for lvl in tl.static_range(LEVELS):
        if SCATTER:
            w = ((t + 1) >> (lvl * LOG2P)) - 1
        else:
            w = t >> (lvl * LOG2P)
        ok = (t < n_out) & (w >= 0) & (w < (n >> (lvl * LOG2P)))
        pos = tl.load(inv_base + _level_offset(n, lvl, LOG2P) + w, mask=ok, other=-1)
        ok = ok & (pos >= 0)
        y = tl.load(y_base + pos[:, None] * sy_s + dd[None, :], mask=ok[:, None] & (dd[None, :] < D), other=0.0)
        if SCATTER:
            acc += y.to(ACC)
        else:
            acc += y.to(ACC) * (1.0 / (1 << (lvl * LOG2P)))
    out = out_ptr + b.to(tl.int64) * sob + t[:, None].to(tl.int64) * son + h * soh + dd[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(t < n_out)[:, None] & (dd[None, :] < D))


# ---------------------------------------------------------------- launchers


def _log2(p: int) -> int:
    return p.bit_length() - 1


def _accumulator(x: torch.Tensor, out: torch.Tensor):
    """Sums run in fp32, or in fp64 where the input or the output is fp64."""
    return tl.float64 if torch.float64 in (x.dtype, out.dtype) else tl.float32


def pyramid_scores_triton(q: torch.Tensor, k: torch.Tensor, levels: int, pooling: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm-scorer score pyramids ([B, Hkv, P], [B, Hkv, P]) fp32, as `reference.pyramid_scores`."""
    b, n, h, d = q.shape
    hkv = k.shape[2]
    assert q.stride(-1) == 1 and k.stride(-1) == 1
    coarsest = pooling ** (levels - 1)
    block_n = max(coarsest, 64)
    assert n % block_n == 0
    total = sum(n // pooling**lvl for lvl in range(levels))
    q_scores = torch.empty(b, hkv, total, dtype=torch.float32, device=q.device)
    k_scores = torch.empty_like(q_scores)
    _scores_kernel[(n // block_n, b * hkv)](
        q, k, q_scores, k_scores, n, total,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        HKV=hkv, GROUP=h // hkv, D=d, CHUNK_D=min(64, triton.next_power_of_2(d)),
        BLOCK_N=block_n, LEVELS=levels, LOG2P=_log2(pooling),
    )
    return q_scores, k_scores


def select_triton(
    q_scores: torch.Tensor, k_scores: torch.Tensor, n: int, levels: int, pooling: int, n_tiles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, Hkv, S], inverse [B, Hkv, P]) int64, as `reference.select`."""
    b, hkv, total = q_scores.shape
    per_tile = n // pooling ** (levels - 1) // n_tiles
    per_tile_emit = per_tile + (levels - 1) * pooling * TILE_SELECT
    assert per_tile >= TILE_SELECT and per_tile < 2**_POS_BITS
    assert (n // n_tiles) * 2 ** (levels - 1) < 2**31 and total < 2**32  # fits the packed sort keys
    e_pad = triton.next_power_of_2(per_tile_emit)
    device = q_scores.device
    index = torch.empty(b, hkv, n_tiles * per_tile_emit, dtype=torch.int64, device=device)
    inverse = torch.full((b, hkv, total), -1, dtype=torch.int64, device=device)
    emit = torch.empty(b * hkv * n_tiles * e_pad, dtype=torch.int64, device=device)
    parents = torch.empty(b * hkv * n_tiles * TILE_SELECT, dtype=torch.int64, device=device)
    _select_kernel[(n_tiles, b * hkv)](
        q_scores, k_scores, index, inverse, emit, parents, n, total, n_tiles, per_tile,
        LEVELS=levels, LOG2P=_log2(pooling), SEL=TILE_SELECT,
        M_PAD=triton.next_power_of_2(per_tile), E_PAD=e_pad, num_warps=8,
    )
    return index, inverse


def select_indices(q: torch.Tensor, k: torch.Tensor, levels: int, pooling: int, n_tiles: int,
                   scorer: str = "norm") -> tuple[torch.Tensor, torch.Tensor]:
    """As `reference.select_indices`; scorers other than "norm" score in PyTorch, then select here."""
    if scorer == "norm":
        scores = pyramid_scores_triton(q, k, levels, pooling)
    else:
        scores = pyramid_scores(q, k, levels, pooling, scorer)
    return select_triton(*scores, q.shape[1], levels, pooling, n_tiles)


def segment(x: torch.Tensor, index: torch.Tensor, n: int, levels: int, pooling: int, *, shift: bool, mean: bool,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Row s, head h of the result reduces x [B, >= n, Hx, D] over the window of entry index[b, h // G, s].

    mean and not shift: window means (gather-pool); shift and not mean: sums over the rows the
    entry's output was scattered to, as far as x reaches (the scatter's backward; rows past n are a
    chunk's spill). n is the length the pyramid was built on. Returns [B, S, Hx, D].
    """
    b, rows, hx, d = x.shape
    s = index.shape[-1]
    assert x.stride(-1) == 1 and index.is_contiguous() and rows >= n
    out = torch.empty(b, s, hx, d, dtype=out_dtype or x.dtype, device=x.device)
    block_s = 32
    _segment_kernel[(triton.cdiv(s, block_s), b * hx)](
        x, index, out, n, rows, s, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HX=hx, GROUP=hx // index.shape[1], D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_S=block_s,
        LEVELS=levels, LOG2P=_log2(pooling), SHIFT=shift, MEAN=mean, ACC=_accumulator(x, out),
    )
    return out


def level_gather(y: torch.Tensor, inverse: torch.Tensor, n: int, levels: int, pooling: int, *, scatter: bool,
                 n_out: int | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Token rows from gathered rows y [B, S, Hx, D] through the inverse maps: [B, n_out, Hx, D].

    scatter: out[t] = sum_l y[inv_l[(t+1)//c - 1]] (the forward scatter-back; n_out > n keeps the rows
             past the end that the last windows reach);
    else:    out[t] = sum_l y[inv_l[t//c]] / c     (the backward of the window means). fp32 (fp64) sums.
    """
    b, _, hx, d = y.shape
    n_out = n if n_out is None else n_out
    assert y.stride(-1) == 1 and inverse.is_contiguous()
    out = torch.empty(b, n_out, hx, d, dtype=out_dtype or y.dtype, device=y.device)
    block_n = 32
    _level_gather_kernel[(triton.cdiv(n_out, block_n), b * hx)](
        y, inverse, out, n, n_out, inverse.shape[-1],
        y.stride(0), y.stride(1), y.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HX=hx, GROUP=hx // inverse.shape[1], D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n,
        LEVELS=levels, LOG2P=_log2(pooling), SCATTER=scatter, ACC=_accumulator(y, out),
    )
    return out
