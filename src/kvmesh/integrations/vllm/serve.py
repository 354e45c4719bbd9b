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


ENGINE_PORT_VARIABLE = "KVMESH_ENGINE_PORT"
VLLM_DEFAULT_PORT = 8000


def serve_settings(overrides: dict[str, object]) -> dict[str, object]:
    """The user's settings plus the embedded defaults of ``kvmesh serve``: a disk tier, unless configured.

    A bad key fails here, with kvmesh's message, before vLLM starts.
    """
    config = KVMeshConfig.load(overrides)
    settings = dict(overrides)
    if not config.disk_path and "disk_path" not in overrides:
        settings["disk_path"] = os.path.join(os.path.expanduser(DEFAULT_DISK_DIR), config.instance)
    return settings


CPU_BLOCK_SIZE = 128  # vLLM-CPU's default block size, which its Mamba state blocks take too


def keeps_recurrent_state(model: str) -> bool:
    """Whether vLLM's registry says the model's architecture keeps state beside attention KV (Mamba, GDN, ...).

    Its public form needs a whole ``ModelConfig``, so the per-architecture inspection it uses inside is asked.
    A model named by a hub id (no local ``config.json``) or a Python without vLLM counts as attention only.
    """
    config_path = os.path.join(os.path.expanduser(model), "config.json")
    if not os.path.isfile(config_path):
        return False
    with open(config_path) as handle:
        architectures = json.load(handle).get("architectures") or []
    try:
        from vllm.model_executor.models.registry import ModelRegistry
    except ImportError:
        return False
    from kvmesh.integrations.vllm.engine_shape import RECURRENT_STATE_FLAGS

    for architecture in architectures:
        info = ModelRegistry._try_inspect_model_cls(architecture)
        if info is not None and any(getattr(info, name) for name in RECURRENT_STATE_FLAGS):
            return True
    return False


def vllm_arg(args: Sequence[str], name: str) -> str | None:
    """The value the user gave to vLLM's ``name`` (``--name X`` or ``--name=X``), or None."""
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
    return None


def with_recurrent_state_steps(model: str, args: Sequence[str]) -> tuple[list[str], str | None]:
    """vLLM's arguments with prefill steps of one block for a model with recurrent state, unless the user chose.

    vLLM-CPU's Mamba kernels fail on prefill steps longer than one state block (an ``IndexError`` in
    ``mamba_mixer2``, with or without kvmesh), and kvmesh stores a chunk's state only where a step ends.
    Returns the arguments and a line saying what was set (None when nothing was).
    """
    if vllm_arg(args, "--max-num-batched-tokens") is not None or not keeps_recurrent_state(model):
        return list(args), None
    steps = vllm_arg(args, "--block-size") or str(CPU_BLOCK_SIZE)
    return [*args, "--max-num-batched-tokens", steps], (
        f"the model keeps recurrent state: prefill steps of one block (--max-num-batched-tokens {steps}), which "
        "vLLM-CPU's Mamba kernels need and where kvmesh stores the state; pass --max-num-batched-tokens to choose")


def with_blend_engine(args: Sequence[str]) -> tuple[list[str], str]:
    """vLLM's arguments for an engine that blends: kvmesh's load format, and vLLM's own prefix cache off.

    The load format hands the model to the connector (``blend_model.py``); vLLM's prefix cache would commit
    blended (approximate) blocks under exact token hashes, so it is refused on, not turned off behind the
    user's back (kvmesh's exact prefixes still hit, from L1).
    """
    given = vllm_arg(args, "--load-format")
    if given is not None and given != "kvmesh":
        raise ValueError(f"--blend needs vLLM's --load-format kvmesh, got --load-format {given}")
    if "--enable-prefix-caching" in args:
        raise ValueError("--blend needs vLLM's own prefix cache off (it would store blended KV as exact); drop "
                         "--enable-prefix-caching")
    extra = [] if given else ["--load-format", "kvmesh"]
    if "--no-enable-prefix-caching" not in args:
        extra.append("--no-enable-prefix-caching")
    return [*args, *extra], ("blending: the engine's model is loaded through kvmesh's loader (--load-format kvmesh) "
                             "and vLLM's own prefix cache is off (exact prefixes hit from kvmesh); requests opt in "
                             'with "kv_transfer_params": {"kvmesh": {"blend": true}}, or all with --set blend=true')


def kv_transfer_config(settings: dict[str, object]) -> dict[str, object]:
    """The value of vLLM's ``--kv-transfer-config`` for kvmesh with these config keys."""
    KVMeshConfig.load(settings)
    return {**CONNECTOR, "kv_connector_extra_config": dict(settings)}


@dataclass(frozen=True)
class ServeCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    dtype_choice: DtypeChoice | None = None  # the dtype kvmesh chose for this machine; None: the user's --dtype
    notes: list[str] = field(default_factory=list)  # other settings kvmesh serve chose, one line each


def build_serve_command(model: str, vllm_args: Sequence[str], overrides: dict[str, object],
                        python: str = sys.executable, embedded_defaults: bool = True,
                        blend: bool = False) -> ServeCommand:
    """``blend``: an engine that can blend (``--blend``; implied by the ``blend`` config key)."""
    if any(arg.startswith("--kv-transfer-config") for arg in vllm_args):
        raise ValueError("kvmesh serve sets --kv-transfer-config itself; pass kvmesh settings with --set KEY=VALUE")
    engine_args, steps_note = with_recurrent_state_steps(model, vllm_args)
    notes = [steps_note] if steps_note else []
    if blend or KVMeshConfig.load(overrides).blend:
        engine_args, blend_note = with_blend_engine(engine_args)
        notes.append(blend_note)
    if not any(arg.split("=")[0] in ("--enable-prompt-tokens-details", "--no-enable-prompt-tokens-details")
               for arg in engine_args):
        # answers say how many prompt tokens were cached (vLLM's own hit and kvmesh's): the router's check
        engine_args = ["--enable-prompt-tokens-details", *engine_args]
    # without --dtype, the dtype this CPU runs fast (fp32 where bf16 is only emulated: ~4x faster prefill)
    engine_args, dtype_choice = with_machine_dtype(engine_args)
    settings = serve_settings(overrides) if embedded_defaults else dict(overrides)
    kv_transfer_config(settings)  # every key checked, secrets included, before any leaves the command line
    # secrets reach the connector through vLLM's environment (readable by this user alone), never its argv
    secrets = {f"KVMESH_{key.upper()}": str(settings.pop(key)) for key in SECRET_KEYS if settings.get(key)}
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--kv-transfer-config", json.dumps(kv_transfer_config(settings)), *engine_args]
    env = {**os.environ, **secrets}
    # the engine's scheduler tells its daemon which HTTP port serves it, so `kvmesh router --engine URL` finds
    # the node daemon of a local engine by itself
    env[ENGINE_PORT_VARIABLE] = vllm_arg(engine_args, "--port") or str(VLLM_DEFAULT_PORT)
    # vLLM-CPU keeps a core for its scheduler unless told otherwise; kvmesh wants both for prefill.
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return ServeCommand(argv, env, dtype_choice, notes)
