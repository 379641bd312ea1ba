"""Separate jobs on one machine open their datasets at the same moment: mosaicml-streaming registers
each dataset under the first free shared-memory prefix of the machine, and no two jobs may get the same
one. Real processes, released together by a barrier, round after round, each round opening a loader and
closing it again (which frees a prefix while slower jobs may still look for one): jobs of one rank, and
jobs of two ranks joined by gloo (a node's two ranks must agree on their job's prefix).

Without a guard, about half of the openings of one-rank jobs fail (FileExistsError: '/0000NN_locals').
"""

import datetime
import os
import queue
import time
import traceback

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from lh_dist.data.loader import PackedLoader
from lh_dist.parallel.distributed import free_port

NUM_PROCESSES = 6
NUM_ROUNDS = 4


def _job_rank(path: str, rank: int, num_ranks: int, port: int, start, results) -> None:
    """One rank of a job: in each round, wait for every process, then open a loader and close it again."""
    try:
        if num_ranks > 1:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_ranks),
                              LOCAL_WORLD_SIZE=str(num_ranks))
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=num_ranks,
                                    timeout=datetime.timedelta(seconds=30))
        for _ in range(NUM_ROUNDS):
            start.wait(timeout=120)
            loader = PackedLoader(path, "train", seq_len=64, micro_batch=1, dp_rank=0, dp_degree=1, seed=0)
            try:
                next(iter(loader))
                if num_ranks > 1:
                    dist.barrier()  # no rank releases the job's shared memory while another still attaches to it
            finally:
                loader.close()  # a forked process skips exit handlers: left open, it would stay in /dev/shm
            results.put(None)
    except Exception:  # noqa: BLE001  (reported to the test)
        results.put(traceback.format_exc())


@pytest.mark.parametrize("ranks_per_job", [1, 2], ids=["1-rank-jobs", "2-rank-jobs"])
def test_jobs_started_together_each_open_their_dataset(stdlib_dataset, ranks_per_job):
    import streaming  # noqa: F401  (forked jobs inherit it: importing it in each would take seconds)

    ctx = mp.get_context("fork")
    start, results = ctx.Barrier(NUM_PROCESSES), ctx.Queue()
    processes = []
    for _ in range(NUM_PROCESSES // ranks_per_job):
        port = free_port()
        processes += [ctx.Process(target=_job_rank, args=(str(stdlib_dataset), rank, ranks_per_job, port, start,
                                                          results)) for rank in range(ranks_per_job)]
    for process in processes:
        process.start()
    outcomes, deadline = [], time.monotonic() + 300
    while len(outcomes) < NUM_PROCESSES * NUM_ROUNDS and time.monotonic() < deadline:
        try:
            outcomes.append(results.get(timeout=1))
        except queue.Empty:
            if not any(process.is_alive() for process in processes):
                break
    for process in processes:
        process.join(timeout=60)
    failures = [error for error in outcomes if error is not None]
    # A failed job also breaks the start barrier of the others: the first failure is the cause.
    assert not failures, f"{len(failures)} failure(s); the first:\n{failures[0]}"
    assert len(outcomes) == NUM_PROCESSES * NUM_ROUNDS
    assert [process.exitcode for process in processes] == [0] * NUM_PROCESSES
