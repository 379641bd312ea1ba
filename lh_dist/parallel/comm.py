"""Point-to-point ring transfers within a process group, the ways Lighthouse under CP exchanges
the gathered K/V between ranks (`EXCHANGES`, which lighthouse_cp implements), and the barrier
every module uses."""

import contextlib
import warnings

import torch
import torch.distributed as dist

# "allgather": all-gather them once; "ring": ring attention over them.
EXCHANGES = ("allgather", "ring")


def group_coords(group) -> tuple[int, int]:
    """(size, rank) of this process in group; (1, 0) for None or without torch.distributed."""
    if group is None or not dist.is_initialized():
        return 1, 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the group it was given")
    return dist.get_world_size(group), rank


def barrier() -> None:
    """Wait for every rank of the default group. Under NCCL the barrier runs on this rank's GPU,
    named, since torch warns each time it has to guess which device that is."""
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextlib.contextmanager
def device_guessing_barriers():
    """Within the block, barriers that do not name their device run without torch's warning.

    DeepSpeed's checkpoint save and load and mosaicml-streaming's opening of a dataset call
    dist.barrier() without device_ids, and in a world of one DeepSpeed leaves the process group
    unbound to a device (its comm/torch.py), so torch warns on rank 0 that it takes the current
    device. lh_dist sets the current device to this rank's GPU before it starts torch.distributed
    (lh_dist/parallel/device.py), so the device taken is the right one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"barrier\(\): using the device under current context")
        yield


class PendingRecv:
    """A transfer in flight; wait() returns the received tensor."""

    def __init__(self, requests, send: torch.Tensor, recv: torch.Tensor):
        self._requests = requests
        self._send = send  # held so the buffer outlives the asynchronous send
        self._recv = recv

    def wait(self) -> torch.Tensor:
        """Block until the send and the receive are complete; the received tensor."""
        for request in self._requests:
            request.wait()
        self._requests, self._send = [], None
        return self._recv


class RingExchange:
    """Send to the next rank of `group` while receiving from the previous one.

    Sends and receives are posted together through batch_isend_irecv: NCCL can
    deadlock when the two halves of a ring step are issued separately.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next_peer = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev_peer = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, send: torch.Tensor, tag: int = 0) -> PendingRecv:
        """Post send -> next and a receive of the same shape <- previous; returns at once.

        Distinct tags keep concurrent streams (K/V and their gradients) apart on gloo;
        NCCL matches in posting order, which every rank shares.
        """
        send = send.contiguous()
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next_peer, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev_peer, self.group, tag),
        ]
        return PendingRecv(dist.batch_isend_irecv(ops), send, recv)


# Newer torch renames the tensor collectives; older releases only have the *_tensor names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_stacked(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's x, stacked in group-rank order: [*S] -> [W, *S]."""
    # Flat buffers: backends disagree on which shapes of the stacked buffer they accept.
    out = torch.empty(dist.get_world_size(group) * x.numel(), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous().view(-1), group=group)
    return out.view(-1, *x.shape)


def reduce_scatter_stacked(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over ranks of x[my rank]: [W, *S] -> [*S]."""
    out = torch.empty(x[0].numel(), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x.contiguous().view(-1), group=group)
    return out.view(x.shape[1:])


def exchange_with_neighbors(to_prev, to_next, group: dist.ProcessGroup):
    """Along the chain of group ranks 0..W-1, send to_prev to rank-1 and to_next to rank+1.

    Returns (from_prev, from_next): what rank-1 sent to its next and rank+1 to its prev.
    All four tensors have one shape; the ends of the chain pass and get None.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    assert (to_prev is None) == (rank == 0) and (to_next is None) == (rank == world - 1)
    ops, from_prev, from_next = [], None, None
    if rank > 0:
        peer = dist.get_global_rank(group, rank - 1)
        from_prev = torch.empty_like(to_prev)
        ops += [dist.P2POp(dist.isend, to_prev.contiguous(), peer, group),
                dist.P2POp(dist.irecv, from_prev, peer, group)]
    if rank < world - 1:
        peer = dist.get_global_rank(group, rank + 1)
        from_next = torch.empty_like(to_next)
        ops += [dist.P2POp(dist.isend, to_next.contiguous(), peer, group),
                dist.P2POp(dist.irecv, from_next, peer, group)]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return from_prev, from_next

