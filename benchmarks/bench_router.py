"""`kvmesh router` on two real vLLM-CPU engines: which policy gets the most prompt tokens from cache.

Two ``kvmesh serve`` engines on the demo model (one core each: ``VLLM_CPU_OMP_THREADS_BIND`` 0 and 1), each
with a small pool of its own (``--pool-tokens``), behind one ``kvmesh router``.  Arms, each with fresh engines
and fresh daemons (new instance names and disk folders: no arm sees another's cache), all stopped after it:

- ``round-robin``: two private daemons (two "nodes"), ``--policy round-robin``;
- ``random``: two private daemons, ``--policy random``;
- ``cache``: two private daemons, ``--policy cache`` (the router probes each node for the prompt's prefix);
- ``shared``: one daemon both engines store through, ``--policy round-robin``: every engine sees every
  stored prefix, the upper bound of hit tokens.

``--redis`` adds a Redis tier that both nodes share (a fresh ``redis-server`` per arm).

Workloads (``--workload``, comma-separated; each arm starts fresh engines for each workload):

- ``chat``: ``kvmesh bench``'s multi-round chat (``kvmesh.bench.workloads.multi_round``): ``--users`` x
  ``--rounds``, each round's prompt is the user's history (a shared system prompt, the user's document, the
  earlier questions and canned answers) plus a new question; users come back in a shuffled order each round
  (seeded, the same in every arm: with a fixed order and two engines round-robin would send every user to the
  same engine every round, or always to the other one, by the parity of ``--users``).  Streamed through the
  router with ``--concurrency`` requests in flight, a user's next round only after their previous answer.
  The engines' own pools hold a few prompts, so a returning user's history has left them: it comes from
  kvmesh, from the node that stored it, or is computed again.
- ``hot-prefix``: ``--hot-users`` distinct users, one round, every prompt one long shared system prompt
  (``--hot-system-tokens``) plus a short question of its own: how the load is spread (target: under the
  cache policy no engine takes more than 65% of the requests).
- ``burst``: ``--burst-size`` copies of one prompt sent at once, for ``--burst-prompts`` prompts in turn: where
  each copy went and its TTFT.
- ``pd`` (not in the default list; its own two arms, ``--arms`` picks among them): prefill/decode vs aggregated
  on one request stream.  ``--pd-long-clients`` clients each send ``--pd-long-requests`` long prompts
  (``--pd-long-tokens``, a new document each time, ``--pd-long-answer`` tokens answered) while
  ``--pd-short-clients`` clients each send ``--pd-short-requests`` short prompts (``--pd-short-tokens``) with
  long answers (``--pd-short-answer``): each client sends its next request once its previous one is answered,
  all streamed through the router at once.  Arms, each with fresh engines and ONE fresh daemon both share:

  - ``aggregated``: ``--policy cache`` over both engines, each prefilling and decoding;
  - ``prefill-decode``: ``--prefill`` the core-0 engine (e0), ``--decode`` the core-1 engine (e1): long prompts
    are computed on e0 (one token), stored in the node's L1, and loaded by e1, which computes their last token
    only; prompts shorter than a chunk go to e1 directly (no prefill: counted as short).

  Reported: TTFT of long and short prompts, the short (decode-heavy) requests' inter-token latency (mean, p99,
  max over every gap between streamed tokens; also p99 over the gaps that overlap another request's long
  prefill: from its sending to its first token), the prompt tokens each engine computed (``prompt_tokens -
  cached_tokens``: 1 for a handed-off prompt) and the router's handoff counters.  On two cores P/D halves the
  compute each phase gets, so its throughput may well drop: what it can win is decode ITL isolation.

Per arm and workload: requests, failures, requests/s, TTFT (first rounds, returning rounds: mean and p90),
each engine's share of the requests (the router's ``x-kvmesh-engine`` header), prompt tokens the engines
reported cached (``usage.prompt_tokens_details.cached_tokens``: their own prefix cache and kvmesh's loads
together) and vLLM's split of them (its own pool vs external, from its ``/metrics``), the daemons' tokens
(looked up, hit, loaded into engines, stored) and chunk hits and bytes read per tier, and the router's
predicted vs reported cached tokens.  Headlines on chat: cached tokens of ``cache`` vs ``shared`` (target
>= 95%) and vs ``round-robin`` (target >= 1.5x); on hot-prefix: the largest engine share under ``cache``.
A markdown table on stdout; everything (every request too) in the JSON report (``--report``).

    .venv/bin/python benchmarks/bench_router.py --report router.json
    .venv/bin/python benchmarks/bench_router.py --workload chat,hot-prefix,burst --redis --report router.json
    .venv/bin/python benchmarks/bench_router.py --users 2 --rounds 2 --arms cache   # a smoke run
    .venv/bin/python benchmarks/bench_router.py --workload pd --report pd.json

At the default size one arm of chat takes about 2-3 minutes on a 2-core machine (two engine starts of 35-85 s
each, in parallel where the daemons are private, then the workload); one arm of pd about 3 minutes (engines
started one after the other: they share a daemon).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvmesh.bench.openai_client import EndpointError, stream_completion  # noqa: E402
from kvmesh.bench.redis_server import RedisServer  # noqa: E402
from kvmesh.bench.report import markdown_table, percentile, summarize  # noqa: E402
from kvmesh.bench.runner import RequestRecord, RunRecord, run_workload  # noqa: E402
from kvmesh.bench.servers import EngineServer, EngineSpec, free_port  # noqa: E402
from kvmesh.bench.texts import Tokenizer, document_token_ids, question_prompt  # noqa: E402
from kvmesh.bench.workloads import MultiRoundSpec, Request, multi_round  # noqa: E402
from kvmesh.client import KVMeshClient  # noqa: E402
from kvmesh.client.stop import stop_daemon  # noqa: E402
from kvmesh.config import KVMeshConfig  # noqa: E402
from kvmesh.demo.model import default_model_dir, prepare_demo_model  # noqa: E402
from kvmesh.router import ENGINE_HEADER  # noqa: E402

ARMS: dict[str, tuple[str, bool]] = {  # name: (router policy, one daemon shared by both engines)
    "round-robin": ("round-robin", False),
    "random": ("random", False),
    "cache": ("cache", False),
    "shared": ("round-robin", True),
}
# the pd workload's arms: name: (router policy, prefill/decode); both with one daemon shared by both engines
PD_ARMS: dict[str, tuple[str, bool]] = {
    "aggregated": ("cache", False),
    "prefill-decode": ("cache", True),
}
WORKLOADS = ("chat", "hot-prefix", "burst", "pd")
PD_NOTE = ("On 2 cores P/D halves the compute available to each phase (prefill on core 0 only, decode on core 1 "
           "only), so its throughput may drop; the measurable win is the decode ITL isolation (short_itl_*).")
ENGINES = 2  # one per core
# the daemons' counters reported (totals; tiers are added by their label)
DAEMON_TOKENS = {"lookup": "kvmesh_lookup_tokens_total", "hit": "kvmesh_hit_tokens_total",
                 "loaded": "kvmesh_loaded_tokens_total", "stored": "kvmesh_stored_tokens_total"}
# vLLM's prefix-cache counters (tokens): asked, found in its own pool, found through the connector (kvmesh)
VLLM_COUNTERS = {"vllm:prefix_cache_queries_total": "queries", "vllm:prefix_cache_hits_total": "own",
                 "vllm:external_prefix_cache_hits_total": "external"}
TARGET_SHARED = 0.95  # cache arm's cached tokens / shared arm's
TARGET_ROUND_ROBIN = 1.5  # cache arm's cached tokens / round-robin's
TARGET_MAX_SHARE = 0.65  # hot-prefix, cache arm: the busiest engine's share of the requests


# ------------------------------------------------------------------------------------------------ workloads
def chat_requests(tokenizer: Tokenizer, args: argparse.Namespace) -> list[Request]:
    """``multi_round``, with users returning in a shuffled (seeded) order each round."""
    spec = MultiRoundSpec(users=args.users, rounds=args.rounds, system_tokens=args.system_tokens,
                          context_tokens=args.context_tokens, turn_tokens=args.turn_tokens, seed=args.seed)
    requests = multi_round(tokenizer, spec)
    rng = random.Random(args.seed)
    ordered: list[Request] = []
    for round_index in range(args.rounds):
        this_round = [r for r in requests if r.round == round_index]
        rng.shuffle(this_round)
        ordered += this_round
    return ordered


def hot_prefix_requests(tokenizer: Tokenizer, args: argparse.Namespace) -> list[Request]:
    """One long system prompt shared by every request, then each user's own short question (one round)."""
    manual = document_token_ids(tokenizer, 1, args.hot_system_tokens, seed=args.seed + 101)[0]
    system = tokenizer.encode("You are the support assistant for this manual.\n\n", add_special_tokens=False)
    questions = document_token_ids(tokenizer, args.hot_users, args.hot_question_tokens, seed=args.seed + 102)
    return [Request(user, 0, system + manual + tokenizer.encode(f"\n\nUser {user} asks: ", add_special_tokens=False)
                    + question + tokenizer.encode("\nAnswer:", add_special_tokens=False))
            for user, question in enumerate(questions)]


