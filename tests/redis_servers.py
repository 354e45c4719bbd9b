"""Real ``redis-server`` processes for the Redis tier's tests: single servers and a 3-master cluster.

The tier is tested against the real server (no fakes), each server on a free
loopback port in a temporary directory, without persistence.  The fixtures
that start them are in ``conftest.py``.  ``redis-server``/``redis-cli`` come
from ``scripts/ensure_redis.sh``, which is run once if they are missing.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvmesh.bench.redis_server import RedisServer, ensure_redis_binaries
from kvmesh.bench.servers import free_port

__all__ = ["RedisClusterServers", "RedisServer", "ensure_redis_binaries", "free_port", "start_cluster"]


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
