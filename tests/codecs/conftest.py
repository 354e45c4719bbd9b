"""The codec tests' shared fixture: a chunk of real KV from the demo model (slow: it loads the model)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def real_kv() -> torch.Tensor:
    """A chunk ``[layers, 2, 256, kv_heads, head_size]`` (bf16) as the demo engine computes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvmesh.bench.texts import document_token_ids
    from kvmesh.demo.model import default_model_dir
    from kvmesh.demo.run import cache_to_chunk

    path = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, local_files_only=True).eval()
    ids = torch.tensor([document_token_ids(tokenizer, 1, 256, seed=7)[0]])
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    return cache_to_chunk(cache, 0, 256).contiguous()