def burst_prompts(tokenizer: Tokenizer, args: argparse.Namespace) -> list[list[int]]:
    documents = document_token_ids(tokenizer, args.burst_prompts, args.burst_tokens, seed=args.seed + 201)
    return [question_prompt(tokenizer, doc, "What is this text about?") for doc in documents]


def run_burst(url: str, model: str, prompts: list[list[int]], copies: int, answer_tokens: int) -> RunRecord:
    """Each prompt ``copies`` times at once (the copies leave together, behind a barrier); prompts in turn."""
    records: list[RequestRecord] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=copies) as pool:
        for user, prompt in enumerate(prompts):
            barrier = threading.Barrier(copies)

            def send(copy: int) -> RequestRecord:
                index = user * copies + copy
                barrier.wait()
                sent = time.perf_counter() - started
                try:
                    reply = stream_completion(url, model, prompt, answer_tokens)
                except (EndpointError, OSError, ValueError) as err:
                    return RequestRecord(index, user, copy, len(prompt), sent, float("nan"), float("nan"), None,
                                         None, "", f"{type(err).__name__}: {err}")
                return RequestRecord(index, user, copy, len(prompt), sent, reply.ttft, reply.latency,
                                     reply.inter_token_latency, reply.completion_tokens, reply.text,
                                     cached_tokens=reply.cached_tokens, served_by=reply.headers.get(ENGINE_HEADER))

            records += list(pool.map(send, range(copies)))
    return RunRecord("burst", None, copies, time.perf_counter() - started, records, [])


@dataclass(frozen=True)
class PDRequest:
    """One request of the pd workload: its client, long or short, prompt and answer length."""

    index: int
    client: int
    kind: str  # "long" (a new long document, a short answer) or "short" (a short prompt, a long answer)
    prompt: list[int]
    answer_tokens: int


PD_WARM = 3  # pd: warm-up prompts, one for each engine and one through the router (not measured)
PD_WARM_TOKENS = 600


def pd_clients(tokenizer: Tokenizer, args: argparse.Namespace) -> tuple[list[list[PDRequest]], list[list[int]]]:
    """Each client's requests, in order (the long clients' first, then the short clients'); and the warm-up
    prompts, cut from the same stream of text as the long prompts (a warm-up never shares a prefix with them)."""
    longs = document_token_ids(tokenizer, args.pd_long_clients * args.pd_long_requests + PD_WARM,
                               max(args.pd_long_tokens, PD_WARM_TOKENS), seed=args.seed + 301)
    warm = [question_prompt(tokenizer, document[:PD_WARM_TOKENS], "Warm up.") for document in longs[-PD_WARM:]]
    longs = [document[:args.pd_long_tokens] for document in longs[:-PD_WARM]]
    shorts = document_token_ids(tokenizer, args.pd_short_clients * args.pd_short_requests, args.pd_short_tokens,
                                seed=args.seed + 302)
    clients: list[list[PDRequest]] = []
    index = 0
    for kind, documents, count, each, answer, question in (
            ("long", longs, args.pd_long_clients, args.pd_long_requests, args.pd_long_answer,
             "What is this text about, in a few words?"),
            ("short", shorts, args.pd_short_clients, args.pd_short_requests, args.pd_short_answer,
             "Explain this text at length.")):
        for client in range(count):
            mine = []
            for document in documents[client * each:(client + 1) * each]:
                mine.append(PDRequest(index, len(clients), kind, question_prompt(tokenizer, document, question),
                                      answer))
                index += 1
            clients.append(mine)
    return clients, warm


def run_pd(url: str, model: str, clients: list[list[PDRequest]]) -> tuple[RunRecord, list[dict[str, Any]]]:
    """Every client at once, each sending its next request when its previous one is answered (streamed).

    Besides the usual records: per request its kind, the prompt tokens the engine reported and computed, and
    each streamed token's arrival (seconds after the request was sent).
    """
    records: list[RequestRecord] = []
    details: list[dict[str, Any]] = []
    lock = threading.Lock()
    started = time.perf_counter()

    def client_loop(requests: list[PDRequest]) -> None:
        for position, request in enumerate(requests):
            sent = time.perf_counter() - started
            detail: dict[str, Any] = {"index": request.index, "client": request.client, "kind": request.kind,
                                      "sent_at": sent, "answer_tokens": request.answer_tokens}
            try:
                reply = stream_completion(url, model, request.prompt, request.answer_tokens)
            except Exception as err:  # noqa: BLE001 - a failed request is a result
                record = RequestRecord(request.index, request.client, position, len(request.prompt), sent,
                                       float("nan"), float("nan"), None, None, "", f"{type(err).__name__}: {err}")
                detail.update(usage_prompt_tokens=None, computed_prompt_tokens=None, token_times=[])
            else:
                record = RequestRecord(request.index, request.client, position, len(request.prompt), sent,
                                       reply.ttft, reply.latency, reply.inter_token_latency, reply.completion_tokens,
                                       reply.text, cached_tokens=reply.cached_tokens,
                                       served_by=reply.headers.get(ENGINE_HEADER))
                prompt = reply.prompt_tokens if reply.prompt_tokens is not None else len(request.prompt)
                computed = prompt - reply.cached_tokens if reply.cached_tokens is not None else None
                detail.update(usage_prompt_tokens=prompt, computed_prompt_tokens=computed,
                              token_times=[round(t, 5) for t in reply.token_times])
            with lock:
                records.append(record)
                details.append(detail)

    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        for future in [pool.submit(client_loop, requests) for requests in clients]:
            future.result()
    wall = time.perf_counter() - started
    order = sorted(range(len(records)), key=lambda i: records[i].index)
    return (RunRecord("pd", None, len(clients), wall, [records[i] for i in order], []),
            [details[i] for i in order])


