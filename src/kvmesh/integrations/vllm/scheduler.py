"""The connector's scheduler side: how much of a prompt kvmesh holds, what to load, what to save.

It never waits for a disk or Redis read.  A lookup that finds chunks below L1 starts their promotion
and answers ``None`` ("ask again"), which vLLM's scheduler takes as "skip this request for now": the
other requests keep being scheduled, and the next step asks again (at most every
``RECHECK_SECONDS``, without a daemon round trip in between).  Once the chunks it would load are in
L1 (or after ``promotion_wait_seconds``, with whatever is in L1 by then), it answers a token count,
and the lease taken in ``after_alloc`` pins only entries already in L1.  Why "ask again" and not
``load_async`` for the slow read: a request waiting for its promotion holds no blocks, where one in
vLLM's ``WAITING_FOR_REMOTE_KVS`` holds all of them.  The copy from L1 itself may still run in the
background (``load_async`` in the config, ``matched``): it is short, and the request has its blocks by then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3

from kvmesh.client import CacheFault, KVMeshClient, LookupResult
from kvmesh.config import KVMeshConfig
from kvmesh.integrations.vllm.blend_plan import BlendPlan, BlendScheduler, PassageSave
from kvmesh.integrations.vllm.engine_link import ABSORBED, DaemonLink
from kvmesh.integrations.vllm.engine_shape import EngineKVShape
from kvmesh.integrations.vllm.explain import hit_end_reason, tokens_by_tier, wants_explanation
from kvmesh.integrations.vllm.planner import (
    ChunkTransfer,
    LeaseTicket,
    LoadPlan,
    RequestTracker,
    SavePlan,
    complete_chunks,
    end_at_state,
    held_by_every_part,
    lookup_parts,
    plan_group_load,
    plan_group_save,
    plan_load,
)
from kvmesh.keys import ChunkKey, Namespace, PartKeys, chunk_keys, content_digest

log = logging.getLogger("kvmesh.vllm")

RECHECK_SECONDS = 0.005  # how often a request waiting for its promotion asks the daemon again


class RequestLike(Protocol):
    """The parts of vLLM's ``Request`` the scheduler side reads."""

    request_id: str
    prompt_token_ids: list[int] | None
    cache_salt: str | None
    lora_request: Any
    mm_features: Any
    prompt_embeds: Any


class BlocksLike(Protocol):
    def get_block_ids(self) -> tuple[list[int], ...]: ...


@dataclass(slots=True)
class _Waiting:
    """A request whose chunks are being promoted into L1."""

    since: float
    next_check: float
    found_in: dict[int, str] = field(default_factory=dict)  # where the first lookup found each chunk below L1


