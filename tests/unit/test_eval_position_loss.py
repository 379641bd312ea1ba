"""Position buckets of the validation loss."""

import numpy as np
import pytest
import torch

from lh_dist.eval.position_loss import PositionLoss, bucket_edges, evaluate_position_loss


def test_linear_edges_are_equal_widths():
    assert bucket_edges(64, 8) == [0, 8, 16, 24, 32, 40, 48, 56, 64]


def test_log_edges_grow_and_cover_the_sequence():
    assert bucket_edges(65536, 7, "log") == [0, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    edges = bucket_edges(4096, 8, "log")
    assert edges[0] == 0 and edges[-1] == 4096
    widths = np.diff(edges)
    assert len(widths) == 8 and np.all(widths[2:] == 2 * widths[1:-1])
    assert bucket_edges(4, 4, "log") == sorted(set(bucket_edges(4, 4, "log")))  # rounding duplicates merged


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=16, num_buckets=0), "num_buckets"),
    (dict(seq_len=16, num_buckets=17), "num_buckets"),
    (dict(seq_len=16, num_buckets=4, spacing="cubic"), "spacing must be one of"),
])
def test_bad_bucket_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bucket_edges(**kwargs)


@pytest.mark.parametrize("spacing", ["linear", "log"])
def test_buckets_average_to_the_overall_loss(spacing):
    seq_len = 100
    batches = [torch.rand(3, seq_len + 1) for _ in range(4)]
    # A stand-in for the model whose per-token loss rises with position.
    losses_of = {id(b): torch.rand(3, seq_len) + torch.linspace(0, 2, seq_len) for b in batches}
    result = evaluate_position_loss(lambda b: losses_of[id(b)], batches, seq_len,
                                    bucket_edges(seq_len, 7, spacing), log=None)
    everything = torch.cat(list(losses_of.values()))  # [12, seq_len]
    assert result["loss"] == pytest.approx(everything.double().mean().item(), rel=1e-12)
    assert result["tokens"] == 12 * seq_len and result["sequences"] == 12
    buckets = result["buckets"]
    assert sum(b["tokens"] for b in buckets) == result["tokens"]
    weighted = sum(b["loss"] * b["tokens"] for b in buckets) / result["tokens"]
    assert weighted == pytest.approx(result["loss"], rel=1e-12)
    last = buckets[-1]
    assert last["loss"] == pytest.approx(everything[:, last["start"]:last["end"]].double().mean().item())
    assert buckets[-1]["loss"] > buckets[0]["loss"]


def test_position_loss_rejects_wrong_shapes_and_empty_input():
    with pytest.raises(ValueError, match=r"losses must be \[B, 8\]"):
        PositionLoss(8).add(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="no validation batches"):
        evaluate_position_loss(lambda b: b, [], 8, [0, 8], log=None)


def test_standard_error_over_sequences_and_bits_per_byte():
    seq_len, edges = 8, [0, 4, 8]
    losses = torch.tensor([[1.0] * 4 + [2.0] * 4, [3.0] * 4 + [2.0] * 4, [2.0] * 8])  # [3, 8]
    eod = 256
    targets = torch.full((3, seq_len), 65)
    targets[0, 7] = eod  # an end-of-document token: no byte
    result = evaluate_position_loss(lambda b: losses, [torch.cat([targets[:, :1], targets], 1)], seq_len, edges,
                                    log=None, token_bytes_fn=lambda t: (t != eod).long())
    first, second = result["buckets"]
    # Sequence means of the first bucket are 1, 3, 2: sample std 1, over sqrt(3) sequences.
    assert first["loss"] == pytest.approx(2.0) and first["stderr"] == pytest.approx(1 / np.sqrt(3))
    assert second["stderr"] == 0.0
    assert result["bytes"] == 23 and second["bytes"] == 11
    assert result["bits_per_byte"] == pytest.approx(losses.sum().item() / np.log(2) / 23)
    assert second["bits_per_byte"] == pytest.approx(2.0 * 12 / np.log(2) / 11)
    single = evaluate_position_loss(lambda b: losses[:1], [torch.zeros(1, seq_len + 1)], seq_len, edges, log=None)
    assert single["buckets"][0]["stderr"] is None and "bits_per_byte" not in single
