"""Shared fixtures: a private node daemon per test session, gated disk writes, real redis-server processes."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmesh.client import KVMeshClient
from kvmesh.client.stop import stop_daemon
from kvmesh.config import KVMeshConfig
from redis_servers import RedisClusterServers, RedisServer, start_cluster


def _daemon_config(tmp_dir: str, l1_size: str) -> KVMeshConfig:
    return KVMeshConfig.from_mapping({
        "instance": f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        "socket_dir": tmp_dir,
        "l1_size": l1_size,
        "l1_prefault": False,
        "http_port": 0,
    })


@pytest.fixture(scope="session")
def daemon_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KVMeshConfig]:
    """A config naming a fresh instance; the first client auto-starts its daemon."""
    config = _daemon_config(str(tmp_path_factory.mktemp("kvmesh-sock")), "64MiB")
    yield config
    stop_daemon(config)


@pytest.fixture
def client(daemon_config: KVMeshConfig) -> Iterator[KVMeshClient]:
    with KVMeshClient(daemon_config) as kv_client:
        yield kv_client


@dataclass
class DiskWriteGate:
    """Holds every DiskTier file write until ``finish`` is set; ``writing`` is set when one is held."""

    writing: threading.Event = field(default_factory=threading.Event)
    finish: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def gated_disk_writes(monkeypatch: pytest.MonkeyPatch) -> DiskWriteGate:
    """Stop DiskTier writes mid-file, to look at what is visible while one is in flight."""
    from kvmesh.tiers import disk

    gate = DiskWriteGate()
    real = disk._writev_all

    def gated(fd: int, views: list[memoryview]) -> None:
        gate.writing.set()
        assert gate.finish.wait(30)
        real(fd, views)

    monkeypatch.setattr(disk, "_writev_all", gated)
    return gate


# ------------------------------------------------------------------ real redis-server processes
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server shared by the tests that only need a working Redis (use distinct namespaces)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start servers of one's own (``factory(extra_args=...)``); all are stopped after the test."""
    started: list[RedisServer] = []

    def factory(extra_args: tuple[str, ...] = ()) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(started)}", extra_args=extra_args)
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()
