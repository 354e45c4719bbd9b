"""What an engine process uses to reach the node's cache.

:class:`KVMeshClient` connects to the node daemon's socket (starting a daemon
when none answers and ``autostart_daemon`` is on), maps the shared L1 segment,
and moves KV bytes through it directly: a store copies into a reserved extent
and commits it, a load pins extents, copies out and releases them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvmesh.tensorbytes import copy_tensor
from kvmesh.config import KVMeshConfig, describe_mismatch
from kvmesh.keys import ChunkKey
from kvmesh.entry import DTYPES, dtype_name
from kvmesh.wire import PROTOCOL_VERSION, ProtocolError, receive_message, send_message
from kvmesh.shm import SharedSegment
from kvmesh.entry import EntryMeta as TensorMeta  # the name this module uses for an entry's description

log = logging.getLogger(__name__)

# how long a spawned daemon may take to import and take its instance's lock before we call it failed
# (imports alone took over 5 s on a loaded 2-core machine)
DAEMON_LOCK_GRACE = 30.0


class CacheFault(Exception):
    """A fault of the cache, not of its caller: the engine treats it as a miss or a reported load failure.

    Everything else a client call raises (a refused request, a bug on either side) is not a cache fault
    and must not be turned into a miss.
    """


class DaemonUnavailable(CacheFault, ConnectionError):
    """No node daemon answers, and none could be started (or the connection to it was lost)."""


class LeaseLost(CacheFault):
    """A lease expired, or belongs to a daemon that has restarted since: its pages may no longer be read."""


class DaemonError(RuntimeError):
    """The daemon refused a request or failed on it: a bug or a version skew, never a cache miss."""


class ConfigMismatch(DaemonError):
    """The running daemon was started with other settings than this client asks for."""


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

    def resident(self, index: int) -> bool:
        return index not in self.below_l1


@dataclass(frozen=True, slots=True)
class Lease:
    """Entries pinned for another process: (offset, nbytes, meta) each, valid in daemon ``epoch``."""

    lease_id: str
    epoch: str
    extents: list[tuple[int, int, str]]


@dataclass(frozen=True, slots=True)
class ReadSlot:
    """A pinned L1 entry; ``tensor`` views shared memory until the slot is released."""

    key: ChunkKey
    offset: int
    nbytes: int
    meta: str
    tensor: torch.Tensor


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
        self.epoch = ""
        try:
            self._open()
        except (OSError, ProtocolError):  # reached a daemon that was just stopping: start or find the next
            time.sleep(0.2)
            try:
                self._open()
            except DaemonUnavailable:
                raise
            except (OSError, ProtocolError) as err:
                raise DaemonUnavailable(f"cannot reach the kvmesh daemon on {self.config.socket_path()}: {err}") \
                    from err

    def _open(self) -> None:
        """Connect (starting a daemon if allowed) and map the segment it names."""
        self._sock = self._connect()
        message: dict[str, Any] = {"op": "hello", "pid": os.getpid(), "engine": self.engine}
        if self.check_config:
            message["config_digest"] = self.config.daemon_digest()
        send_message(self._sock, message)
        hello = receive_message(self._sock)
        if hello.get("protocol") != PROTOCOL_VERSION:
            self._sock.close()
            raise DaemonUnavailable(
                f"the kvmesh daemon on {self.config.socket_path()} speaks protocol {hello.get('protocol')}, "
                f"this client {PROTOCOL_VERSION}; stop it (pid {hello.get('pid')}) so a current one starts")
        if self.check_config and hello.get("config_digest") != message["config_digest"]:
            self._sock.close()
            differences = describe_mismatch(self.config.daemon_settings(), hello.get("config", {}))
            raise ConfigMismatch(
                f"the kvmesh daemon for instance {self.config.instance!r} (pid {hello.get('pid')}, "
                f"{self.config.socket_path()}) runs with other settings: {'; '.join(differences)}. "
                "Use the daemon's settings, stop it, or run a second daemon beside it under another name "
                "(set instance, e.g. --set instance=second): engines that name the same instance share one "
                "daemon and its settings.")
        self.daemon_pid: int = hello["pid"]
        if hello["epoch"] != self.epoch:
            self.segment = SharedSegment.open(hello["shm_name"], hello["shm_size"])
            self._buffer = self.segment.buffer
            self.epoch = hello["epoch"]

    # -------------------------------------------------------------- connection
    def _connect(self) -> socket.socket:
        path = self.config.socket_path()
        sock = _try_connect(str(path))
        if sock is not None:
            return sock
        if not self.config.autostart_daemon:
            raise DaemonUnavailable(
                f"no kvmesh daemon answers on {path}; start one with `kvmesh daemon` "
                "or set autostart_daemon: true")
        try:
            self._spawn_daemon()
        except (OSError, subprocess.SubprocessError) as err:  # no socket directory, no process: no daemon
            raise DaemonUnavailable(f"cannot start a kvmesh daemon for {path}: {err}") from err
        started = time.monotonic()
        while time.monotonic() < started + self.config.daemon_start_timeout:
            sock = _try_connect(str(path))
            if sock is not None:
                return sock
            if time.monotonic() > started + DAEMON_LOCK_GRACE and not _daemon_holds_lock(path.with_suffix(".lock")):
                raise DaemonUnavailable(f"the kvmesh daemon failed to start; last lines of "
                                        f"{self._daemon_log_path()}:\n{_tail(self._daemon_log_path())}")
            time.sleep(0.05)
        raise DaemonUnavailable(
            f"started a kvmesh daemon but it did not answer on {path} within "
            f"{self.config.daemon_start_timeout}s; see {self._daemon_log_path()}")

    def _daemon_log_path(self) -> str:
        return str(self.config.socket_path().with_suffix(".log"))

    def _spawn_daemon(self) -> None:
        path = self.config.socket_path()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        log.info("starting kvmesh daemon for instance %s", self.config.instance)
        with open(self._daemon_log_path(), "ab") as out:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "kvmesh.daemon", "--detach",
                 "--config-json", json.dumps(self.config.to_dict())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        launcher.wait(timeout=30)  # returns as soon as the daemon has forked away

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request and its reply; after a lost connection, reconnect once and retry.

        Every request is safe to repeat on a new connection: the daemon gave back
        what the old connection held, so a retried commit or release finds nothing
        and does nothing (a store lost this way is a later miss, never an error).
        """
        with self._lock:
            try:
                reply = self._exchange(message)
            except (OSError, ProtocolError) as first:
                log.warning("lost the kvmesh daemon (%s); reconnecting", first)
                try:
                    self._sock.close()
                    self._open()
                    reply = self._exchange(message)
                except (OSError, ProtocolError) as err:
                    raise DaemonUnavailable(f"lost the kvmesh daemon: {err}") from err
        if not reply.get("ok"):
            raise DaemonError(f"the kvmesh daemon failed on {message.get('op')!r}: "
                              f"{reply.get('error', 'unknown error')} (its log has the traceback)")
        return reply

    def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        send_message(self._sock, message)
        return receive_message(self._sock)

    def close(self) -> None:
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
                             count: bool = True) -> LookupResult:
        """Consecutive hits, which of them are not in L1 yet, and the stored partial chunks that continue them.

        Chunks found only on disk or in Redis start moving into L1 at once; ``count`` False asks again
        without counting the lookup in the metrics (a request waiting for its promotion).
        """
        if not keys:
            return LookupResult(0, [])
        reply = self._call({"op": "lookup", "keys": [k.hex for k in keys], "partials": partials,
                            "tokens": [k.num_tokens for k in keys], "count": count})
        found = [PartialCandidate(bytes.fromhex(key), int(tokens), bool(resident))
                 for key, tokens, resident in reply["partials"]]
        return LookupResult(reply["hits"], found, frozenset(reply["below_l1"]))

    # ------------------------------------------------------------------- stores
    def reserve(self, keys: Sequence[ChunkKey], metas: Sequence[TensorMeta],
                parents: Sequence[bytes | None] | None = None) -> list[WriteSlot | None]:
        """Reserve an extent per chunk; None where the chunk is already stored or there is no room.

        ``parents`` names, for partial chunks, the key of the chunk before them, so
        that a longer prompt continuing the same tokens can find them.
        """
        parents = parents or [None] * len(keys)
        items = []
        for key, meta, parent in zip(keys, metas, parents, strict=True):
            item: list[Any] = [key.hex, meta.nbytes, meta.encode()]
            if parent is not None:
                item += [parent.hex(), key.num_tokens]
            items.append(item)
        reply = self._call({"op": "reserve", "items": items})
        slots: list[WriteSlot | None] = []
        for key, meta, (status, offset) in zip(keys, metas, reply["results"], strict=True):
            slots.append(None if status != "ok" else WriteSlot(key, offset, self._view(offset, meta)))
        return slots

    def commit(self, slots: Sequence[WriteSlot], seconds: float | None = None, tokens: int = 0) -> None:
        """Make written slots visible; ``seconds`` (the copy time) feeds the store-latency metric."""
        if slots:
            message: dict[str, Any] = {"op": "commit", "keys": [s.key.hex for s in slots]}
            if seconds is not None:
                message.update(seconds=seconds, tokens=tokens,
                               bytes=sum(s.tensor.numel() * s.tensor.element_size() for s in slots))
            self._call(message)

    def abort(self, slots: Sequence[WriteSlot]) -> None:
        if slots:
            self._call({"op": "abort", "keys": [s.key.hex for s in slots]})

    def put(self, keys: Sequence[ChunkKey], chunks: Sequence[torch.Tensor]) -> int:
        """Store whole tensors; returns how many were newly written."""
        metas = [TensorMeta(dtype_name(c.dtype), tuple(c.shape)) for c in chunks]
        slots = self.reserve(keys, metas)
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
        reply = self._call({"op": "acquire", "keys": [k.hex for k in keys]}) if keys else {"extents": []}
        slots = [ReadSlot(key, offset, nbytes, meta, self._view(offset, TensorMeta.decode(meta)))
                 for key, (offset, nbytes, meta) in zip(keys, reply["extents"])]
        try:
            yield slots
        finally:
            if slots:
                self._call({"op": "release",
                            "items": [[s.key.hex, s.offset, s.nbytes, s.meta] for s in slots]})

    def acquire_lease(self, keys: Sequence[ChunkKey]) -> Lease:
        """Pin the longest prefix of ``keys`` that is in L1 now, for another process to read.

        Never waits for a disk or Redis read: what is not in L1 is not pinned (the caller loads less).
        Release with :meth:`release_lease`.
        """
        reply = self._call({"op": "acquire", "keys": [k.hex for k in keys], "lease": True, "promote": False})
        return Lease(reply["lease"], self.epoch, [tuple(e) for e in reply["extents"]])

    def release_lease(self, lease_id: str, seconds: float | None = None, nbytes: int = 0, tokens: int = 0,
                      verified: int = 0, mismatches: int = 0) -> bool:
        """Give a lease back; False when the daemon no longer knew it (expired, or a restarted daemon).

        A lease still known here was held for the whole time since it was acquired, so pages read under
        it were the pinned entries; after False they may have been overwritten.
        """
        message: dict[str, Any] = {"op": "release_lease", "lease": lease_id, "verified": verified,
                                   "mismatches": mismatches}
        if seconds is not None:
            message.update(seconds=seconds, bytes=nbytes, tokens=tokens)
        return self._call(message)["known"]

    def view(self, offset: int, meta: str, epoch: str) -> torch.Tensor:
        """A tensor over an extent that another process pinned (its lease names the daemon's epoch)."""
        if epoch != self.epoch:
            self._call({"op": "hello"})  # reconnects and remaps if the daemon restarted
            if epoch != self.epoch:
                raise LeaseLost(f"the lease belongs to daemon epoch {epoch}, now {self.epoch} (it restarted)")
        return self._view(offset, TensorMeta.decode(meta))

    def report_error(self, kind: str) -> None:
        self._call({"op": "report_error", "kind": kind})

    def get(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor]:
        """Copies of the longest stored prefix of ``keys``."""
        with self.acquire(keys) as slots:
            return [slot.tensor.clone() for slot in slots]  # clone is a memcpy

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return self._call({"op": "delete", "keys": [k.hex for k in keys]})["deleted"]

    def stats(self) -> dict[str, Any]:
        return self._call({"op": "stats"})["tiers"]

    def info(self) -> dict[str, Any]:
        """Everything the daemon reports: tiers, metrics, leases, its settings and the engines it serves."""
        return self._call({"op": "stats"})

    def metrics(self) -> dict[str, float]:
        return self._call({"op": "stats"})["metrics"]

    def flush(self) -> dict[str, Any]:
        """Wait for the daemon's write-behind queue to drain; returns tier stats."""
        return self._call({"op": "stats", "flush": True})["tiers"]

    def shutdown_daemon(self, timeout: float = 30.0) -> None:
        """Stop the daemon and wait until it has let go of the instance (socket, segment, lock)."""
        self._call({"op": "shutdown"})
        lock = self.config.socket_path().with_suffix(".lock")
        deadline = time.monotonic() + timeout
        while _daemon_holds_lock(lock) and time.monotonic() < deadline:
            time.sleep(0.02)

    # ---------------------------------------------------------------- internals
    def _view(self, offset: int, meta: TensorMeta) -> torch.Tensor:
        raw = torch.frombuffer(self._buffer, dtype=torch.uint8, count=meta.nbytes, offset=offset)
        return raw.view(DTYPES[meta.dtype]).view(meta.shape)


def _daemon_holds_lock(lock_path: Path) -> bool:
    """True while some process (a starting or running daemon) holds the instance's lock."""
    try:
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def socket_is_live(path: Path) -> bool:
    """True when a daemon answers on ``path``."""
    sock = _try_connect(str(path))
    if sock is None:
        return False
    sock.close()
    return True


def _try_connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return sock
    except OSError:
        sock.close()
        return None
