"""The faults the soak injects, one at a time, each into a real process or file: no fake, no monkeypatch.

Every fault returns when it is over (the process restarted, the delay removed, the ballast deleted), so the
soak knows each fault's window and can compare TTFT inside and outside it.  The kinds:

- ``daemon-kill``: SIGKILL of a node's daemon; over when the engine has started a new one.
- ``daemon-stop``: SIGSTOP of a node's daemon for ``stop_seconds``, then SIGCONT.
- ``redis-kill``: SIGKILL of the shared Redis; started again (empty) on its port after ``down_seconds``.
- ``engine-kill``: SIGKILL of one engine's process group (its daemon, detached, lives on), then a new engine.
  The soak stops routing to it and lets its requests finish first: requests a killed server was answering
  are lost by any server, they say nothing of the cache.
- ``disk-full``: a ballast file takes every free byte of the node's disk filesystem (a tmpfs the soak
  mounted, smaller than nothing else on the machine) for ``hold_seconds``.
- ``disk-corrupt``, ``redis-corrupt``: bytes flipped in, or the tail cut off, a few stored entries.
- ``redis-slow``: every reply of Redis held ``slow_delay`` seconds by the delaying proxy for ``hold_seconds``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis

from kvmesh.bench.delay_proxy import DelayProxy
from kvmesh.bench.redis_server import RedisServer
from kvmesh.bench.servers import EngineServer
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig

KINDS = ("daemon-kill", "daemon-stop", "redis-kill", "engine-kill", "disk-full", "disk-corrupt",
         "redis-corrupt", "redis-slow")


class SoakNode(Protocol):
    """What a fault needs of a node (the soak's ``Node``)."""

    name: str
    settings: dict[str, object]
    server: EngineServer
    disk_mount: Path | None

    def hold(self, reason: str) -> None: ...

    def release(self, reason: str) -> None: ...


@dataclass
class FaultRecord:
    kind: str
    node: str
    start: float  # seconds since the soak began
    end: float
    detail: str = ""


@dataclass
class FaultTimings:
    stop_seconds: float = 10.0
    down_seconds: float = 5.0
    hold_seconds: float = 10.0
    slow_delay: float = 0.3
    corrupt_entries: int = 4


@dataclass
class Faults:
    """Injects faults into the soak's processes and files; ``run(kind, node)`` returns its record."""

    redis: RedisServer
    proxy: DelayProxy
    redis_namespace: str
    rng: random.Random
    clock: Callable[[], float]
    timings: FaultTimings = field(default_factory=FaultTimings)

    def available(self, kind: str, nodes: list[SoakNode]) -> bool:
        if kind == "disk-full":
            return any(node.disk_mount is not None for node in nodes)
        return True

    def run(self, kind: str, node: SoakNode) -> FaultRecord:
        start = self.clock()
        detail = getattr(self, "_" + kind.replace("-", "_"))(node)
        return FaultRecord(kind, node.name, start, self.clock(), detail)

    # ------------------------------------------------------------------ processes
    def _daemon_kill(self, node: SoakNode) -> str:
        pid = daemon_pid(node.settings)
        if pid is None:
            return "no daemon was running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the engine starts a new one (in the background, on its next call)
            new_pid = daemon_pid(node.settings)
            if new_pid is not None and new_pid != pid:
                return f"pid {pid} killed, pid {new_pid} started by the engine"
            time.sleep(0.5)
        return f"pid {pid} killed, no new daemon within 90 s"

    def _daemon_stop(self, node: SoakNode) -> str:
        pid = daemon_pid(node.settings)
        if pid is None:
            return "no daemon was running"
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(self.timings.stop_seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"pid {pid} stopped {self.timings.stop_seconds:.0f} s"

    def _redis_kill(self, node: SoakNode) -> str:
        self.redis.kill()
        time.sleep(self.timings.down_seconds)
        self.redis.start()
        return f"killed, down {self.timings.down_seconds:.0f} s, started empty"

    def _engine_kill(self, node: SoakNode) -> str:
        node.hold("down")  # no new requests; the ones it is answering finish
        try:
            process = node.server.process
            if process is not None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                node.server.process = None
            started = time.monotonic()
            node.server.start()
            return f"killed, a new engine ready in {time.monotonic() - started:.0f} s"
        finally:
            node.release("down")

    def _redis_slow(self, node: SoakNode) -> str:
        self.proxy.delay = self.timings.slow_delay
        try:
            time.sleep(self.timings.hold_seconds)
        finally:
            self.proxy.delay = 0.0
        return f"replies held {self.timings.slow_delay * 1000:.0f} ms for {self.timings.hold_seconds:.0f} s"

    # ------------------------------------------------------------------ storage
    def _disk_full(self, node: SoakNode) -> str:
        if node.disk_mount is None:
            return "skipped: the node's disk is not a filesystem of its own"
        ballast = node.disk_mount / "ballast"
        stats = os.statvfs(node.disk_mount)
        free = stats.f_bavail * stats.f_frsize
        written = 0
        try:
            with open(ballast, "wb") as out:
                block = b"\0" * (1 << 20)
                while True:
                    try:
                        written += out.write(block)
                        out.flush()
                    except OSError:  # ENOSPC: the filesystem is full
                        break
            time.sleep(self.timings.hold_seconds)
        finally:
            ballast.unlink(missing_ok=True)
        return f"{written >> 20} MiB ballast ({free >> 20} MiB were free), held {self.timings.hold_seconds:.0f} s"

    def _disk_corrupt(self, node: SoakNode) -> str:
        root = Path(str(node.settings["disk_path"]))
        files = sorted(root.rglob("*.kv"))
        chosen = self.rng.sample(files, min(self.timings.corrupt_entries, len(files)))
        done = []
        for path in chosen:
            try:
                data = path.read_bytes()
            except OSError:
                continue  # evicted meanwhile
            changed = self._damage(data)
            try:
                path.write_bytes(changed)
            except OSError:
                continue
            done.append(path.name[:8])
        return f"{len(done)} of {len(files)} entries damaged"

    def _redis_corrupt(self, node: SoakNode) -> str:
        try:
            client = self.redis.client()
            keys = [k for k in client.scan_iter(match=f"{self.redis_namespace}:*", count=1000)
                    if b":p:" not in k]
            chosen = self.rng.sample(keys, min(self.timings.corrupt_entries, len(keys)))
            for key in chosen:
                data = client.get(key)
                if data:
                    client.set(key, self._damage(data), keepttl=True)
            return f"{len(chosen)} of {len(keys)} values damaged"
        except redis.RedisError as err:  # Redis may be restarting
            return f"skipped: {err}"

    def _damage(self, data: bytes) -> bytes:
        """Flip a few bytes or cut off the tail: what a bad sector, a torn write or a bad actor leaves."""
        if len(data) < 2:
            return b""
        if self.rng.random() < 0.5:
            return data[:self.rng.randrange(1, len(data))]
        changed = bytearray(data)
        for _ in range(3):
            changed[self.rng.randrange(len(changed))] ^= 0xFF
        return bytes(changed)


def daemon_pid(settings: dict[str, object]) -> int | None:
    """The pid of the node's daemon, or None where none answers (never starts one)."""
    config = KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})
    try:
        with KVMeshClient(config, check_config=False) as client:
            return client.daemon_pid
    except (ConnectionError, TimeoutError):
        return None