class SchedulerSide:
    def __init__(self, config: KVMeshConfig, shape: EngineKVShape, link: DaemonLink,
                 lora_identity: Callable[[Any], str] | None = None,
                 clock: Callable[[], float] = time.monotonic, blend: BlendScheduler | None = None,
                 load_async: bool = False) -> None:
        self.config = config
        self.load_async = load_async  # exact loads run while the engine steps (vLLM's load_async)
        self.background: set[str] = set()  # requests whose current load is a background one
        self.backgrounded: set[str] = set()  # requests whose background load was planned (see ``matched``)
        self.blend = blend  # passages reused wherever they stand (blend_plan.py); None: exact prefixes only
        self.shape = shape
        self.link = link
        self.lora_identity = lora_identity or (lambda lora: f"name:{lora.lora_name}")
        self.clock = clock
        self.trackers: dict[str, RequestTracker] = {}
        self.waiting: dict[str, _Waiting] = {}
        self.pending_loads: list[LoadPlan] = []
        self.uncached_reasons: set[str] = set()  # logged once each
        # with tensor parallelism every rank stores its own heads under its own keys, and every KV cache group
        # its own pages: a chunk is a hit only where every part's entry is there
        self.parts = PartKeys.every_part(shape.tp_world, len(shape.groups))
        self.counted_part = PartKeys(0, shape.tp_world, shape.token_group)  # its plans count the tokens loaded

    def _namespace(self, request: RequestLike) -> Namespace:
        salt = self.config.tenant_salt
        if request.cache_salt:
            salt += f"|salt:{request.cache_salt}"
        if request.lora_request is not None:
            salt += f"|lora:{self.lora_identity(request.lora_request)}"
        return self.shape.namespace(salt)

    def _identity(self, request: RequestLike) -> dict[str, str]:
        """The parts of the request's namespace, for the daemon to name the one that differs from another's
        (``daemon/requests.py``); salts by a digest only."""
        lora = request.lora_request
        return {"model": self.shape.model_identity, "page_format": self.shape.fingerprint(),
                "tenant_salt": _secret_digest(self.config.tenant_salt),
                "cache_salt": _secret_digest(request.cache_salt or ""),
                "lora": self.lora_identity(lora) if lora is not None else ""}

    def _tracker(self, request: RequestLike) -> RequestTracker | None:
        tracker = self.trackers.get(request.request_id)
        if tracker is None:
            tokens = list(request.prompt_token_ids or [])
            if len(tokens) < 2:
                return None  # nothing worth caching
            reason = content_beyond_tokens(request)
            if reason is not None:
                if reason not in self.uncached_reasons:
                    self.uncached_reasons.add(reason)
                    log.info("kvmesh: requests with %s are not cached (their token ids do not name all "
                             "that their KV depends on)", reason)
                return None
            namespace = self._namespace(request)
            keys = chunk_keys(tokens, namespace, self.config.chunk_size,
                              include_partial=self.config.save_partial_chunks)
            # every request's summary goes to the daemon's recent list (kvmesh explain --request); the request
            # gets it back in its response only where it asked
            tracker = RequestTracker(request.request_id, tokens, self.config.chunk_size, keys, namespace=namespace,
                                     asked=wants_explanation(request), identity=self._identity(request))
            self.trackers[request.request_id] = tracker
        return tracker

    def num_new_matched_tokens(self, request: RequestLike, num_computed_tokens: int) -> int | None:
        """Tokens kvmesh can load beyond the engine's own hit; None while they are still below L1."""
        tracker = self._tracker(request)
        if tracker is None:
            return 0
        waiting = self.waiting.get(request.request_id)
        now = self.clock()
        if waiting is not None and now < waiting.next_check:
            return None
        client = self.link.client()
        if client is None:
            tracker.explanation.cause = "daemon_down"
            tracker.explanation.reason = "the kvmesh daemon is not reachable: a miss, computed by the engine"
            return 0
        try:
            per_part, found = lookup_parts(client, tracker.tokens, tracker.keys, tracker.namespace, self.parts,
                                           count=waiting is None)
        except ABSORBED as err:
            self.link.fault("lookup", f"kvmesh lookup failed, treating as a miss: {err}", err)
            self.waiting.pop(request.request_id, None)
            tracker.explanation.cause = "lookup_failed"
            tracker.explanation.reason = f"the kvmesh lookup failed ({type(err).__name__}): a miss"
            return 0
        hit_keys = _common_prefix(per_part)
        cut = None
        if self.shape.has_state and end_at_state(hit_keys, len(tracker.tokens), self.shape.layout.block_size):
            cut = "state"
        below = [_first_below_l1(hit_keys, result, num_computed_tokens, part)
                 for part, result in zip(self.parts, found)]
        first_below = min((index for index in below if index is not None), default=None)
        found_in = {**found[0].found_in, **(waiting.found_in if waiting is not None else {})}
        if hit_keys and hit_keys[-1].num_tokens < self.config.chunk_size and any(
                p.digest == self.parts[0](hit_keys[-1].digest) and not p.resident for p in found[0].partials):
            found_in.setdefault(len(hit_keys) - 1, "below_l1")  # a partial chunk: its index does not say which
        if first_below is not None:
            if waiting is None:
                waiting = self.waiting[request.request_id] = _Waiting(now, now, found_in)
            if now - waiting.since < self.config.promotion_wait_seconds:
                waiting.next_check = now + RECHECK_SECONDS
                return None
            self.link.fault("promotion_slow", f"kvmesh: chunks still not in L1 after "
                            f"{self.config.promotion_wait_seconds}s of promotion; loading what is, computing "
                            "the rest", _PromotionSlow())
            hit_keys = hit_keys[:first_below]
            cut = "promotion"
        self.waiting.pop(request.request_id, None)
        tracker.hit_keys = hit_keys
        told = tracker.explanation
        told.engine_hit_tokens = num_computed_tokens
        told.kvmesh_hit_tokens = tracker.hit_tokens
        told.chunks_found = len(hit_keys)
        told.chunks_from_below_l1 = sum(1 for index in range(len(hit_keys)) if index in found_in)
        told.hit_tokens_by_tier = tokens_by_tier(hit_keys, found_in)
        told.promotion_seconds = round(now - waiting.since, 6) if waiting is not None else 0.0
        told.cause, told.reason = hit_end_reason(len(tracker.tokens), tracker.keys, hit_keys, per_part, found[0],
                                                 cut, self.config.chunk_size)
        tracker.stored_chunks = max(tracker.stored_chunks, min(result.hits for result in found))
        tracker.local_tokens = num_computed_tokens
        loadable = min(tracker.hit_tokens, len(tracker.tokens) - 1)  # the engine computes the last token
        blends = self.blend
        blend = blends.track(request, tracker.tokens, tracker.namespace) if blends is not None else None
        if blends is not None and blend is not None:
            fixed = max(num_computed_tokens, loadable)
            end = blends.claim(blend, tracker.tokens, fixed)
            tracker.explanation.blended_tokens = max(0, end - fixed)
            tracker.explanation.passages_reused = len(blend.reused)
            if end:
                # blended KV is approximate: no exact chunk is stored from its first token on
                tracker.keys = [key for key in tracker.keys if key.end <= fixed]
                return end - num_computed_tokens
        return max(0, loadable - num_computed_tokens)

    def matched(self, request: RequestLike, num_computed_tokens: int) -> tuple[int | None, bool]:
        """vLLM's ``get_num_new_matched_tokens``: the tokens kvmesh can load, and whether they load in the
        background (``load_async``): the request waits for its copy, the engine's other requests do not.

        A blend computes on the engine in the request's own step, so it loads before it.  A request asked again
        after its background load failed whole (vLLM then frees its blocks and asks anew) loads before its step
        this time, so a load that keeps failing is computed instead of retried forever.
        """
        tokens = self.num_new_matched_tokens(request, num_computed_tokens)
        req_id = request.request_id
        retry = req_id in self.backgrounded
        background = bool(tokens) and self.load_async and not retry and not self._blends(req_id)
        if background:
            self.background.add(req_id)
        else:
            self.background.discard(req_id)
        return tokens, background

    def _blends(self, req_id: str) -> bool:
        blend = self.blend.requests.get(req_id) if self.blend is not None else None
        return blend is not None and bool(blend.end)

    def after_alloc(self, request: RequestLike, blocks: BlocksLike, num_external_tokens: int) -> None:
        """Pin what will be loaded (in L1 only: this never waits) and queue the load for the worker.

        After a background load vLLM calls this once more, with 0 tokens, when it allocates the rest of the
        prompt's blocks: the load was planned at the first call.
        """
        tracker = self.trackers.get(request.request_id)
        if tracker is not None and (num_external_tokens or request.request_id not in self.background):
            tracker.explanation.loaded_tokens = num_external_tokens
        if num_external_tokens == 0 or tracker is None:
            return
        background = request.request_id in self.background
        if background:
            self.backgrounded.add(request.request_id)
        tracker.explanation.loaded_in_background = background
        first, last = tracker.local_tokens, tracker.local_tokens + num_external_tokens
        block_ids = blocks.get_block_ids()
        blends = self.blend
        blend = blends.requests.get(request.request_id) if blends is not None else None
        if blends is not None and blend is not None and blend.end and last == blend.end:
            blends.plan(request.request_id, tracker.tokens, block_ids[0])
            last = blend.fixed  # the exact prefix is loaded as usual; the worker blends the rest after it
            if last <= first:
                return
        chunks = [plan_group_load(group, tracker.hit_keys, first, last, block_ids[index])
                  for index, group in enumerate(self.shape.groups)]
        client = self.link.client()
        for part in self.parts:  # each part's entries under a lease of its own: each worker releases its own
            transfers = [ChunkTransfer(part.key(c.key), c.block_ids, c.first_page, page_index=c.page_index)
                         for c in chunks[part.group]]
            lease = None
            if client is not None:
                try:
                    lease = client.acquire_lease([t.key for t in transfers])
                except ABSORBED as err:
                    self.link.fault("lease", f"kvmesh could not pin entries to load: {err}", err)
            ticket = LeaseTicket(lease.lease_id, lease.epoch) if lease is not None else None
            self.pending_loads.append(plan_load(request.request_id, transfers, ticket,
                                                lease.extents if lease else [],
                                                num_external_tokens if part == self.counted_part else 0,
                                                part.rank, part.group, background))

    def build_meta(self, scheduled: list[tuple[str, int, int]],
                   block_ids_of: Callable[[str], tuple[list[int], ...]] | None
                   ) -> tuple[list[LoadPlan], list[SavePlan]]:
        """Loads queued since the last step, and saves of chunks this step completes.

        ``scheduled`` holds (request id, tokens computed before this step, tokens scheduled in it);
        ``block_ids_of`` gives a request's block ids per KV cache group.
        """
        loads, self.pending_loads = self.pending_loads, []
        saves = []
        for req_id, computed, scheduled_now in scheduled:
            tracker = self.trackers.get(req_id)
            if tracker is None or tracker.stored_chunks >= len(tracker.keys) or block_ids_of is None:
                continue
            step_end = computed + scheduled_now
            completed = complete_chunks(tracker, step_end)
            if not completed:
                continue
            block_ids = block_ids_of(req_id)
            for index, group in enumerate(self.shape.groups):
                chunks = [chunk for chunk in (plan_group_save(group, c, block_ids[index], step_end) for c in completed)
                          if chunk is not None]
                if chunks:
                    saves.append(SavePlan(req_id, chunks, index))
        return loads, saves

    def build_blend_meta(self, scheduled: list[tuple[str, int, int]],
                         block_ids_of: Callable[[str], tuple[list[int], ...]] | None
                         ) -> tuple[list[BlendPlan], list[PassageSave]]:
        """Blends queued since the last step, and passages of prompts this step finished computing."""
        if self.blend is None:
            return [], []
        saves = []
        for req_id, computed, scheduled_now in scheduled:
            tracker = self.trackers.get(req_id)
            if tracker is None or block_ids_of is None:
                continue
            save = self.blend.saves(req_id, len(tracker.tokens), computed + scheduled_now, block_ids_of(req_id)[0])
            if save is not None:
                saves.append(save)
        return self.blend.take_plans(), saves

    def finished(self, req_id: str, remote_decode: bool = False) -> dict[str, Any] | None:
        """Forget the request, recording its summary with the daemon; what its response carries back.

        That is its explanation, if it asked for one.  A prefill for another engine (``remote_decode``:
        vLLM's ``do_remote_decode``, sent by ``kvmesh router --prefill``) also gets the tokens its node now
        holds, confirmed by a lookup: this step's saves were committed before vLLM calls this, so the decode
        engine, asked after this response, finds them (through the same daemon, or Redis written through).
        """
        tracker = self.trackers.pop(req_id, None)
        self.waiting.pop(req_id, None)
        self.background.discard(req_id)
        self.backgrounded.discard(req_id)
        if self.blend is not None:
            self.blend.finished(req_id)
        if tracker is None:
            return {"do_remote_prefill": True, "kvmesh": {"stored_tokens": 0}} if remote_decode else None
        summary = tracker.explanation.to_dict()
        client = self.link.client()
        stored = 0
        if client is not None:
            try:
                first_chunk = content_digest(tracker.tokens[:self.config.chunk_size])
                summary = client.record_request(req_id, summary, first_chunk, tracker.identity,
                                                stored_first_chunk=tracker.stored_chunks > 0)
                if remote_decode:
                    stored = self._stored_tokens(client, tracker)
            except ABSORBED as err:
                self.link.fault("record", f"kvmesh could not record a request's summary: {err}", err)
        params: dict[str, Any] = {"kvmesh": summary} if tracker.asked else {}
        if remote_decode:  # vLLM's convention for a finished prefill, so stock P/D proxies pass it on
            params = {"do_remote_prefill": True, "kvmesh": {**params.get("kvmesh", {}), "stored_tokens": stored}}
        return params or None

    def _stored_tokens(self, client: KVMeshClient, tracker: RequestTracker) -> int:
        """The leading tokens of the prompt the node holds now (every part), counted nowhere."""
        per_part, _ = lookup_parts(client, tracker.tokens, tracker.keys, tracker.namespace, self.parts,
                                   count=False, prefetch=False)
        held = held_by_every_part(per_part)
        return held[-1].end if held else 0


