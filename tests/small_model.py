"""The small model that the tests of the training step's features (activation checkpointing, compile,
activation offloading) build, as `build_model` builds it, and one forward and backward through it."""

import torch

from lh_dist.assembly.model import build_model, set_phase
from lh_dist.config import load_config

# In the Lighthouse phase layer 0 stays dense: both kinds of attention run (Lighthouse on its reference path).
SMALL = ["model.dim=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=48",
         "model.vocab_size=64", "data.seq_len=1024", "lighthouse.levels=2", "lighthouse.pooling=2",
         "lighthouse.topk=256", "lighthouse.dense_layers=[0]", "parallel.cp_degree=1", "model.attention_backend=math"]
LAYERS = 3


def small_model(phase: str, *overrides: str, dtype=torch.float64, device="cpu"):
    """(model, config): SMALL plus `overrides`, seeded weights, in `phase` ("dense" or "lighthouse")."""
    cfg = load_config(None, [*SMALL, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).to(device=device, dtype=dtype)
    set_phase(model, phase)
    return model, cfg


def loss_and_grads(model, cfg, device="cpu"):
    """(mean loss, every parameter's gradient) of one seeded batch of data.seq_len tokens."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1), generator=gen).to(device)
    loss = model(tokens[:, :-1], torch.arange(cfg.data.seq_len, device=device), tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]
