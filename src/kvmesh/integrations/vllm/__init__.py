"""kvmesh inside vLLM: the v1 KV connector, its two sides, and `kvmesh serve`.

Only ``connector.py`` imports vLLM; the other modules are plain Python so tests drive them with real CPU
tensors and a real daemon. ``kv_connector_module_path`` is ``kvmesh.integrations.vllm.connector``; the
package path itself still resolves ``KVMeshConnector`` (lazily, so importing the planner never imports vLLM)
for configurations written before the connector moved into this package.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("KVMeshConnector", "KVMeshConnectorMetadata"):
        from kvmesh.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module 'kvmesh.integrations.vllm' has no attribute {name!r}")
