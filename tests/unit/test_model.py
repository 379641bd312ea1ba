import pytest
import torch

from lh_dist.config import ModelConfig
from lh_dist.model import Transformer, apply_rope, rope_tables
from lh_dist.model.llama import Attention
from lh_dist.ops.attention import attention


def _dense(q, k, v):
    return attention(q, k, v, causal=True, backend="math")


def test_rope_with_offset_positions_equals_slicing_the_full_sequence():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 3, 16, dtype=torch.float64)
    cos, sin = rope_tables(torch.arange(64), ModelConfig(head_dim=16))
    full = apply_rope(x, cos, sin)
    pos = torch.cat([torch.arange(8, 24), torch.arange(40, 56)])  # a zigzag-like shard
    cos_s, sin_s = rope_tables(pos, ModelConfig(head_dim=16))
    assert torch.allclose(apply_rope(x[:, pos], cos_s, sin_s), full[:, pos], atol=1e-12)


def test_rope_preserves_norm_and_relative_positions():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)

    cfg = ModelConfig(head_dim=32, rope_theta=500.0)

    def score(i, j):
        ci, si = rope_tables(torch.tensor([i]), cfg)
        cj, sj = rope_tables(torch.tensor([j]), cfg)
        return (apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum()

    # float64 tables: angles up to 105 rad carry rounding errors of ~105 * 2^-53 ~ 1e-14.
    assert torch.allclose(score(5, 2), score(105, 102), atol=1e-12)
    c, s = rope_tables(torch.tensor([7]), cfg)
    assert torch.allclose(apply_rope(q, c, s).norm(), q.norm(), atol=1e-12)


def test_gqa_equals_multi_head_with_repeated_kv():
    torch.manual_seed(0)
    gqa_cfg = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, ffn_hidden=96)
    mha_cfg = ModelConfig(dim=64, n_heads=4, n_kv_heads=4, ffn_hidden=96)
    gqa, mha = Attention(gqa_cfg, _dense).double(), Attention(mha_cfg, _dense).double()
    d = gqa_cfg.head_dim
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):  # KV head j serves query heads 2j and 2j+1
            w = getattr(gqa, name).weight.view(2, d, 64)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * d, 64))
    x = torch.randn(2, 33, 64, dtype=torch.float64)
    cos, sin = rope_tables(torch.arange(33), gqa_cfg)
    assert torch.allclose(gqa(x, cos, sin), mha(x, cos, sin), atol=1e-12)


def test_transformer_is_causal_and_counts_parameters():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=50)
    model = Transformer(cfg, [_dense] * 2).double()
    tokens = torch.randint(0, 50, (1, 20))
    logits = model(tokens, torch.arange(20))
    assert logits.shape == (1, 20, 50)
    changed = tokens.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 50
    logits2 = model(changed, torch.arange(20))
    assert torch.allclose(logits[:, :12], logits2[:, :12], atol=1e-12)
    assert not torch.allclose(logits[:, 12:], logits2[:, 12:])
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48 + 2 * 32
    assert model.num_params() == 2 * 50 * 32 + 2 * per_layer + 32


def test_attention_fns_must_match_layers():
    with pytest.raises(ValueError, match="n_layers"):
        Transformer(ModelConfig(n_layers=2), [_dense])
