"""Lighthouse reference vs a literal, loop-based float64 reading of DESIGN.md §2."""

from __future__ import annotations

import os
from fractions import Fraction

import pytest
import torch

from lh_dist.ops.lighthouse import (
    gather_pyramid,
    gathered_length,
    lighthouse_attention,
    pyramid_scores,
    scatter_back,
    select,
    validate_lighthouse_args,
)
from lh_dist.ops.lighthouse.reference import causal_attention

# (levels, pooling, topk, n): n is the smallest length with 128 coarsest windows per tile.
CONFIGS = [(3, 4, 256, 4096), (2, 2, 256, 512), (4, 2, 256, 2048), (3, 4, 512, 8192)]


def literal_entries(q_norm: list[float], k_norm: list[float], n: int, levels: int, p: int, topk: int):
    """DESIGN.md §2 steps 2-4 for one (batch, KV head): emitted (level, window) in causal order."""

    def score(norms, lvl, i):
        return max(norms[i * p**lvl : (i + 1) * p**lvl])

    n_tiles = topk // 128
    coarse_per_tile = n // n_tiles // p ** (levels - 1)
    emitted = []  # (sort key, level, window)
    for tile in range(n_tiles):
        candidates = list(range(tile * coarse_per_tile, (tile + 1) * coarse_per_tile))
        for lvl in range(levels - 1, -1, -1):
            c = p**lvl
            if lvl == 0:
                emitted += [(Fraction(i), 0, i) for i in candidates]
                break
            by_q = sorted(candidates, key=lambda i: (-score(q_norm, lvl, i), i))[:64]
            rest = [i for i in candidates if i not in by_q]
            by_k = sorted(rest, key=lambda i: (-score(k_norm, lvl, i), i))[:64]
            chosen = set(by_q) | set(by_k)
            for i in candidates:
                key = Fraction(c * (i + 1)) - Fraction(1, 2**lvl) if i in chosen else Fraction(c * i)
                emitted.append((key, lvl, i))
            candidates = [child for i in sorted(chosen) for child in range(i * p, i * p + p)]
    emitted.sort()
    return [(lvl, i) for _, lvl, i in emitted]


def literal_lighthouse(q, k, v, levels, p, topk):
    """Slow, obviously-correct Lighthouse in float64: q [B, N, H, D], k/v [B, N, Hkv, D]."""
    b_size, n, h, d = q.shape
    hkv = k.shape[2]
    group = h // hkv
    out = torch.zeros_like(q)
    for b in range(b_size):
        for g in range(hkv):
            heads = list(range(g * group, (g + 1) * group))
            q_norm = [max(q[b, t, hh].norm().item() for hh in heads) for t in range(n)]
            k_norm = [k[b, t, g].norm().item() for t in range(n)]
            entries = literal_entries(q_norm, k_norm, n, levels, p, topk)
            # Entry (l, i) is the mean of tokens [i*c, (i+1)*c), c = p^l.
            members, tokens, weights = [], [], []
            for m, (lvl, i) in enumerate(entries):
                c = p**lvl
                for t in range(i * c, (i + 1) * c):
                    members.append(m)
                    tokens.append(t)
                    weights.append(1.0 / c)
            members, tokens = torch.tensor(members), torch.tensor(tokens)
            weights = torch.tensor(weights, dtype=q.dtype)

            def window_means(x):
                return torch.zeros(len(entries), *x.shape[1:], dtype=x.dtype).index_add(
                    0, members, x[tokens] * weights.view(-1, *[1] * (x.dim() - 1)))

            qg, kg, vg = window_means(q[b][:, heads]), window_means(k[b, :, g]), window_means(v[b, :, g])
            s = len(entries)
            logits = torch.einsum("sgd,rd->gsr", qg, kg) / d**0.5
            logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
            og = torch.einsum("gsr,rd->sgd", logits.softmax(-1), vg)  # [S, group, D]
            # Entry (l, i) adds its output to positions [i*c + c - 1, i*c + 2c - 1), clipped to n.
            targets, sources = [], []
            for m, (lvl, i) in enumerate(entries):
                c = p**lvl
                for t in range(i * c + c - 1, min(n, i * c + 2 * c - 1)):
                    targets.append(t)
                    sources.append(m)
            scattered = torch.zeros(n, group, d, dtype=q.dtype).index_add(0, torch.tensor(targets), og[sources])
            out = out.index_put((torch.tensor([b]), torch.arange(n)[:, None], torch.tensor(heads)), scattered)
    return out