# ------------------------------------------------------------------------------------------------- the cluster
@dataclass
class Cluster:
    """Two engines, their daemon(s), optionally a shared Redis, and a router in front: one arm's setup.

    The pd arms share one daemon; ``prefill-decode``'s router prefills on the first engine (core 0) and
    answers on the second (core 1).
    """

    arm: str
    model: str
    work: Path
    args: argparse.Namespace
    engines: list[EngineServer] = field(default_factory=list)
    settings: list[dict[str, object]] = field(default_factory=list)  # per engine
    redis: RedisServer | None = None
    router: subprocess.Popen[bytes] | None = None
    router_port: int = 0
    started_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    @property
    def router_log(self) -> Path:
        return self.work / "router.log"

    @property
    def prefill_decode(self) -> bool:
        return self.arm in PD_ARMS and PD_ARMS[self.arm][1]

    def daemons(self) -> list[dict[str, object]]:
        """One settings dict per distinct daemon."""
        return list({str(s["instance"]): s for s in self.settings}.values())

    def start(self) -> Cluster:
        began = time.monotonic()
        policy, shared = (PD_ARMS[self.arm][0], True) if self.arm in PD_ARMS else ARMS[self.arm]
        args = self.args
        self.work.mkdir(parents=True, exist_ok=True)
        tag = f"{self.arm}-{uuid.uuid4().hex[:6]}"
        if args.redis:
            self.redis = RedisServer(self.work / "redis").start()
        for index in range(ENGINES):
            name = "shared" if shared else f"node{index}"
            settings: dict[str, object] = {
                "instance": f"rt-{tag}-{name}", "socket_dir": str(self.work.parent / "sock"),
                "disk_path": str(self.work / f"disk-{tag}-{name}"), "l1_size": args.l1_size, "l1_prefault": False,
                "http_port": 0}
            if self.redis is not None:
                settings.update(redis_url=self.redis.url, redis_namespace=f"rt-{tag}")
            spec = EngineSpec(self.model, kvmesh=settings, kv_pool_tokens=args.pool_tokens,
                              max_model_len=args.max_model_len, extra_env={"VLLM_CPU_OMP_THREADS_BIND": str(index)})
            self.settings.append(settings)
            self.engines.append(EngineServer(spec, self.work / f"engine{index}.log"))
        if shared:  # the first engine starts the daemon both use
            for engine in self.engines:
                engine.start()
        else:
            with ThreadPoolExecutor(max_workers=ENGINES) as pool:
                for future in [pool.submit(engine.start) for engine in self.engines]:
                    future.result()
        warmup = [7] * 64
        for engine in self.engines:  # the first request of a fresh engine pays one-time costs: not measured
            stream_completion(engine.base_url, self.model, warmup, 2)
        self.start_router(policy)
        self.started_seconds = time.monotonic() - began
        return self

    def start_router(self, policy: str) -> None:
        self.router_port = free_port()
        argv = [str(Path(sys.executable).parent / "kvmesh"), "router", "--port", str(self.router_port),
                "--policy", policy, "--set", f"socket_dir={self.settings[0]['socket_dir']}"]
        if self.prefill_decode:  # the core-0 engine prefills, the core-1 engine answers
            argv += ["--prefill", self.engines[0].base_url, "--decode", self.engines[1].base_url]
        else:
            for engine in self.engines:
                argv += ["--engine", engine.base_url]
        with open(self.router_log, "ab") as log:
            self.router = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        deadline = time.monotonic() + self.args.router_timeout
        listing: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.router.poll() is not None:
                raise RuntimeError(f"the router exited with code {self.router.returncode}:\n{self._router_tail()}")
            try:
                listing = httpx.get(self.url + "/router/engines", timeout=5.0).json()
                engines = listing.get("engines", []) + listing.get("prefill", [])
                # every engine up and its daemon found (the tokenizer check happens before the search)
                if len(engines) == ENGINES and all(e["up"] and e["daemon"] for e in engines):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the router did not find both engines and their daemons in {self.args.router_timeout:.0f}"
                           f" s: {listing}\n{self._router_tail()}")

    def _router_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.router_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -------------------------------------------------------------------- counters
    def daemon_counters(self) -> dict[str, float]:
        """The daemons' counters, summed over the arm's daemons."""
        total: Counter[str] = Counter()
        for settings in self.daemons():
            config = KVMeshConfig.load({**settings, "autostart_daemon": False}, env={})
            with KVMeshClient(config) as client:
                for name, value in client.metrics().items():
                    if name in DAEMON_TOKENS.values() or name.startswith(("kvmesh_tier_hits{",
                                                                          "kvmesh_tier_read_bytes_total{")):
                        total[name] += value
        return dict(total)

    def engine_counters(self) -> dict[str, dict[str, float]]:
        """vLLM's own prefix-cache counters per engine (tokens: queried, own pool hits, external hits)."""
        counters = {}
        for engine in self.engines:
            values = prometheus_values(engine.base_url)
            counters[engine.base_url] = {short: sum(v for k, v in values.items() if k.split("{")[0] == name)
                                         for name, short in VLLM_COUNTERS.items()}
        return counters

    def router_counters(self) -> dict[str, float]:
        return prometheus_values(self.url)

    # --------------------------------------------------------------------- stopping
    def stop(self) -> None:
        """The router, the engines, the daemons and Redis, each by its own process (group)."""
        if self.router is not None:
            if self.router.poll() is None:
                try:
                    os.killpg(self.router.pid, signal.SIGTERM)
                    self.router.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.router.pid, signal.SIGKILL)
                    self.router.wait(timeout=15)
                except ProcessLookupError:
                    pass
            self.router = None
        for engine in self.engines:
            engine.stop()
        for settings in self.daemons():
            stop_daemon(KVMeshConfig.load({**settings, "autostart_daemon": False}, env={}), settle=3.0)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


