"""The node daemon: owns L1 in shared memory and answers control messages on a Unix socket.

One daemon per (user, instance) on a node.  Engines' scheduler and worker
processes connect, map the segment it names, and move KV bytes through it
directly; the daemon only keeps the books (what is where, who reads what).
Whatever a connection reserved or pinned is given back when it closes, so a
crashed engine leaks nothing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import socketserver
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmesh import __version__
from kvmesh.config import KVMeshConfig
from kvmesh.server.protocol import ProtocolError, receive_message, send_message
from kvmesh.server.shm import SharedSegment
from kvmesh.store import TieredStore
from kvmesh.tiers.memory import Extent, MemoryTier, ReserveStatus

log = logging.getLogger("kvmesh.daemon")


class DaemonAlreadyRunning(RuntimeError):
    """Another daemon holds this instance's lock."""


@dataclass
class _Session:
    """What one connection holds, to give back when it closes."""

    reserved: set[bytes] = field(default_factory=set)
    pinned: list[tuple[bytes, Extent]] = field(default_factory=list)


class NodeDaemon:
    def __init__(self, config: KVMeshConfig) -> None:
        self.config = config
        self.socket_path = config.socket_path()
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_file = open(self.socket_path.with_suffix(".lock"), "w")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise DaemonAlreadyRunning(f"a kvmesh daemon already serves {self.socket_path}") from None
        self.segment = SharedSegment.create(config.shm_name(), config.l1_size, prefault=config.l1_prefault)
        self.store = TieredStore(MemoryTier(config.l1_size, self.segment.buffer))
        self._store_lock = threading.Lock()
        self.socket_path.unlink(missing_ok=True)
        self._server = _Server(str(self.socket_path), _Handler)
        self._server.daemon = self
        os.chmod(self.socket_path, 0o600)

    def serve_forever(self) -> None:
        log.info("kvmesh daemon %s serving %s with L1 %d bytes (%s)", __version__, self.socket_path,
                 self.config.l1_size, self.segment.path)
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self.close()

    def shutdown(self) -> None:
        threading.Thread(target=self._server.shutdown, daemon=True).start()

    def close(self) -> None:
        self._server.server_close()
        self.socket_path.unlink(missing_ok=True)
        self.segment.unlink()
        self.segment.close()
        self._lock_file.close()

    # ----------------------------------------------------------------- requests
    def handle(self, request: dict[str, Any], session: _Session) -> dict[str, Any]:
        op = request.get("op")
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r}"}
        with self._store_lock:
            return {"ok": True, **handler(request, session)}

    def _op_hello(self, request: dict[str, Any], session: _Session) -> dict[str, Any]:
        return {"version": __version__, "pid": os.getpid(), "shm_name": self.segment.name,
                "shm_size": self.segment.size}

    def _op_lookup(self, request: dict[str, Any], session: _Session) -> dict[str, Any]:
        return {"hits": self.store.lookup([bytes.fromhex(k) for k in request["keys"]])}

    def _op_reserve(self, request: dict[str, Any], session: _Session) -> dict[str, Any]:
        results = []
        for key_hex, nbytes, meta in request["items"]:
            key = bytes.fromhex(key_hex)
            reservation = self.store.reserve(key, int(nbytes), meta)
            if reservation.status is ReserveStatus.OK:
                session.reserved.add(key)
                results.append(["ok", reservation.extent.offset])
            else:
                results.append([reservation.status.value, None])
        return {"results": results}

    def _op_commit(self, request: dict[str, Any], session: _Session) -> dict[str, Any]:
        for key_hex in request["keys"]:
            key = bytes.fromhex(key_hex)
            if key in session.reserved:
                session.reserved.discard(key)
                self.store.commit(key)
        return {}

    def _op_abort(self, request: dict[str, Any], session: _Session) -> dict[str, Any]:
        for key_hex in request["keys"]:
            key = bytes.fromhex(key_hex)
            if key in session.reserved:
                session.reserved.discard(key)
                self.store.abort(key)
        return {}

    def _op_acquire(self, request: dict[str, Any], session: _Session) -> dict[str, Any]:
        """Pin the longest available prefix of the keys."""
        extents = []
        for key_hex in request["keys"]:
            key = bytes.fromhex(key_hex)
            extent = self.store.acquire(key)
            if extent is None:
                break
            session.pinned.append((key, extent))
            extents.append([extent.offset, extent.nbytes, extent.meta])
        return {"extents": extents}

    def _op_release(self, request: dict[str, Any], session: _Session) -> dict[str, Any]:
        for key_hex, offset, nbytes, meta in request["items"]:
            pin = (bytes.fromhex(key_hex), Extent(int(offset), int(nbytes), meta))
            if pin in session.pinned:
                session.pinned.remove(pin)
                self.store.release(*pin)
        return {}

    def _op_delete(self, request: dict[str, Any], session: _Session) -> dict[str, Any]:
        return {"deleted": sum(self.store.delete(bytes.fromhex(k)) for k in request["keys"])}

    def _op_stats(self, request: dict[str, Any], session: _Session) -> dict[str, Any]:
        return {"tiers": {name: stats.to_dict() for name, stats in self.store.stats().items()}}

    def _op_shutdown(self, request: dict[str, Any], session: _Session) -> dict[str, Any]:
        self.shutdown()
        return {}

    def end_session(self, session: _Session) -> None:
        with self._store_lock:
            for key in session.reserved:
                self.store.abort(key)
            for key, extent in session.pinned:
                self.store.release(key, extent)
        session.reserved.clear()
        session.pinned.clear()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    daemon: NodeDaemon


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        daemon: NodeDaemon = self.server.daemon  # type: ignore[attr-defined]
        session = _Session()
        sock: socket.socket = self.request
        try:
            while True:
                try:
                    request = receive_message(sock)
                except (ProtocolError, OSError, ValueError):
                    return
                try:
                    reply = daemon.handle(request, session)
                except Exception as err:  # a bad request must not kill the daemon
                    log.exception("request %s failed", request.get("op"))
                    reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                send_message(sock, reply)
        finally:
            daemon.end_session(session)


def run_daemon(config: KVMeshConfig) -> None:
    """Run in the foreground until SIGTERM/SIGINT or a shutdown message."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    daemon = NodeDaemon(config)
    signal.signal(signal.SIGTERM, lambda *_: daemon.shutdown())
    signal.signal(signal.SIGINT, lambda *_: daemon.shutdown())
    daemon.serve_forever()


def socket_is_live(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()
