"""Start and stop a vLLM OpenAI-compatible server (with or without kvmesh) for demos, tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from kvmesh.bench.openai_client import EndpointError, wait_until_ready
from kvmesh.integrations.vllm.serve import build_serve_command
from kvmesh.machine_dtype import explicit_dtype, machine_dtype

# vLLM's --dtype names -> bytes per value; "auto" is resolved from the checkpoint's config
DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "half": 2, "fp16": 2, "float32": 4, "float": 4, "fp32": 4}
DEFAULT_POOL_TOKENS = 4340  # 100 MB of the demo model's bf16 KV


def kv_bytes_per_token(model: str, dtype: str) -> int:
    """Bytes of KV one token takes in the engine's pool: every layer's K and V for every KV head.

    Read from the checkpoint's ``config.json`` (a local model directory), so that a pool given in tokens
    holds as many tokens in fp32 as in bf16.  Attention-only, full-attention models (what the demo and the
    benchmarks run); a model that is not a local directory is refused, naming it.
    """
    path = Path(model) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot size a KV pool in tokens for {model!r}: {path} unreadable ({err})") from None
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_size = config.get("head_dim") or config["hidden_size"] // heads
    if dtype == "auto":
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}, auto")
    # hybrid configs (NemotronH) list their layers' kinds instead of a count; sized as if all were attention
    layers = config.get("num_hidden_layers") or len(config["layers_block_type"])
    return layers * 2 * kv_heads * head_size * DTYPE_BYTES[dtype]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EngineSpec:
    """One engine configuration; ``kvmesh=None`` runs plain vLLM.

    The engine's own KV pool is given in tokens and sized in bytes for the dtype the engine runs in
    (``dtype``, else a ``--dtype`` in ``extra_args``, else this machine's choice): fp32 KV is twice as large.
    """

    model: str
    kvmesh: dict[str, object] | None = None
    kv_pool_tokens: int | None = DEFAULT_POOL_TOKENS
    max_model_len: int = 4096
    prefix_caching: bool = True
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable  # another virtual environment's interpreter runs a peer system
    embedded_defaults: bool = False  # True: kvmesh serve's defaults (a disk tier) where kvmesh names none
    dtype: str | None = None  # vLLM's --dtype (a --dtype in extra_args wins); None: this machine's choice
    blend: bool = False  # kvmesh serve --blend: kvmesh's loader, vLLM's own prefix cache off

    @property
    def engine_dtype(self) -> str:
        return explicit_dtype(self.extra_args) or self.dtype or machine_dtype().dtype

    @property
    def kv_cache_bytes(self) -> int | None:
        if not self.kv_pool_tokens:
            return None
        return self.kv_pool_tokens * kv_bytes_per_token(self.model, self.engine_dtype)

    def vllm_args(self, port: int) -> list[str]:
        args = ["--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--gpu-memory-utilization", "0.4",
                "--max-model-len", str(self.max_model_len),
                "--enable-prefix-caching" if self.prefix_caching and not self.blend else "--no-enable-prefix-caching"]
        if explicit_dtype(self.extra_args) is None:
            args += ["--dtype", self.engine_dtype]
        pool_bytes = self.kv_cache_bytes
        if pool_bytes:
            args += ["--kv-cache-memory-bytes", str(pool_bytes)]
        return args + list(self.extra_args)


class ProcessServer:
    """A server process in its own process group, logging to ``log_path``; stopping it stops what it spawned."""

    log_path: Path
    process: subprocess.Popen | None

    def start(self) -> Self:
        raise NotImplementedError

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
        self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


class EngineServer(ProcessServer):
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
                                          embedded_defaults=self.spec.embedded_defaults, blend=self.spec.blend)
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



def stop_process_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a process started in its own session and everything it spawned (SIGTERM, then SIGKILL)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
        except ProcessLookupError:
            pass
    else:  # it died; make sure nothing it spawned lingers
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RouterServer(ProcessServer):
    """``kvmesh router`` in its own process group; started once every engine is up and its daemon found."""

    def __init__(self, engines: Sequence[str], log_path: Path, socket_dir: str, policy: str = "cache",
                 prefill: Sequence[str] = (), extra_args: Sequence[str] = (), start_timeout: float = 120.0,
                 python: str = sys.executable) -> None:
        self.engines, self.prefill = list(engines), list(prefill)
        self.log_path, self.socket_dir, self.policy = log_path, socket_dir, policy
        self.extra_args, self.start_timeout, self.python = list(extra_args), start_timeout, python
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RouterServer:
        argv = [self.python, "-m", "kvmesh.cli", "router", "--port", str(self.port), "--policy", self.policy,
                "--set", f"socket_dir={self.socket_dir}", *self.extra_args]
        argv += [arg for url in self.engines for arg in ("--engine", url)]
        argv += [arg for url in self.prefill for arg in ("--prefill", url)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        listing: dict[str, object] = {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EndpointError(f"kvmesh router exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                listing = json.loads(urllib.request.urlopen(f"{self.base_url}/router/engines", timeout=5).read())
                listed = [*listing.get("engines", []), *listing.get("prefill", [])]  # type: ignore[misc]
                if len(listed) == len(self.engines) + len(self.prefill) and all(e["up"] and e["daemon"]
                                                                                 for e in listed):
                    return self
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        self.stop()
        raise EndpointError(f"kvmesh router did not find every engine and its daemon in {self.start_timeout:.0f} s: "
                            f"{listing}\n{self.log_tail()}")