def random_qkv(b, n, h, hkv, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads, d, generator=gen, dtype=dtype) for heads in (h, hkv, hkv)]


@pytest.mark.parametrize("levels,pooling,topk,n", CONFIGS)
def test_reference_matches_literal_outputs_and_grads(levels, pooling, topk, n):
    h, hkv = (4, 2) if levels == 3 and pooling == 4 and topk == 256 else (2, 1)
    q, k, v = random_qkv(1, n, h, hkv, 8, seed=levels * 100 + pooling)
    grad_out = torch.randn(1, n, h, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad_out)
        return [out.detach()] + [x.grad for x in leaves]

    ref = run(lambda a, b_, c: lighthouse_attention(a, b_, c, levels=levels, pooling=pooling, topk=topk, backend="reference"))
    lit = run(lambda a, b_, c: literal_lighthouse(a, b_, c, levels, pooling, topk))
    # Both run in float64 with the same selection; only summation order differs.
    for name, r, l in zip(("out", "dq", "dk", "dv"), ref, lit):
        torch.testing.assert_close(r, l, rtol=1e-10, atol=1e-12, msg=name)
        assert r.abs().sum() > 0, name


@pytest.mark.parametrize("levels,pooling,topk,n", CONFIGS)
def test_gathered_length_and_structure(levels, pooling, topk, n):
    q, k, v = random_qkv(2, n, 2, 2, 4, dtype=torch.float32, seed=3)
    n_tiles = topk // 128
    sel = select(*pyramid_scores(q, k, levels, pooling), n, levels, pooling, n_tiles)
    s = n // pooling ** (levels - 1) + (levels - 1) * pooling * topk
    assert gathered_length(n, levels, pooling, n_tiles) == s
    assert sel.index.shape == (2, 2, s)
    assert all(len(set(row.tolist())) == s for row in sel.index.flatten(0, 1))
    positions = torch.arange(s).expand(2, 2, -1)
    assert torch.equal(sel.inverse.gather(-1, sel.index), positions)
    assert int((sel.inverse >= 0).sum()) == 4 * s
    # Every position from p^(L-1) - 1 on receives between 1 and L entries.
    ones = torch.ones(2, s, 2, 1)
    fan_in = scatter_back(ones, sel)[..., 0]
    assert fan_in[:, pooling ** (levels - 1) - 1 :].min() >= 1
    assert fan_in.max() <= levels


