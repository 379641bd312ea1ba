"""The training step's speed features keep its numbers: activation checkpointing modes, compile.

CPU tests run the model as `build_model` builds it (both phases, Lighthouse on its reference
path) in float64, where recomputation is exact; their `gpu` twin runs the compiled bf16 model.
"""

import pytest
import torch

from lh_dist.config import load_config
from lh_dist.ops.attention import dispatch

from small_model import LAYERS, loss_and_grads, small_model

PHASES = ["dense", "lighthouse"]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_same_loss_and_gradients(phase, mode):
    # Recomputation repeats the forward's ops on the same inputs: the results are equal to
    # float64 round-off (summation order in backward may differ between the graphs).
    loss0, grads0 = loss_and_grads(*small_model(phase, "parallel.activation_checkpointing=none"))
    loss1, grads1 = loss_and_grads(*small_model(phase, f"parallel.activation_checkpointing={mode}"))
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
        loss_and_grads(*small_model(phase, f"parallel.activation_checkpointing={mode}"))
        counts[mode] = calls["forward"]
    assert counts["none"] == LAYERS  # one attention per layer (Lighthouse's inner one on its gathered rows)
    assert counts["full"] == 2 * LAYERS  # recomputed in backward
    assert counts["selective"] == LAYERS  # kept from the forward


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
    model, cfg = small_model(phase, f"parallel.activation_checkpointing={mode}", dtype=torch.float32)
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
    eager, cfg = small_model(phase, f"parallel.activation_checkpointing={mode}")
    loss0, grads0 = loss_and_grads(eager, cfg)
    model, cfg = small_model(phase, f"parallel.activation_checkpointing={mode}")
    torch._dynamo.reset()
    for layer in model.layers:
        layer.compile(backend="aot_eager", fullgraph=True)
    loss1, grads1 = loss_and_grads(model, cfg)
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
    ref_loss, ref = loss_and_grads(*small_model(phase, *over, dtype=torch.float64, device="cuda"), device="cuda")
    eager_loss, eager = loss_and_grads(*small_model(phase, *over, dtype=torch.bfloat16, device="cuda"), device="cuda")
    model, cfg = small_model(phase, *over, "parallel.compile=true", dtype=torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    comp_loss, comp = loss_and_grads(model, cfg, device="cuda")
    eps = torch.finfo(torch.bfloat16).eps
    assert abs(comp_loss - ref_loss) <= 2 * abs(eager_loss - ref_loss) + eps * abs(ref_loss)
    for c, e, r in zip(comp, eager, ref):
        rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
        assert rms(c - r) <= 2 * rms(e - r) + eps * rms(r)
