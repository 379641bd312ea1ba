"""The chunked cross-entropy of `LMHead` against F.cross_entropy on the full logits.

In float64 the two compute the same sums in another order, so losses and both gradients agree to
round-off. The bf16 tests run under CPU autocast (and with bf16 weights, as DeepSpeed holds them on
GPUs) against `cross_entropy_reference` in the same precision.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lh_dist.model.loss import (CHUNK_LOGITS_BYTES, LMHead, chunked_cross_entropy, cross_entropy_reference,
                                default_chunk_rows)

T, E, V = 37, 16, 64
# float64 round-off: every result is a sum of at most max(T, V) = 64 products, each rounded to a few
# eps (1.1e-16), so a norm-relative difference stays below 1e-13; 1e-12 leaves a margin.
RTOL64 = 1e-12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _inputs(*lead, dtype=torch.float64):
    hidden = torch.randn(*lead, E, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, E, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, lead)
    # Unequal weights per token, so the loss's gradient scales each row differently.
    upstream = torch.rand(*lead, dtype=torch.float64)
    return hidden, weight, targets, upstream


def _full_logits(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).flatten(0, -2), targets.flatten(), reduction="none") \
        .view(targets.shape)


@pytest.mark.parametrize("chunk_rows", [1, 8, T, 64], ids=["C=1", "C=8-not-dividing-T", "C=T", "C>T"])
def test_losses_and_gradients_equal_full_logits_in_float64(chunk_rows):
    hidden, weight, targets, upstream = _inputs(T)
    losses = chunked_cross_entropy(hidden, weight, targets, chunk_rows)
    grads = torch.autograd.grad((losses * upstream).sum(), (hidden, weight))
    expected = _full_logits(hidden, weight, targets)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    assert losses.dtype == torch.float64 and losses.shape == (T,)
    assert _rel(losses, expected) <= RTOL64
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float64 and _rel(got, want) <= RTOL64


def test_lm_head_takes_batched_inputs():
    hidden, weight, targets, upstream = _inputs(2, 19)  # [B, N, E]: 38 tokens in chunks of 5
    head = LMHead(E, V, chunk_rows=5).double()
    with torch.no_grad():
        head.weight.copy_(weight)
    losses = head(hidden, targets)
    assert losses.shape == (2, 19)
    grads = torch.autograd.grad((losses * upstream).sum(), (hidden, head.weight))
    expected = _full_logits(hidden, weight, targets)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    assert _rel(losses, expected) <= RTOL64
    for got, want in zip(grads, expected_grads):
        assert _rel(got, want) <= RTOL64
    logits = head(hidden)  # without targets: the logits, as before
    assert torch.equal(logits, F.linear(hidden, head.weight))


def _tied_model_grads(tied: bool):
    torch.manual_seed(1)
    embed, head = nn.Embedding(V, E).double(), LMHead(E, V, chunk_rows=7).double()
    mix = torch.randn(E, E, dtype=torch.float64)
    if tied:
        head.weight = embed.weight
    else:
        with torch.no_grad():
            head.weight.copy_(embed.weight)
    tokens = torch.randint(0, V, (2, 12))
    hidden = torch.tanh(embed(tokens[:, :-1]) @ mix)  # [B, N, E]
    head(hidden, tokens[:, 1:]).mean().backward()
    return embed.weight.grad, head.weight.grad


def test_tied_weights_accumulate_both_gradients():
    embed_grad, head_grad = _tied_model_grads(tied=False)
    tied_grad, same = _tied_model_grads(tied=True)
    assert same is tied_grad  # one parameter
    assert _rel(tied_grad, embed_grad + head_grad) <= RTOL64
    assert head_grad.abs().max() > 0 and embed_grad.abs().max() > 0


@pytest.mark.parametrize("bad", [-1, V])
def test_targets_outside_the_vocabulary_are_refused(bad):
    hidden, weight, targets, _ = _inputs(T)
    targets[:3] = torch.tensor([0, V - 1, bad])
    with pytest.raises(ValueError, match=rf"^targets must be token ids in \[0, {V}\) \(the model's vocabulary\), "
                                         rf"got ids from {min(bad, 0)} to {max(bad, V - 1)}$"):
        LMHead(E, V)(hidden, targets)


def test_bad_shapes_and_chunk_sizes_are_refused():
    hidden, weight, targets, _ = _inputs(T)
    with pytest.raises(ValueError, match=r"^chunked_cross_entropy needs hidden \[\.\.\., 16\]"):
        chunked_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match=r"^chunk_rows must be a positive integer, got 0$"):
        chunked_cross_entropy(hidden, weight, targets, 0)


def _saved_elements(head: LMHead, hidden, targets) -> int:
    """Elements that autograd keeps from head's forward for its backward."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        head(hidden, targets)
    return sum(sizes)


