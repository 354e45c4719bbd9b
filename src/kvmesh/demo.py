"""The core-cache demo: compute a long document's KV with transformers, keep it in kvmesh, load it back.

It shows the whole data path a serving engine will use (chunk keys, the node
daemon's shared-memory L1, one copy in and out) on the demo model, and checks
what matters: the loaded KV is bit-identical to what was computed, and a
prefill that loads it picks the same next token as a full prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.keys import chunk_keys, model_namespace
from kvmesh.layout import KVLayout


def demo_document(min_chars: int) -> str:
    """Real English text, the same every run: Python's own bundled documentation topics."""
    from pydoc_data.topics import topics

    parts: list[str] = []
    for name in sorted(topics):
        parts.append(topics[name])
        if sum(map(len, parts)) >= min_chars:
            break
    return "\n\n".join(parts)


@dataclass(frozen=True, slots=True)
class DemoResult:
    prompt_tokens: int
    chunk_tokens: int
    hit_tokens: int
    stored_bytes: int
    store_seconds: float
    load_seconds: float
    cold_seconds: float
    warm_seconds: float
    same_next_token: bool
    kv_bit_identical: bool

    @property
    def speedup(self) -> float:
        return self.cold_seconds / self.warm_seconds


def layout_of(model_config) -> KVLayout:  # noqa: ANN001 - a transformers PretrainedConfig
    head_size = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return KVLayout(model_config.num_hidden_layers, model_config.num_key_value_heads, head_size, "bfloat16")


def _cache_to_chunk(cache, start: int, end: int) -> torch.Tensor:  # noqa: ANN001 - a DynamicCache
    """[layers, 2, tokens, kv_heads, head_size] from a transformers cache ([batch, heads, tokens, dim])."""
    return torch.stack([
        torch.stack([layer.keys[0, :, start:end].transpose(0, 1), layer.values[0, :, start:end].transpose(0, 1)])
        for layer in cache.layers])


def _chunks_to_cache(chunks: list[torch.Tensor]):  # noqa: ANN202
    from transformers import DynamicCache

    whole = torch.cat(chunks, dim=2)  # [layers, 2, tokens, heads, dim]
    cache = DynamicCache()
    for index in range(whole.shape[0]):
        cache.update(whole[index, 0].transpose(0, 1).unsqueeze(0).contiguous(),
                     whole[index, 1].transpose(0, 1).unsqueeze(0).contiguous(), index)
    return cache


def run_core_demo(model_path: Path, config: KVMeshConfig, prompt_tokens: int = 2048,
                  say: Callable[[str], None] = print) -> DemoResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, local_files_only=True)
    model.eval()
    layout = layout_of(model.config)
    ids = tokenizer(demo_document(prompt_tokens * 6), return_tensors="pt").input_ids[:, :prompt_tokens]
    total = ids.shape[1]
    say(f"model {model_path.name}: KV {layout.bytes_per_token:,} bytes/token; prompt {total} tokens")

    with torch.inference_mode():
        started = time.perf_counter()
        cold = model(input_ids=ids, use_cache=True)
        cold_seconds = time.perf_counter() - started
        cold_next = int(cold.logits[0, -1].argmax())

        ns = model_namespace(model_path.name, layout.fingerprint(), config.tenant_salt)
        keys = chunk_keys(ids[0, :-1].tolist(), ns, config.chunk_size)  # the last token is always recomputed
        with KVMeshClient(config) as client:
            chunks = [_cache_to_chunk(cold.past_key_values, k.start, k.end) for k in keys]
            started = time.perf_counter()
            client.put(keys, chunks)
            store_seconds = time.perf_counter() - started
            say(f"stored {len(keys)} chunks of {config.chunk_size} tokens in the node's L1")

            started = time.perf_counter()
            hits = client.lookup(keys)
            loaded = client.get(keys[:hits])
            load_seconds = time.perf_counter() - started
            hit_tokens = keys[hits - 1].end if hits else 0
            cache = _chunks_to_cache(loaded) if loaded else None
            warm = model(input_ids=ids[:, hit_tokens:], past_key_values=cache, use_cache=True)
            warm_seconds = time.perf_counter() - started
        identical = len(loaded) == len(chunks) and all(
            torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(loaded, chunks))
    return DemoResult(total, config.chunk_size, hit_tokens, sum(c.numel() * 2 for c in chunks), store_seconds,
                      load_seconds, cold_seconds, warm_seconds, int(warm.logits[0, -1].argmax()) == cold_next,
                      identical)
