"""Activation offloading: what activation checkpointing keeps of each block, the block's input
[B, N, E], waits in pinned host memory between a block's forward and its backward.

Mechanism: `torch.autograd.graph.saved_tensors_hooks` entered around each block call, outside
the checkpoint and outside torch.compile. Both save the block's input through autograd at the
block boundary (non-reentrant checkpoint saves the inputs it will recompute from; a compiled
block's autograd function saves its graph inputs), so the hooks see that tensor in eager and
compiled runs alike, while everything inside the block stays under the checkpoint's own hooks.
The pack hook offloads only that tensor: the RoPE tables (shared by every block), the weights
and, for `selective`, the attention outputs the checkpoint keeps stay where they are.

Why not `torch.autograd.graph.save_on_cpu(pin_memory=True)`: its copies run on the compute stream,
in line with the kernels, so the GPU computes nothing while a block's input crosses PCIe; it brings
a tensor back only when backward asks for it, so backward waits again; and it moves every saved
tensor, the weights included. Here, on a GPU:
  - the device->host copy runs on a side stream, started as soon as the input is saved, once
    the compute stream has produced it (an event recorded when the block was entered);
  - the device tensor stays referenced until the compute stream has waited for the copy's
    event, one block later, so the allocator cannot hand its memory out before the copy ends;
  - the host buffer is read only by host->device copies on the same side stream, after the
    device->host copy in stream order;
  - when backward unpacks a block's input, the side stream already starts bringing back the
    input of the block whose backward comes next (the previous block), into memory allocated on
    the compute stream, and the compute stream waits for that copy's event only when it needs it.
The last offloaded block's input is kept on the device as well (its host copy goes unread): its backward
comes first.
On the CPU the pack hook makes a plain copy (nothing to gain, but the path is the same).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor


class _Offloaded:
    """One block input while it is off the device: the host copy and the events around it."""

    def __init__(self, index: int, device: torch.device, host: Tensor):
        self.index, self.device, self.host = index, device, host
        self.on_device: Tensor | None = None  # the original, until the copy is known to be done
        self.copied: torch.cuda.Event | None = None  # device->host copy done (side stream)
        self.fetched: Tensor | None = None  # a prefetched device copy, not yet handed to backward
        self.loaded: torch.cuda.Event | None = None  # host->device copy of `fetched` done


def _key(t: Tensor) -> tuple:
    # Identifies the block's input among the saved tensors of its call without holding it.
    return t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


class ActivationOffload:
    """Moves each wrapped block's saved input to host memory and back (see the module docstring).

    One instance serves all blocks of a model: backward's prefetch follows the order in which
    the blocks saved their inputs. `host_bytes` and `peak_host_bytes` count the host copies alive.
    """

    def __init__(self):
        self.host_bytes = 0
        self.peak_host_bytes = 0
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        # This forward's offloaded inputs in the order the blocks saved them; weak, so that a
        # host copy is freed when autograd releases the saved tensor.
        self._saved: list[weakref.ref[_Offloaded]] = []

    def wrap(self, block_call):
        """`block_call(x, *args)` with its saved input x [B, N, E] offloaded while grad is enabled."""

        def offloaded_call(x: Tensor, *args):
            if not torch.is_grad_enabled():
                return block_call(x, *args)
            key, packed = _key(x), None
            ready = None
            if x.is_cuda:
                ready = torch.cuda.Event()
                ready.record()  # x is complete on the compute stream here

            def pack(t: Tensor):
                nonlocal packed
                if _key(t) != key:
                    return t
                if packed is None:
                    packed = self._offload(t, ready)
                return packed

            with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
                out = block_call(x, *args)
            # The inputs of earlier blocks: their copies ran beside this block's compute.
            self._release(keep=packed)
            return out

        return offloaded_call

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _offload(self, t: Tensor, ready: torch.cuda.Event | None) -> _Offloaded:
        """Start copying t to a new host buffer; returns its record (what the pack hook returns)."""
        if self._saved and all(ref() is None for ref in self._saved):
            self._saved = []  # every earlier input was released: a new forward
        with torch.no_grad():
            # The same strides: a compiled block's backward expects its saved input laid out as traced.
            host = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=t.is_cuda)
            record = _Offloaded(len(self._saved), t.device, host)
            if t.is_cuda:
                stream = self._side_stream(t.device)
                stream.wait_event(ready)
                with torch.cuda.stream(stream):
                    host.copy_(t, non_blocking=True)
                    record.copied = stream.record_event()
                record.on_device = t
            else:
                host.copy_(t)
        nbytes = host.numel() * host.element_size()
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        weakref.finalize(record, self._freed, nbytes)
        self._saved.append(weakref.ref(record))
        return record

    def _freed(self, nbytes: int) -> None:
        self.host_bytes -= nbytes

    def _release(self, keep: _Offloaded | None) -> None:
        """Drop the device originals of finished copies, but `keep`'s (its copy may still run)."""
        for ref in self._saved:
            record = ref()
            if record is not None and record is not keep and record.on_device is not None:
                # Later work on the compute stream, and so any reuse of this memory, waits for the copy.
                torch.cuda.current_stream(record.device).wait_event(record.copied)
                record.on_device = None

    def _fetch(self, record: _Offloaded) -> None:
        """Start bringing `record` back to its device on the side stream."""
        if record.on_device is not None or record.fetched is not None or record.device.type != "cuda":
            return
        compute = torch.cuda.current_stream(record.device)
        # Allocated on the compute stream, which frees it after use: the side stream must not
        # write into it before the compute stream is done with the memory's previous tenant.
        host = record.host
        fetched = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=record.device)
        stream = self._side_stream(record.device)
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            fetched.copy_(host, non_blocking=True)
            record.loaded = stream.record_event()
        # Should backward never ask for it, its memory is not reused before the copy ends.
        fetched.record_stream(stream)
        record.fetched = fetched

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        record = packed
        if record.device.type != "cuda":
            return record.host
        if record.on_device is not None:  # still held: the last block's input
            x = record.on_device
            torch.cuda.current_stream(record.device).wait_event(record.copied)
            record.on_device = None
        else:
            self._fetch(record)
            torch.cuda.current_stream(record.device).wait_event(record.loaded)
            x, record.fetched = record.fetched, None
        # The next backward is the previous block's: bring its input back during this one.
        if 0 < record.index <= len(self._saved):
            previous = self._saved[record.index - 1]()
            if previous is not None:
                self._fetch(previous)
        return x
