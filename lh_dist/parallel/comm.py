"""Point-to-point ring transfers within a process group."""

import torch
import torch.distributed as dist


class PendingRecv:
    """A transfer in flight; wait() returns the received tensor."""

    def __init__(self, requests, send: torch.Tensor, recv: torch.Tensor):
        self._requests = requests
        self._send = send  # held so the buffer outlives the asynchronous send
        self._recv = recv

    def wait(self) -> torch.Tensor:
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
