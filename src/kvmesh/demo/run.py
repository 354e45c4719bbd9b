"""The core-cache demo: compute a long document's KV with transformers, keep it in kvmesh, load it back.

It shows the whole data path a serving engine will use (chunk keys, the node
daemon's shared-memory L1, one copy in and out) on the demo model, and checks
what matters: the loaded KV is bit-identical to what was computed, and a
prefill that loads it picks the same next token as a full prefill.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvmesh.bench.texts import topic_texts
from kvmesh.client import KVMeshClient, socket_is_live
from kvmesh.config import KVMeshConfig
from kvmesh.entry import DTYPES
from kvmesh.keys import chunk_keys
from kvmesh.layout import KVLayout
from kvmesh.machine_dtype import machine_dtype


def demo_document(min_chars: int) -> str:
    """Real English text, the same every run: Python's own bundled documentation topics."""
    parts: list[str] = []
    for text in topic_texts():
        parts.append(text)
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
    dtype: str

    @property
    def speedup(self) -> float:
        return self.cold_seconds / self.warm_seconds


def layout_of(model_config, dtype: str) -> KVLayout:
    head_size = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    # the demo stores transformers' KV as canonical chunks (cache_to_chunk), not an engine's pages
    return KVLayout(model_config.num_hidden_layers, model_config.num_key_value_heads, head_size, dtype,
                    page_view="chunk")


def cache_to_chunk(cache, start: int, end: int) -> torch.Tensor:
    """[layers, 2, tokens, kv_heads, head_size] from a transformers cache ([batch, heads, tokens, dim])."""
    return torch.stack([
        torch.stack([layer.keys[0, :, start:end].transpose(0, 1), layer.values[0, :, start:end].transpose(0, 1)])
        for layer in cache.layers])


def chunks_to_cache(chunks: list[torch.Tensor]):
    from transformers import DynamicCache

    whole = torch.cat(chunks, dim=2)  # [layers, 2, tokens, heads, dim]
    cache = DynamicCache()
    for index in range(whole.shape[0]):
        cache.update(whole[index, 0].transpose(0, 1).unsqueeze(0).contiguous(),
                     whole[index, 1].transpose(0, 1).unsqueeze(0).contiguous(), index)
    return cache


def run_core_demo(model_path: Path, config: KVMeshConfig, prompt_tokens: int = 2048,
                  say: Callable[[str], None] = print, dtype: str | None = None) -> DemoResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or machine_dtype().dtype
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype], local_files_only=True)
    model.eval()
    layout = layout_of(model.config, dtype)
    ids = tokenizer(demo_document(prompt_tokens * 6), return_tensors="pt").input_ids[:, :prompt_tokens]
    total = ids.shape[1]
    say(f"model {model_path.name}: KV {layout.bytes_per_token:,} bytes/token; prompt {total} tokens")

    with torch.inference_mode():
        started = time.perf_counter()
        cold = model(input_ids=ids, use_cache=True)
        cold_seconds = time.perf_counter() - started
        cold_next = int(cold.logits[0, -1].argmax())

        ns = layout.namespace(model_path.name, config.tenant_salt)
        keys = chunk_keys(ids[0, :-1].tolist(), ns, config.chunk_size)  # the last token is always recomputed
        daemon_was_running = socket_is_live(config.socket_path())
        with KVMeshClient(config) as client:
            chunks = [cache_to_chunk(cold.past_key_values, k.start, k.end) for k in keys]
            started = time.perf_counter()
            client.put(keys, chunks)
            store_seconds = time.perf_counter() - started
            say(f"stored {len(keys)} chunks of {config.chunk_size} tokens in the node's L1")

            started = time.perf_counter()
            hits = client.lookup(keys)
            loaded = client.get(keys[:hits])
            load_seconds = time.perf_counter() - started
            hit_tokens = keys[hits - 1].end if hits else 0
            cache = chunks_to_cache(loaded) if loaded else None
            warm = model(input_ids=ids[:, hit_tokens:], past_key_values=cache, use_cache=True)
            warm_seconds = time.perf_counter() - started
            if not daemon_was_running:
                client.shutdown_daemon()  # leave the node as we found it
        identical = len(loaded) == len(chunks) and all(
            torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(loaded, chunks))
    return DemoResult(total, config.chunk_size, hit_tokens, sum(c.numel() * c.element_size() for c in chunks),
                      store_seconds, load_seconds, cold_seconds, warm_seconds,
                      int(warm.logits[0, -1].argmax()) == cold_next, identical, dtype)


