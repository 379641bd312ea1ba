"""An image of one Lighthouse layer's selection, for TensorBoard: which windows of which level
a head kept (refined), emitted as a leaf, or skipped."""

from __future__ import annotations

import numpy as np
import torch

from lh_dist.ops.lighthouse import pyramid_scores, select

# Skipped, emitted as a leaf, refined (its children were candidates).
_COLORS = np.array([[20, 20, 30], [70, 130, 200], [250, 200, 60]], dtype=np.uint8)


@torch.no_grad()
def selection_map(q: torch.Tensor, k: torch.Tensor, *, levels: int, pooling: int, n_tiles: int,
                  scorer: str = "norm", width: int = 1024, row_height: int = 24) -> np.ndarray:
    """HWC uint8 image for batch 0, KV head 0 of q [B, N, H, D], k [B, N, Hkv, D].

    Row l (coarsest level on top) shows, for every token, the state of its level-l window.
    """
    n = q.shape[1]
    q_scores, k_scores = pyramid_scores(q[:1], k[:1], levels, pooling, scorer)
    sel = select(q_scores, k_scores, n, levels, pooling, n_tiles)
    inverse, offsets = sel.inverse[0, 0].cpu(), sel.offsets
    rows = []
    for lvl in range(levels - 1, -1, -1):
        windows = n // pooling**lvl
        state = (inverse[offsets[lvl]:offsets[lvl] + windows] >= 0).long()  # 1: gathered
        if lvl > 0:
            children = inverse[offsets[lvl - 1]:offsets[lvl - 1] + windows * pooling].view(windows, pooling)
            state = state + (children[:, 0] >= 0).long()  # 2: refined
        per_token = state.repeat_interleave(pooling**lvl)  # [N]
        cols = per_token[: n - n % width].view(width, -1).amax(1) if n >= width else per_token
        rows.append(np.repeat(_COLORS[cols.numpy()][None], row_height, axis=0))
    return np.concatenate(rows, axis=0)
