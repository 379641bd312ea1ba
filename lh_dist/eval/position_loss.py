"""Validation loss by token position: does the model get better as it sees more context?

Losses are summed per position over every validation sequence, then grouped into buckets
of positions. A bucket's loss is the mean over all its tokens, so the token-weighted mean of
the bucket losses is exactly the overall loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

SPACINGS = ("linear", "log")


def bucket_edges(seq_len: int, num_buckets: int, spacing: str = "linear") -> list[int]:
    """Position edges [0, ..., seq_len] of at most num_buckets buckets.

    "linear": equal widths. "log": widths growing geometrically from position 1, so the
    first tokens (where loss falls fastest) get buckets of their own; duplicate edges from
    rounding are merged, so short sequences may get fewer buckets.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= num_buckets <= seq_len:
        raise ValueError(f"num_buckets must be in [1, seq_len={seq_len}], got {num_buckets}")
    if spacing == "linear":
        edges = np.linspace(0, seq_len, num_buckets + 1)
    else:
        edges = np.concatenate([[0], np.geomspace(1, seq_len, num_buckets)])
    return sorted({int(round(e)) for e in edges})


class PositionLoss:
    """Running per-position loss sums over sequences of one length."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.loss_sum = torch.zeros(seq_len, dtype=torch.float64)
        self.num_sequences = 0

    def add(self, losses: torch.Tensor) -> None:
        """Add token losses [B, seq_len]."""
        if losses.dim() != 2 or losses.shape[1] != self.seq_len:
            raise ValueError(f"losses must be [B, {self.seq_len}], got {tuple(losses.shape)}")
        self.loss_sum += losses.double().sum(0).cpu()
        self.num_sequences += losses.shape[0]

    @property
    def overall(self) -> float:
        return float(self.loss_sum.sum() / (self.num_sequences * self.seq_len))

    def buckets(self, edges: list[int]) -> list[dict]:
        """[{"start", "end" (exclusive), "tokens", "loss"}] for consecutive edges."""
        out = []
        for start, end in zip(edges[:-1], edges[1:]):
            tokens = (end - start) * self.num_sequences
            out.append({"start": start, "end": end, "tokens": tokens,
                        "loss": float(self.loss_sum[start:end].sum() / tokens)})
        return out


def evaluate_position_loss(token_losses_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
                           seq_len: int, edges: list[int], log: Callable[[str], None] | None = print) -> dict:
    """Loss overall and per bucket of positions over validation batches [B, seq_len + 1].

    token_losses_fn maps a batch to next-token losses [B, seq_len].
    """
    acc = PositionLoss(seq_len)
    for i, batch in enumerate(batches):
        acc.add(token_losses_fn(batch))
        if log is not None:
            log(f"loss batch {i + 1}: running loss {acc.overall:.4f}")
    if acc.num_sequences == 0:
        raise ValueError("no validation batches to evaluate")
    return {"loss": acc.overall, "tokens": acc.num_sequences * seq_len, "sequences": acc.num_sequences,
            "buckets": acc.buckets(edges)}
