"""kvmesh settings for a test's engine: the defaults, but a node of its own (instance, folders) and checked loads.

Only what isolates a test is set: its own daemon instance and socket folder, a disk tier in its temporary
folder (where `kvmesh serve` would put one in the user's cache), a small L1, and `verify_loads`, which compares
every loaded page with the stored bytes and changes nothing it checks.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from kvmesh.client.stop import stop_daemon
from kvmesh.config import KVMeshConfig


def default_path_settings(base: Path, name: str, **extra: object) -> dict[str, object]:
    return {"instance": f"{name}-{uuid.uuid4().hex[:8]}", "socket_dir": str(base / "sock"),
            "disk_path": str(base / "disk"), "l1_size": "256MiB", "l1_prefault": False, "http_port": 0,
            "verify_loads": True, **extra}


def observer(settings: dict[str, object]) -> KVMeshConfig:
    """The settings as a client that never starts a daemon (to read metrics, stop it)."""
    return KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})


def stop_settings_daemon(settings: dict[str, object], settle: float = 10.0) -> None:
    stop_daemon(observer(settings), settle=settle)


def kv_bytes_per_token(model: str) -> int:
    """A checkpoint's KV per token in the dtype engines run in here: K and V, every layer and KV head."""
    from transformers import AutoConfig

    from kvmesh.machine_dtype import machine_dtype

    config = AutoConfig.from_pretrained(model, local_files_only=True)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = 4 if machine_dtype().dtype == "float32" else 2
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head * element
