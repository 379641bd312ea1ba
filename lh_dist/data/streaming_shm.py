"""mosaicml-streaming's shared memory on a machine that several jobs share.

streaming registers every open dataset under the first shared-memory prefix of the machine that
it finds free (`000017_locals`, ...): it looks, then creates. Two jobs that look at the same moment
pick the same prefix, and the second to create it fails with FileExistsError. Within a job, every
rank of a node looks on its own, and all must find the same prefix: a prefix freed by another job
while they look splits them ("shared memory prefix=N was not registered by local leader").

streaming has no supported way to choose the prefix, and retrying the opening cannot repair a job of
several ranks: the node's leader fails between two of streaming's barriers, with the other ranks
already waiting in the second. So every lh_dist process takes one machine-wide file lock while it
changes what a job looking for a prefix would find: the node's leader for a whole opening (the
job's other ranks start only once it holds the lock), and whoever frees a prefix while freeing it.
Other programs that use streaming do not take the lock, so they can still collide with a job.
"""

import atexit
import contextlib
import fcntl
import functools
import os
import tempfile
import time
import warnings

import torch

from lh_dist.parallel.comm import barrier, device_guessing_barriers

LOCK_PATH = os.path.join(tempfile.gettempdir(), "lh_dist_streaming_shm.lock")
# How long a process waits for the lock before going on without it: far longer than an opening
# takes, and a bound on the wait when two multi-node jobs hold each other's nodes' locks.
LOCK_WAIT_S = 120.0

_held = 0  # how deep this process is inside `_machine_lock` (a loader freed while another opens re-enters)


@contextlib.contextmanager
def _machine_lock():
    """Hold the machine-wide lock (reentrant within the process)."""
    global _held
    fd = None
    if not _held:
        fd = os.open(LOCK_PATH, os.O_RDONLY | os.O_CREAT, 0o666)  # read-only suffices to lock it
        with contextlib.suppress(PermissionError):  # only its owner may: then any user can open it, whatever the umask
            os.fchmod(fd, 0o666)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    warnings.warn(f"waited {LOCK_WAIT_S:.0f} s for {LOCK_PATH}; going on without it", stacklevel=3)
                    break
                time.sleep(0.05)
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if fd is not None:
            os.close(fd)  # releases the lock


def _shared_memories(obj, depth: int = 3) -> set:
    """The streaming SharedMemory objects held by `obj` and its attributes, `depth` levels down."""
    from streaming.base.shared.memory import SharedMemory

    if isinstance(obj, SharedMemory):
        return {obj}
    if not depth or not hasattr(obj, "__dict__"):
        return set()
    return set().union(*(_shared_memories(v, depth - 1) for v in vars(obj).values()))


def _release(dataset) -> None:
    shms = _shared_memories(dataset)
    for shm in shms:
        # Once the prefix is free another job may take it: streaming's own exit handler must not
        # unlink it a second time then.
        atexit.unregister(shm.cleanup)
    with _machine_lock() if any(shm.created_shms for shm in shms) else contextlib.nullcontext():
        for shm in shms:
            shm.cleanup()


@contextlib.contextmanager
def _exit_handlers_registered():
    """The functions given to atexit.register inside the block (they are registered as usual)."""
    registered, register = [], atexit.register

    def recording_register(fn, *args, **kwargs):
        registered.append(fn)
        return register(fn, *args, **kwargs)

    atexit.register = recording_register
    try:
        yield registered
    finally:
        atexit.register = register


def _close_search_handles(registered: list, kept: set) -> None:
    """Close the shared memory that streaming attached to while it looked for a free prefix.

    Each look attaches to another job's block (or a stale one) and leaves the handle to its exit
    handler, which keeps it, a file descriptor and a mapping, until the process ends: a process that
    opens many datasets on a machine with many blocks runs out of file descriptors."""
    from streaming.base.shared.memory import SharedMemory

    for fn in registered:
        shm = getattr(fn, "__self__", None)
        if isinstance(shm, SharedMemory) and shm not in kept and not shm.created_shms:
            atexit.unregister(fn)
            shm.cleanup()  # closes what it attached to; unlinks nothing


def open_streaming_dataset(**kwargs):
    """`streaming.StreamingDataset(**kwargs)`, opened while no other lh_dist job on this machine opens
    or frees one; returns (the dataset, a function that frees its shared memory). The function also
    runs at exit; streaming's own exit handlers for the dataset are replaced by it."""
    from streaming import StreamingDataset  # importing streaming takes seconds
    from streaming.base.world import World

    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    if joined:
        # No rank of the job is still freeing a dataset: it would wait for the lock that its leader
        # holds while the leader waits for it in a barrier.
        barrier()
    with _machine_lock() if World.detect().is_local_leader else contextlib.nullcontext(), \
            _exit_handlers_registered() as registered:
        if joined:
            barrier()  # the other ranks of the node look for the prefix under the lock too
        with device_guessing_barriers():  # streaming's own barriers name no device
            dataset = StreamingDataset(**kwargs)
    kept = _shared_memories(dataset)
    _close_search_handles(registered, kept)
    release = functools.partial(_release, dataset)
    for shm in kept:
        atexit.unregister(shm.cleanup)
    atexit.register(release)
    return dataset, release
