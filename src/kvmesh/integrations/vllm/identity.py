"""The model's identity in the keys' namespace: what names the weights, not the folder they sit in.

Two engines share KV entries only when this string (and the page format) agree, so it is derived from
the checkpoint itself (``kvmesh.fingerprint``) unless the user names it (``model_fingerprint``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

from kvmesh.config import KVMeshConfig
from kvmesh.entry import dtype_name
from kvmesh.fingerprint import FingerprintError, lora_fingerprint, model_fingerprint, resolve_model_dir
from kvmesh.integrations.vllm.engine_shape import engine_dtype

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def engine_model_identity(vllm_config: VllmConfig, config: KVMeshConfig) -> tuple[str, str]:
    """The identity for the keys and a line for the log.

    ``named:<value>`` when the user set ``model_fingerprint``, else ``fp:<digest of the checkpoint>``.
    """
    if config.model_fingerprint:
        return f"named:{config.model_fingerprint}", "named by the model_fingerprint setting"
    model_config = vllm_config.model_config
    revision = model_config.revision
    download_dir = getattr(vllm_config.load_config, "download_dir", None)
    model_dir = resolve_model_dir(str(model_config.model), revision, cache_dir=download_dir)
    tokenizer = str(model_config.tokenizer or model_config.model)
    tokenizer_dir = resolve_model_dir(tokenizer, model_config.tokenizer_revision, cache_dir=download_dir) \
        if tokenizer != str(model_config.model) else None
    identity = model_fingerprint(model_dir, tokenizer_dir=tokenizer_dir, revision=revision,
                                 dtype=dtype_name(engine_dtype(model_config.dtype)))
    digest, described = identity.digest, identity.describe()
    overrides = getattr(model_config, "hf_overrides", None)
    if callable(overrides):
        raise FingerprintError("kvmesh cannot fingerprint a model whose config is changed by a function "
                               "(hf_overrides); set the kvmesh config key `model_fingerprint` to name it")
    if overrides:  # --hf-overrides can change rope_theta & co. beyond config.json
        text = json.dumps(overrides, sort_keys=True, default=str)
        digest = hashlib.blake2b(f"{digest}|{text}".encode(), digest_size=16).hexdigest()
        described += f", hf_overrides {text}"
    return f"fp:{digest}", described


def lora_identity(lora_request: Any) -> str:
    """A LoRA adapter is named by its own weights' digest (its name alone could be reused).

    The digest is remembered per path *and* the identity of the files in it (name, size, mtime, inode),
    as the weights' digest cache does: an adapter retrained in place and reloaded gets a new namespace.
    Asking costs one directory listing per request.
    """
    path = str(lora_request.lora_path)
    return _lora_identity(path, _files_identity(path))


def _files_identity(path: str) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when any file of the adapter's directory is rewritten, replaced, added or removed."""
    directory = resolve_model_dir(path)
    try:
        entries = [(entry.name, entry.stat()) for entry in os.scandir(directory) if entry.is_file()]
    except OSError:
        return ()  # lora_fingerprint names what is wrong with the directory
    return tuple(sorted((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in entries))


@functools.lru_cache(maxsize=256)
def _lora_identity(path: str, files: tuple[tuple[str, int, int, int], ...]) -> str:
    return f"fp:{lora_fingerprint(resolve_model_dir(path))}"
