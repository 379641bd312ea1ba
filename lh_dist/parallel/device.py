"""Which device each rank runs on: one GPU per local rank, or the CPU.

`choose_device` is the rule, a pure function of the request and the counts, so it is tested
with made-up counts; `local_device` applies it to this process (torchrun's LOCAL_RANK and
LOCAL_WORLD_SIZE, and the GPUs torch sees, which honours CUDA_VISIBLE_DEVICES). Training and
evaluation both call it before any process group starts, so too few GPUs stop every rank with
the same one-line error instead of a crash inside NCCL on some of them.

`default_ranks_per_node` is how many ranks a node starts when nobody says (`lh-train
--ranks-per-node`, which launch/run.sh asks): one per visible GPU, or 2 CPU ranks.

`use_expandable_segments` is the CUDA memory allocator setting that lh-train and lh-eval start with.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

from lh_dist.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
# Where torch reads its CUDA allocator settings, first found first: PYTORCH_CUDA_ALLOC_CONF, which every
# torch version reads, then (on ROCm) PYTORCH_HIP_ALLOC_CONF, then the newer PYTORCH_ALLOC_CONF.
# A user's setting in any of them stands.
ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"
# Ranks per node without GPUs: enough for context parallelism (CP 2) on CPU.
CPU_RANKS = 2


def _setting(option: str, value: str) -> str:
    """How the user writes `option` = `value`: a command-line flag or a config override."""
    return f"{option} {value}" if option.startswith("-") else f"{option}={value}"


def use_expandable_segments(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in `environ` unless one of ALLOC_CONF_VARS is
    already set (the user's setting stands); True if it was set here.

    torch reads the variable once, when CUDA starts in the process (the device is set, or the first
    tensor made), so this must run before that: the command-line tools call it first thing.
    Why: a long sequence allocates blocks of many GiB whose sizes differ between forward and backward
    (a block's activations, their gradients, the recomputed block, the attention's workspaces). The
    default allocator takes each such block from the GPU as a segment of its own and can split a
    free segment but never join two: at 2,097,152 tokens a step failed to find 6 GiB while 32 GiB
    were reserved but free, in pieces. Expandable segments grow one segment per stream by mapping
    more memory at its end, so freed pieces stay joined to their neighbours.
    """
    if any(name in environ for name in ALLOC_CONF_VARS):
        return False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return True


def choose_device(requested: str, local_rank: int, local_ranks: int, num_gpus: int, *,
                  option: str = "device", cp_option: str = "parallel.cp_degree") -> torch.device:
    """The device of local rank `local_rank` of `local_ranks` on a node with `num_gpus` visible GPUs.

    `requested` is "cpu", "cuda" or "auto" (CUDA when there are GPUs, else CPU). CUDA gives each
    local rank the GPU of its own index, so it needs local_ranks <= num_gpus; otherwise this raises
    ConfigError naming both counts and the ways out. `option` and `cp_option` are the names the
    user knows the device and the CP degree by: config fields, or flags (starting with "-").
    """
    if requested not in DEVICES:
        raise ConfigError(f"{option} must be one of {DEVICES}, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and num_gpus == 0):
        return torch.device("cpu")
    if num_gpus == 0:
        raise ConfigError(f"{_setting(option, 'cuda')} needs a CUDA GPU, but this process sees none "
                          f"(torch {torch.__version__}); use {_setting(option, 'cpu')} or {_setting(option, 'auto')}")
    # A launcher that sets LOCAL_RANK but not LOCAL_WORLD_SIZE still has at least local_rank + 1 ranks.
    local_ranks = max(local_ranks, local_rank + 1)
    if local_ranks > num_gpus:
        gpus = f"{num_gpus} visible GPU" + ("s" if num_gpus > 1 else "")
        raise ConfigError(f"{local_ranks} ranks on this node but {gpus}, and each rank needs a GPU of its own: "
                          f"start {num_gpus} per node (torchrun --nproc-per-node {num_gpus}, with a {cp_option} "
                          f"that fits), or run the ranks on CPU ({_setting(option, 'cpu')})")
    return torch.device("cuda", local_rank)


def local_device(requested: str, **options: str) -> torch.device:
    """`choose_device` for this process, from torchrun's environment (a lone process is rank 0 of 1),
    made the current CUDA device when it is one (NCCL and kernels then use this rank's GPU)."""
    device = choose_device(requested, int(os.environ.get("LOCAL_RANK", "0")),
                           int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count(), **options)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def default_ranks_per_node(requested: str, num_gpus: int) -> int:
    """Ranks a node starts when nobody says: one per visible GPU, or CPU_RANKS on CPU."""
    if requested == "cpu" or num_gpus == 0:
        return CPU_RANKS
    return num_gpus