def test_forward_keeps_per_token_values_and_no_logits():
    hidden, _, targets, _ = _inputs(T)
    head = LMHead(E, V).double()  # the default chunk: the whole sequence in one chunk here
    # hidden [T, E], weight [V, E], targets [T], log-sum-exp [T]: nothing of size T x V.
    assert _saved_elements(head, hidden, targets) == T * E + V * E + 2 * T
    head.materialize_logits = True  # the reference path keeps the logits, so the count above can fail
    assert _saved_elements(head, hidden, targets) >= T * V


def test_default_chunk_holds_at_most_the_budget_of_fp32_logits():
    for vocab in (257, 49152, 65536, 151936):
        rows = default_chunk_rows(vocab)
        assert rows * vocab * 4 <= CHUNK_LOGITS_BYTES < (rows + 1) * vocab * 4
    assert default_chunk_rows(151936) == 883
    assert default_chunk_rows(10**9) == 1


def _bf16_case(mode: str, chunk_rows: int | None, device: str = "cpu"):
    """Losses, input gradients and the largest |logit| of one bf16 case; chunk_rows None: the reference."""
    torch.manual_seed(2)
    dtype = torch.bfloat16 if mode == "bf16 weights" else torch.float32
    hidden = torch.randn(T, E, dtype=dtype).to(device).requires_grad_()
    weight = (0.5 * torch.randn(V, E, dtype=dtype)).to(device).requires_grad_()
    targets = torch.randint(0, V, (T,)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "autocast"):
        if chunk_rows is None:
            losses = cross_entropy_reference(hidden, weight, targets)
        else:
            losses = chunked_cross_entropy(hidden, weight, targets, chunk_rows)
        losses.mean().backward()
    max_logit = (hidden.detach().double() @ weight.detach().double().T).abs().max().item()
    return losses.detach(), hidden.grad, weight.grad, max_logit


def _compare_bf16(mode: str, device: str) -> None:
    ref_losses, ref_hidden_grad, ref_weight_grad, max_logit = _bf16_case(mode, None, device)
    losses, hidden_grad, weight_grad, _ = _bf16_case(mode, 8, device)
    param_dtype = torch.bfloat16 if mode == "bf16 weights" else torch.float32
    assert losses.dtype == torch.float32  # fp32 softmax in both modes
    assert hidden_grad.dtype == weight_grad.dtype == param_dtype
    # Both round the same fp32-accumulated logits to bf16; another accumulation order moves a logit z by
    # at most one bf16 unit (2^-8 |z|), and a loss, lse(z) - z_t, by at most twice the largest move.
    assert (losses - ref_losses).abs().max().item() <= 2 * 2**-8 * max_logit
    # Gradients: the logits' gradient is rounded to bf16 in both (2^-8 relative) and multiplied in bf16
    # with fp32 sums; the chunked weight gradient rounds each chunk's product once more before its fp32
    # sum (bf16 weights also round the result). Four bf16 units of the norm, 2^-6, bound both.
    assert _rel(hidden_grad.float(), ref_hidden_grad.float()) <= 2**-6
    assert _rel(weight_grad.float(), ref_weight_grad.float()) <= 2**-6


@pytest.mark.parametrize("mode", ["autocast", "bf16 weights"])
def test_bf16_matches_the_reference_in_the_same_precision(mode):
    _compare_bf16(mode, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["autocast", "bf16 weights"])
def test_bf16_matches_the_reference_on_gpu(mode):
    # On CUDA the chunked path sums in fp32 across chunks (mixed-dtype matmuls): fewer roundings.
    _compare_bf16(mode, "cuda")
