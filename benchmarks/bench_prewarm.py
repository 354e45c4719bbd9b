"""Prewarm and pin: the first real request of a prewarmed system prompt, and a pinned one after a flood.

One `kvmesh serve` engine on the demo model, with its own daemon (a small L1, no disk tier, so that what
leaves L1 is gone).  For each of ``--docs`` system prompts (documents of ``--tokens`` tokens):

* cold: a conversation on a system prompt never seen (TTFT of its first answer, streamed);
* prewarmed: ``kvmesh prewarm --engine URL doc.json`` first (timed), then a conversation on it;
* after a flood: two system prompts prewarmed, one of them with ``--pin``; then other prompts larger than L1
  go through the engine; then a conversation on each.

    .venv/bin/python benchmarks/bench_prewarm.py [--docs 4] [--tokens 2500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from kvmesh.bench.servers import EngineServer, EngineSpec
from kvmesh.bench.texts import document_token_ids
from kvmesh.client.stop import stop_daemon
from kvmesh.config import KVMeshConfig
from kvmesh.demo.model import default_model_dir, prepare_demo_model


def chat_ttft(url: str, model: str, messages: list[dict[str, str]]) -> tuple[float, int]:
    """Seconds to the first streamed token of a chat answer, and the cached prompt tokens it reported."""
    body = {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    cached = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                first = time.perf_counter() - started
            usage = event.get("usage") or {}
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or cached)
    assert first is not None, "no token came back"
    return first, cached


def prewarm(url: str, files: list[Path], settings: dict[str, object], pin: bool = False) -> float:
    started = time.perf_counter()
    command = [sys.executable, "-m", "kvmesh.cli", "prewarm", "--engine", url, *map(str, files),
               "--set", f"socket_dir={settings['socket_dir']}", "--set", f"instance={settings['instance']}"]
    subprocess.run(command + (["--pin"] if pin else []), check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2500)
    parser.add_argument("--l1-size", default="256MiB",
                        help="the node's L1 (the flood is 1.5x it; a quarter of it may be pinned)")
    args = parser.parse_args()
    model = str(prepare_demo_model(default_model_dir()))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    work = Path(tempfile.mkdtemp(prefix="bench-prewarm-"))
    settings: dict[str, object] = {"instance": f"prewarm-{uuid.uuid4().hex[:6]}", "socket_dir": str(work / "sock"),
                                   "disk_path": "", "l1_size": args.l1_size, "l1_prefault": False, "http_port": 0}
    docs = [tokenizer.decode(d) for d in document_token_ids(tokenizer, 3 * args.docs + 2, args.tokens, seed=5)]
    engine = EngineServer(EngineSpec(model, kvmesh=settings, max_model_len=4096), work / "engine.log")
    rows: dict[str, list[float]] = {"cold": [], "prewarmed": [], "prewarm command": [], "pinned, after a flood": [],
                                    "not pinned, after a flood": []}
    cached: dict[str, list[int]] = {name: [] for name in rows}
    try:
        engine.start()
        url = engine.base_url
        chat_ttft(url, model, [{"role": "user", "content": "warm up"}])
        question = {"role": "user", "content": "What is the first thing this document explains?"}
        for index in range(args.docs):
            cold_doc, warm_doc = docs[3 * index], docs[3 * index + 1]
            seconds, hit = chat_ttft(url, model, [{"role": "system", "content": cold_doc}, question])
            rows["cold"].append(seconds)
            cached["cold"].append(hit)
            path = work / f"doc-{index}.json"
            path.write_text(json.dumps([{"role": "system", "content": warm_doc}]))
            rows["prewarm command"].append(prewarm(url, [path], settings))
            seconds, hit = chat_ttft(url, model, [{"role": "system", "content": warm_doc}, question])
            rows["prewarmed"].append(seconds)
            cached["prewarmed"].append(hit)
        pinned_path, plain_path = work / "pinned.json", work / "plain.json"
        pinned_doc, plain_doc = docs[-2], docs[-1]
        pinned_path.write_text(json.dumps([{"role": "system", "content": pinned_doc}]))
        plain_path.write_text(json.dumps([{"role": "system", "content": plain_doc}]))
        prewarm(url, [pinned_path], settings, pin=True)
        prewarm(url, [plain_path], settings)
        bytes_per_token = 23_040  # the demo model's bf16 KV (30 layers, 3 KV heads of 64, K and V)
        l1_tokens = KVMeshConfig.load(settings, env={}).l1_size // bytes_per_token
        flood = document_token_ids(tokenizer, int(1.5 * l1_tokens / args.tokens) + 1, args.tokens, seed=9)
        for doc in flood:
            httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": doc, "max_tokens": 1},
                       timeout=600).raise_for_status()
        for name, doc in (("pinned, after a flood", pinned_doc), ("not pinned, after a flood", plain_doc)):
            seconds, hit = chat_ttft(url, model, [{"role": "system", "content": doc}, question])
            rows[name].append(seconds)
            cached[name].append(hit)
    finally:
        engine.stop()
        stop_daemon(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={}), settle=3.0)
    print(f"\n{args.docs} system prompts of {args.tokens} tokens; L1 {args.l1_size}, flood "
          f"{len(flood) * args.tokens} tokens; `{' '.join(sys.argv)}`\n")
    print("| request | median TTFT (s) | cached prompt tokens |")
    print("| --- | --- | --- |")
    for name, values in rows.items():
        hits = f"{statistics.median(cached[name]):,.0f}" if cached[name] else ""
        print(f"| {name} | {statistics.median(values):.3f} | {hits} |")


if __name__ == "__main__":
    main()
