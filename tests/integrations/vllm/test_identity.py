"""The model identity the connector folds into every key: from vLLM's model config, or named by the user."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from kvmesh.config import KVMeshConfig
from kvmesh.fingerprint import FingerprintError
from kvmesh.integrations.vllm.identity import engine_model_identity, lora_identity


def _checkpoint(directory: Path, weight: float = 0.0) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2,
                                                       "rope_theta": 10000.0}))
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    save_file({"w": torch.full((4, 4), weight)}, str(directory / "model.safetensors"))
    return directory


def _vllm_config(model: Path, **model_fields: object) -> SimpleNamespace:
    fields = {"model": str(model), "tokenizer": str(model), "revision": None, "tokenizer_revision": None,
              "dtype": torch.bfloat16, "hf_overrides": {}, **model_fields}
    return SimpleNamespace(model_config=SimpleNamespace(**fields), load_config=SimpleNamespace(download_dir=None))


@pytest.fixture(autouse=True)
def _private_digest_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMESH_FINGERPRINT_CACHE", str(tmp_path / "digests.json"))


def test_the_identity_follows_the_weights_not_the_folder(tmp_path: Path) -> None:
    base = _checkpoint(tmp_path / "a" / "Model")
    tuned = _checkpoint(tmp_path / "b" / "Model", weight=1.0)
    copy = _checkpoint(tmp_path / "c" / "Other")
    config = KVMeshConfig()
    identity, described = engine_model_identity(_vllm_config(base), config)
    assert identity.startswith("fp:") and "weights" in described
    assert engine_model_identity(_vllm_config(tuned), config)[0] != identity
    assert engine_model_identity(_vllm_config(copy), config)[0] == identity
    assert engine_model_identity(_vllm_config(base, revision="v2"), config)[0] != identity


def test_hf_overrides_change_the_identity_and_a_function_cannot_be_fingerprinted(tmp_path: Path) -> None:
    base = _checkpoint(tmp_path / "m")
    config = KVMeshConfig()
    plain = engine_model_identity(_vllm_config(base), config)[0]
    assert engine_model_identity(_vllm_config(base, hf_overrides={"rope_theta": 5e5}), config)[0] != plain
    with pytest.raises(FingerprintError, match="model_fingerprint"):
        engine_model_identity(_vllm_config(base, hf_overrides=lambda c: c), config)


def test_model_fingerprint_names_the_identity_without_reading_the_model(tmp_path: Path) -> None:
    config = KVMeshConfig.from_mapping({"model_fingerprint": "llama-ft-2026-11"})
    assert engine_model_identity(_vllm_config(tmp_path / "does-not-exist"), config)[0] == "named:llama-ft-2026-11"
    with pytest.raises(FingerprintError, match="does-not-exist"):
        engine_model_identity(_vllm_config(tmp_path / "does-not-exist"), KVMeshConfig())


def test_a_lora_adapter_is_named_by_its_weights(tmp_path: Path) -> None:
    adapters = []
    for name, value in (("one", 0.0), ("two", 1.0), ("same-as-one", 0.0)):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
        save_file({"base_model.model.lora_A.weight": torch.full((8, 4), value)},
                  str(directory / "adapter_model.safetensors"))
        adapters.append(lora_identity(SimpleNamespace(lora_name="adapter", lora_path=str(directory))))
    assert adapters[0] != adapters[1]
    assert adapters[0] == adapters[2]


def test_a_lora_adapter_retrained_in_place_gets_a_new_identity(tmp_path: Path) -> None:
    """Same path, same process: the new weights are a new namespace, never the old adapter's KV."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    request = SimpleNamespace(lora_name="adapter", lora_path=str(directory))
    weights = directory / "adapter_model.safetensors"
    save_file({"base_model.model.lora_A.weight": torch.full((8, 4), 0.0)}, str(weights))
    before = lora_identity(request)
    assert lora_identity(request) == before
    replacement = tmp_path / "retrained.safetensors"
    save_file({"base_model.model.lora_A.weight": torch.full((8, 4), 2.0)}, str(replacement))
    os.replace(replacement, weights)  # as a trainer saving over the old checkpoint
    after = lora_identity(request)
    assert after != before
    save_file({"base_model.model.lora_A.weight": torch.full((8, 4), 0.0)}, str(replacement))
    os.replace(replacement, weights)
    assert lora_identity(request) == before  # the old weights again: the old namespace
