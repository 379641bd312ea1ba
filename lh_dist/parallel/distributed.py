"""Starting torch.distributed, from torchrun's environment or alone, and ending it."""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for ranks on `device`: NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> None:
    """Initialize torch.distributed for training, through DeepSpeed, from torchrun's environment
    variables; a process started without torchrun becomes a world of one."""
    if device.type == "cpu":
        # DeepSpeed guesses the accelerator when it is imported; on CPU say so, to keep it certain and quiet.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Importing DeepSpeed imports torch's extension builder, which warns on every rank of a machine
        # without CUDA that it "found no CUDA runtime"; nothing here builds CUDA code.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import deepspeed

    if device.type == "cpu":
        # On CPU, DeepSpeed's communication backend builds its shared-memory all-reduce op
        # (`deepspeed_shm_comm`) with the C++ compiler when it starts, into ~/.cache/torch_extensions,
        # which all virtual environments of the user share: without a compiler the start fails, and
        # environments rebuild it over each other's copy (over a minute each time). Training never
        # uses the op (DeepSpeed calls it only from `inference_all_reduce`; gradients go through
        # gloo), and initializing torch.distributed first would not help (DeepSpeed still builds
        # it then). DeepSpeed's own switch is its table of ops it may build: one marked not
        # compatible there is skipped, exactly as on a machine that cannot build it.
        from deepspeed.accelerator import get_accelerator

        shm_comm = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if shm_comm is not None:
            deepspeed.ops.__compatible_ops__[shm_comm.NAME] = False

    if "WORLD_SIZE" not in os.environ:
        # A plain `lh-train` without torchrun: a world of one on a free local port.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend=backend_for(device))


def close_distributed(clean: bool) -> None:
    """End torch.distributed in this process, if it was started.

    clean: every rank reached the same ending (training finished, or stopped on a signal that the
    ranks agreed on). Then the process groups are destroyed, as torch asks of a normal exit: NCCL
    otherwise warns that destroy_process_group() was not called, and a gloo group left to the
    interpreter's exit now and then aborts the process there ("terminate called without an active
    exception", SIGABRT; 4 of about 120 two-rank CPU runs of a few collectives, none of 300 that
    destroyed their groups). So every entry point that starts torch.distributed ends with this.
    Destroying waits for this rank's collectives in flight, which its peers join. After a failure
    on this rank, the peers may never join one, so nothing may wait: NCCL groups are aborted (what
    torch does at exit to a group nobody destroyed, without its warning); gloo groups are left to
    the exit, since aborting one waits for its collectives as destroying does.
    """
    if not dist.is_initialized():
        return
    if clean:
        dist.destroy_process_group()
    elif dist.get_backend() == "nccl" and hasattr(dist.distributed_c10d, "_abort_process_group"):
        dist.distributed_c10d._abort_process_group()  # torch's own teardown at exit; not public API