def _secret_digest(value: str) -> str:
    """A salt as the daemon may see it: equal salts give equal digests, and nothing more ("" for none)."""
    return blake3.blake3(b"kvmesh-salt-v1" + value.encode("utf-8")).hexdigest()[:16] if value else ""


def content_beyond_tokens(request: RequestLike) -> str | None:
    """What in a request changes its KV without being in its token ids (and so not in kvmesh's keys).

    Such a request is not cached: two requests with the same token ids but other images or other prompt
    embeddings (whose positions hold placeholder ids) would otherwise share keys and load each other's KV.
    LoRA and the cache salt change KV too, but are in the namespace.
    """
    if request.mm_features:
        return "multimodal inputs"
    if request.prompt_embeds is not None:
        return "prompt embeddings"
    return None


class _PromotionSlow(CacheFault):
    """Chunks found on disk or in Redis did not reach L1 in time (a slow or failing tier)."""


def _first_below_l1(hit_keys: list[ChunkKey], found: LookupResult, local_tokens: int,
                    entry_key: PartKeys) -> int | None:
    """Index of the first chunk to load whose entry (``entry_key``'s) is not in L1 yet (its promotion runs)."""
    partials = {p.digest: p for p in found.partials}
    for index, key in enumerate(hit_keys):
        if key.end <= local_tokens:
            continue  # the engine holds these tokens itself
        if index < found.hits:
            if not found.resident(index):
                return index
        elif not partials[entry_key(key.digest)].resident:
            return index
    return None


def _common_prefix(per_part: list[list[ChunkKey]]) -> list[ChunkKey]:
    """The chunks every part found (each part's entries are stored, evicted and lost on their own)."""
    common = []
    for keys in zip(*per_part):
        if any(key != keys[0] for key in keys):
            break
        common.append(keys[0])
    return common
