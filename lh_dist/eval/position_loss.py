"""Validation loss by token position: does the model get better as it sees more context?

Losses are summed per position over every validation sequence, then grouped into buckets
of positions. A bucket's loss is the mean over all its tokens, so the token-weighted mean of
the bucket losses is exactly the overall loss. Its standard error is taken over sequences
(the tokens of one sequence are not independent samples): the standard deviation of the
per-sequence bucket means divided by sqrt(sequences).

With byte counts per target token (the byte-level tokenizer: 1, end-of-document: 0), the
loss is also given in bits per byte: total nats / ln 2 / total bytes, the measure that does
not depend on the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

SPACINGS = ("linear", "log")


def bucket_edges(seq_len: int, num_buckets: int, spacing: str = "linear") -> list[int]:
    """Position edges [0, ..., seq_len] of at most num_buckets buckets.

    "linear": equal widths. "log": octaves ending at seq_len, each bucket twice as wide as the one
    before, the first one [0, seq_len / 2^(num_buckets-1)): at 65,536 tokens and 7 buckets 0-1K,
    1K-2K, ..., 32K-64K, so that the gain from far context is as visible as the gain from near
    context. Duplicate edges from rounding are merged, so short sequences may get fewer buckets.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= num_buckets <= seq_len:
        raise ValueError(f"num_buckets must be in [1, seq_len={seq_len}], got {num_buckets}")
    if spacing == "linear":
        edges = np.linspace(0, seq_len, num_buckets + 1)
    else:
        edges = [0] + [seq_len / 2 ** k for k in range(num_buckets - 1, -1, -1)]
    return sorted({int(round(e)) for e in edges})


class PositionLoss:
    """Running per-position loss (and byte) sums over sequences of one length, plus each
    sequence's bucket means for the standard errors."""

    def __init__(self, seq_len: int, edges: list[int] | None = None):
        self.seq_len = seq_len
        self.edges = edges or [0, seq_len]
        self.loss_sum = torch.zeros(seq_len, dtype=torch.float64)
        self.byte_sum = torch.zeros(seq_len, dtype=torch.float64)
        self.has_bytes = True
        self.sequence_means: list[torch.Tensor] = []  # [B, buckets] per add

    def add(self, losses: torch.Tensor, num_bytes: torch.Tensor | None = None) -> None:
        """Add token losses [B, seq_len] and, if known, the bytes [B, seq_len] of each target token."""
        if losses.dim() != 2 or losses.shape[1] != self.seq_len:
            raise ValueError(f"losses must be [B, {self.seq_len}], got {tuple(losses.shape)}")
        losses = losses.double().cpu()
        self.loss_sum += losses.sum(0)
        if num_bytes is None:
            self.has_bytes = False
        else:
            self.byte_sum += num_bytes.double().cpu().sum(0)
        self.sequence_means.append(torch.stack([losses[:, a:b].mean(1) for a, b in zip(self.edges, self.edges[1:])], 1))

    @property
    def num_sequences(self) -> int:
        """Sequences added so far."""
        return sum(m.shape[0] for m in self.sequence_means)

    @property
    def overall(self) -> float:
        """Mean loss (nats/token) over every position of every sequence."""
        return float(self.loss_sum.sum() / (self.num_sequences * self.seq_len))

    def bits_per_byte(self, start: int = 0, end: int | None = None) -> float | None:
        """Bits per byte of the targets at positions [start, end), or None without byte counts (or bytes)."""
        if not self.has_bytes:
            return None
        num_bytes = float(self.byte_sum[start:end].sum())
        return float(self.loss_sum[start:end].sum()) / math.log(2) / num_bytes if num_bytes else None

    def buckets(self) -> list[dict]:
        """[{"start", "end" (exclusive), "tokens", "loss", "stderr", "bytes", "bits_per_byte"}] per bucket;
        stderr is None for one sequence, the byte fields without byte counts."""
        means = torch.cat(self.sequence_means)  # [S, buckets]
        n = means.shape[0]
        out = []
        for i, (start, end) in enumerate(zip(self.edges[:-1], self.edges[1:])):
            tokens = (end - start) * n
            bucket = {"start": start, "end": end, "tokens": tokens,
                      "loss": float(self.loss_sum[start:end].sum() / tokens),
                      "stderr": float(means[:, i].std() / math.sqrt(n)) if n > 1 else None}
            if self.has_bytes:
                bucket |= {"bytes": int(self.byte_sum[start:end].sum()),
                           "bits_per_byte": self.bits_per_byte(start, end)}
            out.append(bucket)
        return out


def evaluate_position_loss(token_losses_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
                           seq_len: int, edges: list[int], log: Callable[[str], None] | None = print,
                           token_bytes_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Loss overall and per bucket of positions over validation batches [B, seq_len + 1].

    token_losses_fn maps a batch to next-token losses [B, seq_len]; token_bytes_fn, if given,
    maps target ids [B, seq_len] to their lengths in bytes.
    """
    acc = PositionLoss(seq_len, edges)
    for i, batch in enumerate(batches):
        acc.add(token_losses_fn(batch), token_bytes_fn(batch[:, 1:]) if token_bytes_fn else None)
        if log is not None:
            log(f"loss batch {i + 1}: running loss {acc.overall:.4f}")
    if acc.num_sequences == 0:
        raise ValueError("no validation batches to evaluate")
    result = {"loss": acc.overall, "tokens": acc.num_sequences * seq_len, "sequences": acc.num_sequences}
    if acc.has_bytes:
        result |= {"bytes": int(acc.byte_sum.sum()), "bits_per_byte": acc.bits_per_byte()}
    return result | {"buckets": acc.buckets()}
