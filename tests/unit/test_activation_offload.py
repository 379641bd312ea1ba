"""parallel.activation_offload: each checkpointed block's input waits in host memory between its
forward and its backward, and training computes exactly what it computes without offloading.

CPU tests build the model as `build_model` builds it, in the Lighthouse phase (layer 0 dense, so both
attentions run; Lighthouse on its reference path), in float64; with compile, torch.compile runs through
AOT autograd without code generation (backend aot_eager, as tests/test_fast_step.py does). The `gpu`
tests run the side-stream path: pinned copies, events, prefetch, and the memory it frees.
"""

from functools import partial

import pytest
import torch

from lh_dist.assembly.offload import ActivationOffload, _Offloaded
from lh_dist.config import ConfigError, load_config

from small_model import LAYERS, loss_and_grads, small_model


def _model(phase: str, *overrides: str, **kwargs):
    return small_model(phase, "data.seq_len=512", *overrides, **kwargs)


@pytest.fixture
def compile_without_codegen(monkeypatch):
    """Make build_model's torch.compile trace with AOT autograd and run eagerly (no compiler on CPU)."""
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_offloading_gives_exactly_the_same_loss_and_gradients(mode, compiled, request, phase="lighthouse"):
    # The host copy is exact and backward gets it back unchanged, so nothing may differ by a bit.
    if compiled:
        request.getfixturevalue("compile_without_codegen")
    over = [f"parallel.activation_checkpointing={mode}", f"parallel.compile={str(compiled).lower()}"]
    loss0, grads0 = loss_and_grads(*_model(phase, *over))
    model, cfg = _model(phase, *over, "parallel.activation_offload=cpu")
    assert isinstance(model.activation_offload, ActivationOffload)
    loss1, grads1 = loss_and_grads(model, cfg)
    assert torch.equal(loss1, loss0)
    for g1, g0 in zip(grads1, grads0, strict=True):
        assert torch.equal(g1, g0)


ON_GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_each_block_input_and_nothing_else_goes_to_host_memory(compiled, device, request, monkeypatch):
    if compiled and device == "cpu":
        request.getfixturevalue("compile_without_codegen")
    model, cfg = _model("lighthouse", "parallel.activation_checkpointing=full",
                        f"parallel.compile={str(compiled).lower()}", "parallel.activation_offload=cpu",
                        device=device)
    offload = model.activation_offload
    inputs, packed, unpacked = [], [], []
    for layer in model.layers:  # the block inputs, as the model passes them
        call = layer.forward
        layer.forward = lambda x, *args, call=call: (inputs.append(x), call(x, *args))[1]
    real_offload, real_unpack = offload._offload, offload._unpack

    def spy_offload(t, ready):
        record = real_offload(t, ready)
        packed.append((t, record))
        return record

    def spy_unpack(record):
        x = real_unpack(record)
        if isinstance(record, _Offloaded):
            unpacked.append((record, x))
        return x

    monkeypatch.setattr(offload, "_offload", spy_offload)
    monkeypatch.setattr(offload, "_unpack", spy_unpack)
    loss_and_grads(model, cfg, device)

    # One offload per block: its input, not the RoPE tables or the weights that are saved beside it.
    assert len(packed) == len(inputs) == LAYERS
    assert all(pair[0] is x for pair, x in zip(packed, inputs))
    for t, record in packed:
        if record.copied is not None:
            record.copied.synchronize()  # the device->host copy has ended
        host = record.host
        assert host.device.type == "cpu" and host.is_pinned() == (device == "cuda")  # pinned for a GPU
        assert host.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()  # a copy, not the tensor
        assert torch.equal(host, t.cpu())
    # Backward asks for every block's input once, last block first, and gets the host copy's values.
    assert [pair[0] for pair in unpacked] == [pair[1] for pair in reversed(packed)]
    assert all(torch.equal(x.cpu(), r.host) for r, x in unpacked)
    block_bytes = cfg.data.seq_len * cfg.model.dim * 8  # [1, N, E] float64
    assert offload.peak_host_bytes == LAYERS * block_bytes
    del inputs, packed, unpacked, t, record, host  # what holds the graph, which holds the host copies
    assert offload.host_bytes == 0  # freed with the graph


