"""A Qwen3-like model (head_dim apart from dim / n_heads, qk-norm, q/k/v biases) with llama3 or
YaRN RoPE scaling, built for a CP group of 2 gloo ranks with ring attention: each rank's logits
on its zigzag shard, at its global positions, equal the zigzag shard of the single-device logits.
The same holds in the Lighthouse phase, its selection scoring the projections before the QK-norm.

Tolerance: in float64 the two paths differ only by the ring's order of summation (its
log-sum-exp merge of partial attentions) and by matmuls over a shard instead of the whole
sequence; logits of magnitude ~3 then differ by ~1e-14 (measured: <= 6e-15). 1e-10 leaves a
wide margin, while the rank's local positions instead of its global ones change them by ~1.
"""

import torch
import torch.distributed as dist

from lh_dist.assembly.model import build_model, set_phase
from lh_dist.config import load_config
from lh_dist.parallel.sharding import zigzag_positions, zigzag_shard

from spawn import spawn_ranks

SEQ_LEN, CONTEXT = 128, 32  # positions run to 4x the original context of the scalings
QWEN3_LIKE = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=24",
              "model.ffn_hidden=96", "model.vocab_size=101", "model.qk_norm=true", "model.attention_bias=true",
              "model.attention_backend=math", "model.rope_theta=10000", f"data.seq_len={SEQ_LEN}",
              "parallel.cp_degree=2", "schedule.lighthouse_steps=0"]
SCALINGS = {
    "llama3": ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=4", "model.rope_scaling.low_freq_factor=1",
               "model.rope_scaling.high_freq_factor=4", f"model.rope_scaling.original_max_position_embeddings={CONTEXT}"],
    "yarn": ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
             f"model.rope_scaling.original_max_position_embeddings={CONTEXT}"],
}


def _random_weights(model: torch.nn.Module) -> dict:
    """The same random weights on every rank: norm gains around 1, biases around 0."""
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, p in model.state_dict().items():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        weights[name] = 1 + 0.2 * noise if "norm" in name else 0.2 * noise if name.endswith("bias") else 0.1 * noise
    return weights


def _single_and_cp(cfg):
    """The model on one device and over the world as its CP group, float64, with the same random weights."""
    single = build_model(cfg).to(torch.float64)
    cp = build_model(cfg, dist.group.WORLD).to(torch.float64)
    weights = _random_weights(single)
    single.load_state_dict(weights)
    cp.load_state_dict(weights)
    return single, cp


def _compare_shards(rank, world):
    for name, scaling in SCALINGS.items():
        cfg = load_config(None, QWEN3_LIKE + scaling)
        single, cp = _single_and_cp(cfg)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = zigzag_shard(single(tokens, torch.arange(SEQ_LEN)), 1, world, rank)  # [B, N/W, V]
            local_tokens = zigzag_shard(tokens, 1, world, rank)
            got = cp(local_tokens, zigzag_positions(SEQ_LEN, world, rank))
            wrong = cp(local_tokens, torch.arange(SEQ_LEN // world))  # local positions: must not match
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-10, f"rank {rank} {name}: max |logit difference| {diff:.3g}"
        assert (wrong - expected).abs().max().item() > 1e-3, f"rank {rank} {name}: positions had no effect"


def test_cp_logits_equal_single_device_with_rope_scaling():
    spawn_ranks(_compare_shards, 2)


# Lighthouse in both layers: 4 tiles (one per zigzag chunk of 2 ranks) of 256 windows of 2 tokens, half of
# them refined (with fewer, 128, every window would be and the scores would not matter).
LIGHTHOUSE = ["data.seq_len=2048", "lighthouse.levels=2", "lighthouse.pooling=2", "lighthouse.topk=512",
              "lighthouse.dense_layers=[]", "lighthouse.backend=reference", "lighthouse.score_from=projections"]


def _compare_lighthouse_shards(rank, world):
    cfg = load_config(None, QWEN3_LIKE + LIGHTHOUSE)
    n = cfg.data.seq_len
    single, cp = _single_and_cp(cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    local_tokens, positions = zigzag_shard(tokens, 1, world, rank), zigzag_positions(n, world, rank)
    with torch.no_grad():
        dense = zigzag_shard(single(tokens, torch.arange(n)), 1, world, rank)  # [B, N/W, V]
        set_phase(single, "lighthouse")
        set_phase(cp, "lighthouse")
        expected = zigzag_shard(single(tokens, torch.arange(n)), 1, world, rank)
        got = cp(local_tokens, positions)
    # As above, plus the Lighthouse exchange's own order of float64 sums (~1e-15 relative).
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-10, f"rank {rank}: max |logit difference| {diff:.3g}"
    assert (expected - dense).abs().max().item() > 1e-3, f"rank {rank}: the Lighthouse phase changed nothing"


def test_cp_lighthouse_logits_of_a_qk_norm_model_equal_single_device():
    spawn_ranks(_compare_lighthouse_shards, 2)