def test_causal_given_selection():
    levels, pooling, topk, n = 3, 4, 256, 4096
    q, k, v = random_qkv(1, n, 4, 2, 8, seed=5)
    sel = select(*pyramid_scores(q, k, levels, pooling), n, levels, pooling, topk // 128)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = scatter_back(causal_attention(*(gather_pyramid(x, sel) for x in leaves)), sel)
    gen = torch.Generator().manual_seed(6)
    for s in (15, 100, 1023, 2049, 3000, 4094):
        grads = torch.autograd.grad(out[:, s].mul(torch.randn(4, 8, generator=gen, dtype=q.dtype)).sum(), leaves,
                                    retain_graph=True)
        for name, g in zip("qkv", grads):
            assert g[:, s + 1 :].abs().max() == 0, f"d out[{s}] / d {name}[t > {s}] must be zero"
            assert g[:, : s + 1].abs().max() > 0, f"d out[{s}] / d {name} must reach earlier tokens"


def test_gqa_heads_share_their_kv_head_selection():
    # Make one query head of a group dominate the scores: the group's selection must follow it.
    levels, pooling, topk, n = 2, 2, 256, 512
    q, k, _ = random_qkv(1, n, 4, 2, 8, dtype=torch.float32, seed=7)
    q[:, :, 1] *= 100
    q_scores, _ = pyramid_scores(q, k, levels, pooling)
    torch.testing.assert_close(q_scores[0, 0, :n], q[0, :, 1].norm(dim=-1))
    torch.testing.assert_close(q_scores[0, 1, :n], q[0, :, 2:4].norm(dim=-1).amax(-1))


def test_selection_per_chunk_concatenates_to_whole():
    # Context parallelism selects each chunk alone; chunks hold whole tiles, so results concatenate.
    levels, pooling, topk, n, chunks = 3, 4, 512, 8192, 2
    q, k, _ = random_qkv(1, n, 2, 2, 4, dtype=torch.float32, seed=8)
    whole = select(*pyramid_scores(q, k, levels, pooling), n, levels, pooling, topk // 128)
    m = n // chunks
    parts = [select(*pyramid_scores(q[:, i * m : (i + 1) * m], k[:, i * m : (i + 1) * m], levels, pooling),
                    m, levels, pooling, topk // 128 // chunks) for i in range(chunks)]
    level_w, window_w = whole.level_and_window()
    s = parts[0].length
    for i, part in enumerate(parts):
        level_c, window_c = part.level_and_window()
        assert torch.equal(level_c, level_w[..., i * s : (i + 1) * s])
        shift = (i * m) // pooling**level_c
        assert torch.equal(window_c + shift, window_w[..., i * s : (i + 1) * s])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=4096, levels=1, pooling=4, topk=256), "levels"),
        (dict(n=4096, levels=3, pooling=3, topk=256), "pooling"),
        (dict(n=4096, levels=3, pooling=1, topk=256), "pooling"),
        (dict(n=4096, levels=3, pooling=4, topk=200), "topk"),
        (dict(n=4096, levels=3, pooling=4, topk=0), "topk"),
        (dict(n=4095, levels=3, pooling=4, topk=256), "n must be"),
        (dict(n=4096 + 8, levels=3, pooling=4, topk=256), "tile length"),
        (dict(n=2048, levels=3, pooling=4, topk=256), "at least 128 coarsest"),
        (dict(n=4096, levels=3, pooling=4, topk=384, chunks=2), "chunks"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_lighthouse_args(**kwargs)


def test_validation_accepts_design_configs():
    for levels, pooling, topk, n in CONFIGS:
        validate_lighthouse_args(n, levels, pooling, topk)
    validate_lighthouse_args(512 * 1024, 3, 4, 2048, chunks=8)


@pytest.mark.parametrize(
    "shapes,dtypes,match",
    [
        (((1, 512, 2, 8), (1, 512, 2, 8), (1, 512, 1, 8)), None, "same shape"),
        (((1, 512, 3, 8), (1, 512, 2, 8), (1, 512, 2, 8)), None, "multiple"),
        (((1, 512, 2, 8), (1, 256, 2, 8), (1, 256, 2, 8)), None, r"\[B, N, Hkv, D\]"),
        (((512, 2, 8), (1, 512, 2, 8), (1, 512, 2, 8)), None, "q must have shape"),
        (((1, 512, 2, 8),) * 3, (torch.float32, torch.float64, torch.float32), "dtype"),
    ],
)
def test_input_errors(shapes, dtypes, match):
    dtypes = dtypes or (torch.float32,) * 3
    q, k, v = (torch.randn(s, dtype=dt) for s, dt in zip(shapes, dtypes))
    with pytest.raises(ValueError, match=match):
        lighthouse_attention(q, k, v, levels=2, pooling=2, topk=256)


def test_api_argument_errors():
    q = torch.randn(1, 512, 2, 8)
    with pytest.raises(ValueError, match="backend"):
        lighthouse_attention(q, q, q, levels=2, pooling=2, topk=256, backend="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="CUDA"):
            lighthouse_attention(q, q, q, levels=2, pooling=2, topk=256, backend="triton")
    with pytest.raises(ValueError, match="scorer"):
        lighthouse_attention(q, q, q, levels=2, pooling=2, topk=256, scorer="dilated")
    with pytest.raises(ValueError, match="pooling"):
        lighthouse_attention(q, q, q, levels=2, pooling=6, topk=256)


def test_scatter_back_keeps_rows_past_the_chunk_end():
    # Context parallelism forwards these rows to the next chunk.
    levels, pooling, topk, n = 3, 4, 256, 4096
    q, k, _ = random_qkv(1, n, 2, 1, 4, dtype=torch.float32, seed=11)
    sel = select(*pyramid_scores(q, k, levels, pooling), n, levels, pooling, topk // 128)
    o = torch.randn(1, sel.length, 2, 4)
    extra = pooling ** (levels - 1) - 1
    longer = scatter_back(o, sel, length=n + extra)
    torch.testing.assert_close(longer[:, :n], scatter_back(o, sel), rtol=0, atol=0)
    level, window = sel.level_and_window()
    expected = torch.zeros(extra, 2, 4)
    for s, (lvl, i) in enumerate(zip(level[0, 0].tolist(), window[0, 0].tolist())):
        c = pooling**lvl
        for t in range(max(n, i * c + c - 1), i * c + 2 * c - 1):
            expected[t - n] += o[0, s]
    torch.testing.assert_close(longer[0, n:], expected)
    assert expected.abs().sum() > 0
