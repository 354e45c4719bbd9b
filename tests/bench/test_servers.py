"""Engines of the demo, tests and benchmarks: a KV pool given in tokens holds those tokens in any dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmesh.bench.servers import EngineSpec, kv_bytes_per_token
from kvmesh.machine_dtype import machine_dtype

# the demo model's attention shape (SmolLM2-135M): 30 layers, 3 KV heads of 64
SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
           "torch_dtype": "bfloat16"}


@pytest.fixture
def model(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    return str(tmp_path)


def test_bytes_per_token_follow_the_dtype(model: str) -> None:
    assert kv_bytes_per_token(model, "bfloat16") == 23_040
    assert kv_bytes_per_token(model, "float32") == 46_080
    assert kv_bytes_per_token(model, "auto") == 23_040  # the checkpoint's own dtype


def test_a_pool_in_tokens_is_sized_for_the_engines_dtype(model: str) -> None:
    bf16 = EngineSpec(model, kv_pool_tokens=1280, dtype="bfloat16")
    fp32 = EngineSpec(model, kv_pool_tokens=1280, dtype="float32")
    assert fp32.kv_cache_bytes == 2 * bf16.kv_cache_bytes == 2 * 1280 * 23_040
    args = fp32.vllm_args(8000)
    assert args[args.index("--dtype") + 1] == "float32"
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(1280 * 46_080)


def test_by_default_engines_run_in_the_machines_dtype(model: str) -> None:
    spec = EngineSpec(model, kv_pool_tokens=1280)
    args = spec.vllm_args(8000)
    assert args[args.index("--dtype") + 1] == machine_dtype().dtype == spec.engine_dtype


def test_a_dtype_in_the_extra_arguments_wins_and_sizes_the_pool(model: str) -> None:
    spec = EngineSpec(model, kv_pool_tokens=1280, dtype="bfloat16", extra_args=["--dtype", "float32"])
    args = spec.vllm_args(8000)
    assert args.count("--dtype") == 1 and args[args.index("--dtype") + 1] == "float32"
    assert spec.kv_cache_bytes == 1280 * 46_080


def test_a_pool_cannot_be_sized_for_a_model_without_a_local_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot size a KV pool in tokens for .*nowhere"):
        kv_bytes_per_token(str(tmp_path / "nowhere"), "float32")
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        kv_bytes_per_token(str(tmp_path), "int4")
