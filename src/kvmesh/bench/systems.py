"""The systems `kvmesh bench` compares, each as an engine configuration (and a peer server where needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.bench.servers import EngineSpec, free_port
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig

CACHE_GIB = 4  # the CPU-memory cache every caching system gets (kvmesh's L1, LMCache's L1)

SYSTEMS: dict[str, str] = {
    "vllm-nocache": "vLLM, prefix caching off",
    "vllm": "vLLM, its own prefix cache (the engine's pool)",
    "vllm-big": "vLLM, its own prefix cache with a pool holding everything (the ideal in-engine hit)",
    "kvmesh": "vLLM + kvmesh, L1 (shared memory)",
    "kvmesh-disk": "vLLM + kvmesh, L1 + disk",
    "kvmesh-full": "vLLM + kvmesh, L1, whole chunks only (no partial chunks)",
    "kvmesh-blend": "vLLM + kvmesh, L1, passages blended wherever they stand (rag; approximate KV; vLLM's own "
                    "prefix cache off)",
    "lmcache": "vLLM + LMCache 0.5.6 multi-process mode, memory",
    "lmcache-disk": "vLLM + LMCache 0.5.6 multi-process mode, memory + disk",
    "lmcache-blend": "vLLM + LMCache 0.5.6 multi-process mode with its CacheBlend engine (--engine-type blend), "
                     "vLLM's own prefix cache off",
    "example": "vLLM + ExampleConnector (safetensors files)",
}


def lmcache_venv_default() -> Path:
    """Where benchmarks/peers/setup_lmcache.sh put LMCache: $LMCACHE_VENV, else ./.venv-lmcache (run from the repo)."""
    return Path(os.environ.get("LMCACHE_VENV", ".venv-lmcache")).resolve()


class LMCacheServer:
    """LMCache's multi-process server, from its own virtual environment (see benchmarks/peers/setup_lmcache.sh)."""

    def __init__(self, venv: Path, log: Path, disk_dir: Path | None = None, engine_type: str = "default") -> None:
        if not (venv / "bin" / "lmcache").exists():
            raise FileNotFoundError(f"no LMCache in {venv}; run: bash benchmarks/peers/setup_lmcache.sh")
        self.venv, self.log, self.disk_dir = venv, log, disk_dir
        self.engine_type = engine_type  # "blend": LMCache's CacheBlend engine (non-prefix reuse)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def start(self) -> LMCacheServer:
        argv = [str(self.venv / "bin" / "lmcache"), "server", "--host", "localhost", "--port", str(self.port),
                "--chunk-size", "256", "--l1-size-gb", str(CACHE_GIB), "--eviction-policy", "LRU",
                "--max-workers", "1",
                "--supported-transfer-mode", "auto", "--engine-type", self.engine_type]
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--l2-adapter", json.dumps({"type": "fs", "base_path": str(self.disk_dir)})]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + 180
        while "running" not in self.log.read_text(errors="replace").lower():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the LMCache server did not start; see {self.log}")
            time.sleep(1)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None

    def connector(self) -> dict[str, object]:
        return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": self.port,
                                              "lmcache.mp.mq_timeout": 60.0}}


@dataclass
class PreparedSystem:
    name: str
    spec: EngineSpec
    kvmesh: dict[str, object] | None = None
    peer: LMCacheServer | None = None
    notes: list[str] = field(default_factory=list)
    blend: bool = False  # requests ask kvmesh to blend their passages

    def sample_metrics(self) -> dict[str, float]:
        """The kvmesh daemon's counters (empty for other systems)."""
        if self.kvmesh is None:
            return {}
        config = KVMeshConfig.load({**self.kvmesh, "autostart_daemon": False}, env={})
        with KVMeshClient(config) as client:
            return {k: v for k, v in client.metrics().items() if not k.endswith("_created")}

    def cleanup(self) -> None:
        if self.peer is not None:
            self.peer.stop()
        if self.kvmesh is not None:
            try:
                config = KVMeshConfig.load({**self.kvmesh, "autostart_daemon": False}, env={})
                with KVMeshClient(config) as client:
                    client.shutdown_daemon()
            except ConnectionError:
                pass


def prepare_system(name: str, model: str, pool_tokens: int, max_model_len: int, work: Path,
                   big_pool_tokens: int, lmcache_venv: Path | None = None,
                   kvmesh_overrides: dict[str, object] | None = None, dtype: str | None = None) -> PreparedSystem:
    """An engine configuration for ``name`` (see SYSTEMS); starts LMCache's server when needed.

    Every system runs in the same ``dtype`` (None: this machine's choice) with pools of the same tokens.
    """
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    spec = EngineSpec(model, kv_pool_tokens=pool_tokens, max_model_len=max_model_len, dtype=dtype)
    system = PreparedSystem(name, spec)
    if name == "vllm-nocache":
        spec.prefix_caching = False
    elif name == "vllm-big":
        spec.kv_pool_tokens = big_pool_tokens
    elif name.startswith("kvmesh"):
        settings: dict[str, object] = {"instance": f"bench-{name}-{uuid.uuid4().hex[:6]}",
                                       "socket_dir": str(work / "sock"), "l1_size": f"{CACHE_GIB}GiB", "http_port": 0,
                                       "save_partial_chunks": name != "kvmesh-full"}
        if name == "kvmesh-disk":
            settings["disk_path"] = str(work / f"disk-{uuid.uuid4().hex[:6]}")
        if name == "kvmesh-blend":
            spec.blend = system.blend = True
        settings.update(kvmesh_overrides or {})
        spec.kvmesh = system.kvmesh = settings
    elif name.startswith("lmcache"):
        venv = lmcache_venv or lmcache_venv_default()
        disk = work / f"lmcache-disk-{uuid.uuid4().hex[:6]}" if name == "lmcache-disk" else None
        engine_type = "blend" if name == "lmcache-blend" else "default"
        system.peer = LMCacheServer(venv, work / f"{name}-server.log", disk, engine_type).start()
        if engine_type == "blend":
            spec.prefix_caching = False  # as LMCache's blend examples run vLLM
        spec.python = system.peer.python
        spec.extra_args = ["--kv-transfer-config", json.dumps(system.peer.connector())]
    elif name == "example":
        config = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                  "kv_connector_extra_config": {"shared_storage_path": str(work / f"example-{uuid.uuid4().hex[:6]}")}}
        spec.extra_args = ["--kv-transfer-config", json.dumps(config)]
    return system
