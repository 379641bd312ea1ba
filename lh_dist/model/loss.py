"""The output layer and its loss: logits, or next-token cross-entropy per token.

`LMHead` owns the output projection [V, E]. Called with targets it returns the
per-token loss, so the training step and evaluation never ask for the logits of a
whole sequence (at 128K tokens and a 152K vocabulary those are 80 GB in fp32).
It is a module, called by the model, so that sharded engines (ZeRO-3) gather its
weight as for any other layer.

The loss is computed in chunks of rows (`chunked_cross_entropy`): forward keeps only
each token's loss and log-sum-exp; backward recomputes one chunk's logits at a time,
turns them into the gradient of the logits, softmax(logits) - onehot(target), and
multiplies that into the gradients of the hidden states and of the weight. Logits are
computed in the inputs' dtype (bf16 on GPUs, fp32 accumulation inside the matmul) and
the softmax in fp32 (fp64 for fp64 inputs). `cross_entropy_reference`, which holds every
logit at once, is the definition the chunked path is tested against.

Shape legend: T tokens (any leading dims flattened), C tokens of one chunk, E model dim,
V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# Rows per chunk. A chunk's fp32 logits [C, V] are the head's largest temporary; beside them sits
# at most one copy in the inputs' dtype (bf16: 4 + 2 bytes per logit, 768 MiB at this budget).
# 512 MiB of fp32 logits is 883 rows at V = 151,936 and 2,730 at V = 49,152: tall enough for the
# matmuls to run near peak, and under 1% of an H200, where a whole 131,072-token sequence's fp32
# logits would be 80 GB.
CHUNK_LOGITS_BYTES = 512 * 2**20


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk whose fp32 logits fit in CHUNK_LOGITS_BYTES."""
    return max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 for half inputs, fp64 stays fp64.
    return torch.promote_types(dtype, torch.float32)


def cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Per-token loss [...] (fp32; fp64 for fp64 inputs) of hidden [..., E], weight [V, E] and
    targets [...]: -log softmax(hidden @ weight.T)[target], with every logit materialized."""
    logits = F.linear(hidden, weight)  # [..., V]
    logits = logits.to(_softmax_dtype(logits.dtype))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


def _chunk_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """Logits [C, V] of hidden [C, E]: the matmul in the inputs' dtype, the result a new tensor in
    the softmax dtype (callers work on it in place)."""
    logits = hidden @ weight.T  # [C, V]
    return logits.to(_softmax_dtype(logits.dtype))


def _matmul(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a @ b in the inputs' dtype, returned in `dtype` (fp32 or fp64)."""
    if a.dtype != dtype and a.is_cuda:
        return torch.mm(a, b, out_dtype=dtype)  # half inputs: the fp32 sums are not rounded to half first
    return (a @ b).to(dtype)  # the CPU has no mixed-dtype matmul: one rounding to the inputs' dtype


def _accumulate_matmul(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, with acc in fp32 (fp64) and a, b in the inputs' dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # half inputs, fp32 sums, no rounding between chunks
    else:
        acc += a @ b  # the CPU has no mixed-dtype matmul: one rounding per chunk


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token loss [T] of hidden [T, E], weight [V, E], targets [T], chunk_rows rows at a time."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
        dtype = _softmax_dtype(hidden.dtype)
        losses = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)  # [T]
        lse = torch.empty_like(losses)  # [T]: log-sum-exp of each token's logits
        # Inputs are already in the autocast dtype; the softmax must not be cast back to it.
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = _chunk_logits(hidden[rows], weight)  # [C, V]
                target_logit = logits.gather(1, targets[rows, None]).squeeze(1)  # [C]
                peak = logits.amax(dim=1, keepdim=True)  # [C, 1]
                lse[rows] = logits.sub_(peak).exp_().sum(dim=1).log_() + peak.squeeze(1)
                losses[rows] = lse[rows] - target_logit
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_rows = chunk_rows
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # [T, E]
        # [V, E], summed over the chunks in fp32 (fp64)
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if want_weight else None
        grad_losses = grad_losses.to(lse.dtype)  # [T]
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                chunk = hidden[rows]  # [C, E]
                # d loss_t / d logits_t = softmax(logits_t) - onehot(target_t). The loss's gradient g_t
                # scales row t; it is applied to the [C, E] factors, one pass fewer over [C, V].
                probs = _chunk_logits(chunk, weight).sub_(lse[rows, None]).exp_()  # [C, V]
                probs.scatter_add_(1, targets[rows, None], torch.full_like(probs[:, :1], -1.0))
                probs = probs.to(hidden.dtype)  # [C, V]
                scale = grad_losses[rows, None]  # [C, 1]
                if want_hidden:
                    grad_hidden[rows] = _matmul(probs, weight, scale.dtype).mul_(scale)  # [C, E]
                if want_weight:
                    _accumulate_matmul(grad_weight, probs.T, (chunk * scale).to(hidden.dtype))  # [V, E]
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def _check_targets(targets: Tensor, vocab_size: int) -> None:
    """Every target in [0, vocab_size). On an accelerator the check is queued on the device, so the
    training step does not wait for it; a bad id stops the process there with the same words."""
    message = f"targets must be token ids in [0, {vocab_size}) (the model's vocabulary)"
    if targets.numel() == 0:
        return
    if targets.device.type != "cpu":
        torch._assert_async((targets >= 0).all() & (targets < vocab_size).all(), message)
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{message}, got ids from {low} to {high}")


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None) -> Tensor:
    """Per-token loss [...] of hidden [..., E], weight [V, E], targets [...], never holding more than
    `chunk_rows` rows of logits (default: `default_chunk_rows(V)`).

    Returns fp32 losses (fp64 for fp64 inputs), differentiable in hidden and weight. Under
    torch.autocast both inputs are cast to the autocast dtype first, as F.linear would be.
    """
    vocab_size, dim = weight.shape
    if hidden.shape[-1] != dim or hidden.shape[:-1] != targets.shape:
        raise ValueError(f"chunked_cross_entropy needs hidden [..., {dim}] and targets of its leading shape, "
                         f"got hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows}")
    _check_targets(targets, vocab_size)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    losses = _ChunkedCrossEntropy.apply(hidden.reshape(-1, dim).contiguous(), weight, targets.reshape(-1).long(),
                                        chunk_rows or default_chunk_rows(vocab_size))  # [T]
    return losses.view(targets.shape)


class LMHead(nn.Module):
    """Output projection E -> V; with targets, the per-token cross-entropy instead of the logits.

    `chunk_rows` (None: `default_chunk_rows(V)`) sets the loss's chunk; `materialize_logits = True`
    computes the loss through `cross_entropy_reference` instead, holding every logit (for comparisons).
    """

    def __init__(self, dim: int, vocab_size: int, chunk_rows: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.chunk_rows = chunk_rows
        self.materialize_logits = False

    def forward(self, hidden: Tensor, targets: Tensor | None = None) -> Tensor:
        """hidden [..., E] -> logits [..., V] in hidden's dtype, or, with targets [...], losses [...] fp32."""
        if targets is None:
            return F.linear(hidden, self.weight)
        if self.materialize_logits:
            return cross_entropy_reference(hidden, self.weight, targets)
        return chunked_cross_entropy(hidden, self.weight, targets, self.chunk_rows)
