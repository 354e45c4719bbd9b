"""kvmesh as a vLLM v1 KV connector: a thin adapter over kvmesh's client and planner.

Enable it with::

    --kv-transfer-config '{"kv_connector": "KVMeshConnector",
                           "kv_connector_module_path": "kvmesh.integrations.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"chunk_size": 256}}'

Scheduler side (in the engine core): ``get_num_new_matched_tokens`` hashes the
prompt into chunk keys and asks the node daemon how much of it is stored (whole
chunks, then a stored partial chunk that continues them, down to the token);
``update_state_after_alloc`` pins what will be loaded under a lease, and
``build_connector_meta`` tells the worker which pages to load and which newly
computed chunks to save.

Worker side: ``start_load_kv`` copies the leased pages from shared memory into
the engine's blocks before the forward pass; ``wait_for_save`` copies the pages
of chunks computed in this step into shared memory after it, before vLLM can
free or reuse those blocks (one memcpy per layer and chunk; encoding for slower
tiers happens later, in the daemon).

Failure contract: a dead or restarted daemon, an expired lease or anything else
that keeps a planned page from loading is reported through
``get_block_ids_with_load_errors``; with ``kv_load_failure_policy="recompute"``
(what ``kvmesh serve`` sets) vLLM recomputes those tokens.  Nothing is ever
served from a page that was not loaded.  Stores that fail are dropped and
counted; they never fail a request.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvmesh.client import DaemonError, DaemonUnavailable, KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.integrations.planner import (
    LoadPlan,
    RequestTracker,
    SavePlan,
    match_prefix,
    plan_load_chunks,
    plan_save_chunks,
)
from kvmesh.keys import Namespace, chunk_keys, model_namespace
from kvmesh.layout import DTYPES, PageJob, dtype_name, move_pages
from kvmesh.store import TensorMeta

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvmesh.vllm")
# Anything that goes wrong while talking to the cache becomes a miss (or a reported load failure):
# a cache must never take the engine down.  The first occurrence of each kind is logged with its cause.
_CLIENT_ERRORS = (Exception,)
RECONNECT_SECONDS = 10.0  # after a failed connection, how long requests run without cache before the next try


@dataclass
class KVMeshConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadPlan] = field(default_factory=list)
    saves: list[SavePlan] = field(default_factory=list)


def cpu_page_view(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """How vLLM-CPU's attention kernel orders tokens and channels inside its pages (a ``codecs.kvview`` name).

    The kernel is chosen per machine (``amx`` on CPUs with AMX for bf16, ``vec`` on other x86, others
    elsewhere) and each packs K and V its own way; lossy codecs need to know which, or they quantize the
    wrong groups.  Layouts kvmesh does not know are ``opaque``: lower tiers then store them lossless.
    """
    try:
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        if not current_platform.is_cpu():
            return "opaque"
        isa = _get_attn_isa(dtype, block_size, head_size)
    except Exception as err:  # a vLLM without this helper: stay safe, lossless
        log.info("kvmesh: vLLM-CPU's attention kernel is unknown (%s); pages stored lossless", err)
        return "opaque"
    return {"amx": "vllm-cpu-amx", "vec": "vllm-cpu-vec"}.get(isa, "opaque")


@dataclass(frozen=True, slots=True)
class EngineKVShape:
    """What both sides derive from vLLM's config: it names the cache (keys) and checks the tensors."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: str
    block_size: int
    page_view: str = "opaque"  # codecs.kvview name of the in-page K/V order; part of the keys' namespace

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> EngineKVShape:
        model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
        if parallel.tensor_parallel_size * parallel.pipeline_parallel_size != 1:
            raise ValueError("kvmesh supports one worker per engine for now "
                             f"(tensor_parallel_size={parallel.tensor_parallel_size}, "
                             f"pipeline_parallel_size={parallel.pipeline_parallel_size})")
        cache_dtype = vllm_config.cache_config.cache_dtype
        torch_dtype = model_config.dtype if cache_dtype == "auto" else None
        if torch_dtype is None:
            raise ValueError(f"kvmesh stores bf16/fp16/fp32 KV; cache_dtype={cache_dtype!r} is not supported yet")
        return cls(
            model_id=os.path.basename(os.path.normpath(str(model_config.model))),
            num_layers=model_config.get_num_layers(parallel),
            num_kv_heads=model_config.get_num_kv_heads(parallel),
            head_size=model_config.get_head_size(),
            dtype=dtype_name(torch_dtype),
            block_size=vllm_config.cache_config.block_size,
            page_view=cpu_page_view(torch_dtype, vllm_config.cache_config.block_size, model_config.get_head_size()),
        )

    def namespace(self, salt: str) -> Namespace:
        # the in-page order is in the name: engines whose kernels pack pages differently must not share entries
        layout = (f"L{self.num_layers}.H{self.num_kv_heads}.D{self.head_size}.{self.dtype}.pages{self.block_size}"
                  f".{self.page_view}")
        return model_namespace(self.model_id, layout, salt)

    @property
    def page_elements(self) -> int:
        return self.num_kv_heads * self.block_size * 2 * self.head_size


class KVMeshConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = KVMeshConfig.load(extra)
        logging.getLogger("kvmesh").setLevel(self.config.log_level.upper())
        self.shape = EngineKVShape.from_vllm(vllm_config)
        if self.config.chunk_size % self.shape.block_size:
            raise ValueError(f"kvmesh chunk_size={self.config.chunk_size} must be a multiple of vLLM's "
                             f"block_size={self.shape.block_size}; set chunk_size to e.g. "
                             f"{max(1, self.config.chunk_size // self.shape.block_size) * self.shape.block_size}")
        self._client: KVMeshClient | None = None
        self._retry_at = 0.0
        self._warned: set[str] = set()
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _SchedulerSide(self)
        else:
            self._worker = _WorkerSide(self)
        self.client()  # start or reach the daemon while vLLM starts, not inside the first request

    # ------------------------------------------------------------- shared plumbing
    def client(self) -> KVMeshClient | None:
        """The daemon connection, opened on first use; None (a miss) while no daemon can be had."""
        if self._client is None:
            if time.monotonic() < self._retry_at:
                return None  # a recent attempt failed: requests go on without cache until the next try
            try:
                self._client = KVMeshClient(self.config)
            except _CLIENT_ERRORS as err:
                self._retry_at = time.monotonic() + RECONNECT_SECONDS
                self.warn_once("connect", f"kvmesh daemon unavailable, serving without cache: {err}")
                return None
        return self._client

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message, exc_info=not isinstance(sys.exc_info()[1], (DaemonUnavailable, DaemonError)))
            if self._client is not None:
                try:
                    self._client.report_error(kind)
                except Exception:  # noqa: BLE001 - reporting is best effort
                    pass

    # ------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler.finished(request.request_id)
        return False, None

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, KVMeshConnectorMetadata)
        self._worker.load(metadata.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv: the CPU backend has nothing to overlap them with

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # saves happen for all layers at once in wait_for_save

    def wait_for_save(self) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, KVMeshConnectorMetadata)
        self._worker.save(metadata.saves)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_blocks()

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class _SchedulerSide:
    def __init__(self, connector: KVMeshConnector) -> None:
        self.connector = connector
        self.config = connector.config
        self.shape = connector.shape
        self.trackers: dict[str, RequestTracker] = {}
        self.pending_loads: list[LoadPlan] = []

    def _namespace(self, request: Request) -> Namespace:
        salt = self.config.tenant_salt
        if request.cache_salt:
            salt += f"|salt:{request.cache_salt}"
        if request.lora_request is not None:
            salt += f"|lora:{request.lora_request.lora_name}"
        return self.shape.namespace(salt)

    def _tracker(self, request: Request) -> RequestTracker | None:
        tracker = self.trackers.get(request.request_id)
        if tracker is None:
            tokens = list(request.prompt_token_ids or [])
            if len(tokens) < 2 or request.mm_features:
                return None  # nothing worth caching, or token ids that do not name the content
            keys = chunk_keys(tokens, self._namespace(request), self.config.chunk_size,
                              include_partial=self.config.save_partial_chunks)
            tracker = RequestTracker(request.request_id, tokens, self.config.chunk_size, keys)
            self.trackers[request.request_id] = tracker
        return tracker

    def num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        tracker = self._tracker(request)
        client = self.connector.client()
        if tracker is None or client is None:
            return 0
        try:
            found = client.lookup_with_partials(tracker.keys)
        except _CLIENT_ERRORS as err:
            self.connector.warn_once("lookup", f"kvmesh lookup failed, treating as a miss: {err}")
            return 0
        tracker.hit_keys = match_prefix(tracker.tokens, tracker.keys, found.hits, found.partials,
                                        self._namespace(request))
        tracker.stored_chunks = max(tracker.stored_chunks, found.hits)
        tracker.local_tokens = num_computed_tokens
        loadable = min(tracker.hit_tokens, len(tracker.tokens) - 1)  # the engine computes the last token
        return max(0, loadable - num_computed_tokens)

    def after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        tracker = self.trackers.get(request.request_id)
        client = self.connector.client()
        if num_external_tokens == 0 or tracker is None or client is None:
            return
        first, last = tracker.local_tokens, tracker.local_tokens + num_external_tokens
        block_ids = blocks.get_block_ids()[0]
        chunks = plan_load_chunks(tracker.hit_keys, first, last, block_ids, self.shape.block_size)
        try:
            lease = client.acquire_lease([c.key for c in chunks])
        except _CLIENT_ERRORS as err:
            self.connector.warn_once("lease", f"kvmesh could not pin entries to load: {err}")
            lease = None
        self.pending_loads.append(LoadPlan(
            request.request_id, lease.lease_id if lease else "", lease.epoch if lease else "",
            lease.extents if lease else [], chunks, num_external_tokens))

    def build_meta(self, scheduler_output: SchedulerOutput) -> KVMeshConnectorMetadata:
        metadata = KVMeshConnectorMetadata(loads=self.pending_loads)
        self.pending_loads = []
        scheduled: list[tuple[str, int]] = [(r.req_id, r.num_computed_tokens)
                                            for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        scheduled += list(zip(cached.req_ids, cached.num_computed_tokens))
        manager = getattr(self.connector, "_kv_cache_manager", None)
        for req_id, computed in scheduled:
            tracker = self.trackers.get(req_id)
            if tracker is None or tracker.stored_chunks >= len(tracker.keys) or manager is None:
                continue
            after_step = computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            block_ids = manager.get_block_ids(req_id)[0]
            chunks = plan_save_chunks(tracker, after_step, block_ids, self.shape.block_size)
            if chunks:
                metadata.saves.append(SavePlan(req_id, chunks))
        return metadata

    def finished(self, req_id: str) -> None:
        self.trackers.pop(req_id, None)


class _WorkerSide:
    def __init__(self, connector: KVMeshConnector) -> None:
        self.connector = connector
        self.config = connector.config
        self.shape = connector.shape
        self.layers: list[torch.Tensor] = []
        self.page_shape: tuple[int, ...] = ()
        self.page_view = "opaque"
        self.failed_blocks: set[int] = set()
        self.pool = ThreadPoolExecutor(self.config.copy_threads, thread_name_prefix="kvmesh-copy") \
            if self.config.copy_threads > 1 else None

    def _move(self, jobs: list[PageJob], into_engine: bool) -> None:
        move_pages(jobs, self.layers, into_engine, self.pool, self.config.copy_threads)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        ordered = sorted(kv_caches.items(), key=lambda item: [int(n) for n in re.findall(r"\d+", item[0])])
        layers = [tensor for _, tensor in ordered]
        if len(layers) != self.shape.num_layers:
            raise ValueError(f"kvmesh expected {self.shape.num_layers} KV layers, vLLM registered {len(layers)}")
        num_blocks = self.connector._kv_cache_config.num_blocks if self.connector._kv_cache_config else None
        views = []
        for tensor in layers:
            if num_blocks and tensor.shape[0] != num_blocks and tensor.shape[0] % num_blocks == 0:
                tensor = tensor.view(num_blocks, -1, *tensor.shape[1:])  # kernel blocks inside manager blocks
            if tensor[0].numel() != self.shape.page_elements or tensor.dtype != DTYPES[self.shape.dtype]:
                raise ValueError(f"kvmesh: KV page of shape {tuple(tensor.shape[1:])} {tensor.dtype} does not "
                                 f"hold {self.shape.block_size} tokens of {self.shape}")
            views.append(tensor)
        self.layers = views
        self.page_shape = tuple(views[0].shape[1:])
        expected = (self.shape.num_kv_heads, self.shape.block_size, 2 * self.shape.head_size)
        # kernel blocks smaller than the manager's, or an unexpected page shape: the view would not fit
        self.page_view = self.shape.page_view if self.page_shape == expected else "opaque"
        log.info("kvmesh: %d KV layers, pages of %s %s, in-page order %s", len(views), self.page_shape,
                 views[0].dtype, self.page_view)

    def _meta(self, pages: int) -> TensorMeta:
        return TensorMeta(self.shape.dtype, (len(self.layers), pages, *self.page_shape), self.page_view)

    def load(self, plans: list[LoadPlan]) -> None:
        for plan in plans:
            self._load_one(plan)

    def _load_one(self, plan: LoadPlan) -> None:
        started = time.perf_counter()
        client = self.connector.client()
        jobs: list[PageJob] = []
        for index, chunk in enumerate(plan.chunks):
            try:
                if client is None or index >= len(plan.extents):
                    raise DaemonUnavailable("entry not pinned (evicted before the load, or no daemon)")
                offset, _, meta = plan.extents[index]
                entry = client.view(offset, meta, plan.epoch)
                if entry.shape[0] != len(self.layers) or tuple(entry.shape[2:]) != self.page_shape:
                    raise DaemonError(f"stored pages {tuple(entry.shape)} do not fit this engine")
                pages = entry[:, chunk.first_page:chunk.first_page + len(chunk.block_ids)]
                jobs.append((pages, torch.tensor(chunk.block_ids, dtype=torch.long)))
            except _CLIENT_ERRORS as err:
                self.connector.warn_once("load", f"kvmesh load failed, vLLM will recompute: {err}")
                self.failed_blocks.update(chunk.block_ids)
        loaded_bytes = verified = mismatches = 0
        try:
            self._move(jobs, into_engine=True)
            loaded_bytes = sum(pages.numel() * pages.element_size() for pages, _ in jobs)
            if self.config.verify_loads:
                for pages, blocks in jobs:
                    verified += 1
                    mismatches += int(not all(torch.equal(layer.index_select(0, blocks), pages[i])
                                              for i, layer in enumerate(self.layers)))
        except _CLIENT_ERRORS as err:
            self.connector.warn_once("load", f"kvmesh load failed, vLLM will recompute: {err}")
            for _, blocks in jobs:
                self.failed_blocks.update(blocks.tolist())
        if client is not None and plan.lease_id:
            try:
                client.release_lease(plan.lease_id, time.perf_counter() - started, loaded_bytes,
                                     plan.num_tokens, verified, mismatches)
            except _CLIENT_ERRORS as err:
                self.connector.warn_once("release", f"kvmesh could not release a lease: {err}")

    def save(self, plans: list[SavePlan]) -> None:
        client = self.connector.client() if plans else None
        if client is None:
            return
        for plan in plans:
            started = time.perf_counter()
            try:
                slots = client.reserve([c.key for c in plan.chunks],
                                       [self._meta(len(c.block_ids)) for c in plan.chunks],
                                       [c.parent for c in plan.chunks])
            except _CLIENT_ERRORS as err:
                self.connector.warn_once("save", f"kvmesh store failed, dropped: {err}")
                continue
            written = [(slot, chunk) for slot, chunk in zip(slots, plan.chunks) if slot is not None]
            try:
                self._move([(slot.tensor, torch.tensor(chunk.block_ids, dtype=torch.long))
                            for slot, chunk in written], into_engine=False)
                client.commit([slot for slot, _ in written], time.perf_counter() - started,
                              sum(chunk.key.num_tokens for _, chunk in written))
            except Exception as err:  # never fail the request for a store
                self.connector.warn_once("save", f"kvmesh store failed, dropped: {err}")
                try:
                    client.abort([slot for slot, _ in written])
                except _CLIENT_ERRORS:
                    pass  # the daemon gives reservations back when the connection drops

    def take_failed_blocks(self) -> set[int]:
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed
