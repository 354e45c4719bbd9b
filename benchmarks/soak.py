"""Soak with faults: two `kvmesh serve` engines, a shared Redis, concurrent clients and a seeded schedule of faults.

Bounded (it stops by itself after ``--seconds``, 20 minutes by default) and on loopback only.

- **Nodes.** Two engines (the demo model, one core each), each with its own daemon, L1 and disk tier, as on
  two machines; both share one Redis behind a delaying TCP proxy.  L1 is small for the working set (it
  evicts all the time: L1 under pressure throughout).  Node a's disk tier lies on a tmpfs the soak mounts
  (it needs root; without, the ``disk-full`` fault is reported as not run).
- **Load.** ``--clients`` threads send the multi-round, long-doc and RAG workloads in turn, each user to
  its own node (the other one while its node is down).  A load request fails if it errors or comes back
  short.  Answers computed inside a batch are not compared: batch composition changes bf16 rounding.
- **Answers.** Every ``--probe-every`` seconds the load pauses (nothing in flight) and probe prompts are
  sent one at a time, as the vLLM tests compare: a new one, and earlier ones again after the load has
  pushed them out of the engines' own pools, on either node.  Each probe prompt starts with its own
  marker (no workload prompt shares its first chunk) and has ``128·k + 1`` tokens, and a plain vLLM
  engine gave two references before the soak: its answer computed from scratch and its answer from
  its own cache (all but the last token, which is exactly the depth kvmesh loads to).  The engine's own
  counters say how deep each probe was served from cache (vLLM's own hits plus the connector's).  At
  depth 0 the answer must be the first reference, at full depth the second; any other answer there is
  *wrong*.  A probe served at another depth (some chunks lost to a fault) has no exact reference; it is
  counted as unchecked, and that prompt is not checked again (its tail was stored from that split run).
- **Faults** (`soak_faults.py`): daemon SIGKILL and SIGSTOP, Redis SIGKILL, engine SIGKILL (restarted),
  a full disk tier, damaged entries on disk and in Redis, a slow Redis; one at a time, seeded order.
- **Budgets.** Every second: each daemon's shared memory (its L1) against ``l1_size``, its private memory
  against ``--private-allowance``, and each disk tier's entry bytes against ``disk_size``.

The report (``--report FILE``, JSON; a summary on stdout): requests, failed, wrong, unchecked, faults by
kind, budget overshoots, p50/p99 TTFT of load requests during each kind of fault and without, hit rate
over time, and the daemons' counters.

    python benchmarks/soak.py --seconds 1200 --seed 1 --report soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvmesh.bench.delay_proxy import DelayProxy  # noqa: E402
from kvmesh.bench.openai_client import EndpointError, stream_completion  # noqa: E402
from kvmesh.bench.redis_server import RedisServer  # noqa: E402
from kvmesh.bench.servers import EngineServer, EngineSpec  # noqa: E402
from kvmesh.bench.texts import document_token_ids  # noqa: E402
from kvmesh.bench.workloads import (  # noqa: E402
    LongDocSpec,
    MultiRoundSpec,
    RagSpec,
    Request,
    long_doc,
    multi_round,
    rag,
)
from kvmesh.client import KVMeshClient  # noqa: E402
from kvmesh.client.stop import stop_daemon  # noqa: E402
from kvmesh.config import KVMeshConfig, parse_size  # noqa: E402
from kvmesh.demo.model import default_model_dir, prepare_demo_model  # noqa: E402
from soak_faults import KINDS, FaultRecord, Faults, FaultTimings, daemon_pid  # noqa: E402

BLOCK = 128
POOL_TOKENS = 6144  # each engine's own pool: a few of the workloads' prompts
MAX_LEN = 4096
PROBE_TOKENS = 24
PROBE_LENGTHS = (3 * BLOCK + 1, 4 * BLOCK + 1, 5 * BLOCK + 1)  # all but the last token: whole blocks
FAULT_SETTLE = 5.0  # seconds after a fault's end still counted as "during" it
ENGINE_KILL_RESERVE = 90.0  # an engine restart takes ~30-60 s: not started this close to the end


@dataclass
class Options:
    seconds: float = 1200.0
    seed: int = 0
    clients: int = 3
    probe_every: float = 20.0
    warmup: float = 15.0
    gap: tuple[float, float] = (10.0, 30.0)
    kinds: tuple[str, ...] = KINDS
    l1_size: str = "512MiB"  # ~22k tokens of the demo model's bf16 KV: about half the workloads' working set
    disk_size: str = "384MiB"
    tmpfs_size: str = "448MiB"  # node a's disk filesystem: the disk tier's budget and room for its index files
    private_allowance: str = "768MiB"
    answer_tokens: int = 16
    workdir: Path | None = None


# ---------------------------------------------------------------------------------------------- nodes
@dataclass
class Node:
    """One engine and its daemon; a gate that holds new requests back (for a probe, or while it is down)."""

    name: str
    core: int
    settings: dict[str, object]
    server: EngineServer
    disk_mount: Path | None
    _holds: set[str] = field(default_factory=set)
    _in_flight: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def try_enter(self, ignoring: str | None = None) -> bool:
        with self._cond:
            if self._holds - {ignoring}:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def hold(self, reason: str) -> None:
        """No new requests (but ``ignoring=reason``'s); returns once those in flight have finished."""
        with self._cond:
            self._holds.add(reason)
            while self._in_flight:
                self._cond.wait()

    def release(self, reason: str) -> None:
        with self._cond:
            self._holds.discard(reason)

    @property
    def down(self) -> bool:
        with self._cond:
            return "down" in self._holds


# ---------------------------------------------------------------------------------------------- records
@dataclass
class LoadRecord:
    start: float
    node: str
    workload: str
    prompt_tokens: int
    ttft: float | None
    ok: bool
    error: str = ""


@dataclass
class Probe:
    prompt: list[int]
    cold: str  # plain vLLM's answer computed from scratch
    hit: str  # plain vLLM's answer from its own cache: all but the last token
    split: bool = False  # once served at another depth, its stored tail came from a split run


@dataclass
class ProbeRecord:
    start: float
    node: str
    probe: int
    tokens: int
    depth: int | None  # tokens served from cache (vLLM's own + kvmesh), None if the request failed
    expected: str  # "cold", "hit" or "unchecked"
    ok: bool | None  # None: unchecked
    error: str = ""


@dataclass
class BudgetSample:
    time: float
    node: str
    shared: int  # the daemon's resident shared memory (its L1)
    private: int  # its resident private memory
    disk: int  # bytes of entries in its disk tier


# ---------------------------------------------------------------------------------------------- the soak
class Soak:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.started = time.monotonic()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.loads: list[LoadRecord] = []
        self.probe_records: list[ProbeRecord] = []
        self.faults: list[FaultRecord] = []
        self.budget: list[BudgetSample] = []
        self.hit_samples: list[dict[str, float]] = []
        self.daemon_counters: dict[str, dict[str, float]] = {}
        self.not_run: dict[str, str] = {}
        self.nodes: list[Node] = []

    def clock(self) -> float:
        return time.monotonic() - self.started

    # ------------------------------------------------------------------ set-up
    def run(self) -> dict[str, object]:
        options = self.options
        workdir = options.workdir or Path(tempfile.mkdtemp(prefix="kvmesh-soak-"))
        workdir.mkdir(parents=True, exist_ok=True)
        model = str(prepare_demo_model(default_model_dir()))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        probes_needed = int(options.seconds / options.probe_every) + 4
        print(f"soak: {options.seconds:.0f} s, seed {options.seed}, working in {workdir}", flush=True)
        probes = self._references(model, tokenizer, probes_needed, workdir)
        feed = Feed(tokenizer, options.seed)
        redis_server = RedisServer(workdir / "redis").start()
        proxy = DelayProxy(redis_server.port)
        namespace = f"soak-{uuid.uuid4().hex[:6]}"
        mount = self._mount_tmpfs(workdir / "disk-a")
        try:
            for index, name in enumerate("ab"):
                disk = (mount / "tier") if (mount and name == "a") else workdir / f"disk-{name}"
                settings: dict[str, object] = {
                    "instance": f"soak-{namespace}-{name}", "socket_dir": str(workdir / "sock"),
                    "l1_size": options.l1_size, "l1_prefault": False, "http_port": 0,
                    "disk_path": str(disk), "disk_size": options.disk_size, "redis_url": proxy.url,
                    "redis_namespace": namespace, "verify_loads": True,
                }
                spec = EngineSpec(model, kvmesh=settings, kv_pool_tokens=POOL_TOKENS, max_model_len=MAX_LEN,
                                  extra_env={"VLLM_CPU_OMP_THREADS_BIND": str(index)}, embedded_defaults=True)
                server = EngineServer(spec, workdir / f"engine-{name}.log")
                self.nodes.append(Node(name, index, settings, server, mount if name == "a" else None))
            for node in self.nodes:
                print(f"soak: starting engine {node.name}", flush=True)
                node.server.start()
            self.started = time.monotonic()
            faults = Faults(redis_server, proxy, namespace, random.Random(options.seed + 1), self.clock,
                            FaultTimings())
            threads = [threading.Thread(target=self._client, args=(feed, model), name=f"client-{i}")
                       for i in range(options.clients)]
            threads += [threading.Thread(target=self._prober, args=(probes, model), name="prober"),
                        threading.Thread(target=self._faults, args=(faults,), name="faults"),
                        threading.Thread(target=self._sample_budgets, name="budgets"),
                        threading.Thread(target=self._sample_counters, name="counters")]
            for thread in threads:
                thread.start()
            self.stopping.wait(options.seconds)
            self.stopping.set()
            for thread in threads:
                thread.join(timeout=900)
            return self._report(probes)
        finally:
            for node in self.nodes:
                node.server.stop()
                stop_daemon(KVMeshConfig.load({**node.settings, "autostart_daemon": False}, env={}), settle=5.0)
            proxy.stop()
            redis_server.stop()
            if mount is not None:
                subprocess.run(["umount", str(mount)], check=False)
            if options.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)

    def _mount_tmpfs(self, path: Path) -> Path | None:
        path.mkdir(parents=True, exist_ok=True)
        size = parse_size(self.options.tmpfs_size)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.not_run["disk-full"] = f"could not mount a tmpfs for node a's disk tier: {done.stderr.strip()}"
            return None
        return path

    def _references(self, model: str, tokenizer: object, count: int, workdir: Path) -> list[Probe]:
        """Plain vLLM's two answers to each probe prompt, one request at a time, on one core like the nodes."""
        docs = document_token_ids(tokenizer, count, max(PROBE_LENGTHS), seed=self.options.seed + 1000)
        prompts = []
        for index, doc in enumerate(docs):
            marker = tokenizer.encode(f"Probe {index} of soak {self.options.seed}.\n", add_special_tokens=False)
            prompts.append((marker + doc)[:PROBE_LENGTHS[index % len(PROBE_LENGTHS)]])
        spec = EngineSpec(model, kvmesh=None, kv_pool_tokens=POOL_TOKENS, max_model_len=MAX_LEN,
                          extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0"})
        print(f"soak: references for {count} probe prompts from plain vLLM", flush=True)
        probes = []
        with EngineServer(spec, workdir / "reference.log") as server:
            for prompt in prompts:
                cold = stream_completion(server.base_url, model, prompt, PROBE_TOKENS).text
                hit = stream_completion(server.base_url, model, prompt, PROBE_TOKENS).text
                probes.append(Probe(prompt, cold, hit))
        return probes

    # ------------------------------------------------------------------ load
    def _route(self, workload: str, request: Request) -> Node | None:
        first = (request.user + len(workload)) % len(self.nodes)
        for node in self.nodes[first:] + self.nodes[:first]:
            if node.try_enter():
                return node
        return None

    def _client(self, feed: Feed, model: str) -> None:
        while not self.stopping.is_set():
            workload, request = feed.next()
            node = self._route(workload, request)
            if node is None:
                time.sleep(0.05)
                continue
            start = self.clock()
            try:
                result = stream_completion(node.server.base_url, model, request.prompt, self.options.answer_tokens,
                                           timeout=600)
                ok = result.completion_tokens == self.options.answer_tokens
                record = LoadRecord(start, node.name, workload, len(request.prompt), result.ttft, ok,
                                    "" if ok else f"{result.completion_tokens} tokens")
            except (EndpointError, OSError, ValueError) as err:
                record = LoadRecord(start, node.name, workload, len(request.prompt), None, False, repr(err)[:300])
            finally:
                node.leave()
            with self.lock:
                self.loads.append(record)

    # ------------------------------------------------------------------ probes
    def _prober(self, probes: list[Probe], model: str) -> None:
        index = 0
        while not self.stopping.wait(self.options.probe_every) and index < len(probes):
            for node in self.nodes:
                node.hold("probe")
            try:
                up = [node for node in self.nodes if not node.down]
                if up:
                    here, there = up[index % len(up)], up[(index + 1) % len(up)]
                    for node, number in ((here, index), (here, index - 1), (there, index - 2), (there, index - 5)):
                        if number >= 0:
                            self._probe(node, probes, number, model)
                    index += 1
            finally:
                for node in self.nodes:
                    node.release("probe")

    def _probe(self, node: Node, probes: list[Probe], number: int, model: str) -> None:
        if not node.try_enter(ignoring="probe"):
            return  # it went down meanwhile
        probe = probes[number]
        start = self.clock()
        try:
            before = engine_counters(node.server.base_url)
            result = stream_completion(node.server.base_url, model, probe.prompt, PROBE_TOKENS, timeout=600)
            after = engine_counters(node.server.base_url)
        except (EndpointError, OSError, ValueError) as err:
            record = ProbeRecord(start, node.name, number, len(probe.prompt), None, "unchecked", False,
                                 repr(err)[:300])
        else:
            depth = int(sum(after[k] - before[k] for k in ("own", "external")))
            if depth == 0:
                expected, reference = "cold", probe.cold
            elif depth == len(probe.prompt) - 1 and not probe.split:
                expected, reference = "hit", probe.hit
            else:
                expected, reference = "unchecked", None
                probe.split = probe.split or depth != len(probe.prompt) - 1
            ok = None if reference is None else result.text == reference
            short = result.completion_tokens != PROBE_TOKENS
            record = ProbeRecord(start, node.name, number, len(probe.prompt), depth, expected,
                                 False if short else ok, "short answer" if short else "")
        finally:
            node.leave()
        with self.lock:
            self.probe_records.append(record)

    # ------------------------------------------------------------------ faults
    def _faults(self, faults: Faults) -> None:
        kinds = [k for k in self.options.kinds if faults.available(k, self.nodes)]
        for kind in set(self.options.kinds) - set(kinds):
            self.not_run.setdefault(kind, "not available here")
        if self.stopping.wait(self.options.warmup):
            return
        while not self.stopping.is_set():
            # a seeded order each cycle; the engine restart (the longest) first, so a short soak has time for it
            order = sorted(self.rng.sample(kinds, len(kinds)), key=lambda kind: kind != "engine-kill")
            for kind in order:
                left = self.options.seconds - self.clock()
                if self.stopping.is_set() or (kind == "engine-kill" and left < ENGINE_KILL_RESERVE):
                    continue
                targets = [n for n in self.nodes if n.disk_mount is not None] if kind == "disk-full" else self.nodes
                record = faults.run(kind, self.rng.choice(targets))
                print(f"soak: {record.start:6.1f}-{record.end:6.1f} s {record.kind} on {record.node}: "
                      f"{record.detail}", flush=True)
                with self.lock:
                    self.faults.append(record)
                if self.stopping.wait(self.rng.uniform(*self.options.gap)):
                    return

    # ------------------------------------------------------------------ samplers
    def _sample_budgets(self) -> None:
        pids: dict[str, int | None] = {}
        while not self.stopping.wait(1.0):
            for node in self.nodes:
                pid = pids.get(node.name)
                if pid is None or not os.path.exists(f"/proc/{pid}"):
                    pid = pids[node.name] = daemon_pid(node.settings)
                shared, private = process_memory(pid) if pid else (0, 0)
                with self.lock:
                    self.budget.append(BudgetSample(self.clock(), node.name, shared, private,
                                                    entry_bytes(Path(str(node.settings["disk_path"])))))

    def _sample_counters(self) -> None:
        last_daemon: dict[str, tuple[int | None, dict[str, float]]] = {}
        last_engine: dict[str, dict[str, float]] = {}
        while not self.stopping.wait(10.0):
            sample: dict[str, float] = {"time": self.clock()}
            for node in self.nodes:
                if not node.down:
                    try:
                        now = engine_counters(node.server.base_url)
                    except (EndpointError, OSError, ValueError):
                        now = None
                    if now is not None:
                        before = last_engine.get(node.name, {})
                        for key, value in now.items():
                            previous = before.get(key, 0.0)
                            sample[key] = sample.get(key, 0.0) + (value - previous if value >= previous else value)
                        last_engine[node.name] = now
                try:  # one connection for both: the pid says whether counters started again at zero
                    config = KVMeshConfig.load({**node.settings, "autostart_daemon": False}, env={})
                    with KVMeshClient(config, check_config=False) as client:
                        pid, metrics = client.daemon_pid, client.metrics()
                except (ConnectionError, TimeoutError):
                    continue
                previous_pid, previous = last_daemon.get(node.name, (None, {}))
                totals = self.daemon_counters.setdefault(node.name, defaultdict(float))
                for key, value in metrics.items():
                    if "_total" in key and not key.startswith("kvmesh_hit"):
                        base = previous.get(key, 0.0) if previous_pid == pid else 0.0
                        totals[key] += max(0.0, value - base)
                last_daemon[node.name] = (pid, metrics)
            with self.lock:
                self.hit_samples.append(sample)

    # ------------------------------------------------------------------ report
    def _report(self, probes: list[Probe]) -> dict[str, object]:
        options = self.options
        l1_size, disk_size = parse_size(options.l1_size), parse_size(options.disk_size)
        allowance = parse_size(options.private_allowance)
        windows = [(f.kind, f.start, f.end + FAULT_SETTLE) for f in self.faults]
        during: dict[str, list[float]] = defaultdict(list)
        for load in self.loads:
            if load.ttft is None:
                continue
            kinds = {kind for kind, start, end in windows if start <= load.start <= end}
            for kind in kinds or {"none"}:
                during[kind].append(load.ttft)
        checked = [p for p in self.probe_records if p.ok is not None]
        report: dict[str, object] = {
            "options": {**asdict(options), "workdir": str(options.workdir) if options.workdir else None},
            "seconds": round(self.clock(), 1),
            "requests": len(self.loads) + len(self.probe_records),
            "load_requests": len(self.loads),
            "probes": len(self.probe_records),
            "failed": sum(not r.ok for r in self.loads) + sum(p.depth is None or p.error != ""
                                                              for p in self.probe_records),
            "wrong": sum(p.ok is False and p.depth is not None and p.error == "" for p in checked),
            "checked": len(checked),
            "checked_at_depth": {kind: sum(p.expected == kind for p in checked) for kind in ("cold", "hit")},
            "unchecked": sum(p.ok is None for p in self.probe_records),
            "faults": {kind: sum(f.kind == kind for f in self.faults) for kind in options.kinds},
            "not_run": self.not_run,
            "overshoots": {
                "l1": sum(s.shared > l1_size for s in self.budget),
                "private_memory": sum(s.private > allowance for s in self.budget),
                "disk": sum(s.disk > disk_size for s in self.budget),
            },
            "l1_nearly_full": _ratio(sum(s.shared > 0.9 * l1_size for s in self.budget), len(self.budget)),
            "max": {
                "l1_bytes": max((s.shared for s in self.budget), default=0), "l1_size": l1_size,
                "private_bytes": max((s.private for s in self.budget), default=0), "private_allowance": allowance,
                "disk_bytes": max((s.disk for s in self.budget), default=0), "disk_size": disk_size,
            },
            "ttft": {kind: {"n": len(values), "p50": round(statistics.median(values), 3),
                            "p99": round(percentile(values, 0.99), 3)}
                     for kind, values in sorted(during.items())},
            "hit_rate": [{"time": round(s["time"]), "queries": s.get("queries", 0.0),
                          "own": _ratio(s.get("own", 0.0), s.get("queries", 0.0)),
                          "kvmesh": _ratio(s.get("external", 0.0), s.get("queries", 0.0))}
                         for s in self.hit_samples],
            "daemon_counters": {node: dict(sorted(c.items())) for node, c in self.daemon_counters.items()},
            "fault_log": [asdict(f) for f in self.faults],
            "failures": [asdict(r) for r in self.loads if not r.ok][:50]
                        + [asdict(p) for p in self.probe_records if p.ok is False or p.depth is None][:50],
            "probe_log": [asdict(p) for p in self.probe_records],
            "load_log": [[round(r.start, 2), r.node, r.workload, r.prompt_tokens,
                          None if r.ttft is None else round(r.ttft, 3)] for r in self.loads],
        }
        return report


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 3) if whole else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Feed:
    """The three workloads in turn, each in its own order, starting over when one runs out."""

    def __init__(self, tokenizer: object, seed: int) -> None:
        self._lists: dict[str, list[Request]] = {
            "multi-round": multi_round(tokenizer, MultiRoundSpec(users=8, rounds=6, system_tokens=100,
                                                                 context_tokens=900, seed=seed)),
            "long-doc": long_doc(tokenizer, LongDocSpec(documents=6, document_tokens=1800, visits=6,
                                                        order="random", seed=seed)),
            "rag": rag(tokenizer, RagSpec(passages=16, passage_tokens=250, per_request=4, requests=60, seed=seed)),
        }
        self._names = list(self._lists)
        self._cursor = dict.fromkeys(self._names, 0)
        self._turn = 0
        self._lock = threading.Lock()

    def next(self) -> tuple[str, Request]:
        with self._lock:
            name = self._names[self._turn % len(self._names)]
            self._turn += 1
            items = self._lists[name]
            item = items[self._cursor[name] % len(items)]
            self._cursor[name] += 1
            return name, item


