"""The training step's speed features keep its numbers: activation checkpointing modes, compile.

CPU tests run the model as `build_model` builds it (both phases, Lighthouse on its reference
path) in float64, where recomputation is exact; their `gpu` twin runs the compiled bf16 model.
"""

import pytest
import torch
import torch.nn.functional as F

from lh_dist.ops.attention import dispatch
from lh_dist.config import load_config
from lh_dist.runtime.build import build_model, set_phase

SMALL = ["model.dim=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=48",
         "model.vocab_size=64", "data.seq_len=1024", "lighthouse.levels=2", "lighthouse.pooling=2",
         "lighthouse.topk=256", "lighthouse.dense_layers=[0]", "parallel.cp_degree=1", "model.attention_backend=math"]
PHASES = ["dense", "lighthouse"]


def _model(phase: str, *overrides: str, dtype=torch.float64, device="cpu"):
    cfg = load_config(None, [*SMALL, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).to(device=device, dtype=dtype)
    set_phase(model, phase)
    return model, cfg


def _loss_and_grads(model, cfg, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1), generator=gen).to(device)
    logits = model(tokens[:, :-1], torch.arange(cfg.data.seq_len, device=device))
    loss = F.cross_entropy(logits.double().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), [p.grad.double().clone() for p in model.parameters()]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_same_loss_and_gradients(phase, mode):
    # Recomputation repeats the forward's ops on the same inputs: the results are equal to
    # float64 round-off (summation order in backward may differ between the graphs).
    loss0, grads0 = _loss_and_grads(*_model(phase, "parallel.activation_checkpointing=none"))
    loss1, grads1 = _loss_and_grads(*_model(phase, f"parallel.activation_checkpointing={mode}"))
    assert loss1 == loss0
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("phase", PHASES)
def test_selective_checkpointing_keeps_attention_and_full_recomputes_it(phase, monkeypatch):
    calls = {"forward": 0}
    real = dispatch.KERNELS["math"]

    def counting_forward(*args):
        calls["forward"] += 1
        return real[0](*args)

    monkeypatch.setitem(dispatch.KERNELS, "math", (counting_forward, real[1]))
    counts = {}
    for mode in ("none", "full", "selective"):
        calls["forward"] = 0
        _loss_and_grads(*_model(phase, f"parallel.activation_checkpointing={mode}"))
        counts[mode] = calls["forward"]
    layers = 3
    assert counts["none"] == layers  # one attention per layer (Lighthouse's inner one on its gathered rows)
    assert counts["full"] == 2 * layers  # recomputed in backward
    assert counts["selective"] == layers  # kept from the forward


def test_legacy_boolean_checkpointing_values_still_load():
    assert load_config(None, ["parallel.activation_checkpointing=true"]).parallel.activation_checkpointing == "full"
    assert load_config(None, ["parallel.activation_checkpointing=false"]).parallel.activation_checkpointing == "none"
    with pytest.raises(ValueError, match=r"parallel.activation_checkpointing must be one of 'none', 'full', "
                                         r"'selective', got 'some'"):
        load_config(None, ["parallel.activation_checkpointing=some"])


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_checkpointed_blocks_trace_without_graph_breaks(phase, mode):
    # A graph break inside a checkpointed block makes torch.compile run the whole block eagerly.
    model, cfg = _model(phase, f"parallel.activation_checkpointing={mode}", dtype=torch.float32)
    x = torch.randn(1, cfg.data.seq_len, cfg.model.dim)
    from lh_dist.model import rope_tables

    cos, sin = (t.float() for t in rope_tables(torch.arange(cfg.data.seq_len), cfg.model))  # as the model passes them
    block = model.layers[1]  # a Lighthouse layer in the Lighthouse phase
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, cos, sin)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compiled_checkpointed_model_matches_eager(phase, mode):
    # What compile=true builds, traced through AOT autograd without code generation (no compiler
    # needed on CPU): the same ops, so the same numbers to float64 round-off.
    eager, cfg = _model(phase, f"parallel.activation_checkpointing={mode}")
    loss0, grads0 = _loss_and_grads(eager, cfg)
    model, cfg = _model(phase, f"parallel.activation_checkpointing={mode}")
    torch._dynamo.reset()
    for layer in model.layers:
        layer.compile(backend="aot_eager", fullgraph=True)
    loss1, grads1 = _loss_and_grads(model, cfg)
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=0)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-13)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("mode", ["none", "selective"])
def test_compiled_bf16_model_is_as_accurate_as_eager(phase, mode):
    # Inductor fuses and reorders the elementwise work, so bf16 results change; they may not get
    # worse: against the float64 model, the compiled gradients' RMS error is at most 2x the eager
    # bf16 model's (plus one bf16 rounding step of the reference's RMS).
    over = [f"parallel.activation_checkpointing={mode}", "model.attention_backend=auto",
            "lighthouse.backend=auto"]
    ref_loss, ref = _loss_and_grads(*_model(phase, *over, dtype=torch.float64, device="cuda"), device="cuda")
    eager_loss, eager = _loss_and_grads(*_model(phase, *over, dtype=torch.bfloat16, device="cuda"), device="cuda")
    model, cfg = _model(phase, *over, "parallel.compile=true", dtype=torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    comp_loss, comp = _loss_and_grads(model, cfg, device="cuda")
    eps = torch.finfo(torch.bfloat16).eps
    assert abs(comp_loss - ref_loss) <= 2 * abs(eager_loss - ref_loss) + eps * abs(ref_loss)
    for c, e, r in zip(comp, eager, ref):
        rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
        assert rms(c - r) <= 2 * rms(e - r) + eps * rms(r)
