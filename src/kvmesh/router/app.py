"""The router's HTTP side: an OpenAI-compatible proxy that sends each request to the engine chosen for it.

Request bodies go to the engine byte for byte, and responses (streamed or not) come back byte for byte.  An
engine that cannot be reached is marked down and the request is tried on the next engine, as long as no
byte of the answer was sent; a node daemon that cannot be asked only costs that engine its cache credit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvmesh.config import KVMeshConfig
from kvmesh.router import ENGINE_HEADER
from kvmesh.router.nodes import NODE_FAULTS, EngineKeys, Held, NodeLink, RouterConfigError, find_node
from kvmesh.router.policy import Candidate, Chooser, EngineLoad, PendingCredit, PrefillSpeed
from kvmesh.router.prompts import LocalTokenizer, NotTokenizable, PromptRequest, check_samples

log = logging.getLogger("kvmesh.router")

HEALTH_SECONDS = 2.0
NODE_RETRY_SECONDS = 5.0  # a daemon that did not answer is asked again after this long
TAIL_BYTES = 8192  # the end of a streamed answer kept to read its usage
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def parse_engine(argument: str) -> tuple[str, str | None]:
    """``URL`` or ``URL@instance`` (the node daemon's instance name), checked."""
    url, separator, instance = argument.rpartition("@")
    if not separator or "/" in instance or ":" in instance:  # an @ of the URL itself, not an instance
        url, instance = argument, ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RouterConfigError(f"--engine {argument!r}: expected http://HOST:PORT (optionally @INSTANCE, the "
                                "engine's kvmesh daemon instance)")
    return url.rstrip("/"), instance or None


@dataclass
class Engine:
    url: str
    instance: str | None = None  # the daemon named by --engine URL@instance; None: found by port
    up: bool = False
    model: str | None = None
    node: NodeLink | None = None
    keys: EngineKeys | None = None
    node_retry_at: float = 0.0
    load: EngineLoad = field(default_factory=EngineLoad)

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "up": self.up, "model": self.model,
                "daemon": self.node.instance if self.node else None,
                "in_flight": len(self.load.in_flight),
                "prefill_ms_per_token": round(self.load.prefill_seconds_per_token * 1000, 4)}


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvmesh_router_requests", "Requests routed, by engine and by whether the chosen "
                                "engine's node held part of the prompt", ["engine", "cache"], registry=r)
        self.predicted = Counter("kvmesh_router_predicted_cached_tokens", "Prompt tokens the chosen node held "
                                 "when routed", registry=r)
        self.actual = Counter("kvmesh_router_actual_cached_tokens", "Prompt tokens the engine reported cached "
                              "(usage.prompt_tokens_details, where the engine gives it)", registry=r)
        self.reported_prompt = Counter("kvmesh_router_reported_prompt_tokens", "Prompt tokens of the answers "
                                       "whose cached tokens were reported", registry=r)
        self.decision = Histogram("kvmesh_router_decision_seconds", "Time from a request's arrival to its engine "
                                  "chosen (tokenizing and probing included)", registry=r,
                                  buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
        self.retries = Counter("kvmesh_router_retries", "Requests sent to another engine because one could not "
                               "be reached", ["engine"], registry=r)
        self.probe_failures = Counter("kvmesh_router_probe_failures", "Node daemons that could not be asked",
                                      ["engine"], registry=r)
        self.token_checks = Counter("kvmesh_router_token_checks", "Prompts tokenized by both the router and the "
                                    "engine to compare", registry=r)
        self.token_mismatches = Counter("kvmesh_router_token_mismatches", "Compared prompts whose tokens "
                                        "differed (the model is then tokenized by its engine)", registry=r)
        self.handoffs = Counter("kvmesh_router_handoffs", "Prefill/decode: prompts prefilled on a prefill "
                                "engine, skipped (the decode engine's node held them), short (less than a chunk: "
                                "computed by the decode engine), or whose prefill failed (the decode engine "
                                "computed them)", ["outcome"], registry=r)
        self.shortfall = Counter("kvmesh_router_handoff_shortfall_tokens", "Prefill/decode: prompt tokens the "
                                 "decode engine computed beyond the last one although the prefill stored them",
                                 registry=r)
        self.engine_up = Gauge("kvmesh_router_engine_up", "1 when the engine answers its health check",
                               ["engine"], registry=r)
        self.in_flight = Gauge("kvmesh_router_in_flight", "Requests routed to the engine and not finished",
                               ["engine"], registry=r)


class Router:
    """The engines, their nodes and loads, the tokenizers, and the choice."""

    def __init__(self, engines: list[tuple[str, str | None]], policy: str = "cache",
                 config: KVMeshConfig | None = None, check_fraction: float = 0.01, seed: int | None = None,
                 prefill: list[tuple[str, str | None]] | None = None) -> None:
        if not engines:
            raise RouterConfigError("give at least one --engine URL (--decode URL with --prefill)")
        urls = [url for url, _ in [*engines, *(prefill or [])]]
        repeated = sorted({url for url in urls if urls.count(url) > 1})
        if repeated:
            raise RouterConfigError(f"--engine {repeated[0]} is given more than once")
        if not 0.0 <= check_fraction <= 1.0:
            raise RouterConfigError(f"--check-fraction must be between 0 and 1, got {check_fraction}")
        self.config = config or KVMeshConfig.load()
        self.engines = {url: Engine(url, instance) for url, instance in engines}
        # prefill/decode: prompts are computed on these first (one token), then answered by ``engines``, which
        # load the prompt from kvmesh and compute its last token only
        self.prefill = {url: Engine(url, instance) for url, instance in prefill or []}
        self.chooser = Chooser(policy, random.Random(seed))
        self.policy = policy
        self.check_fraction = check_fraction
        self.metrics = RouterMetrics()
        self.pending = PendingCredit()
        self.speeds: dict[tuple[bool, str], PrefillSpeed] = {}  # (a prefill engine?, model): PrefillSpeed's why
        self.tokenizers: dict[str, LocalTokenizer | None] = {}  # None: the model's engines tokenize
        self.links: dict[str, NodeLink] = {}
        self._checking: set[str] = set()
        self._rng = random.Random(seed)
        self._http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("the router is not started")
        return self._http

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._refresh_forever()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._http is not None:
            await self._http.aclose()
        for link in self.links.values():
            link.close()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_SECONDS)
            await self.refresh()

    async def refresh(self) -> None:
        engines = [*self.engines.values(), *self.prefill.values()]
        await asyncio.gather(*(self.refresh_engine(engine) for engine in engines))

    async def refresh_engine(self, engine: Engine) -> None:
        try:
            health = await self.http.get(f"{engine.url}/health", timeout=5.0)
            up = health.status_code == 200
            if up and engine.model is None:
                models = await self.http.get(f"{engine.url}/v1/models", timeout=5.0)
                engine.model = str(models.json()["data"][0]["id"])
                engine.load.speed = self.speeds.setdefault((engine.url in self.prefill, engine.model),
                                                           engine.load.speed)
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            up = False
        if up != engine.up:
            log.info("kvmesh router: engine %s is %s", engine.url, "up" if up else "down")
        engine.up = up
        self.metrics.engine_up.labels(engine.url).set(int(up))
        if not up or engine.model is None:
            return
        if engine.model not in self.tokenizers and engine.model not in self._checking:
            self._checking.add(engine.model)  # one check per model; meanwhile its engines tokenize
            try:
                self.tokenizers[engine.model] = await self._checked_tokenizer(engine)
            finally:
                self._checking.discard(engine.model)
        if engine.keys is None and time.monotonic() >= engine.node_retry_at:
            found = await asyncio.to_thread(find_node, self.config, engine.url, engine.model, engine.instance,
                                            self.links)
            if found is None:
                engine.node_retry_at = time.monotonic() + NODE_RETRY_SECONDS
            else:
                engine.node, engine.keys = found
                log.info("kvmesh router: engine %s stores through the daemon %r", engine.url, engine.node.instance)

    async def _checked_tokenizer(self, engine: Engine) -> LocalTokenizer | None:
        """The model's tokenizer, if it tokenizes the check prompts exactly as the engine does."""
        model = str(engine.model)
        try:
            tokenizer = await asyncio.to_thread(LocalTokenizer, model)
        except (OSError, ValueError) as err:
            log.warning("kvmesh router: no local tokenizer for %s (%s); its engines tokenize each request", model, err)
            return None
        for sample in check_samples():
            if not await self._same_tokens(engine, tokenizer, sample):
                return None
        return tokenizer

    async def _same_tokens(self, engine: Engine, tokenizer: LocalTokenizer, prompt: PromptRequest) -> bool:
        try:
            mine = tokenizer.tokens(prompt)
            theirs = await self._engine_tokens(engine, prompt)
        except (NotTokenizable, httpx.HTTPError, ValueError, KeyError):
            return True  # nothing to compare
        self.metrics.token_checks.inc()
        if mine == theirs:
            return True
        self.metrics.token_mismatches.inc()
        log.warning("kvmesh router: its tokens of a %s prompt differ from the engine %s's (%d vs %d tokens); "
                    "the engines tokenize %s's requests from now on", prompt.kind, engine.url, len(mine),
                    len(theirs), engine.model)
        return False

    async def _engine_tokens(self, engine: Engine, prompt: PromptRequest) -> list[int]:
        reply = await self.http.post(f"{engine.url}/tokenize", json=prompt.tokenize_body(str(engine.model)),
                                     timeout=30.0)
        reply.raise_for_status()
        return [int(t) for t in reply.json()["tokens"]]

    # ------------------------------------------------------------------- routing
    def candidates_for(self, model: object, pool: dict[str, Engine] | None = None) -> list[Engine]:
        up = [engine for engine in (self.engines if pool is None else pool).values() if engine.up]
        serving = [engine for engine in up if engine.model == model]
        return serving or up

    async def tokens_of(self, prompt: PromptRequest, engines: list[Engine]) -> list[int] | None:
        """The prompt's tokens, or None where neither the router nor an engine could tokenize it."""
        model = engines[0].model
        tokenizer = self.tokenizers.get(str(model))
        if tokenizer is not None:
            try:
                tokens = tokenizer.tokens(prompt)
            except NotTokenizable:
                return None
            if self._rng.random() < self.check_fraction:
                task = asyncio.create_task(self._sample_check(engines[0], tokenizer, prompt))
                self._tasks.append(task)
                task.add_done_callback(self._tasks.remove)
            return tokens
        try:
            return await self._engine_tokens(engines[0], prompt)
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    async def _sample_check(self, engine: Engine, tokenizer: LocalTokenizer, prompt: PromptRequest) -> None:
        if not await self._same_tokens(engine, tokenizer, prompt):
            self.tokenizers[str(engine.model)] = None

    async def _held(self, engine: Engine, tokens: list[int], cache_salt: str | None) -> Held:
        node, keys = engine.node, engine.keys
        if node is None or keys is None or time.monotonic() < engine.node_retry_at:
            return Held()
        namespace = keys.namespace_for(self.config.tenant_salt, cache_salt)
        if namespace is None:
            return Held()
        try:
            return await asyncio.to_thread(node.held, keys, tokens, namespace)
        except NODE_FAULTS as err:
            self.metrics.probe_failures.labels(engine.url).inc()
            log.info("kvmesh router: the daemon of %s could not be asked (%s); no cache credit", engine.url, err)
            engine.node_retry_at = time.monotonic() + NODE_RETRY_SECONDS
            return Held()

    async def choose(self, kind: str, body: dict[str, Any], pool: dict[str, Engine] | None = None,
                     tokens: list[int] | None = None) -> tuple[list[Candidate], list[int] | None]:
        """The engines of ``pool`` (default: the answering ones) to try, best first; the prompt's tokens."""
        pool = self.engines if pool is None else pool
        engines = self.candidates_for(body.get("model"), pool)
        if not engines:
            return [], None
        helds = [Held()] * len(engines)
        chunks: list[tuple[tuple[bytes, int], ...]] = [()] * len(engines)
        if self.policy == "cache" or self.prefill:
            tokens = tokens or await self.tokens_of(PromptRequest.of(kind, body), engines)
        # a LoRA adapter's requests name the adapter, not the engine's model: their chunks are in a namespace
        # of the adapter's files, which the router cannot name, so they get no credit
        base_model = body.get("model") in (None, engines[0].model)
        if self.policy == "cache" and tokens and base_model:
            salt = body.get("cache_salt")
            helds = list(await asyncio.gather(*(self._held(e, tokens, salt) for e in engines)))
            for index, engine in enumerate(engines):
                namespace = engine.keys.namespace_for(self.config.tenant_salt, salt) if engine.keys else None
                if engine.keys is not None and namespace is not None:
                    chunks[index] = tuple(_chunk_ends(engine.keys, tokens, namespace))
                    pending = self.pending.tokens(engine.url, chunks[index])
                    if pending > helds[index].tokens:
                        helds[index] = Held(pending, 0)
        candidates = [Candidate(e.url, e.load, h.tokens, h.below_l1, c) for e, h, c in zip(engines, helds, chunks)]
        ordered = self.chooser.order(candidates, len(tokens) if tokens else 0, replicate=not self.prefill)
        chosen = pool[ordered[0].name]
        if ordered[0].chunks:  # the cache policy named them for the choice
            self.pending.add(chosen.url, ordered[0].chunks)
        elif tokens and base_model and chosen.keys is not None:
            namespace = chosen.keys.namespace_for(self.config.tenant_salt, body.get("cache_salt"))
            if namespace is not None:
                self.pending.add(chosen.url, _chunk_ends(chosen.keys, tokens, namespace))
        return ordered, tokens

    async def prefill_first(self, kind: str, body: dict[str, Any], tokens: list[int] | None,
                            decode: Candidate, headers: dict[str, str]) -> int | None:
        """Have a prefill engine compute the prompt (one token; its connector stores every chunk and says
        how many tokens its node holds), unless the decode engine's node holds all but its last chunk
        already; the tokens the decode engine should find, or None where no prefill ran."""
        keys = self.engines[decode.name].keys
        if tokens and keys is not None:
            if len(tokens) <= keys.chunk_size:  # less than a chunk: the decode engine computes it about as fast
                self.metrics.handoffs.labels("short").inc()
                return None
            held = decode.held_tokens
            if self.policy != "cache":  # the choice did not ask the decode engine's node
                held = (await self._held(self.engines[decode.name], tokens, body.get("cache_salt"))).tokens
            if held >= len(tokens) - keys.chunk_size:
                self.metrics.handoffs.labels("skipped").inc()
                return None
        ordered, _ = await self.choose(kind, body, self.prefill, tokens)
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        for candidate in ordered:
            engine = self.prefill[candidate.name]
            ticket = engine.load.start(max(len(tokens or ()) - candidate.held_tokens, 0), chunks=candidate.chunks)
            try:
                reply = await self.http.post(f"{engine.url}{path}", json=prefill_body(body), headers=headers)
            except httpx.TransportError as err:
                engine.up = False
                log.warning("kvmesh router: prefill engine %s could not be reached (%s)", engine.url, err)
                continue
            finally:
                self._finished(engine, ticket)
            if reply.status_code != 200:
                log.warning("kvmesh router: prefill engine %s answered %s: %s; the decode engine computes the "
                            "prompt", engine.url, reply.status_code, reply.text[:200])
                break
            try:
                params = reply.json().get("kv_transfer_params") or {}
                stored = (params.get("kvmesh") or {}).get("stored_tokens")
            except (ValueError, AttributeError):  # not kvmesh's answer: the decode engine finds what it finds
                stored = None
            self.metrics.handoffs.labels("prefilled").inc()
            return int(stored) if isinstance(stored, int) else None
        self.metrics.handoffs.labels("prefill_failed").inc()
        return None

    async def forward(self, request: Request, kind: str) -> Response:
        arrived = time.perf_counter()
        raw = await request.body()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as err:
            return _error(400, f"the request body is not a JSON object: {err}")
        ordered, tokens = await self.choose(kind, body)
        self.metrics.decision.observe(time.perf_counter() - arrived)
        if not ordered:
            return _error(503, "no engine is up")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        expected = None  # prefill/decode: the prompt tokens the decode engine should load
        if self.prefill:
            stored = await self.prefill_first(kind, body, tokens, ordered[0], headers)
            if stored is not None:
                expected = min(stored, len(tokens) - 1) if tokens else None
                ordered, tokens = await self.choose(kind, body, tokens=tokens)  # its node holds the prompt now
                if not ordered:
                    return _error(503, "no engine is up")
        streamed = bool(body.get("stream"))
        prompt_tokens = len(tokens) if tokens else 0
        for attempt, candidate in enumerate(ordered):
            engine = self.engines[candidate.name]
            uncached = max(prompt_tokens - candidate.held_tokens, 0)
            ticket = engine.load.start(uncached, chunks=candidate.chunks)
            self.metrics.in_flight.labels(engine.url).set(len(engine.load.in_flight))
            upstream = self.http.build_request("POST", f"{engine.url}{request.url.path}", content=raw,
                                               headers=headers)
            try:
                reply = await self.http.send(upstream, stream=True)
            except httpx.TransportError as err:
                self._finished(engine, ticket)
                engine.up = False
                self.metrics.engine_up.labels(engine.url).set(0)
                self.metrics.retries.labels(engine.url).inc()
                log.warning("kvmesh router: engine %s could not be reached (%s); trying the next", engine.url, err)
                continue
            self.metrics.requests.labels(engine.url, "hit" if candidate.held_tokens else "miss").inc()
            self.metrics.predicted.inc(candidate.held_tokens if attempt == 0 else 0)
            out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_HEADERS}
            out_headers[ENGINE_HEADER] = engine.url
            if streamed:
                return StreamingResponse(self._relay(engine, ticket, reply, expected),
                                         status_code=reply.status_code, headers=out_headers)
            try:
                content = await reply.aread()
            finally:  # the whole answer at once: no first token to learn the prefill speed from
                await reply.aclose()
                self._finished(engine, ticket)
            self._count_usage(content, expected)
            return Response(content, status_code=reply.status_code, headers=out_headers)
        return _error(503, "no engine could be reached: " + ", ".join(c.name for c in ordered))

    async def _relay(self, engine: Engine, ticket: int, reply: httpx.Response,
                     expected: int | None) -> AsyncIterator[bytes]:
        tail = b""
        try:
            async for piece in reply.aiter_raw():
                engine.load.first_token(ticket)
                tail = (tail + piece)[-TAIL_BYTES:]
                yield piece
        finally:
            await reply.aclose()
            self._finished(engine, ticket)
            for line in reversed(tail.split(b"\n")):
                if line.startswith(b"data: {") and b'"usage"' in line:
                    self._count_usage(line[len(b"data: "):], expected)
                    break

    def _finished(self, engine: Engine, ticket: int) -> None:
        engine.load.finish(ticket)
        self.metrics.in_flight.labels(engine.url).set(len(engine.load.in_flight))

    def _count_usage(self, content: bytes, expected: int | None = None) -> None:
        try:
            usage = json.loads(content).get("usage") or {}
        except (ValueError, AttributeError):
            return
        details = usage.get("prompt_tokens_details") or {}
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            cached = int(details["cached_tokens"])
            self.metrics.actual.inc(cached)
            self.metrics.reported_prompt.inc(int(usage.get("prompt_tokens") or 0))
            if expected is not None:  # a handoff that fell short: the decode engine computed more
                self.metrics.shortfall.inc(max(expected - cached, 0))


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request for a prefill engine: one token, not streamed, marked for a decode elsewhere (vLLM's
    ``do_remote_decode``, as its P/D proxies send it)."""
    dropped = ("stream", "stream_options", "min_tokens", "n", "best_of")
    prefill = {key: value for key, value in body.items() if key not in dropped}
    prefill.update(max_tokens=1, stream=False)
    if "max_completion_tokens" in body:
        prefill["max_completion_tokens"] = 1
    params = body.get("kv_transfer_params")
    prefill["kv_transfer_params"] = {**(params if isinstance(params, dict) else {}), "do_remote_decode": True}
    return prefill


def _chunk_ends(keys: EngineKeys, tokens: list[int], namespace: Any) -> list[tuple[bytes, int]]:
    return [(key.digest, key.end) for key in keys.keys(tokens, namespace)]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": f"kvmesh router: {message}", "type": "kvmesh_router", "code": status}},
                        status_code=status)


def build_app(router: Router) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="kvmesh router", lifespan=lifespan)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await router.forward(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.forward(request, "completion")

    @app.get("/v1/models")
    async def models() -> Response:
        seen: dict[str, Any] = {}
        for engine in router.engines.values():
            if not engine.up:
                continue
            try:
                reply = await router.http.get(f"{engine.url}/v1/models", timeout=10.0)
                for model in reply.json().get("data", []):
                    seen.setdefault(model["id"], model)
            except (httpx.HTTPError, ValueError, KeyError):
                continue
        return JSONResponse({"object": "list", "data": list(seen.values())})

    @app.get("/health")
    async def health() -> Response:
        up = sum(1 for engine in router.engines.values() if engine.up)
        return JSONResponse({"engines_up": up, "engines": len(router.engines)}, status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/router/engines")
    async def engines() -> Response:
        return JSONResponse({"policy": router.policy, "engines": [e.describe() for e in router.engines.values()],
                             "prefill": [e.describe() for e in router.prefill.values()]})

    @app.post("/router/engines")
    async def add_engine(request: Request) -> Response:
        try:
            url, instance = parse_engine(str((await request.json()).get("url", "")))
        except (RouterConfigError, ValueError, AttributeError) as err:
            return _error(400, str(err))
        engine = router.engines.setdefault(url, Engine(url, instance))
        await router.refresh_engine(engine)
        return JSONResponse(engine.describe())

    @app.delete("/router/engines")
    async def remove_engine(url: str) -> Response:
        engine = router.engines.pop(url.rstrip("/"), None)
        if engine is None:
            return _error(404, f"no engine {url!r}")
        return JSONResponse(engine.describe())

    return app