# ------------------------------------------------------------------------------------------------- one arm
def run_arm(arm: str, workload: str, model: str, tokenizer: Tokenizer, work: Path,
            args: argparse.Namespace) -> dict[str, Any]:
    """Start the arm's cluster, run one workload through the router, read every counter, stop it all."""
    began = time.monotonic()
    cluster = Cluster(arm, model, work, args)
    try:
        cluster.start()
        print(f"[{arm} / {workload}] engines, daemons and router up in {cluster.started_seconds:.0f} s", flush=True)
        labels = {engine.base_url: f"e{index}" for index, engine in enumerate(cluster.engines)}
        pd_details: list[dict[str, Any]] = []
        if workload == "pd":
            clients, warm = pd_clients(tokenizer, args)
            # the first store on each engine and the first request through the router (in P/D: the first
            # handoff) pay one-time costs: not measured
            for engine, prompt in zip(cluster.engines, warm):
                stream_completion(engine.base_url, model, prompt, 2)
            stream_completion(cluster.url, model, warm[-1], 4)
        daemons_before, engines_before = cluster.daemon_counters(), cluster.engine_counters()
        router_before = cluster.router_counters()
        progress = sys.stdout.isatty()
        if workload == "pd":
            run, pd_details = run_pd(cluster.url, model, clients)
        elif workload == "chat":
            run = run_workload(cluster.url, model, chat_requests(tokenizer, args), args.answer_tokens,
                               concurrency=args.concurrency, label=f"{arm} chat", show_progress=progress)
        elif workload == "hot-prefix":
            run = run_workload(cluster.url, model, hot_prefix_requests(tokenizer, args), args.answer_tokens,
                               concurrency=args.concurrency, label=f"{arm} hot-prefix", show_progress=progress)
        else:
            run = run_burst(cluster.url, model, burst_prompts(tokenizer, args), args.burst_size, args.answer_tokens)
        run.system = arm
        print(f"[{arm} / {workload}] {len(run.requests)} requests in {run.wall_seconds:.0f} s", flush=True)
        daemons_after, engines_after = cluster.daemon_counters(), cluster.engine_counters()
        router = cluster.router_counters()
        return {"arm": arm, "workload": workload, "policy": _policy(arm), "daemons": len(cluster.daemons()),
                "engines": labels, "start_seconds": cluster.started_seconds,
                "run": run, "daemon_delta": _delta(daemons_after, daemons_before),
                "engine_delta": {labels[url]: _delta(engines_after[url], engines_before[url]) for url in labels},
                "router_metrics": router, "router_delta": _delta(router, router_before),
                "pd_requests": pd_details, "arm_seconds": time.monotonic() - began, "error": None}
    except (RuntimeError, EndpointError, OSError, httpx.HTTPError) as err:
        print(f"[{arm} / {workload}] failed: {type(err).__name__}: {err}", flush=True)
        return {"arm": arm, "workload": workload, "policy": _policy(arm), "error": f"{type(err).__name__}: {err}",
                "arm_seconds": time.monotonic() - began}
    finally:
        cluster.stop()


def _policy(arm: str) -> str:
    if arm in PD_ARMS:
        return "prefill/decode" if PD_ARMS[arm][1] else PD_ARMS[arm][0]
    return ARMS[arm][0]


DECISION = "kvmesh_router_decision_seconds"  # the one histogram kept: the router's time to choose an engine


