"""An image of one Lighthouse layer's selection, for TensorBoard: which windows of which level
a head skipped, attended as a leaf, or refined (its children became candidates).

`SelectionCapture` observes a layer for one step (the training loop attaches it); the model and its
attention wrapper know nothing of it."""

from __future__ import annotations

import numpy as np
import torch

from lh_dist.assembly.model import PhasedAttention
from lh_dist.ops.lighthouse import LighthouseParams, lighthouse_select

class SelectionCapture:
    """Keeps batch 0 of the q [1, N, H, D] and k [1, N, Hkv, D] that a `PhasedAttention` layer's scorer
    reads in its next Lighthouse forward (`captured`), until `detach`. A forward pre-hook: it sees the
    layer's inputs in eager runs (the loop runs such a step without compile); a recomputation under
    activation checkpointing sees the same inputs again and keeps nothing more."""

    def __init__(self, layer: PhasedAttention):
        self.captured: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handle = layer.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, layer: PhasedAttention, args: tuple, kwargs: dict) -> None:
        if self.captured is None and layer.selects:
            q, k = layer.scored(*args[:2], *args[3:], **kwargs)
            self.captured = (q.detach()[:1], k.detach()[:1])

    def detach(self) -> None:
        """Stop observing the layer."""
        self._handle.remove()


STATES = ("skipped", "attended (leaf)", "refined (children considered)")
# Okabe-Ito colours, distinguishable with every common colour-vision deficiency.
_COLORS = ("#3b3b3b", "#0072B2", "#E69F00")


@torch.no_grad()
def selection_states(q: torch.Tensor, k: torch.Tensor, params: LighthouseParams, *, chunks: int = 1,
                     width: int = 1024) -> np.ndarray:
    """int array [levels, min(N, width)]: the state (index into STATES) of each token's window at each
    level, coarsest level first, for batch 0 and KV head 0 of q [B, N, H, D], k [B, N, Hkv, D]: one of
    `chunks` equal chunks of the sequence, as under context parallelism.

    Longer sequences are shown `width` columns wide; a column shows the most advanced state of its tokens.
    """
    n, levels, pooling = q.shape[1], params.levels, params.pooling
    sel = lighthouse_select(q[:1], k[:1], params, chunks=chunks)
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
        rows.append(cols.numpy())
    return np.stack(rows)


def render_states(states: np.ndarray, *, pooling: int, n: int, title: str = "") -> np.ndarray:
    """HWC uint8 image (1100 px wide, 230 + 50 per level high) of `selection_states`, with axes and a legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    levels = states.shape[0]
    fig = Figure(figsize=(11, 1.8 + 0.5 * levels), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(states, cmap=ListedColormap(_COLORS), vmin=0, vmax=len(STATES) - 1, aspect="auto",
              interpolation="nearest", extent=(0, n, levels - 0.5, -0.5))
    ax.set_yticks(range(levels), [f"level {lvl} ({pooling**lvl} tok)" for lvl in range(levels - 1, -1, -1)])
    ax.set_xlabel("token position")
    ax.set_title(title, fontsize=10)
    fig.legend(handles=[Patch(color=c, label=s) for c, s in zip(_COLORS, STATES)], loc="outside lower center",
               ncol=len(STATES), frameon=False, fontsize=9)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def selection_map(q: torch.Tensor, k: torch.Tensor, params: LighthouseParams, *, chunks: int = 1,
                  title: str = "") -> np.ndarray:
    """HWC uint8 image of the selection of q [B, N, H, D], k [B, N, Hkv, D] (batch 0, KV head 0), one of
    `chunks` equal chunks of the sequence."""
    states = selection_states(q, k, params, chunks=chunks)
    return render_states(states, pooling=params.pooling, n=q.shape[1], title=title)
