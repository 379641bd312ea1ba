"""The flash_attn backend's self-check, run against stand-in `flash_attn.cute` modules.

A stand-in has FlashAttention-4's interface (`flash_attn_func(..., return_lse=True)` and
`interface._flash_attn_bwd`) and computes with lh_dist's math backend, either correctly or
with a realistic bug: the causal flag dropped, or the causal mask aligned top-left. The
self-check must reject the buggy ones by their numbers (naming the package version), "auto"
must then fall back with one warning, and a correct one must be picked by "auto".

On CPU the hardware gate (CUDA, sm90+) is lifted for the stand-in, so the check and the
fallback run here; the `gpu` twin runs the same stand-in on CUDA, where "auto" falls back to
cuDNN with no gate lifted.
"""

import re
import sys
import types
import warnings

import pytest
import torch

from lh_dist.ops.attention import dispatch, flash_attn4
from lh_dist.ops.attention import attention_backward, attention_forward, resolve_backend

FAKE_VERSION = "4.0.0.dev0+standin"


def _top_left(q, k, v, scale):
    """Causal attention with the mask aligned top-left (query i sees keys j <= i)."""
    nq = q.shape[1]
    out, lse = attention_forward(q, k[:, :nq], v[:, :nq], causal=True, scale=scale, backend="math")
    return out, lse


def make_flash_attn(kind: str):
    """Modules flash_attn, flash_attn.cute and flash_attn.cute.interface computing attention of `kind`:
    "right", "noncausal" (ignores causal=True) or "topleft" (causal, aligned top-left)."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_lse=False):
        calls.append(causal)
        if kind == "topleft" and causal:
            return _top_left(q, k, v, softmax_scale)
        return attention_forward(q, k, v, causal=causal and kind != "noncausal", scale=softmax_scale,
                                 backend="math")

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False):
        if kind == "topleft" and causal:
            nq = q.shape[1]
            dq, dk, dv = attention_backward(dout, q, k[:, :nq], v[:, :nq], out, lse, causal=True,
                                            scale=softmax_scale, backend="math")
            pad = torch.zeros_like(k[:, nq:])
            return dq, torch.cat([dk, pad], 1), torch.cat([dv, pad], 1)
        return attention_backward(dout, q, k, v, out, lse, causal=causal and kind != "noncausal",
                                  scale=softmax_scale, backend="math")

    package = types.ModuleType("flash_attn")
    cute = types.ModuleType("flash_attn.cute")
    interface = types.ModuleType("flash_attn.cute.interface")
    cute.__version__ = FAKE_VERSION
    cute.flash_attn_func = flash_attn_func
    interface._flash_attn_bwd = _flash_attn_bwd
    package.cute, cute.interface = cute, interface
    return {"flash_attn": package, "flash_attn.cute": cute, "flash_attn.cute.interface": interface}, calls


def _forget_flash_attn():
    flash_attn4._flash_attn.cache_clear()
    flash_attn4._self_checks.clear()
    dispatch._warned.clear()


@pytest.fixture
def install(monkeypatch):
    """install(kind, lift_gate) puts a stand-in into sys.modules; everything is restored afterwards."""
    _forget_flash_attn()

    def _install(kind, lift_gate=True):
        modules, calls = make_flash_attn(kind)
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        if lift_gate:
            monkeypatch.setattr(flash_attn4, "_flash_attn_hardware", lambda device, dtype, head_dim: None)
        return calls

    yield _install
    monkeypatch.undo()
    _forget_flash_attn()


def _inputs(device, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 50, 4, 64, generator=gen)
    k, v = (torch.randn(1, 70, 2, 64, generator=gen) for _ in range(2))
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


@pytest.mark.parametrize("kind, culprit", [("noncausal", "B=2 Nq=203 Nk=203 H=4 Hkv=2 causal: out"),
                                           ("topleft", "B=1 Nq=77 Nk=203 H=2 Hkv=2 causal: out")])
def test_self_check_rejects_a_wrong_kernel(install, kind, culprit):
    install(kind)
    q, k, v = _inputs("cpu")
    with pytest.raises(RuntimeError) as info:
        attention_forward(q, k, v, causal=True, backend="flash_attn")
    message = str(info.value)
    assert "backend 'flash_attn' is unavailable" in message
    assert f"flash_attn.cute {FAKE_VERSION}" in message and "failed lh_dist's self-check" in message
    assert culprit in message and "misses float64 attention by" in message


def test_auto_falls_back_with_one_warning(install):
    install("noncausal")
    q, k, v = _inputs("cpu")
    with pytest.warns(UserWarning, match=re.escape(f"uses cpu_flash instead of flash_attn: flash_attn.cute {FAKE_VERSION}")):
        assert resolve_backend("auto", q.device, q.dtype, q.shape[-1]) == "cpu_flash"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        out, lse = attention_forward(q, k, v, causal=True)
    fallback_out, fallback_lse = attention_forward(q, k, v, causal=True, backend="cpu_flash")
    assert torch.equal(out, fallback_out) and torch.equal(lse, fallback_lse)


def test_auto_picks_flash_attn_once_the_check_passed(install):
    calls = install("right")
    q, k, v = _inputs("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", q.device, q.dtype, q.shape[-1]) == "flash_attn"
    checked = len(calls)
    assert checked == len(flash_attn4._SELF_CHECK_CASES)  # forward of every case, once
    out, lse = attention_forward(q, k, v, causal=True)
    assert len(calls) == checked + 1  # the stand-in computed it, with no second check
    ref_out, ref_lse = attention_forward(q, k, v, causal=True, backend="math")
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_self_check_reports_an_interface_change(install, monkeypatch):
    install("right")
    # A release that renames `return_lse`: the call raises, it is not silently dropped.
    monkeypatch.setattr(sys.modules["flash_attn.cute"], "flash_attn_func",
                        lambda q, k, v, softmax_scale=None, causal=False, return_softmax_lse=False: None)
    with pytest.raises(RuntimeError, match=r"self-check.*TypeError.*return_lse"):
        resolve_backend("flash_attn", torch.device("cpu"), torch.bfloat16, 64)


def test_absent_package_is_quiet_under_auto(monkeypatch):
    _forget_flash_attn()
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ModuleNotFoundError
    monkeypatch.setattr(flash_attn4, "_flash_attn_hardware", lambda device, dtype, head_dim: None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16, 64) == "cpu_flash"
        with pytest.raises(RuntimeError, match=r"not installed \(pip install 'lh_dist\[flash\]'\)"):
            resolve_backend("flash_attn", torch.device("cpu"), torch.bfloat16, 64)
    finally:
        monkeypatch.undo()
        _forget_flash_attn()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm90+ CUDA GPU")
def test_auto_falls_back_to_cudnn_on_gpu(install):
    install("noncausal", lift_gate=False)
    q, k, v = _inputs("cuda")
    with pytest.warns(UserWarning, match="uses cudnn instead of flash_attn"):
        assert resolve_backend("auto", q.device, q.dtype, q.shape[-1]) == "cudnn"
    # With flash-attn-4 also installed, the message lists its distributions' versions after the stand-in's.
    with pytest.raises(RuntimeError, match=re.escape(f"flash_attn.cute {FAKE_VERSION}") + ".* failed lh_dist's self-check"):
        attention_forward(q, k, v, causal=True, backend="flash_attn")
