"""Page copies for an engine whose KV lives on a CUDA device: DMA between its blocks and L1's shared memory.

The worker registers the daemon's L1 segment as pinned memory in the engine's process (``cudaHostRegister``),
so a copy goes straight between the engine's pages and the L1 extent, with no host buffer between them.
Copies run on a side stream, after the work already queued on the engine's stream (a save reads what the
forward pass wrote), and the engine's stream waits for them (a load is read by the next forward pass); the
host waits for their event before it hands the L1 extents back: a load before its lease is released (the
step needs the pages anyway), a save before its commit, which the worker makes at a later call once the
event has completed, so the engine's next step never waits for a save.  A background load (vLLM's
``load_async``) is not waited for by the engine's stream or the host: its request runs only after the
worker has seen its event complete.  The copies
themselves are ``page_copy.move_pages_device``, which the tests run on CPU tensors.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kvmesh.page_copy import PageJob, move_pages_device

log = logging.getLogger("kvmesh.vllm")


class DeviceCopier:
    """Moves pages between one CUDA device's KV tensors and host memory, synchronously for the caller."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"kvmesh copies KV on CUDA devices and the CPU, not on {device}")
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._segment: Any = None  # the mapping registered last (compared by identity: no work per copy)
        self._pinned: tuple[int, int] | None = None  # (address, size) of the registered segment
        self.copies = 0

    def pin(self, segment: Any) -> None:
        """Register ``segment``'s mapping (L1's, in this process) as pinned memory, once per mapping: the worker
        calls this before every copy, and a daemon restart maps a new segment.

        A failed registration is logged and the copies still run, staged by the driver (slower, as correct).
        """
        if segment is self._segment:
            return
        view = torch.frombuffer(segment.buffer, dtype=torch.uint8)
        region = (view.data_ptr(), view.numel())
        cudart = torch.cuda.cudart()
        if self._pinned is not None:
            cudart.cudaHostUnregister(self._pinned[0])  # an older mapping (the daemon restarted): its result is moot
        status = cudart.cudaHostRegister(region[0], region[1], 0)
        if int(status) != 0:
            log.warning("kvmesh: could not pin L1's shared memory for DMA (cudaHostRegister: %s); copies stay "
                        "correct but are staged by the driver", status)
        self._segment, self._pinned = segment, region

    def move(self, jobs: list[PageJob], layers: list[torch.Tensor], into_engine: bool,
             wait: bool = True, engine_waits: bool = True) -> torch.cuda.Event:
        """Queue the copies; with ``wait``, return once they are done, else return their event (a save: its
        commit waits for the event, the engine does not).

        Without ``engine_waits`` the engine's stream does not wait for them either: a background load, whose
        request is not in any step until the worker has seen the event complete.
        """
        engine_stream = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(engine_stream)  # saves read what the forward pass queued before them
        with torch.cuda.stream(self.stream):
            self.copies += move_pages_device(jobs, layers, into_engine)
            done = torch.cuda.Event()
            done.record(self.stream)
        # the engine's next work waits for the copies: a load's pages are read, a save's source blocks may be
        # handed to another request and overwritten
        if engine_waits:
            engine_stream.wait_event(done)
        if wait:
            done.synchronize()  # the host memory goes back to the daemon only after the copy
        return done
