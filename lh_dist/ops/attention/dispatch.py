"""Which kernel runs attention: the backend names, what each needs, and the choice "auto" makes.

"auto" takes the first of flash_attn, cudnn, flash, cpu_flash that can run the tensors, else
math; it warns once when an installed flash_attn does not import or fails its self-check.
"""

from __future__ import annotations

import warnings

import torch

from . import flash_attn4, reference, sdpa

BACKENDS = ("auto", "flash_attn", "cudnn", "flash", "cpu_flash", "math")
_HALF = (torch.float16, torch.bfloat16)

KERNELS = {  # name -> (forward(q, k, v, causal, scale), backward(dout, q, k, v, out, lse, causal, scale))
    "flash_attn": (flash_attn4.forward, flash_attn4.backward),
    **sdpa.KERNELS,
    "math": (reference.math_forward, reference.math_backward),
}


def _unavailable(name: str, device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str | None:
    """Why backend `name` cannot run on (device, dtype, head_dim), or None if it can."""
    if name == "math":
        return None
    if name == "cpu_flash":
        return None if device.type == "cpu" else f"cpu_flash runs on CPU tensors, got device {device}"
    if name == "flash_attn":
        problem = flash_attn4.flash_attn_problem(device, dtype, head_dim)
        return None if problem is None else problem[0]
    if device.type != "cuda":
        return f"{name} needs CUDA tensors, got device {device}"
    if dtype not in _HALF:
        return f"{name} supports float16/bfloat16 only, got dtype {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"{name} needs an sm80+ GPU"
    if name == "cudnn":
        if not torch.backends.cudnn.is_available() or (torch.backends.cudnn.version() or 0) < 90000:
            return "cudnn attention needs cuDNN >= 9"
        if head_dim is not None and (head_dim % 8 or head_dim > 128):
            return f"cudnn attention needs head dim D % 8 == 0 and D <= 128, got D={head_dim}"
    if name == "flash" and head_dim is not None and head_dim > 256:
        return f"flash attention needs head dim D <= 256, got D={head_dim}"
    return None


_AUTO_ORDER = ("flash_attn", "cudnn", "flash", "cpu_flash")  # then math
_warned: set[str] = set()


def check_backend(backend: str) -> None:
    """ValueError unless `backend` is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str:
    """The concrete backend that `backend` means for tensors on `device` of `dtype`.

    "auto": the first of `_AUTO_ORDER` that can run
    here (on CUDA: flash_attn once its self-check has passed, else cudnn, else flash; cpu_flash
    on CPU), else math. An explicit backend that cannot run here raises RuntimeError saying why.
    """
    check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        problem = flash_attn4.flash_attn_problem(device, dtype, head_dim)
        if problem is None:
            return "flash_attn"
        chosen = next((c for c in _AUTO_ORDER[1:] if _unavailable(c, device, dtype, head_dim) is None), "math")
        reason, loud = problem
        if loud and reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"attention backend 'auto' uses {chosen} instead of flash_attn: {reason}", stacklevel=2)
        return chosen
    reason = _unavailable(backend, device, dtype, head_dim)
    if reason is not None:
        raise RuntimeError(f"attention backend {backend!r} is unavailable: {reason}")
    return backend
