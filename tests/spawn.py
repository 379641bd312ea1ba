"""Test harness: run a function on several ranks joined by torch.distributed, as local processes
(`spawn_ranks`) or as threads of the test process (`thread_ranks`)."""

import datetime
import faulthandler
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lh_dist.parallel.distributed import free_port


def _worker(rank, world_size, port, backend, timeout_s, fn, args):
    # A rank that dies of a signal leaves no traceback for spawn to report: print every thread's stack.
    faulthandler.enable(all_threads=True)
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
        # No rank tears the group down while another still talks to it: gloo aborts the process
        # ("terminate called without an active exception") when its peer's connection goes first.
        dist.barrier()
    except RuntimeError as error:
        if "by peer" in str(error):  # gloo's "Connection closed/reset by peer": another rank failed first
            time.sleep(5)  # so that spawn reports that rank's traceback, not this echo of it
        raise
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown. A rank has died of SIGABRT ("terminate called without
    # an active exception", no Python stack) about once in five full test runs, never when its test
    # ran alone; torch's native threads (gloo's, the TCP store's) ending at interpreter exit are the
    # one native teardown left after the barrier, and nothing of the code under test runs past here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 120.0) -> None:
    """Call fn(rank, world_size, *args) in world_size processes with torch.distributed initialized.

    backend "gloo" runs on CPU; "nccl" puts rank r on cuda:r.
    fn must be a module-level function (it is pickled). An exception on any rank
    is re-raised here; a collective stuck for timeout_s fails instead of hanging.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    mp.spawn(_worker, args=(world_size, free_port(), backend, timeout_s, fn, args), nprocs=world_size, join=True)


def thread_ranks(fn, world_size: int, *args, timeout_s: float = 60.0) -> None:
    """Call fn(rank, world_size, *args) on world_size threads of this process, joined by torch's
    threaded process group (torch.testing's, as PyTorch's own tests use it).

    It has the collectives (all_reduce, all_gather, reduce_scatter, new_group, ...) but no
    point-to-point transfers: code that sends or receives needs `spawn_ranks`. An exception on
    any rank is re-raised here.
    """
    from torch.testing._internal.distributed.multi_threaded_pg import (
        ProcessLocalGroup,
        _install_threaded_pg,
        _uninstall_threaded_pg,
    )

    store = dist.HashStore()
    errors = []

    def run(rank):
        dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
        try:
            fn(rank, world_size, *args)
        except BaseException as error:  # noqa: BLE001  (re-raised in the caller's thread)
            errors.append(error)
            ProcessLocalGroup.exception_handle(error)  # wakes the ranks waiting in a collective
        finally:
            dist.destroy_process_group()

    _install_threaded_pg()
    torch._C._distributed_c10d._set_thread_isolation_mode(True)  # each thread its own default group
    try:
        threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in range(world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout_s)
        if any(thread.is_alive() for thread in threads):
            raise TimeoutError(f"a rank was still running after {timeout_s} s")
    finally:
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        _uninstall_threaded_pg()
        ProcessLocalGroup.reset()
    if errors:
        raise errors[0]