def test_offloading_the_first_blocks_only(monkeypatch):
    # activation_offload_layers=2 of 3: the first two blocks' inputs go to host memory, the last
    # block runs as without offloading, and the loss and gradients are still exactly the same.
    over = ["parallel.activation_checkpointing=full"]
    loss0, grads0 = loss_and_grads(*_model("lighthouse", *over))
    model, cfg = _model("lighthouse", *over, "parallel.activation_offload=cpu", "parallel.activation_offload_layers=2")
    offload, packed = model.activation_offload, []
    real_offload = offload._offload
    monkeypatch.setattr(offload, "_offload", lambda t, ready: packed.append(t) or real_offload(t, ready))
    loss1, grads1 = loss_and_grads(model, cfg)
    assert len(packed) == 2
    assert offload.peak_host_bytes == 2 * cfg.data.seq_len * cfg.model.dim * 8  # [1, N, E] float64 each
    assert torch.equal(loss1, loss0)
    for g1, g0 in zip(grads1, grads0, strict=True):
        assert torch.equal(g1, g0)
    with pytest.raises(ConfigError, match=r"^parallel.activation_offload_layers must be at most model.n_layers = 3"):
        _model("dense", "parallel.activation_offload_layers=4")


def test_no_offload_without_gradients():
    model, cfg = _model("dense", "parallel.activation_checkpointing=full", "parallel.activation_offload=cpu")
    with torch.no_grad():
        model(torch.zeros(1, cfg.data.seq_len, dtype=torch.long), torch.arange(cfg.data.seq_len))
    assert model.activation_offload.peak_host_bytes == 0
    assert _model("dense", "parallel.activation_checkpointing=full")[0].activation_offload is None


def test_offload_config_errors_are_one_line(capsys):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["parallel.activation_offload=cpu"])
    assert str(error.value) == \
        "parallel.activation_offload needs parallel.activation_checkpointing full or selective"
    with pytest.raises(ConfigError, match=r"^parallel.activation_offload must be one of 'none', 'cpu', got 'gpu'$"):
        load_config(None, ["parallel.activation_checkpointing=full", "parallel.activation_offload=gpu"])
    from lh_dist.train.cli import main

    assert main(["--dry-run", "parallel.activation_offload=cpu"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "lh-train: config error: parallel.activation_offload needs parallel.activation_checkpointing full or selective"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_offloading_on_a_gpu_is_exact_and_frees_the_block_inputs(mode, compiled):
    # Copies on the side stream, events, prefetch: a missing wait would show as wrong gradients. CUDA's
    # backward kernels are not bitwise reproducible (atomic sums), so offloading must change the
    # gradients by no more than a second run without it does.
    n, dim, layers = 8192, 256, 6
    over = [f"model.dim={dim}", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_hidden=512",
            f"model.n_layers={layers}", f"data.seq_len={n}", f"parallel.activation_checkpointing={mode}",
            f"parallel.compile={str(compiled).lower()}"]
    peaks, results = {}, {}
    for offload in ("none", "cpu", "none again"):
        torch._dynamo.reset()
        model, cfg = _model("dense", *over, f"parallel.activation_offload={offload.split()[0]}",
                            dtype=torch.float32, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results[offload] = loss_and_grads(model, cfg, device="cuda")
        torch.cuda.synchronize()
        peaks[offload] = torch.cuda.max_memory_allocated() - base
        del model
    assert torch.equal(results["cpu"][0], results["none"][0])  # the forward is reproducible
    for g1, g0, g2 in zip(results["cpu"][1], results["none"][1], results["none again"][1], strict=True):
        # Twice the run-to-run spread: exact where the kernels happen to be (g2 == g0).
        assert (g1 - g0).abs().max() <= 2 * (g2 - g0).abs().max()
    # Without offloading, backward of the last block starts with all 6 block inputs held; with it,
    # with the last block's input and the prefetched one: at least 3 fewer.
    block_bytes = n * dim * 4
    assert peaks["none"] - peaks["cpu"] >= 3 * block_bytes, peaks
