"""Where vLLM-CPU keeps tokens and channels inside a KV page: a stored page vs transformers' KV.

Usage: .venv/bin/python benchmarks/probe_vllm_page_layout.py

Serves one 300-token prompt through vLLM + kvmesh (L1 only, 128-token chunks),
reads the first stored chunk (tokens 0-127, one page per layer) straight from
the daemon's shared-memory segment, computes the same tokens' KV with
transformers, and prints the correlation of the page read through each page
view of ``kvmesh.codecs.kvview`` with the real keys and values (1.0 = that
order; the two engines' bf16 numerics differ slightly, so values are compared
by correlation, not equality), and the view the connector chose for this
machine.  Lossy codecs need this order to find K/V channels and tokens.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch

from kvmesh.bench.openai_client import stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec
from kvmesh.bench.texts import document_token_ids
from kvmesh.client import KVMeshClient
from kvmesh.codecs.kvview import PAGE_VIEWS, kv_parts
from kvmesh.config import KVMeshConfig
from kvmesh.demo.model import default_model_dir
from kvmesh.integrations.vllm.engine_shape import cpu_page_view

LAYERS, HEADS, BLOCK, HEAD = 30, 3, 128, 64


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    ids = document_token_ids(tokenizer, 1, 300, seed=11)[0]
    work = Path(tempfile.mkdtemp(prefix="kvmesh-probe-"))
    settings = {"instance": f"probe-{uuid.uuid4().hex[:6]}", "socket_dir": str(work), "l1_size": "64MiB",
                "l1_prefault": False, "http_port": 0, "chunk_size": BLOCK, "save_partial_chunks": False}
    config = KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})
    spec = EngineSpec(model, kvmesh=settings, kv_pool_tokens=20 * BLOCK, max_model_len=1024)
    with EngineServer(spec, work / "engine.log") as server:
        stream_completion(server.base_url, server.model, ids, 2)
        with KVMeshClient(config) as client:
            client.flush()
            # the first extent of a fresh arena is the first chunk stored: tokens 0-127
            raw = np.fromfile(f"/dev/shm/{config.shm_name()}", dtype=np.int16, count=LAYERS * HEADS * BLOCK * 2 * HEAD)
            client.shutdown_daemon()
    entry = torch.from_numpy(raw).view(torch.bfloat16).reshape(LAYERS, 1, HEADS, BLOCK, 2 * HEAD)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, local_files_only=True).eval()
    with torch.inference_mode():
        cache = reference(input_ids=torch.tensor([ids[:BLOCK]]), use_cache=True).past_key_values
    # transformers' KV as [layers, 1 block, heads, tokens, head_size]
    real = (torch.stack([layer.keys[0] for layer in cache.layers]).float().unsqueeze(1),
            torch.stack([layer.values[0] for layer in cache.layers]).float().unsqueeze(1))
    print(f"connector's view on this machine: {cpu_page_view(torch.bfloat16, BLOCK, HEAD)}")
    for view in PAGE_VIEWS:
        keys, values = (part.float() for part in kv_parts(entry, view))
        print(f"  {view:14s} keys {correlation(keys, real[0]):.4f}  values {correlation(values, real[1]):.4f}")


if __name__ == "__main__":
    main()