@dataclass(frozen=True, slots=True)
class ServingDemoResult:
    prompt_tokens: int
    cold_ttft: float
    engine_hit_ttft: float
    warm_ttft: float
    loaded_tokens: int
    same_answer_as_engine_hit: bool
    same_answer_as_cold: bool
    dtype: str

    @property
    def speedup(self) -> float:
        return self.cold_ttft / self.warm_ttft


def run_serving_demo(model_path: Path, overrides: dict[str, object], prompt_tokens: int = 3500,
                     log_dir: Path | None = None, say: Callable[[str], None] = print,
                     dtype: str | None = None) -> ServingDemoResult:
    """vLLM with kvmesh on the demo model: a long-document question cold, then again after eviction."""
    from transformers import AutoTokenizer

    from kvmesh.bench.openai_client import stream_completion
    from kvmesh.bench.servers import EngineServer, EngineSpec
    from kvmesh.bench.texts import document_token_ids, question_prompt
    # a fresh salt per run: the embedded disk tier keeps entries across runs, and "cold" must be cold
    overrides = {"tenant_salt": f"demo-{uuid.uuid4().hex[:8]}", **overrides}
    config = KVMeshConfig.load(overrides)
    daemon_was_running = socket_is_live(config.socket_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    question = "What is this text about? Answer in two sentences."
    prompts = [question_prompt(tokenizer, doc, question)
               for doc in document_token_ids(tokenizer, 3, prompt_tokens - 20)]
    log_dir = log_dir or Path(config.model_dir).expanduser().parent / "logs"
    spec = EngineSpec(str(model_path), kvmesh=overrides, kv_pool_tokens=4340, max_model_len=4096,
                      embedded_defaults=True, dtype=dtype)
    pool_mb = (spec.kv_cache_bytes or 0) / 1e6
    say(f"starting vLLM with kvmesh on {model_path.name} in {spec.engine_dtype} (KV pool of ~4,300 tokens, "
        f"{pool_mb:,.0f} MB; about 30-60 s); log: {log_dir / 'demo-vllm.log'}")
    try:
        with EngineServer(spec, log_dir / "demo-vllm.log") as server:
            def ask(label: str, prompt: list[int]) -> tuple[float, str]:
                result = stream_completion(server.base_url, server.model, prompt, max_tokens=32)
                say(f"{label:<58} TTFT {result.ttft:6.3f} s")
                return result.ttft, result.text

            cold, cold_text = ask(f"document A ({len(prompts[0]):,} tokens), first time (cold)", prompts[0])
            hit, hit_text = ask("document A again (vLLM's own prefix cache hit)", prompts[0])
            ask(f"document B ({len(prompts[1]):,} tokens), pushes A out of vLLM's pool", prompts[1])
            ask(f"document C ({len(prompts[2]):,} tokens)", prompts[2])
            with KVMeshClient(KVMeshConfig.from_mapping({"autostart_daemon": False}, base=config),
                              check_config=False) as client:  # an observer: serve added its disk default
                before = client.metrics().get("kvmesh_loaded_tokens_total", 0.0)
                warm, warm_text = ask("document A after eviction (loaded from kvmesh)", prompts[0])
                loaded = int(client.metrics().get("kvmesh_loaded_tokens_total", 0.0) - before)
    finally:
        if not daemon_was_running and socket_is_live(config.socket_path()):
            with KVMeshClient(KVMeshConfig.from_mapping({"autostart_daemon": False}, base=config),
                              check_config=False) as client:  # an observer: serve added its disk default
                client.shutdown_daemon()
    return ServingDemoResult(len(prompts[0]), cold, hit, warm, loaded, warm_text == hit_text, warm_text == cold_text,
                             spec.engine_dtype)
