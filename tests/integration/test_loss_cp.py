"""The chunked loss under context parallelism equals the single-device loss (2 gloo ranks, float64).

Each rank holds the zigzag shard of one sample, so its per-token losses are those of its own
tokens; the mean over the sequence is the mean of the ranks' means (equal shard sizes), and the
gradients of the mean are the ranks' gradients averaged, as the trainer all-reduces them.
"""

import torch
import torch.distributed as dist

from conftest import TINY_MODEL
from lh_dist.assembly.model import build_model
from lh_dist.config import load_config
from lh_dist.parallel.sharding import zigzag_positions, zigzag_shard
from spawn import spawn_ranks

VOCAB, SEQ_LEN = 96, 64
OVERRIDES = [*TINY_MODEL, f"model.vocab_size={VOCAB}", f"data.seq_len={SEQ_LEN}", "model.attention_backend=math",
             "schedule.lighthouse_steps=0", "parallel.cp_degree=2"]
# float64: ring attention and the split mean reorder sums of at most SEQ_LEN terms, each carrying a
# few eps (1.1e-16) of round-off, so results agree to ~1e-14; 1e-12 leaves a margin.
RTOL = 1e-12


def _model(cp_group=None):
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    model = build_model(load_config(None, OVERRIDES), cp_group).double()
    model.output.chunk_rows = 5  # several chunks per rank, the last one short (32 tokens per rank)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _cp_worker(rank, world):
    tokens = torch.randint(0, VOCAB, (1, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    single = _model()
    loss = single(inputs, torch.arange(SEQ_LEN), targets).mean()
    loss.backward()

    sharded = _model(dist.group.WORLD)
    local = sharded(zigzag_shard(inputs, 1, world, rank), zigzag_positions(SEQ_LEN, world, rank),
                    zigzag_shard(targets, 1, world, rank))  # [1, SEQ_LEN / world]
    assert local.shape == (1, SEQ_LEN // world)
    local.mean().backward()
    mean = local.mean().detach()
    dist.all_reduce(mean)
    mean /= world
    assert _rel(mean, loss.detach()) <= RTOL, f"rank {rank}: loss {mean.item()} != {loss.item()}"
    for (name, p_cp), p_one in zip(sharded.named_parameters(), single.parameters()):
        grad = p_cp.grad.clone()
        dist.all_reduce(grad)
        grad /= world
        assert _rel(grad, p_one.grad) <= RTOL, f"rank {rank}: gradient of {name}"
    assert sharded.output.weight.grad.abs().max() > 0


def test_cp_loss_and_gradients_equal_one_device():
    spawn_ranks(_cp_worker, 2)
