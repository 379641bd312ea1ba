"""Attention with log-sum-exp: one interface, several kernels chosen at run time.

Everything in lh_dist that needs softmax attention (dense layers, ring attention,
Lighthouse) goes through `attention_forward` / `attention_backward` or the autograd
wrapper `attention`.

Shapes (the FlashAttention layout):
    q    [B, Nq, H, D]          k, v [B, Nk, Hkv, D]    H % Hkv == 0 (GQA: query head h
                                                        reads KV head h // (H // Hkv))
    out  [B, Nq, H, D]  q.dtype lse  [B, H, Nq] float32 (float64 for float64 inputs),
                                     natural log of sum_j exp(scale * q_i . k_j)
Causal masking is bottom-right aligned: query i sees keys j <= i + (Nk - Nq).

Backends (`BACKENDS`):
    flash_attn  FlashAttention-4 (the flash-attn-4 package, `flash_attn.cute`), CUDA sm90+
                (Hopper, Blackwell), fp16/bf16, native GQA. Checked once per process (per
                device, dtype and head dim) against plain attention in float64 before its
                first use; a kernel that fails is never used.
    cudnn       torch.ops.aten._scaled_dot_product_cudnn_attention(+_backward), fp16/bf16.
    flash       torch.ops.aten._scaled_dot_product_flash_attention(+_backward), fp16/bf16.
    cpu_flash   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(+_backward).
    math        plain PyTorch in fp32 (fp64 for fp64 inputs); the readable definition.

The modules, one job each:
    reference    the math backend and the LSE merge of partial results
    sdpa         PyTorch's fused SDPA kernels (cudnn, flash, cpu_flash)
    flash_attn4  FlashAttention-4 and its self-check
    dispatch     the backend names, what each needs, and the choice "auto" makes
    ops          the torch.library custom ops and the public functions over them
"""

from .dispatch import BACKENDS, resolve_backend
from .reference import merge_partials

# The functions over the custom ops are imported on first use, so that importing the backend
# names (as the config does when it validates) registers no op.
_OPS = ("attention", "attention_backward", "attention_forward")


def __getattr__(name: str):
    if name in _OPS:
        from . import ops

        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "attention", "attention_backward", "attention_forward", "merge_partials",
           "resolve_backend"]
