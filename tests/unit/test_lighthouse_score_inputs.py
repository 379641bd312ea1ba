"""Lighthouse score inputs: vectors the scorer reads instead of q/k (a QK-norm model's projections
before the norm). Equal to q/k they change nothing, bit for bit; otherwise they, and only they, decide
the selection, on the reference backend and on the Triton kernels (in Triton's interpreter here).

tests/integration/test_model_options_cp.py checks a QK-norm model with Lighthouse under CP=2.
"""

from functools import partial

import pytest
import torch

from lh_dist.assembly.model import PhasedAttention, build_model, set_phase
from lh_dist.config import ModelConfig, load_config
from lh_dist.model import apply_rope, rope_tables
from lh_dist.model.llama import Attention
from lh_dist.ops.lighthouse import (
    LighthouseParams,
    gather_pyramid,
    lighthouse_attention,
    lighthouse_reference,
    pyramid_scores,
    scatter_back,
    select,
)
from lh_dist.ops.lighthouse.reference import causal_attention
from lh_dist.train.selection_map import SelectionCapture

pytestmark = pytest.mark.usefixtures("nan_filled_empty")

# The smallest layout with gathered entries at every level (one tile, L = 3, p = 2).
LEVELS, POOLING, TOPK, N = 3, 2, 128, 512


def _tensors(*heads, dtype=torch.float64, seed=0, d=16, n=N):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, h, d, generator=gen, dtype=dtype) for h in heads]


def _fwd_bwd(fn, q, k, v, dout):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


@pytest.fixture(params=["reference", "triton"])
def params(request):
    """Lighthouse on a backend; in Triton's interpreter with 2 levels (its sorts are slow), still
    refining half of the 256 coarsest windows."""
    if request.param == "triton":
        request.getfixturevalue("triton_interpreter")
        return LighthouseParams(levels=2, pooling=2, topk=TOPK, backend="triton", attention_backend="math")
    return LighthouseParams(levels=LEVELS, pooling=POOLING, topk=TOPK, backend="reference", attention_backend="math")


def test_score_inputs_equal_to_q_and_k_change_nothing(params):
    # Half the length on Triton's interpreter: the shortest its 2 levels allow.
    q, k, v, dout = _tensors(2, 1, 1, 2, dtype=torch.float32, n=N // 2 if params.backend == "triton" else N)
    plain = _fwd_bwd(lambda *x: lighthouse_attention(*x, params), q, k, v, dout)
    scored = _fwd_bwd(lambda q_, k_, v_: lighthouse_attention(q_, k_, v_, params, score_q=q_, score_k=k_),
                      q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), plain, scored):
        assert torch.equal(a, b), name


def test_score_inputs_decide_the_selection_and_get_no_gradient(params):
    q, k, v, dout = _tensors(2, 1, 1, 2)
    sq, sk = (x.requires_grad_() for x in _tensors(2, 1, seed=1))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = lighthouse_attention(*leaves, params, score_q=sq, score_k=sk)
    by_hand = select(*pyramid_scores(sq, sk, params.levels, params.pooling), N, params.levels, params.pooling,
                     params.n_tiles)
    expected = _fwd_bwd(lambda *x: scatter_back(causal_attention(*(gather_pyramid(t, by_hand) for t in x)), by_hand),
                        q, k, v, dout)
    ours = [out.detach()]
    if params.backend == "reference":  # the backward rule is the same for both backends, and slow to interpret
        grads = torch.autograd.grad(out, [*leaves, sq, sk], dout, allow_unused=True)
        assert grads[3] is None and grads[4] is None  # scores carry no gradient
        ours += grads[:3]
    # The same float64 terms summed in another order at most: a few unit roundoffs (2^-53) of O(1)
    # values, far below 1e-12; another selection moves outputs by O(0.1) (checked below).
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert (out.detach() - lighthouse_attention(q, k, v, params)).abs().max() > 0.1  # q/k would select otherwise
    reference = lighthouse_reference(q, k, v, params, score_q=sq.detach(), score_k=sk.detach())
    torch.testing.assert_close(out.detach(), reference, rtol=1e-12, atol=1e-12)


