"""What an engine process uses to reach the node's cache.

:class:`KVMeshClient` connects to the node daemon's socket (starting a daemon
when none answers and ``autostart_daemon`` is on, ``daemon_spawn.py``), maps the
shared L1 segment, and moves KV bytes through it directly: a store copies into a
reserved extent and commits it, a load pins extents, copies out and releases them.
Requests and replies are the typed messages of ``wire.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from kvmesh import wire
from kvmesh.client.faults import (
    ConfigMismatch,
    DaemonError,
    DaemonUnavailable,
    LeaseLost,
)
from kvmesh.client.spawn import connect, wait_for_lock_release
from kvmesh.config import KVMeshConfig, describe_mismatch
from kvmesh.entry import EntryMeta, dtype_name
from kvmesh.keys import ChunkKey
from kvmesh.socket_dir import UntrustedPath
from kvmesh.tensorbytes import copy_tensor
from kvmesh.tiers.shm import SharedSegment
from kvmesh.wire import (
    PROTOCOL_VERSION,
    ExtentRef,
    ProtocolError,
    receive_message,
    send_message,
)

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class WriteSlot:
    """A reserved, not yet visible L1 extent; fill ``tensor`` then commit."""

    key: ChunkKey
    offset: int
    tensor: torch.Tensor


@dataclass(frozen=True, slots=True)
class PartialCandidate:
    """A stored partial chunk that may continue the last full hit (the caller checks its tokens)."""

    digest: bytes
    tokens: int
    resident: bool  # in L1 now (else being promoted from disk or Redis)


@dataclass(frozen=True, slots=True)
class LookupResult:
    hits: int  # consecutive chunks found in any tier, from the first
    partials: list[PartialCandidate]  # partial chunks stored after the last hit
    below_l1: frozenset[int] = frozenset()  # indexes (< hits) of chunks not in L1 yet: promotion has started
    miss_gone: tuple[wire.GoneFrom, ...] = ()  # where the first chunk not found went (tier, what, ago), oldest first
    found_in: dict[int, str] = field(default_factory=dict)  # below_l1 index -> the tier that holds it
    unavailable: tuple[str, ...] = ()  # lower tiers not asked (circuit open) or that failed during the lookup

    def resident(self, index: int) -> bool:
        return index not in self.below_l1


@dataclass(frozen=True, slots=True)
class Lease:
    """Entries pinned for another process, one extent per pinned chunk, valid in daemon ``epoch``."""

    lease_id: str
    epoch: str
    extents: list[ExtentRef]


@dataclass(frozen=True, slots=True)
class ReadSlot:
    """A pinned L1 entry; ``tensor`` views shared memory until the slot is released."""

    key: ChunkKey
    offset: int
    nbytes: int
    meta: str
    tensor: torch.Tensor


# requests that may take long by design (a flush waits for writes; stats may flush): no deadline
# admin calls (stats also flushes; describe_entries reads lower tiers), never an engine's
UNBOUNDED_OPS = frozenset({"stats", "shutdown", "delete", "describe_entries"})


class KVMeshClient:
    """One connection to the node daemon.

    ``check_config`` (the default) makes the daemon's settings part of the contract: when the running
    daemon was started with other L1/tier/codec settings, the connection is refused with
    :class:`ConfigMismatch` naming each differing key.  Tools that only read (``kvmesh stats``) pass False.
    ``engine`` describes the engine (model, fingerprint) for the daemon's stats.
    """

    def __init__(self, config: KVMeshConfig | None = None, check_config: bool = True,
                 engine: dict[str, Any] | None = None) -> None:
        self.config = config or KVMeshConfig.load()
        self.check_config = check_config
        self.engine = engine or {}
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._closed = False
        self.epoch = ""
        try:
            self._open()
        except UntrustedPath:
            raise  # an unsafe socket directory or peer: refused, loudly, not a missing daemon
        except OSError:  # reached a daemon that was just stopping: start or find the next
            time.sleep(0.2)
            try:
                self._open()
            except (DaemonUnavailable, UntrustedPath):
                raise
            except OSError as err:
                raise DaemonUnavailable(f"cannot reach the kvmesh daemon on {self.config.socket_path()}: {err}") \
                    from err

    def _open(self, start: bool = True) -> None:
        """Connect (starting a daemon if allowed and ``start``) and map the segment it names."""
        self._sock = connect(self.config if start or not self.config.autostart_daemon
                             else dataclasses.replace(self.config, autostart_daemon=False))
        digest = self.config.daemon_digest() if self.check_config else None
        request = wire.Hello(PROTOCOL_VERSION, os.getpid(), self.engine, digest)
        message = self._exchange_raw(wire.encode_request(request), self.config.call_timeout_seconds)
        try:
            wire.check_version(message, f"the kvmesh daemon on {self.config.socket_path()}", "this client")
        except wire.VersionMismatch as err:
            self._sock.close()
            raise DaemonUnavailable(f"{err}; stop it (pid {err.pid}) so a current one starts") from None
        hello = self._reply(request, message)
        if self.check_config and hello.config_digest != digest:
            self._sock.close()
            differences = describe_mismatch(self.config.daemon_settings(), hello.config)
            raise ConfigMismatch(
                f"the kvmesh daemon for instance {self.config.instance!r} (pid {hello.pid}, "
                f"{self.config.socket_path()}) runs with other settings: {'; '.join(differences)}. "
                "Use the daemon's settings, stop it, or run a second daemon beside it under another name "
                "(set instance, e.g. --set instance=second): engines that name the same instance share one "
                "daemon and its settings.")
        self.daemon_pid: int = hello.pid
        if hello.epoch != self.epoch:
            self.segment = SharedSegment.open(hello.shm_name, hello.shm_size)
            self._buffer = self.segment.buffer
            self.epoch = hello.epoch

    # -------------------------------------------------------------- connection
    def _call(self, request: wire.Request[R]) -> R:
        """One request and its reply; after a lost connection, reconnect once and retry.

        Every request is safe to repeat on a new connection: the daemon gave back
        what the old connection held, so a retried commit or release finds nothing
        and does nothing (a store lost this way is a later miss, never an error).
        """
        message = wire.encode_request(request)
        deadline = None if request.op in UNBOUNDED_OPS else self.config.call_timeout_seconds
        with self._lock:
            if self._closed:
                raise RuntimeError("this KVMeshClient is closed")
            try:
                if self._sock is None:  # an earlier call gave up on the daemon
                    raise ConnectionError("no connection")
                reply = self._exchange_raw(message, deadline)
            except TimeoutError as err:  # stopped, swapping, stuck: the engine does not wait any longer
                self._abandon()
                raise DaemonUnavailable(f"the kvmesh daemon did not answer {request.op!r} within "
                                        f"{deadline}s (call_timeout_seconds)") from err
            except OSError as first:  # includes a connection the daemon closed (wire.ConnectionClosed)
                log.warning("lost the kvmesh daemon (%s); reconnecting", first)
                try:
                    self._abandon()
                    self._open(start=False)  # never start a daemon inside a call: callers are on a hot path
                    reply = self._exchange_raw(message, deadline)
                except OSError as err:
                    self._abandon()
                    raise DaemonUnavailable(f"lost the kvmesh daemon: {err}") from err
        return self._reply(request, reply)

    def _abandon(self) -> None:
        """Drop a connection whose stream can no longer be trusted (a reply may still be on its way)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _exchange_raw(self, message: dict[str, Any], deadline: float | None = None) -> dict[str, Any]:
        if self._sock is None:
            raise ConnectionError("no connection to the kvmesh daemon")
        self._sock.settimeout(deadline)
        send_message(self._sock, message)
        return receive_message(self._sock)

    @staticmethod
    def _reply(request: wire.Request[R], message: dict[str, Any]) -> R:
        """The typed reply, or :class:`DaemonError` for a refusal (a malformed one raises ProtocolError)."""
        reply = wire.decode_reply(message, request.reply, request.op)
        if isinstance(reply, wire.ErrorReply):
            raise DaemonError(f"the kvmesh daemon failed on {request.op!r}: {reply.error} "
                              "(its log has the traceback)")
        return reply

    def close(self) -> None:
        self._closed = True
        try:
            if self._sock is not None:
                self._sock.close()
        finally:
            self._buffer = None  # type: ignore[assignment]
            self.segment.close()

    def __enter__(self) -> KVMeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ lookups
    def lookup(self, keys: Sequence[ChunkKey]) -> int:
        """How many of the chunks, from the first, the node's cache holds."""
        return self.lookup_with_partials(keys, partials=False).hits

    def lookup_with_partials(self, keys: Sequence[ChunkKey], partials: bool = True,
                             count: bool = True, root: bytes = b"", prefetch: bool = True) -> LookupResult:
        """Consecutive hits, which of them are not in L1 yet, and the stored partial chunks that continue them.

        Chunks found only on disk or in Redis start moving into L1 at once; ``count`` False asks again
        without counting the lookup in the metrics (a request waiting for its promotion).  ``root``
        (``keys.namespace_root`` of the keys' namespace) finds partial chunks that follow no full hit.
        ``prefetch`` False (with ``count`` False): a probe that moves nothing between tiers.
        """
        if not keys:
            return LookupResult(0, [])
        reply = self._call(wire.Lookup([wire.ChunkRef(k.digest, k.num_tokens) for k in keys], partials, count,
                                       root, prefetch))
        found = [PartialCandidate(p.key, p.tokens, p.resident) for p in reply.partials]
        return LookupResult(reply.hits, found, frozenset(reply.below_l1),
                            tuple(reply.miss_gone),
                            {index: tier for index, tier in zip(reply.below_l1, reply.below_l1_tiers) if tier},
                            tuple(reply.unavailable))

    # ------------------------------------------------------------------- stores
    def reserve(self, keys: Sequence[ChunkKey], metas: Sequence[EntryMeta],
                parents: Sequence[bytes | None] | None = None,
                previous: Sequence[bytes | None] | None = None) -> list[WriteSlot | None]:
        """Reserve an extent per chunk; None where the chunk is already stored or there is no room.

        ``parents`` names, for partial chunks, the key of the chunk before them, so
        that a longer prompt continuing the same tokens can find them.  ``previous`` names, for every
        chunk, the chunk before it in its prompt (L1 evicts a prompt from its end).
        """
        parents = parents or [None] * len(keys)
        previous = previous or [None] * len(keys)
        items = [wire.ReserveItem(key.digest, meta.nbytes, meta.encode(), parent, key.num_tokens, key.start, before)
                 for key, meta, parent, before in zip(keys, metas, parents, previous, strict=True)]
        reply = self._call(wire.Reserve(items))
        return [WriteSlot(key, result.offset, meta.tensor_in(self._buffer, result.offset))
                if result.status == "ok" and result.offset is not None else None
                for key, meta, result in zip(keys, metas, reply.results, strict=True)]

    def commit(self, slots: Sequence[WriteSlot], cost: wire.StoreCost | None = None) -> None:
        """Make written slots visible; ``cost`` (what writing them took) goes into the daemon's metrics."""
        if slots:
            self._call(wire.Commit([s.key.digest for s in slots], cost))

    def abort(self, slots: Sequence[WriteSlot]) -> None:
        if slots:
            self._call(wire.Abort([s.key.digest for s in slots]))

    def put(self, keys: Sequence[ChunkKey], chunks: Sequence[torch.Tensor]) -> int:
        """Store whole tensors; returns how many were newly written.

        A key that continues the one before it (its ``start`` is that one's ``end``) is stored as the next
        chunk of the same prompt, as an engine stores a prompt.
        """
        metas = [EntryMeta(dtype_name(c.dtype), tuple(c.shape)) for c in chunks]
        previous = [None] + [before.digest if before.end == key.start else None
                             for before, key in zip(keys, keys[1:])]
        slots = self.reserve(keys, metas, previous=previous)
        written = []
        try:
            for slot, chunk in zip(slots, chunks, strict=True):
                if slot is not None:
                    copy_tensor(slot.tensor, chunk)
                    written.append(slot)
        except BaseException:
            self.abort([s for s in slots if s is not None])
            raise
        self.commit(written)
        return len(written)

    # -------------------------------------------------------------------- loads
    @contextmanager
    def acquire(self, keys: Sequence[ChunkKey]) -> Iterator[list[ReadSlot]]:
        """Pin the longest stored prefix of ``keys``; the slots' tensors are valid inside the block."""
        extents = self._call(wire.Acquire([k.digest for k in keys])).extents if keys else []
        slots = [ReadSlot(key, e.offset, e.nbytes, e.meta, EntryMeta.decode(e.meta).tensor_in(self._buffer, e.offset))
                 for key, e in zip(keys, extents)]
        try:
            yield slots
        finally:
            if slots:
                self._call(wire.Release([wire.PinRef(s.key.digest, s.offset, s.nbytes, s.meta) for s in slots]))

    def acquire_lease(self, keys: Sequence[ChunkKey]) -> Lease:
        """Pin the longest prefix of ``keys`` that is in L1 now, for another process to read.

        Never waits for a disk or Redis read: what is not in L1 is not pinned (the caller loads less).
        Release with :meth:`release_lease`.
        """
        reply = self._call(wire.Acquire([k.digest for k in keys], lease=True, promote=False))
        if reply.lease is None:
            raise ProtocolError("acquire reply.lease: missing for a lease request")
        return Lease(reply.lease, self.epoch, reply.extents)

    def release_lease(self, lease_id: str, cost: wire.LoadCost | None = None) -> bool:
        """Give a lease back; False when the daemon no longer knew it (expired, or a restarted daemon).

        A lease still known here was held for the whole time since it was acquired, so pages read under
        it were the pinned entries; after False they may have been overwritten.  ``cost`` (what the load
        under it took) goes into the daemon's metrics, with no round trip of its own.
        """
        return self._call(wire.ReleaseLease(lease_id, cost)).known

    def view(self, offset: int, meta: str, epoch: str) -> torch.Tensor:
        """A tensor over an extent that another process pinned (its lease names the daemon's epoch)."""
        if epoch != self.epoch:
            self._call(wire.Hello(PROTOCOL_VERSION, os.getpid()))  # reconnects and remaps if the daemon restarted
            if epoch != self.epoch:
                raise LeaseLost(f"the lease belongs to daemon epoch {epoch}, now {self.epoch} (it restarted)")
        return EntryMeta.decode(meta).tensor_in(self._buffer, offset)

    def report_error(self, kind: str) -> None:
        self._call(wire.ReportError(kind))

    def record_request(self, request_id: str, summary: dict[str, Any], first_chunk: bytes = b"",
                       identity: dict[str, str] | None = None, stored_first_chunk: bool = False) -> dict[str, Any]:
        """Keep a finished request's summary (``explain.Explanation``) in the daemon's recent list; the summary
        as kept (``wire.RecordRequest`` says what the daemon adds)."""
        return self._call(wire.RecordRequest(request_id, summary, first_chunk, identity or {},
                                             stored_first_chunk)).summary

    def describe_entries(self, keys: Sequence[bytes]) -> list[wire.EntryDescription | None]:
        """Where each entry is (tier, bytes, age, codec), None where no tier holds it; moves nothing."""
        return self._call(wire.DescribeEntries(list(keys))).entries if keys else []

    def recent_requests(self, request_id: str = "", limit: int = 20) -> list[dict[str, Any]]:
        """The daemon's last ``limit`` request summaries (only ``request_id``'s where given), newest last."""
        return self._call(wire.RecentRequests(request_id, limit)).requests

    def report_blend(self, tokens: int, passages: int, recomputed: int, seconds: float) -> None:
        """Count a blended request in the daemon's metrics, apart from exact loads."""
        self._call(wire.ReportBlend(tokens, passages, recomputed, seconds))

    def get(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor]:
        """Copies of the longest stored prefix of ``keys``."""
        with self.acquire(keys) as slots:
            return [slot.tensor.clone() for slot in slots]  # clone is a memcpy

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return self._call(wire.Delete([k.digest for k in keys])).deleted

    def pin(self, keys: Sequence[ChunkKey], seconds: float) -> wire.PinEntriesReply:
        """Keep these chunks in L1 for ``seconds`` (within the daemon's ``l1_pin_fraction`` of L1)."""
        return self._call(wire.PinEntries([k.digest for k in keys], seconds))

    def unpin(self, keys: Sequence[ChunkKey] = (), every: bool = False) -> int:
        """Let L1 evict these chunks again (``every``: all pinned ones); how many were pinned."""
        return self._call(wire.UnpinEntries([k.digest for k in keys], every)).unpinned

    def stats(self) -> dict[str, Any]:
        return self._call(wire.Stats()).tiers

    def info(self) -> dict[str, Any]:
        """Everything the daemon reports: tiers, metrics, leases, its settings and the engines it serves."""
        return wire.encode(self._call(wire.Stats()))

    def metrics(self) -> dict[str, float]:
        return self._call(wire.Stats()).metrics

    def flush(self) -> dict[str, Any]:
        """Wait for the daemon's write-behind queue to drain; returns tier stats."""
        return self._call(wire.Stats(flush=True)).tiers

    def shutdown_daemon(self, timeout: float = 30.0) -> None:
        """Stop the daemon and wait until it has let go of the instance (socket, segment, lock)."""
        self._call(wire.Shutdown())
        wait_for_lock_release(self.config, timeout)

    # ---------------------------------------------------------------- internals
