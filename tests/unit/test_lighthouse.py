"""Lighthouse reference vs a literal, loop-based float64 reading of docs/DESIGN.md §2."""

from __future__ import annotations

import os
from fractions import Fraction

import pytest
import torch

from lh_dist.ops.lighthouse import (
    LighthouseParams,
    gather_pyramid,
    gathered_length,
    lighthouse_attention,
    pyramid_scores,
    scatter_back,
    select,
)
from lh_dist.ops.lighthouse.reference import causal_attention

# Kernel output buffers come NaN-filled: an element a kernel skips fails the comparisons.
pytestmark = pytest.mark.usefixtures("nan_filled_empty")

# (levels, pooling, topk, n): n is the smallest length with 128 coarsest windows per tile.
CONFIGS = [(3, 4, 256, 4096), (2, 2, 256, 512), (4, 2, 256, 2048), (3, 4, 512, 8192)]


def level_and_window(sel) -> tuple[torch.Tensor, torch.Tensor]:
    """(level, window) of every gathered entry of a Selection, both [B, Hkv, S] int64."""
    offsets = torch.tensor(sel.offsets, device=sel.index.device)
    level = torch.bucketize(sel.index, offsets[1:-1], right=True)
    return level, sel.index - offsets[:-1][level]


def literal_entries(q_norm: list[float], k_norm: list[float], n: int, levels: int, p: int, topk: int):
    """docs/DESIGN.md §2 steps 2-4 for one (batch, KV head): emitted (level, window) in causal order."""

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

    params = LighthouseParams(levels=levels, pooling=pooling, topk=topk, backend="reference")
    ref = run(lambda a, b_, c: lighthouse_attention(a, b_, c, params))
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
    level_w, window_w = level_and_window(whole)
    s = parts[0].length
    for i, part in enumerate(parts):
        level_c, window_c = level_and_window(part)
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
    n, chunks = kwargs.pop("n"), kwargs.pop("chunks", 1)
    with pytest.raises(ValueError, match=match):
        LighthouseParams(**kwargs).check(n, chunks=chunks)


def test_validation_accepts_design_configs():
    for levels, pooling, topk, n in CONFIGS:
        LighthouseParams(levels=levels, pooling=pooling, topk=topk).check(n)
    LighthouseParams(levels=3, pooling=4, topk=2048).check(512 * 1024, chunks=8)


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
        lighthouse_attention(q, k, v, LighthouseParams(levels=2, pooling=2, topk=256))