def engine_counters(base_url: str) -> dict[str, float]:
    """vLLM's prefix-cache counters, in tokens: queried, hit in its own pool, hit through the connector."""
    import urllib.request

    names = {"vllm:prefix_cache_queries_total": "queries", "vllm:prefix_cache_hits_total": "own",
             "vllm:external_prefix_cache_hits_total": "external"}
    totals = dict.fromkeys(names.values(), 0.0)
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in names:
                totals[names[name]] += float(line.rsplit(" ", 1)[1])
    return totals


def process_memory(pid: int) -> tuple[int, int]:
    """(resident shared memory, resident private memory) of a process, in bytes; (0, 0) if it is gone."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    name, value = line.split(":", 1)
                    fields[name] = int(value.split()[0]) * 1024
    except OSError:
        return 0, 0
    return fields.get("RssShmem", 0), fields.get("RssAnon", 0)


def entry_bytes(root: Path) -> int:
    """Bytes of a disk tier's entries, written and being written (its index files are outside the budget)."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith((".kv", ".tmp")):
                try:
                    total += os.stat(os.path.join(directory, name)).st_size
                except OSError:
                    pass
    return total


def summary(report: dict[str, object]) -> str:
    lines = [f"requests {report['requests']} ({report['load_requests']} load, {report['probes']} probes), "
             f"failed {report['failed']}, wrong {report['wrong']}, checked {report['checked']} "
             f"{report['checked_at_depth']}, unchecked {report['unchecked']}",
             f"faults {report['faults']}", f"not run {report['not_run']}",
             f"overshoots {report['overshoots']}", f"max {report['max']}",
             f"share of samples with L1 over 90% full: {report['l1_nearly_full']}", "TTFT of load requests:"]
    for kind, stats in report["ttft"].items():  # type: ignore[union-attr]
        lines.append(f"  {kind:14s} n={stats['n']:4d} p50 {stats['p50']:.3f} s p99 {stats['p99']:.3f} s")
    lines.append("hit rate (tokens, per 10 s): " + " ".join(
        f"{h['time']}s:{h['kvmesh']}" for h in report["hit_rate"]))  # type: ignore[union-attr]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1200.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--probe-every", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--gap", default="10:30", help="seconds between faults, MIN:MAX")
    parser.add_argument("--kinds", default=",".join(KINDS), help="fault kinds, comma-separated")
    parser.add_argument("--l1-size", default=Options.l1_size)
    parser.add_argument("--disk-size", default=Options.disk_size)
    parser.add_argument("--workdir", type=Path, help="keep logs and files here (default: a temporary folder)")
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    args = parser.parse_args()
    try:
        low, high = (float(x) for x in args.gap.split(":"))
    except ValueError:
        parser.error(f"--gap must be MIN:MAX seconds, e.g. 10:30; got {args.gap!r}")
    if not 0 <= low <= high:
        parser.error(f"--gap must be MIN:MAX with 0 <= MIN <= MAX; got {args.gap!r}")
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    options = Options(seconds=args.seconds, seed=args.seed, clients=args.clients, probe_every=args.probe_every,
                      warmup=args.warmup, gap=(low, high), kinds=kinds, l1_size=args.l1_size,
                      disk_size=args.disk_size, workdir=args.workdir)
    report = Soak(options).run()
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    print(summary(report))
    sys.exit(0 if report["failed"] == 0 and report["wrong"] == 0 and not any(report["overshoots"].values())
             else 1)


if __name__ == "__main__":
    main()
