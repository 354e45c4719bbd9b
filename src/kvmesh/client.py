"""What an engine process uses to reach the node's cache.

:class:`KVMeshClient` connects to the node daemon's socket (starting a daemon
when none answers and ``autostart_daemon`` is on), maps the shared L1 segment,
and moves KV bytes through it directly: a store copies into a reserved extent
and commits it, a load pins extents, copies out and releases them.
"""

from __future__ import annotations

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
from typing import Any

import torch

from kvmesh.tensorbytes import copy_tensor, tensor_bytes
from kvmesh.config import KVMeshConfig
from kvmesh.keys import ChunkKey
from kvmesh.layout import DTYPES, dtype_name
from kvmesh.server.protocol import ProtocolError, receive_message, send_message
from kvmesh.server.shm import SharedSegment
from kvmesh.store import TensorMeta

log = logging.getLogger(__name__)


class DaemonUnavailable(ConnectionError):
    """No node daemon answers, and none could be started."""


class DaemonError(RuntimeError):
    """The daemon refused a request."""


@dataclass(frozen=True, slots=True)
class WriteSlot:
    """A reserved, not yet visible L1 extent; fill ``tensor`` then commit."""

    key: ChunkKey
    offset: int
    tensor: torch.Tensor


@dataclass(frozen=True, slots=True)
class ReadSlot:
    """A pinned L1 entry; ``tensor`` views shared memory until the slot is released."""

    key: ChunkKey
    offset: int
    nbytes: int
    meta: str
    tensor: torch.Tensor


class KVMeshClient:
    def __init__(self, config: KVMeshConfig | None = None) -> None:
        self.config = config or KVMeshConfig.load()
        self._lock = threading.Lock()
        self._sock = self._connect()
        hello = self._call({"op": "hello"})
        self.daemon_pid: int = hello["pid"]
        self.segment = SharedSegment.open(hello["shm_name"], hello["shm_size"])
        self._buffer = self.segment.buffer

    # -------------------------------------------------------------- connection
    def _connect(self) -> socket.socket:
        path = self.config.socket_path()
        sock = _try_connect(str(path))
        if sock is not None:
            return sock
        if not self.config.autostart_daemon:
            raise DaemonUnavailable(
                f"no kvmesh daemon answers on {path}; start one with `kvmesh server` "
                "or set autostart_daemon: true")
        self._spawn_daemon()
        deadline = time.monotonic() + self.config.daemon_start_timeout
        while time.monotonic() < deadline:
            sock = _try_connect(str(path))
            if sock is not None:
                return sock
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
            subprocess.Popen(
                [sys.executable, "-m", "kvmesh.server", "--config-json", json.dumps(self.config.to_dict())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            try:
                send_message(self._sock, message)
                reply = receive_message(self._sock)
            except (OSError, ProtocolError) as err:
                raise DaemonUnavailable(f"lost the kvmesh daemon: {err}") from err
        if not reply.get("ok"):
            raise DaemonError(reply.get("error", "unknown error"))
        return reply

    def close(self) -> None:
        try:
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
        if not keys:
            return 0
        return self._call({"op": "lookup", "keys": [k.hex for k in keys]})["hits"]

    # ------------------------------------------------------------------- stores
    def reserve(self, keys: Sequence[ChunkKey], metas: Sequence[TensorMeta]) -> list[WriteSlot | None]:
        """Reserve an extent per chunk; None where the chunk is already stored or there is no room."""
        reply = self._call({"op": "reserve",
                            "items": [[k.hex, m.nbytes, m.encode()] for k, m in zip(keys, metas, strict=True)]})
        slots: list[WriteSlot | None] = []
        for key, meta, (status, offset) in zip(keys, metas, reply["results"], strict=True):
            slots.append(None if status != "ok" else WriteSlot(key, offset, self._view(offset, meta)))
        return slots

    def commit(self, slots: Sequence[WriteSlot]) -> None:
        if slots:
            self._call({"op": "commit", "keys": [s.key.hex for s in slots]})

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

    def get(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor]:
        """Copies of the longest stored prefix of ``keys``."""
        with self.acquire(keys) as slots:
            return [slot.tensor.clone() for slot in slots]  # clone is a memcpy

    def get_bytes(self, key: ChunkKey) -> bytes | None:
        with self.acquire([key]) as slots:
            return bytes(tensor_bytes(slots[0].tensor)) if slots else None

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return self._call({"op": "delete", "keys": [k.hex for k in keys]})["deleted"]

    def stats(self) -> dict[str, Any]:
        return self._call({"op": "stats"})["tiers"]

    def shutdown_daemon(self) -> None:
        self._call({"op": "shutdown"})

    # ---------------------------------------------------------------- internals
    def _view(self, offset: int, meta: TensorMeta) -> torch.Tensor:
        raw = torch.frombuffer(self._buffer, dtype=torch.uint8, count=meta.nbytes, offset=offset)
        return raw.view(DTYPES[meta.dtype]).view(meta.shape)


def _try_connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return sock
    except OSError:
        sock.close()
        return None
