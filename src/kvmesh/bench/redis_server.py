"""A real ``redis-server`` on a free loopback port, for tests and benchmarks (no fakes, no persistence).

``redis-server`` comes from Debian through ``scripts/ensure_redis.sh``, run once if it is not on PATH.
A server can be stopped and started again on the same port (a Redis restart), or killed outright.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from kvmesh.bench.servers import free_port

ENSURE_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "ensure_redis.sh"


def ensure_redis_binaries() -> None:
    """Install redis-server and redis-cli with the project's script if they are missing."""
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return
    if not ENSURE_SCRIPT.exists():
        raise RuntimeError("redis-server is not on PATH (install it: apt-get install redis-server)")
    done = subprocess.run(["bash", str(ENSURE_SCRIPT)], capture_output=True, text=True)
    if done.returncode != 0 or not shutil.which("redis-server"):
        raise RuntimeError(f"redis-server is not on PATH and {ENSURE_SCRIPT} could not install it:\n"
                           f"{done.stdout}{done.stderr}")


@dataclass
class RedisServer:
    """One ``redis-server`` on 127.0.0.1:``port``; stop and start it again on the same port."""

    directory: Path
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / f"redis-{self.port}.log"

    def start(self, timeout: float = 10.0) -> RedisServer:
        ensure_redis_binaries()
        self.directory.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
                   "--bind", "127.0.0.1", "--dir", str(self.directory), *self.extra_args]
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                            cwd=self.directory)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: {self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start in {timeout} s") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash: everything it held is gone."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **options)
