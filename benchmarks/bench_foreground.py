"""Does the foreground pay for the background?  TTFT right after stores vs after idle, per tier configuration.

One ``kvmesh serve`` engine per configuration (the demo model, a pool of two prompts, the machine's dtype)
runs one sequence of requests, one at a time:

1. prompt A cold (its KV is stored), then A again at once: vLLM's *own* prefix-cache hit, right after a store;
2. prompts B, C, D cold (A leaves vLLM's pool), then A: served from kvmesh right after three stores;
3. B, C, D again, back to back: served from kvmesh;
4. after ``--idle`` seconds without requests, A again (it left vLLM's pool again): from kvmesh, idle.
5. E cold, then E again after ``--idle`` seconds: vLLM's own hit on an idle machine (the reference of row 1).

Before rows 2 and 4 it times 40 control round trips to the daemon from an observer (``kvmesh stats``'s
call, which does not hold writes behind back).

Every row prints the TTFT and the tokens kvmesh loaded for it.  ``--profile`` samples the node daemon's
threads with py-spy (``pip install py-spy``) during the hits of rows 1 and 2 and prints which thread held
the GIL how often, to find what the foreground waits on.

    python benchmarks/bench_foreground.py --tokens 2000 --configs disk,nodisk [--profile]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from kvmesh.bench.openai_client import stream_completion
from kvmesh.bench.servers import EngineServer, EngineSpec
from kvmesh.bench.texts import document_token_ids, question_prompt
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.demo.model import default_model_dir, prepare_demo_model
from kvmesh.machine_dtype import machine_dtype

CONFIGS: dict[str, dict[str, object]] = {
    "disk": {},  # kvmesh serve's default: its embedded disk tier (a fresh directory per run)
    "disk-nogate": {"write_quiet_seconds": 0},  # the disk tier, writes behind not held back (before the gate)
    "disk-normal": {"write_priority": "normal"},  # the writer thread at the daemon's priority, not idle class
    "disk-evict": {"disk_write_policy": "on_eviction"},  # written to disk only when L1 is about to evict
    "nodisk": {"disk_path": ""},
    "tmpfs": {},  # the disk tier on /dev/shm: no disk I/O at all
}


PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


class DaemonSampler:
    """py-spy dumps of the daemon, as fast as they come, while ``active``: which thread holds the GIL."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: Counter[str] = Counter()
        self.count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DaemonSampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run([PY_SPY, "dump", "--nonblocking", "--pid", str(self.pid)],
                                 capture_output=True, text=True).stdout
            self.count += 1
            thread = None
            for line in out.splitlines():
                if line.startswith("Thread "):
                    thread = line
                    if "gil" in line.lower():
                        name = line.split('"')[1] if '"' in line else line
                        self.samples[f"holds GIL: {name}"] += 1
                elif thread and "gil" in thread.lower() and line.strip() and "(" in line:
                    self.samples[f"  at {line.strip()[:110]}"] += 1
                    thread = None

    def report(self) -> str:
        lines = [f"{self.count} dumps of the daemon (pid {self.pid})"]
        lines += [f"  {n:4d}  {what}" for what, n in self.samples.most_common(12)]
        return "\n".join(lines)


