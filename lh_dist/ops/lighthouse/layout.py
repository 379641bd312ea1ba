"""The flat pyramid layout and the `Selection` that every Lighthouse backend produces.

See README.md in this package for the math and a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE_SELECT = 128  # entries selected per tile and level (64 by query score + 64 by key score)


def level_offsets(n: int, levels: int, pooling: int) -> list[int]:
    """Start of each level in the flat pyramid, plus its total size P as the last element.

    Level l holds n // pooling**l windows; entry (l, i) lives at flat index offsets[l] + i.
    """
    offsets = [0]
    for lvl in range(levels):
        offsets.append(offsets[-1] + n // pooling**lvl)
    return offsets


def gathered_length(n: int, levels: int, pooling: int, n_tiles: int) -> int:
    """S = n / p^(L-1) + (L-1) * p * 128 * n_tiles: entries gathered from a sequence of n tokens."""
    return n // pooling ** (levels - 1) + (levels - 1) * pooling * TILE_SELECT * n_tiles


@dataclass
class Selection:
    """Which pyramid entries one Lighthouse call attends over, in causal order.

    index:   [B, Hkv, S] int64, flat pyramid index of the s-th gathered entry.
    inverse: [B, Hkv, P] int64, gathered position of each flat pyramid entry, or -1 if not gathered.
    Query heads h use the selection of KV head h // (H // Hkv).
    """

    index: torch.Tensor
    inverse: torch.Tensor
    n: int
    levels: int
    pooling: int

    @property
    def offsets(self) -> list[int]:
        return level_offsets(self.n, self.levels, self.pooling)

    @property
    def length(self) -> int:
        return self.index.shape[-1]
