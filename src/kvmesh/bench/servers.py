"""Start and stop a vLLM OpenAI-compatible server (with or without kvmesh) for demos, tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kvmesh.bench.openai_client import EndpointError, wait_until_ready
from kvmesh.integrations.vllm.serve import build_serve_command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EngineSpec:
    """One engine configuration; ``kvmesh=None`` runs plain vLLM."""

    model: str
    kvmesh: dict[str, object] | None = None
    kv_cache_bytes: int | None = 100_000_000
    max_model_len: int = 4096
    prefix_caching: bool = True
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable  # another virtual environment's interpreter runs a peer system
    embedded_defaults: bool = False  # True: kvmesh serve's defaults (a disk tier) where kvmesh names none

    def vllm_args(self, port: int) -> list[str]:
        args = ["--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--gpu-memory-utilization", "0.4",
                "--max-model-len", str(self.max_model_len),
                "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching"]
        if self.kv_cache_bytes:
            args += ["--kv-cache-memory-bytes", str(self.kv_cache_bytes)]
        return args + list(self.extra_args)


class EngineServer:
    """A server process in its own process group; stopping it stops everything it spawned."""

    def __init__(self, spec: EngineSpec, log_path: Path, port: int | None = None,
                 start_timeout: float = 300.0) -> None:
        self.spec = spec
        self.log_path = log_path
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        return self.spec.model

    def start(self) -> EngineServer:
        args = self.spec.vllm_args(self.port)
        if self.spec.kvmesh is not None:
            command = build_serve_command(self.spec.model, args, self.spec.kvmesh, python=self.spec.python,
                                          embedded_defaults=self.spec.embedded_defaults)
            argv, env = command.argv, command.env
        else:
            argv = [self.spec.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.spec.model, *args]
            env = dict(os.environ)
        env.update({"HF_HUB_OFFLINE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", **self.spec.extra_env})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        try:
            wait_until_ready(self.base_url, self.start_timeout, self.process)
        except EndpointError as err:
            self.stop()
            raise EndpointError(f"{err}; last lines of {self.log_path}:\n{self.log_tail()}") from None
        return self

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            except ProcessLookupError:
                pass
        else:  # the server died; make sure nothing it spawned lingers
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None

    def __enter__(self) -> EngineServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
