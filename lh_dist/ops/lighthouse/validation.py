"""Argument checks for Lighthouse attention, run before any kernel."""

from __future__ import annotations

import torch

TILE_SELECT = 128  # entries selected per tile and level (64 by query score + 64 by key score)
BACKENDS = ("auto", "reference", "triton")


class LighthouseArgError(ValueError):
    """A Lighthouse layout parameter that does not fit; `arg` names it: n, levels, pooling, topk or chunks."""

    def __init__(self, message: str, arg: str):
        super().__init__(message)
        self.arg = arg

    def __reduce__(self):  # pickled with its arg (the default would call __init__ with the message only)
        return type(self), (str(self), self.arg)


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def validate_lighthouse_args(n: int, levels: int, pooling: int, topk: int, *, chunks: int = 1) -> None:
    """Check that (n, levels, pooling, topk) describe a valid Lighthouse layout.

    n is the sequence length seen by one call; under context parallelism the sequence is cut into
    `chunks` equal pieces that are selected independently, so each piece must hold whole tiles.
    Raises LighthouseArgError (a ValueError) naming the offending parameter and what is allowed.
    """
    for name, value in (("n", n), ("levels", levels), ("pooling", pooling), ("topk", topk), ("chunks", chunks)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise LighthouseArgError(f"{name} must be an int, got {value!r}", name)
    if levels < 2:
        raise LighthouseArgError(f"levels must be >= 2, got {levels}", "levels")
    if pooling < 2 or not _is_power_of_two(pooling):
        raise LighthouseArgError(f"pooling must be a power of two >= 2, got {pooling}", "pooling")
    if topk <= 0 or topk % TILE_SELECT:
        raise LighthouseArgError(f"topk must be a positive multiple of {TILE_SELECT}, got {topk}", "topk")
    if chunks < 1:
        raise LighthouseArgError(f"chunks must be >= 1, got {chunks}", "chunks")
    n_tiles = topk // TILE_SELECT
    if n_tiles % chunks:
        raise LighthouseArgError(
            f"topk/{TILE_SELECT} = {n_tiles} tiles must be divisible by chunks = {chunks} "
            "so that no tile straddles a chunk", "topk"
        )
    if n <= 0 or n % n_tiles:
        raise LighthouseArgError(
            f"n must be a positive multiple of topk/{TILE_SELECT} = {n_tiles} tiles, got n = {n}", "n"
        )
    tile = n // n_tiles
    coarsest = pooling ** (levels - 1)
    if tile % coarsest:
        raise LighthouseArgError(
            f"tile length n*{TILE_SELECT}/topk = {tile} must be divisible by pooling**(levels-1) = {coarsest}; "
            "choose n, topk, pooling or levels so it is", "n"
        )
    if tile // coarsest < TILE_SELECT:
        raise LighthouseArgError(
            f"each tile needs at least {TILE_SELECT} coarsest windows, got {tile // coarsest} "
            f"(n >= pooling**(levels-1) * topk = {coarsest * topk} is required; got n = {n})", "n"
        )


def validate_lighthouse_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check shapes [B, N, H, D] / [B, N, Hkv, D] with H % Hkv == 0, and matching dtype and device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, N, heads, D], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, n, h, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, n, d):
        raise ValueError(f"k/v must have shape [B, N, Hkv, D] = [{b}, {n}, Hkv, {d}], got {tuple(k.shape)}")
    if h % k.shape[2]:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
