"""Test harness: run a function on several local processes joined by torch.distributed."""

import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lh_dist.runtime.distributed import free_port


def _worker(rank, world_size, port, backend, timeout_s, fn, args):
    # One thread per process: the CI machine has 2 cores shared by all ranks.
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 120.0) -> None:
    """Call fn(rank, world_size, *args) in world_size processes with torch.distributed initialized.

    backend "gloo" runs on CPU; "nccl" puts rank r on cuda:r.
    fn must be a module-level function (it is pickled). An exception on any rank
    is re-raised here; a collective stuck for timeout_s fails instead of hanging.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    mp.spawn(_worker, args=(world_size, free_port(), backend, timeout_s, fn, args), nprocs=world_size, join=True)