def test_score_inputs_of_another_shape_are_rejected():
    params = LighthouseParams(levels=LEVELS, pooling=POOLING, topk=TOPK)
    q, k, v = _tensors(2, 1, 1)
    with pytest.raises(ValueError, match="score_k must be floating point of shape"):
        lighthouse_attention(q, k, v, params, score_k=q)


def test_qk_norm_model_selects_from_the_projections_before_the_norm():
    # An attention block with QK-norm (gains away from 1, as trained ones are) running Lighthouse
    # equals the layer computed by hand with the selection of its raw projections W_q x, W_k x.
    cfg = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, qk_norm=True)
    params = LighthouseParams(levels=LEVELS, pooling=POOLING, topk=TOPK, backend="reference",
                              attention_backend="math")
    block = Attention(cfg, partial(lighthouse_attention, params=params)).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in (block.q_norm, block.k_norm):
            norm.weight.copy_(1 + 0.3 * torch.randn(cfg.head_dim, generator=gen, dtype=torch.float64))
    x = torch.randn(1, N, cfg.dim, generator=gen, dtype=torch.float64)
    cos, sin = rope_tables(torch.arange(N), cfg)

    with torch.no_grad():
        raw_q = block.wq(x).view(1, N, 4, cfg.head_dim)  # [B, N, H, D]
        raw_k = block.wk(x).view(1, N, 2, cfg.head_dim)  # [B, N, K, D]
        v = block.wv(x).view(1, N, 2, cfg.head_dim)
        q, k = apply_rope(block.q_norm(raw_q), cos, sin), apply_rope(block.k_norm(raw_k), cos, sin)

        def by_hand(score_q, score_k):
            sel = select(*pyramid_scores(score_q, score_k, LEVELS, POOLING), N, LEVELS, POOLING, params.n_tiles)
            out = scatter_back(causal_attention(*(gather_pyramid(t, sel) for t in (q, k, v)), "math"), sel)
            return block.wo(out.reshape(1, N, -1))  # [B, N, E]

        got = block(x, cos, sin)
        # Same float64 ops up to summation order: ~1e-16 relative; another selection is off by O(0.01).
        torch.testing.assert_close(got, by_hand(raw_q, raw_k), rtol=1e-12, atol=1e-12)
        assert (got - by_hand(q, k)).abs().max() > 1e-3  # scoring the normalized q/k selects otherwise


@pytest.mark.parametrize("score_from", ["projections", "normalized"])
def test_config_chooses_what_a_qk_norm_model_scores(score_from):
    # The selection-map capture keeps the vectors Lighthouse scored: the k_norm's input (the
    # projections) or its output (rotated afterwards, which keeps every norm).
    cfg = load_config(None, ["model.dim=64", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.qk_norm=true", "model.attention_backend=math", f"data.seq_len={N}",
                             f"lighthouse.levels={LEVELS}", f"lighthouse.pooling={POOLING}", f"lighthouse.topk={TOPK}",
                             "lighthouse.dense_layers=[]", "lighthouse.backend=reference",
                             f"lighthouse.score_from={score_from}"])
    model = build_model(cfg).double()
    seen = {}
    model.layers[0].attention.k_norm.register_forward_hook(lambda m, args, out: seen.update(pre=args[0], post=out))
    set_phase(model, "lighthouse")
    layer = next(m for m in model.modules() if isinstance(m, PhasedAttention))
    capture = SelectionCapture(layer)
    with torch.no_grad():
        model(torch.randint(0, cfg.model.vocab_size, (1, N)), torch.arange(N))
    capture.detach()
    scored = capture.captured[1].norm(dim=-1)  # [1, N, K]
    expected, other = (seen["pre"], seen["post"]) if score_from == "projections" else (seen["post"], seen["pre"])
    # float64 norms of the same vectors, rotated or not: equal to ~1e-15 relative; the two kinds differ by O(1).
    torch.testing.assert_close(scored, expected.norm(dim=-1), rtol=1e-12, atol=0)
    assert (scored - other.norm(dim=-1)).abs().max() > 0.01