def run_config(name: str, model: str, rounds: list[dict[str, list[int]]], idle: float, work: Path,
               profile: bool, dtype: str | None) -> list[tuple[str, float, int]]:
    """Every round's rows, in order; each round has its own prompts, so it stores and writes anew."""
    settings: dict[str, object] = {"instance": f"fg-{name}-{uuid.uuid4().hex[:6]}", "socket_dir": str(work / "sock"),
                                   "http_port": 0, **CONFIGS[name]}
    if name.startswith("disk"):
        settings["disk_path"] = str(work / f"disk-{uuid.uuid4().hex[:6]}")
    elif name == "tmpfs":
        settings["disk_path"] = f"/dev/shm/kvmesh-fg-{uuid.uuid4().hex[:6]}"
    longest = max(len(p) for prompts in rounds for p in prompts.values())
    spec = EngineSpec(model, kvmesh=settings, kv_pool_tokens=2 * longest + 256, max_model_len=longest + 128,
                      dtype=dtype)
    rows: list[tuple[str, float, int]] = []
    try:
        with EngineServer(spec, work / f"{name}.log") as server, \
                KVMeshClient(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={}),
                             check_config=False) as client:
            prompts: dict[str, list[int]] = {}

            def ask(label: str, prompt: str, sampler: DaemonSampler | None = None) -> None:
                before = client.metrics().get("kvmesh_loaded_tokens_total", 0.0)
                if sampler is not None:
                    with sampler:
                        result = stream_completion(server.base_url, server.model, prompts[prompt], max_tokens=1)
                else:
                    result = stream_completion(server.base_url, server.model, prompts[prompt], max_tokens=1)
                loaded = int(client.metrics().get("kvmesh_loaded_tokens_total", 0.0) - before)
                rows.append((label, result.ttft, loaded))
                print(f"  [{name}] {label:<55} TTFT {result.ttft:7.3f} s  loaded {loaded:6,}", flush=True)

            def round_trips(label: str, count: int = 40) -> None:
                """The daemon's control round trip as the engine sees it (a stats call, nothing else)."""
                times = []
                for _ in range(count):
                    started = time.perf_counter()
                    client.stats()
                    times.append(time.perf_counter() - started)
                print(f"  [{name}] daemon round trip {label}: median {statistics.median(times) * 1e3:.2f} ms, "
                      f"max {max(times) * 1e3:.2f} ms", flush=True)

            sampler = DaemonSampler(client.daemon_pid) if profile else None
            for prompts_of_round in rounds:
                prompts.clear()
                prompts.update(prompts_of_round)
                ask("A cold", "A")
                ask("A again at once: vLLM's own hit right after a store", "A", sampler)
                for prompt in "BCD":
                    ask(f"{prompt} cold", prompt)
                round_trips("after three stores")
                ask("A: from kvmesh right after three stores", "A", sampler)
                for prompt in "BCD":
                    ask(f"{prompt} again: from kvmesh, back to back", prompt)
                time.sleep(idle)
                round_trips(f"after {idle:g} s idle")
                ask(f"A after {idle:g} s idle: from kvmesh", "A")
                ask("E cold", "E")
                time.sleep(idle)
                ask(f"E after {idle:g} s idle: vLLM's own hit", "E")
            if sampler is not None:
                print(sampler.report(), flush=True)
            client.shutdown_daemon()
    finally:
        if name == "tmpfs":
            shutil.rmtree(str(settings["disk_path"]), ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000, help="prompt length")
    parser.add_argument("--configs", default="disk,nodisk", help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--idle", type=float, default=12.0, help="seconds without requests before the idle rows")
    parser.add_argument("--dtype", default=None, help="the engine's dtype (default: this machine's choice)")
    parser.add_argument("--profile", action="store_true", help="sample the daemon's GIL holder with py-spy")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds per configuration, each with new prompts; the table gives median and max")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model = str(prepare_demo_model(default_model_dir()))
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    docs = document_token_ids(tokenizer, 5 * args.repeat, args.tokens - 20, seed=11)
    rounds = [{name: question_prompt(tokenizer, doc, "What is this about?")
               for name, doc in zip("ABCDE", docs[5 * r:5 * r + 5])} for r in range(args.repeat)]
    print(f"engine dtype: {args.dtype or machine_dtype().describe()}; prompts of {len(rounds[0]['A']):,} tokens, "
          f"{args.repeat} round(s) per configuration")
    results = {}
    with tempfile.TemporaryDirectory(prefix="kvmesh-fg-") as work:
        for name in args.configs.split(","):
            results[name] = run_config(name, model, rounds, args.idle, Path(work), args.profile, args.dtype)
    per_round = len(next(iter(results.values()))) // args.repeat
    labels = [label for label, _, _ in next(iter(results.values()))[:per_round]]
    print("\n| request | " + " | ".join(results) + " |")
    print("| --- |" + " --- |" * len(results))
    for index, label in enumerate(labels):
        cells = []
        for rows in results.values():
            ttfts = [rows[r * per_round + index][1] for r in range(args.repeat)]
            cells.append(f"{ttfts[0]:.3f} s ({rows[index][2]:,})" if args.repeat == 1
                         else f"{statistics.median(ttfts):.3f} / {max(ttfts):.3f} s")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.repeat > 1:
        print(f"(median / max over {args.repeat} rounds)")
    for name, rows in results.items():
        back_to_back = [ttft for label, ttft, _ in rows if "back to back" in label]
        print(f"{name}: kvmesh back to back median {statistics.median(back_to_back):.3f} s, "
              f"max {max(back_to_back):.3f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