def test_api_argument_errors():
    q = torch.randn(1, 512, 2, 8)
    with pytest.raises(ValueError, match="backend"):
        LighthouseParams(levels=2, pooling=2, topk=256, backend="cuda")
    with pytest.raises(ValueError, match="attention_backend"):
        LighthouseParams(levels=2, pooling=2, topk=256, attention_backend="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="CUDA"):
            lighthouse_attention(q, q, q, LighthouseParams(levels=2, pooling=2, topk=256, backend="triton"))
    with pytest.raises(ValueError, match="scorer"):
        LighthouseParams(levels=2, pooling=2, topk=256, scorer="dilated")
    with pytest.raises(ValueError, match="pooling"):
        LighthouseParams(levels=2, pooling=6, topk=256)
    with pytest.raises(ValueError, match="at least 128 coarsest windows"):  # the sequence is checked too
        lighthouse_attention(q[:, :500], q[:, :500], q[:, :500], LighthouseParams(levels=2, pooling=2, topk=256))


def test_scatter_back_keeps_rows_past_the_chunk_end():
    # Context parallelism forwards these rows to the next chunk.
    levels, pooling, topk, n = 3, 4, 256, 4096
    q, k, _ = random_qkv(1, n, 2, 1, 4, dtype=torch.float32, seed=11)
    sel = select(*pyramid_scores(q, k, levels, pooling), n, levels, pooling, topk // 128)
    o = torch.randn(1, sel.length, 2, 4)
    extra = pooling ** (levels - 1) - 1
    longer = scatter_back(o, sel, length=n + extra)
    torch.testing.assert_close(longer[:, :n], scatter_back(o, sel), rtol=0, atol=0)
    level, window = level_and_window(sel)
    expected = torch.zeros(extra, 2, 4)
    for s, (lvl, i) in enumerate(zip(level[0, 0].tolist(), window[0, 0].tolist())):
        c = pooling**lvl
        for t in range(max(n, i * c + c - 1), i * c + 2 * c - 1):
            expected[t - n] += o[0, s]
    torch.testing.assert_close(longer[0, n:], expected)
    assert expected.abs().sum() > 0


def fixed_selection_layer(q, k, v, levels, pooling, topk, attention_backend="auto"):
    """The layer as a function of (q, k, v) with the selection computed once from (q, k) and then frozen.

    Selection carries no gradient (docs/DESIGN.md §2.7), so this is the function whose derivative the
    backward pass computes; freezing it also keeps finite differences from crossing a top-k boundary.
    """
    sel = select(*pyramid_scores(q, k, levels, pooling), q.shape[1], levels, pooling, topk // 128)

    def layer(q_, k_, v_):
        gathered = (gather_pyramid(x, sel) for x in (q_, k_, v_))
        return scatter_back(causal_attention(*gathered, backend=attention_backend), sel)

    return sel, layer


@pytest.mark.parametrize("attention_backend", ["math", "cpu_flash"])
def test_reference_grads_match_finite_differences(attention_backend):
    # Smallest valid layout: one tile of 256 coarsest windows (L=2, p=2), so the top-k refines
    # 128 of them and both leaves and picked entries (with their level-0 children) are gathered.
    levels, pooling, topk, n = 2, 2, 128, 512
    q, k, v = random_qkv(1, n, 2, 1, 4, seed=21)
    sel, layer = fixed_selection_layer(q, k, v, levels, pooling, topk, attention_backend)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    # Float64 central differences with eps=1e-6 have truncation error O(eps^2) and rounding error
    # O(1e-16 / eps) ~ 1e-10 relative to O(1) outputs, far inside gradcheck's atol=1e-5, rtol=1e-3;
    # a wrong gradient (e.g. a missing 1/c pooling factor or a misrouted scatter) is off by O(1).
    # fast_mode compares u^T J v for random u, v over all of q, k, v in a few evaluations instead of
    # one per input element (8192 here).
    assert torch.autograd.gradcheck(layer, leaves, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)
    # Also check full columns of the Jacobian for a few single input elements, at tokens that sit
    # at different levels of the gathered set (a refined window's child, a leaf window, the last token).
    gathered_leaf0 = (sel.inverse[0, 0, :n] >= 0).nonzero().flatten()
    not_refined = (sel.inverse[0, 0, :n] < 0).nonzero().flatten()
    tokens = [int(gathered_leaf0[len(gathered_leaf0) // 2]), int(not_refined[len(not_refined) // 2]), n - 1]
    grad_out = torch.randn(1, n, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    analytic = torch.autograd.grad(layer(*leaves), leaves, grad_out)
    eps = 1e-6
    for which in range(3):
        for t in tokens:
            for d in (0, 3):
                plus = [x.detach().clone() for x in leaves]
                minus = [x.detach().clone() for x in leaves]
                plus[which][0, t, 0, d] += eps
                minus[which][0, t, 0, d] -= eps
                numeric = ((layer(*plus) - layer(*minus)) * grad_out).sum() / (2 * eps)
                # Same error budget as above: |error| ~ 1e-10 relative; allow 1e-6 absolute.
                torch.testing.assert_close(analytic[which][0, t, 0, d], numeric, rtol=1e-6, atol=1e-6,
                                           msg=f"d/d{'qkv'[which]}[{t}, 0, {d}]")


# Small valid layouts (n = p^(L-1) * topk, the minimum): one and two tiles, L = 2..4, p = 2 and 4.
SMALL_CONFIGS = [(2, 2, 128, 256), (2, 2, 256, 512), (3, 2, 128, 512), (2, 4, 128, 512), (4, 2, 128, 1024)]


@pytest.mark.parametrize("levels,pooling,topk,n", SMALL_CONFIGS)
def test_causal_given_selection_perturbation_and_gradient(levels, pooling, topk, n):
    # docs/DESIGN.md §2.8: with the selection fixed, outputs before t are a function of tokens < t only.
    # test_causal_given_selection checks single output rows of one config; this checks whole
    # prefixes, by value and by gradient, at many t (tile edges, window edges, odd positions).
    q, k, v = random_qkv(1, n, 4, 2, 4, seed=levels * 10 + pooling + topk)
    _, layer = fixed_selection_layer(q, k, v, levels, pooling, topk)
    base = layer(q, k, v)
    coarse = pooling ** (levels - 1)
    tile = n * 128 // topk
    ts = {1, coarse - 1, coarse, coarse + 1, tile - 1, tile, n // 3, n // 2 + 1, n - coarse, n - 2, n - 1}
    ts = sorted(t for t in ts | set(torch.randint(1, n, (8,), generator=torch.Generator().manual_seed(n)).tolist())
                if t < n)
    gen = torch.Generator().manual_seed(23)
    weights = torch.randn(1, n, 4, 4, dtype=torch.float64, generator=gen)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = layer(*leaves)
    for t in ts:
        for which in range(3):
            moved = [q, k, v]
            moved[which] = moved[which].clone()
            moved[which][:, t] += 3 * torch.randn(moved[which][:, t].shape, dtype=torch.float64, generator=gen)
            changed = layer(*moved)
            # Bitwise: a masked key contributes exp(-inf) = 0 exactly and pooled windows that do not
            # hold token t are recomputed from identical values, so there is no rounding slack to allow.
            assert torch.equal(changed[:, :t], base[:, :t]), f"out[<{t}] moved with {'qkv'[which]}[{t}]"
            # The perturbation must be visible from t on (the level-0 entry of t or its window reaches
            # position t + c - 1 at the latest), or the check above would prove nothing.
            assert not torch.equal(changed[:, t:], base[:, t:]), f"{'qkv'[which]}[{t}] changed nothing"
        grads = torch.autograd.grad((out[:, :t] * weights[:, :t]).sum(), leaves, retain_graph=True)
        for name, g in zip("qkv", grads):
            assert g[:, t:].abs().max() == 0, f"d out[<{t}] / d {name}[>={t}] must be exactly zero"
            # Positions 0 .. p^(L-1) - 2 may receive no entry at all (docs/DESIGN.md §2.6), and an
            # entry first in causal order attends only to itself, so its output is its own v with
            # no q or k gradient. Past 2 p^(L-1) tokens some output has attended to two entries.
            if base[:, :t].abs().max() > 0 and (name == "v" or t > 2 * coarse):
                assert g[:, :t].abs().max() > 0, f"d out[<{t}] / d {name}[<{t}] must not vanish"


def test_selection_is_not_causal():
    # docs/DESIGN.md §2.8: a tile's top-k reads all of its tokens, so a later token can change which
    # earlier windows are refined. One tile (L=2, p=2, topk=128, n=512) of 256 level-1 windows.
    # Norms fall with position for both q and k, so the 64 picked by query score are windows
    # 0..63 and the 64 picked by key score among the rest are 64..127; windows 128..255 are leaves.
    levels, pooling, topk, n = 2, 2, 128, 512
    q, k, v = random_qkv(1, n, 2, 1, 4, seed=24)
    falling = (2.0 - torch.arange(n, dtype=torch.float64) / n).view(1, n, 1, 1)  # in (1, 2]
    q = q / q.norm(dim=-1, keepdim=True) * falling
    k = k / k.norm(dim=-1, keepdim=True) * falling
    sel, layer = fixed_selection_layer(q, k, v, levels, pooling, topk)
    refined = sel.inverse[0, 0, :n : pooling] >= 0  # window i is refined iff its first child is gathered
    assert torch.equal(refined.nonzero().flatten(), torch.arange(128))
    # Boost the norm of token t = 401, the late token of leaf window 200: the window now tops the
    # query ranking and displaces window 63, which is then the best by key score among the rest
    # and displaces window 127 from the key-score picks. Window 127 ends at token 255 < t.
    t = 401
    q2, k2 = q.clone(), k.clone()
    q2[:, t] *= 10
    k2[:, t] *= 10
    sel2, _ = fixed_selection_layer(q2, k2, v, levels, pooling, topk)
    refined2 = sel2.inverse[0, 0, :n : pooling] >= 0
    assert torch.equal(refined2.nonzero().flatten(), torch.cat([torch.arange(127), torch.tensor([t // pooling])]))
    out_free = lighthouse_attention(q2, k2, v, LighthouseParams(levels=levels, pooling=pooling, topk=topk,
                                                                backend="reference"))
    base = layer(q, k, v)
    # Token 254 was gathered as the child of window 127 and is not any more, so the output at
    # position 254 < t loses that entry: an earlier output depends on a later token.
    assert not torch.equal(out_free[:, :t], base[:, :t])
    assert (out_free[:, 254] - base[:, 254]).abs().max() > 1e-3
    # With the original selection held fixed, the same change leaves every earlier output exactly as is.
    assert torch.equal(layer(q2, k2, v)[:, :t], base[:, :t])


def test_gqa_with_identical_heads_equals_repeated_kv_heads():
    # The query score of a KV head is the max over its group (docs/DESIGN.md §2.2). If the heads of a
    # group are identical, that max is each head's own score, so the GQA layer must equal the
    # layer with one KV head per query head (k, v repeated): same selections, same outputs.
    levels, pooling, topk, n = 3, 2, 256, 1024
    q, k, v = random_qkv(2, n, 4, 2, 8, seed=25)
    q = q[:, :, [0, 0, 2, 2]].clone()  # heads 0, 1 identical; heads 2, 3 identical
    args = dict(levels=levels, pooling=pooling, topk=topk, backend="reference")
    k4, v4 = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # query head h reads k4[h] = k[h // 2]
    sel_gqa = select(*pyramid_scores(q, k, levels, pooling), n, levels, pooling, topk // 128)
    sel_mha = select(*pyramid_scores(q, k4, levels, pooling), n, levels, pooling, topk // 128)
    assert torch.equal(sel_gqa.index.repeat_interleave(2, dim=1), sel_mha.index)
    # The two KV heads select differently, so a head routed to the wrong KV head would be caught.
    assert not torch.equal(sel_gqa.index[:, 0], sel_gqa.index[:, 1])
    for attention_backend in ("math", "cpu_flash"):
        params = LighthouseParams(attention_backend=attention_backend, **args)
        gqa = lighthouse_attention(q, k, v, params)
        mha = lighthouse_attention(q, k4, v4, params)
        # Both backends repeat KV heads before computing, so the arithmetic is identical: exact.
        torch.testing.assert_close(gqa, mha, rtol=0, atol=0)
        torch.testing.assert_close(gqa[:, :, 0], gqa[:, :, 1], rtol=0, atol=0)


@pytest.mark.parametrize("levels,pooling,topk,n", CONFIGS[:3])
def test_gathered_entries_sorted_by_causal_key(levels, pooling, topk, n):
    # docs/DESIGN.md §2.4, checked from the Selection alone (test_gathered_length_and_structure checks
    # uniqueness and the inverse map, not the order). An entry at level l >= 1 was picked iff its
    # children were gathered; its key is c*(i+1) - 2^-l, a leaf's c*i. Keys must strictly increase
    # along every (batch, KV head) row, tile after tile.
    q, k, _ = random_qkv(2, n, 4, 2, 4, dtype=torch.float32, seed=26)
    n_tiles = topk // 128
    sel = select(*pyramid_scores(q, k, levels, pooling), n, levels, pooling, n_tiles)
    level, window = level_and_window(sel)
    offsets = torch.tensor(sel.offsets)
    c = pooling**level
    first_child = offsets[(level - 1).clamp(min=0)] + window * pooling
    picked = (level > 0) & (sel.inverse.gather(-1, first_child.clamp(max=sel.inverse.shape[-1] - 1)) >= 0)
    # Keys in units of 2^-(L-1) token, so that they are integers.
    unit = 2 ** (levels - 1)
    key = torch.where(picked, (window + 1) * c * unit - 2 ** (levels - 1 - level), window * c * unit)
    assert (key.diff(dim=-1) > 0).all()
    # Each tile refines exactly 128 entries per level >= 1, and tiles occupy consecutive blocks of index.
    per_tile = sel.length // n_tiles
    tile_of_entry = (window * c) // (n // n_tiles)
    assert torch.equal(tile_of_entry, (torch.arange(sel.length) // per_tile).expand_as(tile_of_entry))
    for lvl in range(1, levels):
        counts = ((level == lvl) & picked).view(2, 2, n_tiles, per_tile).sum(-1)
        assert (counts == 128).all()
