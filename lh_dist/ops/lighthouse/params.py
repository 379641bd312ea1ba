"""The parameters of a Lighthouse layer (`LighthouseParams`), the backend rule, and the argument checks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lh_dist.ops.attention.dispatch import BACKENDS as ATTENTION_BACKENDS

from .layout import TILE_SELECT, gathered_length
from .scorers import get_scorer

BACKENDS = ("auto", "reference", "triton")  # of select, gather and scatter; "auto": Triton on CUDA


class LighthouseArgError(ValueError):
    """A Lighthouse parameter that does not fit; `arg` names it: n, levels, pooling, topk or chunks."""

    def __init__(self, message: str, arg: str):
        super().__init__(message)
        self.arg = arg

    def __reduce__(self):  # pickled with its arg (the default would call __init__ with the message only)
        return type(self), (str(self), self.arg)


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LighthouseArgError(f"{name} must be an int, got {value!r}", name)


@dataclass(frozen=True, kw_only=True)
class LighthouseParams:
    """What a Lighthouse layer is (docs/DESIGN.md §2) and which kernels run it.

    Construction checks what does not depend on the sequence; `check(n)` the rest.
    """

    levels: int
    """L >= 2 pyramid levels; level l has windows of p^l tokens."""
    pooling: int
    """p, a power of two >= 2."""
    topk: int
    """Budget k, a positive multiple of 128: the sequence is cut into k / 128 tiles."""
    scorer: str = "norm"
    """Token scorer (scorers.SCORERS)."""
    backend: str = "auto"
    """Kernels of select, gather and scatter: "reference", "triton" or "auto" (Triton on CUDA)."""
    attention_backend: str = "auto"
    """Kernel of the inner attention (lh_dist.ops.attention.BACKENDS)."""

    def __post_init__(self):
        for name in ("levels", "pooling", "topk"):
            _check_int(name, getattr(self, name))
        if self.levels < 2:
            raise LighthouseArgError(f"levels must be >= 2, got {self.levels}", "levels")
        if self.pooling < 2 or not _is_power_of_two(self.pooling):
            raise LighthouseArgError(f"pooling must be a power of two >= 2, got {self.pooling}", "pooling")
        if self.topk <= 0 or self.topk % TILE_SELECT:
            raise LighthouseArgError(f"topk must be a positive multiple of {TILE_SELECT}, got {self.topk}", "topk")
        get_scorer(self.scorer)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")

    @classmethod
    def from_config(cls, lighthouse, attention_backend: str = "auto") -> LighthouseParams:
        """From a config section with levels, pooling, topk, scorer and backend (config.LighthouseConfig)."""
        return cls(levels=lighthouse.levels, pooling=lighthouse.pooling, topk=lighthouse.topk,
                   scorer=lighthouse.scorer, backend=lighthouse.backend, attention_backend=attention_backend)

    @property
    def n_tiles(self) -> int:
        """Tiles of the whole sequence, each selected on its own."""
        return self.topk // TILE_SELECT

    @property
    def spill(self) -> int:
        """p^(L-1) - 1: rows past the end of a chunk that the output of its last windows reaches."""
        return self.pooling ** (self.levels - 1) - 1

    def gathered_length(self, n: int) -> int:
        """S = n / p^(L-1) + (L-1) p k: entries gathered from a sequence of n tokens."""
        return gathered_length(n, self.levels, self.pooling, self.n_tiles)

    def check(self, n: int, *, chunks: int = 1) -> None:
        """Check that a sequence of n tokens, cut into `chunks` equal chunks selected independently
        (context parallelism), holds whole tiles of at least 128 coarsest windows each.

        Raises LighthouseArgError (a ValueError) naming the offending parameter and what is allowed.
        """
        _check_int("n", n)
        _check_int("chunks", chunks)
        if chunks < 1:
            raise LighthouseArgError(f"chunks must be >= 1, got {chunks}", "chunks")
        n_tiles = self.n_tiles
        if n_tiles % chunks:
            raise LighthouseArgError(
                f"topk/{TILE_SELECT} = {n_tiles} tiles must be divisible by chunks = {chunks} "
                "so that no tile straddles a chunk", "topk"
            )
        if n <= 0 or n % n_tiles:
            raise LighthouseArgError(
                f"n must be a positive multiple of topk/{TILE_SELECT} = {n_tiles} tiles, got n = {n}", "n")
        tile = n // n_tiles
        coarsest = self.pooling ** (self.levels - 1)
        if tile % coarsest:
            raise LighthouseArgError(
                f"tile length n*{TILE_SELECT}/topk = {tile} must be divisible by pooling**(levels-1) = {coarsest}; "
                "choose n, topk, pooling or levels so it is", "n"
            )
        if tile // coarsest < TILE_SELECT:
            raise LighthouseArgError(
                f"each tile needs at least {TILE_SELECT} coarsest windows, got {tile // coarsest} "
                f"(n >= pooling**(levels-1) * topk = {coarsest * self.topk} is required; got n = {n})", "n"
            )

    def kernel_backend(self, device: torch.device) -> str:
        """The backend that runs on `device`: "auto" is Triton on CUDA, else the reference."""
        if self.backend == "auto":
            return "triton" if device.type == "cuda" else "reference"
        if self.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1); use 'reference' or 'auto'")
        return self.backend


def validate_lighthouse_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               score_q: torch.Tensor | None = None, score_k: torch.Tensor | None = None) -> None:
    """Check shapes [B, N, H, D] / [B, N, Hkv, D] with H % Hkv == 0, and matching dtype and device;
    score inputs, where given, have q's or k's shape and device (any floating dtype)."""
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
    for name, x, like in (("score_q", score_q, q), ("score_k", score_k, k)):
        if x is None:
            continue
        if x.shape != like.shape or not x.is_floating_point():
            raise ValueError(f"{name} must be floating point of shape {tuple(like.shape)}, got {x.dtype} "
                             f"{tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
