"""Real ``redis-server`` processes for the Redis tier's tests: single servers and a 3-master cluster.

The tier is tested against the real server (no fakes), each server on a free
loopback port in a temporary directory, without persistence.  The fixtures
that start them are in ``conftest.py``.  ``redis-server``/``redis-cli`` come
from ``scripts/ensure_redis.sh``, which is run once if they are missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from kvmesh.bench.servers import free_port

ENSURE_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ensure_redis.sh"


def ensure_redis_binaries() -> None:
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return
    done = subprocess.run(["bash", str(ENSURE_SCRIPT)], capture_output=True, text=True)
    if done.returncode != 0 or not shutil.which("redis-server"):
        pytest.fail(f"redis-server is not on PATH and {ENSURE_SCRIPT} could not install it:\n"
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

    def client(self, **options: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **options)


@dataclass
class RedisClusterServers:
    """Three masters, no replicas, every slot assigned."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(directory: Path, masters: int = 3, timeout: float = 30.0) -> RedisClusterServers:
    nodes = []
    try:
        for i in range(masters):
            node_dir = directory / f"node{i}"
            nodes.append(RedisServer(node_dir, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-port", str(free_port()), "--cluster-node-timeout", "5000")).start())
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=timeout)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}")
        deadline = time.monotonic() + timeout
        for node in nodes:
            while "cluster_state:ok" not in _cluster_info(node):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {node.port} never reported cluster_state:ok")
                time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return RedisClusterServers(nodes)


def _cluster_info(node: RedisServer) -> str:
    done = subprocess.run(["redis-cli", "-p", str(node.port), "cluster", "info"],
                          capture_output=True, text=True, timeout=5)
    return done.stdout