def prometheus_values(base_url: str) -> dict[str, float]:
    """A server's ``/metrics`` as ``name{labels}: value`` (histograms but the decision's, and creation times,
    left out)."""
    text = httpx.get(base_url + "/metrics", timeout=30.0).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "histogram" and family.name != DECISION:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: value - before.get(name, 0.0) for name, value in after.items()}


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """One line of the table: what the issue asks for, per arm and workload."""
    row: dict[str, Any] = {"workload": result["workload"], "arm": result["arm"]}
    if result.get("error"):
        return {**row, "error": result["error"]}
    if result["workload"] == "pd":
        return {**row, **pd_columns(result), **counter_columns(result)}
    run: RunRecord = result["run"]
    base = summarize(run)
    ok = [r for r in run.requests if r.error is None]
    first = [r.ttft for r in ok if r.round == 0]
    share = Counter(result["engines"].get(r.served_by or "", "?") for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    engines = result["engine_delta"]
    row.update({
        "daemons": result["daemons"], "requests": base["requests"], "failed": base["failed"],
        "req_per_s": base["req_per_s"], "first_mean_ttft": statistics.fmean(first) if first else float("nan"),
        "returning_mean_ttft": base.get("returning_mean_ttft", float("nan")),
        "returning_p90_ttft": base.get("returning_p90_ttft", float("nan")),
        "mean_ttft": base["mean_ttft"], "p90_ttft": base["p90_ttft"],
        "share": " ".join(f"{label}:{share.get(label, 0) / max(1, len(ok)):.0%}"
                          for label in sorted(result["engines"].values())),
        "max_share": max(share.values()) / len(ok) if ok else float("nan"),
        "prompt_tokens": prompt, "cached_tokens": cached,
        "returning_cached_tokens": sum(r.cached_tokens or 0 for r in ok if r.round > 0),
        "cached_share": cached / prompt if prompt else float("nan"),
        "vllm_own_hit_tokens": int(sum(e.get("own", 0.0) for e in engines.values())),
        "vllm_external_hit_tokens": int(sum(e.get("external", 0.0) for e in engines.values())),
    })
    return {**row, **counter_columns(result)}


def pd_columns(result: dict[str, Any]) -> dict[str, Any]:
    """The pd workload's figures: TTFT of long and short prompts, the short requests' inter-token latency,
    the prompt tokens the engines computed, and the router's handoffs."""
    run: RunRecord = result["run"]
    detail = {d["index"]: d for d in result["pd_requests"]}
    ok = [r for r in run.requests if r.error is None]
    kind = {r.index: detail[r.index]["kind"] for r in run.requests}
    longs = [r for r in ok if kind[r.index] == "long"]
    shorts = [r for r in ok if kind[r.index] == "short"]
    # another request's long prefill: from its sending to its first token (in P/D: the prefill engine's
    # compute, then the decode engine's load and its one token)
    prefills = [(r.sent_at, r.sent_at + r.ttft) for r in longs]
    gaps: list[float] = []
    during: list[float] = []
    for r in shorts:
        times = [r.sent_at + t for t in detail[r.index]["token_times"]]
        for begin, end in zip(times, times[1:]):
            gaps.append(end - begin)
            if any(begin < stop and end > start for start, stop in prefills):
                during.append(end - begin)
    computed = {r.index: detail[r.index]["computed_prompt_tokens"] for r in ok}
    share = Counter(result["engines"].get(r.served_by or "", "?") for r in ok)
    router = result["router_delta"]
    engines = result["engine_delta"]

    def handoffs(outcome: str) -> int:
        return int(router.get(f"kvmesh_router_handoffs_total{{outcome={outcome}}}", 0.0))

    def mean(values: Sequence[float]) -> float:
        return statistics.fmean(values) if values else float("nan")

    return {
        "requests": len(run.requests), "failed": len(run.requests) - len(ok),
        "req_per_s": len(ok) / run.wall_seconds if run.wall_seconds else float("nan"),
        "long": len(longs), "short": len(shorts),
        "long_ttft_mean": mean([r.ttft for r in longs]), "long_ttft_p90": percentile([r.ttft for r in longs], 0.9),
        "short_ttft_mean": mean([r.ttft for r in shorts]),
        "short_ttft_p90": percentile([r.ttft for r in shorts], 0.9),
        "short_itl_mean_ms": 1e3 * mean(gaps), "short_itl_p99_ms": 1e3 * percentile(gaps, 0.99),
        "short_itl_max_ms": 1e3 * max(gaps, default=float("nan")),
        "short_itl_p99_ms_in_long_prefill": 1e3 * percentile(during, 0.99),
        "short_gaps_in_long_prefill": f"{len(during)}/{len(gaps)}",
        "short_latency_mean": mean([r.latency for r in shorts]),
        "share": " ".join(f"{label}:{share.get(label, 0) / max(1, len(ok)):.0%}"
                          for label in sorted(result["engines"].values())),
        "long_computed_mean": mean([computed[r.index] for r in longs if computed[r.index] is not None]),
        "short_computed_mean": mean([computed[r.index] for r in shorts if computed[r.index] is not None]),
        "computed_1_requests": sum(1 for value in computed.values() if value == 1),
        "handoffs_prefilled": handoffs("prefilled"), "handoffs_skipped": handoffs("skipped"),
        "handoffs_short": handoffs("short"), "handoffs_prefill_failed": handoffs("prefill_failed"),
        "handoff_shortfall_tokens": int(router.get("kvmesh_router_handoff_shortfall_tokens_total", 0.0)),
        "vllm_own_hit_tokens": int(sum(e.get("own", 0.0) for e in engines.values())),
        "vllm_external_hit_tokens": int(sum(e.get("external", 0.0) for e in engines.values())),
    }


def counter_columns(result: dict[str, Any]) -> dict[str, Any]:
    """The daemons' tokens and tier reads, the router's prediction, the arm's time."""
    daemon = result["daemon_delta"]
    row: dict[str, Any] = {}
    for name, metric in DAEMON_TOKENS.items():
        row[f"kvmesh_{name}_tokens"] = int(daemon.get(metric, 0.0))
    for metric, value in sorted(daemon.items()):
        if metric.startswith("kvmesh_tier_hits{"):
            row[f"{_tier(metric)}_chunk_hits"] = int(value)
        elif metric.startswith("kvmesh_tier_read_bytes_total{"):
            row[f"{_tier(metric)}_read_MB"] = value / 1e6
    router = result["router_metrics"]
    row["router_predicted_cached"] = int(router.get("kvmesh_router_predicted_cached_tokens_total", 0.0))
    row["router_reported_cached"] = int(router.get("kvmesh_router_actual_cached_tokens_total", 0.0))
    row.update(decision_latency(result["router_delta"]))
    row["arm_seconds"] = result["arm_seconds"]
    return row


def decision_latency(delta: dict[str, float]) -> dict[str, float | None]:
    """The router's decisions during the run: their mean, and the bucket bound that holds 99% of them."""
    count = delta.get(f"{DECISION}_count", 0.0)
    if not count:
        return {"decision_mean_ms": None, "decision_p99_at_most_ms": None}
    buckets = sorted((float(name.split("le=", 1)[1].rstrip("}")), value) for name, value in delta.items()
                     if name.startswith(f"{DECISION}_bucket{{"))
    p99 = next((bound for bound, cumulative in buckets if cumulative >= 0.99 * count), float("inf"))
    return {"decision_mean_ms": round(delta.get(f"{DECISION}_sum", 0.0) / count * 1000, 2),
            "decision_p99_at_most_ms": round(p99 * 1000, 1)}


def _tier(metric: str) -> str:
    return metric.split("tier=", 1)[1].rstrip("}")


def headlines(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, where the arms they compare were run."""
    def find(workload: str, arm: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["workload"] == workload and r["arm"] == arm and "error" not in r), None)

    out: dict[str, Any] = {}
    cache, shared, rr = find("chat", "cache"), find("chat", "shared"), find("chat", "round-robin")
    for key in ("cached_tokens", "returning_cached_tokens", "kvmesh_hit_tokens", "kvmesh_loaded_tokens"):
        if cache and shared:
            out[f"{key}: cache / shared"] = _ratio(cache[key], shared[key])
        if cache and rr:
            out[f"{key}: cache / round-robin"] = _ratio(cache[key], rr[key])
    if cache and shared:
        ratio = out["cached_tokens: cache / shared"]
        out["target: cache >= 95% of shared"] = None if ratio is None else ratio >= TARGET_SHARED
    if cache and rr:
        ratio = out["cached_tokens: cache / round-robin"]
        out["target: cache >= 1.5x round-robin"] = None if ratio is None else ratio >= TARGET_ROUND_ROBIN
    hot = find("hot-prefix", "cache")
    if hot:
        out["hot-prefix cache: max engine share"] = hot["max_share"]
        out["target: hot-prefix max share <= 65%"] = hot["max_share"] <= TARGET_MAX_SHARE
    aggregated, pd = find("pd", "aggregated"), find("pd", "prefill-decode")
    if aggregated and pd:
        for key in ("short_itl_p99_ms", "short_itl_p99_ms_in_long_prefill", "short_itl_mean_ms", "req_per_s",
                    "long_ttft_mean", "short_ttft_mean"):
            out[f"pd {key}: prefill-decode / aggregated"] = _ratio(pd[key], aggregated[key])
    if pd:
        out["pd prefill-decode: handed-off requests (prefilled) / requests whose engine computed exactly 1 prompt "
            "token"] = f"{pd['handoffs_prefilled']} / {pd['computed_1_requests']} (of {pd['long']} long prompts)"
    return out


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def burst_detail(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per burst prompt: the engine and TTFT of each copy."""
    if result.get("error") or result["workload"] != "burst":
        return []
    run: RunRecord = result["run"]
    detail = []
    for user in sorted({r.user for r in run.requests}):
        copies = sorted((r for r in run.requests if r.user == user), key=lambda r: r.round)
        detail.append({"arm": result["arm"], "prompt": user,
                       "engines": " ".join(result["engines"].get(r.served_by or "", "?") for r in copies),
                       "ttfts": " ".join(f"{r.ttft:.2f}" for r in copies),
                       "cached": " ".join(str(r.cached_tokens) for r in copies)})
    return detail


# ----------------------------------------------------------------------------------------------------- main
MAIN_COLUMNS = ("workload", "arm", "daemons", "requests", "failed", "req_per_s", "first_mean_ttft",
                "returning_mean_ttft", "returning_p90_ttft", "share", "max_share", "prompt_tokens", "cached_tokens",
                "cached_share", "vllm_own_hit_tokens", "vllm_external_hit_tokens", "arm_seconds", "error")


PD_COLUMNS = ("arm", "requests", "failed", "req_per_s", "long_ttft_mean", "long_ttft_p90", "short_ttft_mean",
              "short_ttft_p90", "short_itl_mean_ms", "short_itl_p99_ms", "short_itl_max_ms",
              "short_itl_p99_ms_in_long_prefill", "short_gaps_in_long_prefill", "short_latency_mean", "arm_seconds",
              "error")
PD_HANDOFF_COLUMNS = ("arm", "share", "long", "short", "long_computed_mean", "short_computed_mean",
                      "computed_1_requests", "handoffs_prefilled", "handoffs_skipped", "handoffs_short",
                      "handoffs_prefill_failed", "handoff_shortfall_tokens", "vllm_own_hit_tokens",
                      "vllm_external_hit_tokens")


def tables(rows: Sequence[dict[str, Any]], bursts: Sequence[dict[str, Any]]) -> str:
    pd = [r for r in rows if r["workload"] == "pd"]
    main = [{k: r[k] for k in MAIN_COLUMNS if k in r} for r in rows if r["workload"] != "pd"]
    tier_keys = [k for r in rows for k in r if k.startswith(("kvmesh_", "router_")) or k.endswith(
        ("_chunk_hits", "_read_MB"))]
    tiers = [{"workload": r["workload"], "arm": r["arm"], **{k: r.get(k) for k in dict.fromkeys(tier_keys)}}
             for r in rows if "error" not in r]
    parts = ["## Requests, TTFT (s), shares, cached tokens", markdown_table(main)] if main else []
    if pd:
        parts += ["## Prefill/decode vs aggregated (pd): requests, TTFT (s) of long and short prompts, the short "
                  "(decode-heavy) requests' inter-token latency (ms) and latency (s)",
                  markdown_table([{k: r[k] for k in PD_COLUMNS if k in r} for r in pd]),
                  f"Note: {PD_NOTE}",
                  "## pd: engine shares (e0 core 0: the prefill engine in P/D; e1 core 1: the decode engine), "
                  "prompt tokens computed per request (prompt_tokens - cached_tokens), the router's handoffs",
                  markdown_table([{k: r[k] for k in PD_HANDOFF_COLUMNS if k in r} for r in pd if "error" not in r])]
    if tiers:
        parts += ["## kvmesh daemons (tokens; chunk hits and MB read per tier) and the router's prediction",
                  markdown_table(tiers)]
    if bursts:
        parts += ["## Bursts: each copy's engine, TTFT (s), cached tokens", markdown_table(bursts)]
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="", help=f"comma-separated, of: {', '.join(ARMS)} (chat, hot-prefix, "
                        f"burst) and {', '.join(PD_ARMS)} (pd); default: every arm of each workload")
    parser.add_argument("--workload", default="chat", help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    parser.add_argument("--model", help="the model's folder (default: the demo model, `kvmesh model path`)")
    parser.add_argument("--users", type=int, default=12, help="chat: users")
    parser.add_argument("--rounds", type=int, default=4, help="chat: rounds per user")
    parser.add_argument("--system-tokens", type=int, default=200, help="chat: the system prompt all users share")
    parser.add_argument("--context-tokens", type=int, default=900, help="chat: each user's document (round 1)")
    parser.add_argument("--turn-tokens", type=int, default=60, help="chat: question + answer added per round")
    parser.add_argument("--hot-users", type=int, default=24, help="hot-prefix: requests (distinct users)")
    parser.add_argument("--hot-system-tokens", type=int, default=1000, help="hot-prefix: the shared system prompt")
    parser.add_argument("--hot-question-tokens", type=int, default=24, help="hot-prefix: each user's question")
    parser.add_argument("--burst-prompts", type=int, default=3, help="burst: prompts, one burst each")
    parser.add_argument("--burst-size", type=int, default=4, help="burst: copies of a prompt sent at once")
    parser.add_argument("--burst-tokens", type=int, default=1000, help="burst: tokens per prompt")
    parser.add_argument("--pd-long-clients", type=int, default=2, help="pd: clients sending long prompts")
    parser.add_argument("--pd-long-requests", type=int, default=10, help="pd: long prompts per long client")
    parser.add_argument("--pd-long-tokens", type=int, default=1500, help="pd: tokens per long prompt (a new "
                        "document each, then a question)")
    parser.add_argument("--pd-long-answer", type=int, default=8, help="pd: tokens answered to a long prompt")
    parser.add_argument("--pd-short-clients", type=int, default=2, help="pd: clients sending short prompts")
    parser.add_argument("--pd-short-requests", type=int, default=12, help="pd: short prompts per short client")
    parser.add_argument("--pd-short-tokens", type=int, default=100, help="pd: tokens per short prompt (before "
                        "the question)")
    parser.add_argument("--pd-short-answer", type=int, default=64, help="pd: tokens answered to a short prompt")
    parser.add_argument("--concurrency", type=int, default=2, help="chat, hot-prefix: requests in flight")
    parser.add_argument("--answer-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--pool-tokens", type=int, default=4096, help="each engine's own KV pool, in tokens")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--l1-size", default="256MiB", help="each daemon's L1 (shared memory); a disk tier is "
                        "always on, in the work folder")
    parser.add_argument("--redis", action="store_true", help="a Redis tier shared by both nodes (fresh per arm)")
    parser.add_argument("--router-timeout", type=float, default=90.0,
                        help="seconds for the router to find both engines and their daemons")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary folder, removed)")
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    args.arm_list = [a for a in args.arms.split(",") if a]
    args.workload_list = [w for w in args.workload.split(",") if w]
    known = [*ARMS, *PD_ARMS]
    if set(args.arm_list) - set(known):
        parser.error(f"--arms: unknown {sorted(set(args.arm_list) - set(known))}; known: {', '.join(known)}")
    if not args.workload_list or set(args.workload_list) - set(WORKLOADS):
        parser.error(f"--workload: unknown {sorted(set(args.workload_list) - set(WORKLOADS))}; "
                     f"known: {', '.join(WORKLOADS)}")
    for workload in args.workload_list:
        if not arms_of(workload, args.arm_list):
            parser.error(f"--arms names no arm of the {workload} workload: "
                         f"{', '.join(PD_ARMS if workload == 'pd' else ARMS)}")
    for name in ("users", "rounds", "hot_users", "burst_prompts", "burst_size", "concurrency", "answer_tokens",
                 "pd_long_requests", "pd_long_tokens", "pd_long_answer", "pd_short_requests", "pd_short_tokens",
                 "pd_short_answer"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("pd_long_clients", "pd_short_clients"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if args.pd_long_clients + args.pd_short_clients < 1:
        parser.error("pd needs at least one client (--pd-long-clients, --pd-short-clients)")
    return args


def arms_of(workload: str, arm_list: Sequence[str]) -> list[str]:
    """The arms a workload runs: those of ``arm_list`` it knows, or all of them where ``arm_list`` is empty."""
    known = PD_ARMS if workload == "pd" else ARMS
    return [a for a in arm_list if a in known] if arm_list else list(known)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark still stops what it started
    from transformers import AutoTokenizer

    model = args.model or str(prepare_demo_model(default_model_dir()))
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    longest = max([len(r.prompt) for r in chat_requests(tokenizer, args)] if "chat" in args.workload_list else [0])
    if longest + args.answer_tokens > args.max_model_len:
        print(f"the last chat round has {longest} tokens: more than --max-model-len {args.max_model_len} allows "
              f"with {args.answer_tokens} answer tokens", file=sys.stderr)
        return 2
    if "pd" in args.workload_list:
        clients, _ = pd_clients(tokenizer, args)
        for request in (r for requests in clients for r in requests):
            if len(request.prompt) + request.answer_tokens > args.max_model_len:
                print(f"a pd {request.kind} prompt has {len(request.prompt)} tokens: more than --max-model-len "
                      f"{args.max_model_len} allows with {request.answer_tokens} answer tokens", file=sys.stderr)
                return 2
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        work = args.workdir or Path(tmp)
        arms = {workload: arms_of(workload, args.arm_list) for workload in args.workload_list}
        print(f"bench_router: arms {arms}, model {model}, work {work}"
              + (f"; chat prompts up to {longest} tokens" if longest else ""), flush=True)
        for workload in args.workload_list:
            for arm in arms_of(workload, args.arm_list):
                results.append(run_arm(arm, workload, model, tokenizer, work / f"{workload}-{arm}", args))
    rows = [summary_row(r) for r in results]
    bursts = [line for r in results for line in burst_detail(r)]
    heads = headlines(rows)
    markdown = tables(rows, bursts)
    print("\n" + markdown)
    if heads:
        print("\n## Headlines\n")
        for name, value in heads.items():
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            print(f"- {name}: {shown}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({
            "title": "kvmesh router: policies on two vLLM-CPU engines", "command": command,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows, "headlines": heads, "bursts": bursts, "markdown": markdown,
            **({"pd_note": PD_NOTE} if "pd" in args.workload_list else {}),
            "results": [{**{k: v for k, v in r.items() if k != "run"},
                         **({"requests": [asdict(q) for q in r["run"].requests],
                             "wall_seconds": r["run"].wall_seconds} if "run" in r else {})} for r in results],
        }, indent=1, default=str))
        print(f"\nreport: {args.report}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
