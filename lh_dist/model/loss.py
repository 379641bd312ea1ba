"""The output layer and its loss: logits, or next-token cross-entropy per token.

`LMHead` owns the output projection [V, E]. Called with targets it returns the
per-token loss, so the training step and evaluation never ask for the logits of a
whole sequence (at 128K tokens and a 152K vocabulary those are 80 GB in fp32).
It is a module, called by the model, so that sharded engines (ZeRO-3) gather its
weight as for any other layer.

Shape legend: T tokens (any leading dims flattened), E model dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Per-token loss [T] (fp32): -log softmax(hidden @ weight.T)[target], logits materialized."""
    logits = F.linear(hidden, weight).float()  # [T, V]
    return F.cross_entropy(logits, targets, reduction="none")


class LMHead(nn.Module):
    """Output projection E -> V; with targets, the per-token cross-entropy instead of the logits."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, hidden: Tensor, targets: Tensor | None = None) -> Tensor:
        """hidden [..., E] -> logits [..., V] in hidden's dtype, or, with targets [...], losses [...] fp32."""
        if targets is None:
            return F.linear(hidden, self.weight)
        losses = cross_entropy_reference(hidden.flatten(0, -2), self.weight, targets.flatten())  # [T]
        return losses.view(targets.shape)
