"""kvmesh as a vLLM v1 KV connector: a thin adapter from vLLM's connector API to kvmesh's two sides.

Enable it with::

    --kv-transfer-config '{"kv_connector": "KVMeshConnector",
                           "kv_connector_module_path": "kvmesh.integrations.vllm.connector",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"chunk_size": 256}}'

Scheduler side (``scheduler.py``, in the engine core): ``get_num_new_matched_tokens`` hashes the prompt
into chunk keys (in a namespace named by the model's fingerprint and the page format) and asks the
node daemon how much of it is stored; while chunks it would load are still being promoted from disk
or Redis it answers ``None`` so vLLM schedules the other requests meanwhile.  ``update_state_after_alloc``
pins what will be loaded (in L1) under a lease, and ``build_connector_meta`` tells the worker which
pages to load and which newly computed chunks to save.

Worker side (``worker.py``): ``start_load_kv`` copies the leased pages from shared memory into the
engine's blocks before the forward pass (or starts a background load, vLLM's ``load_async``, which
``get_finished`` reports once copied); ``wait_for_save`` copies the pages of chunks computed in this
step into shared memory after it.

Failure contract (``engine_link.py``): a fault of the cache (daemon gone or restarted, an expired
lease, an entry evicted before its load) is a miss or a load failure reported through
``get_block_ids_with_load_errors``, which vLLM recomputes with ``kv_load_failure_policy="recompute"``
(what ``kvmesh serve`` sets).  A daemon with other settings, a GPU engine, a page layout kvmesh does
not know, or a bug stops with an error instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from kvmesh.config import KVMeshConfig
from kvmesh.integrations.vllm.blend_model import why_not_blend
from kvmesh.integrations.vllm.blend_plan import BlendPlan, BlendScheduler, PassageSave
from kvmesh.integrations.vllm.engine_link import DaemonLink
from kvmesh.integrations.vllm.engine_shape import EngineKVShape, cpu_page_view
from kvmesh.integrations.vllm.identity import engine_model_identity, lora_identity
from kvmesh.integrations.vllm.planner import LoadPlan, SavePlan
from kvmesh.integrations.vllm.scheduler import SchedulerSide
from kvmesh.integrations.vllm.serve import ENGINE_PORT_VARIABLE
from kvmesh.integrations.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["EngineKVShape", "KVMeshConnector", "KVMeshConnectorMetadata", "cpu_page_view"]

log = logging.getLogger("kvmesh.vllm")


def _log_to_engine_log(level: str) -> None:
    """Give kvmesh's logger a handler of its own: vLLM configures only its ``vllm`` logger, so without one
    kvmesh's info lines (the fingerprint, the page layout) would never reach the engine's log."""
    logger = logging.getLogger("kvmesh")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


@dataclass
class KVMeshConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadPlan] = field(default_factory=list)
    saves: list[SavePlan] = field(default_factory=list)
    blends: list[BlendPlan] = field(default_factory=list)
    passage_saves: list[PassageSave] = field(default_factory=list)


def require_recompute_policy(policy: object) -> None:
    """Refuse to start unless vLLM recomputes what a failed load did not bring.

    A cache fault (an expired lease, a daemon restarted between lookup and load) is a load failure that
    kvmesh reports; with vLLM's default policy, ``fail``, each one fails a user's request.
    """
    if policy != "recompute":
        raise ValueError(f"kvmesh needs vLLM's kv_load_failure_policy 'recompute', got {policy!r}: add "
                         '"kv_load_failure_policy":"recompute" to --kv-transfer-config (kvmesh serve sets it)')


def tensor_parallel_rank(world: int) -> int:
    """This worker's tensor-parallel rank (vLLM sets up its process groups before it builds connectors).

    Two ranks that took the same rank would store different heads under one key: without vLLM's answer,
    a worker of a tensor-parallel engine does not start.
    """
    if world == 1:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, model_parallel_is_initialized

    if not model_parallel_is_initialized():
        raise RuntimeError(f"kvmesh: a worker of a tensor-parallel engine (size {world}) was started before "
                           "vLLM named its rank")
    return get_tensor_model_parallel_rank()


def _message_start_token(vllm_config: VllmConfig) -> int | None:
    """The token that starts each chat message, from the model's tokenizer (where passages are cut)."""
    from transformers import AutoTokenizer

    from kvmesh.blend.segments import message_start_token

    model_config = vllm_config.model_config
    tokenizer = AutoTokenizer.from_pretrained(str(model_config.tokenizer), local_files_only=True,
                                              trust_remote_code=bool(model_config.trust_remote_code))
    token = message_start_token(tokenizer)
    log.info("kvmesh: passages start at token %s (%s)", token,
             tokenizer.convert_ids_to_tokens([token])[0] if token is not None else "none in the chat template")
    return token


def loads_in_background(config: KVMeshConfig) -> bool:
    """``load_async``: ``auto`` is on for CUDA engines, whose copies run on a side stream, and off on vLLM's CPU
    backend, where the copy is milliseconds of memcpy and waiting a step for its report cost a returning request
    1.6-2.3x its time to first token (docs/benchmarks.md)."""
    if config.load_async != "auto":
        return config.load_async == "on"
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda())


class KVMeshConnector(KVConnectorBase_V1, SupportsHMA):
    """Declares vLLM's ``SupportsHMA``: vLLM keeps its hybrid KV-cache manager on, so sliding-window layers keep
    only their window and models with recurrent state start; every KV cache group is stored (``KVGroup``)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = KVMeshConfig.load(extra)
        require_recompute_policy(getattr(self._kv_transfer_config, "kv_load_failure_policy", "fail"))
        _log_to_engine_log(self.config.log_level)
        model = str(vllm_config.model_config.model)
        engine: dict[str, Any] = {"model": model, "role": role.name.lower(), "pid": os.getpid()}
        if role == KVConnectorRole.SCHEDULER:
            identity, described = engine_model_identity(vllm_config, self.config)
            log.info("kvmesh: model %s, fingerprint %s: %s", model, identity, described)
            engine["fingerprint"] = identity
        else:
            identity = "worker"  # the worker never builds keys: the scheduler names every chunk it moves
        self.shape = EngineKVShape.from_vllm(vllm_config, identity, kv_cache_config)
        block_size = self.shape.layout.block_size
        if self.config.chunk_size % block_size:
            raise ValueError(f"kvmesh chunk_size={self.config.chunk_size} must be a multiple of vLLM's "
                             f"block_size={block_size}; set chunk_size to e.g. "
                             f"{max(1, self.config.chunk_size // block_size) * block_size}")
        if role == KVConnectorRole.SCHEDULER:  # what `kvmesh explain --engine` and the router need to name chunks
            engine.update(namespace=self.shape.namespace(self.config.tenant_salt).hex(),
                          layout_fingerprint=self.shape.fingerprint(),
                          chunk_size=self.config.chunk_size, partial_chunks=self.config.save_partial_chunks,
                          parts=self.shape.tp_world * len(self.shape.groups), tp_world=self.shape.tp_world,
                          groups=len(self.shape.groups), state_block=self.shape.layout.block_size
                          if self.shape.has_state else 0)
            port = os.environ.get(ENGINE_PORT_VARIABLE, "")
            if port.isdigit():  # set by kvmesh serve: the HTTP port that serves this engine
                engine["api_port"] = int(port)
        self.link = DaemonLink(self.config, engine)
        if role == KVConnectorRole.SCHEDULER:
            unavailable = why_not_blend(vllm_config, [group.kind for group in self.shape.groups])
            if self.config.blend and unavailable is not None:
                log.warning("kvmesh: blend is on, but this engine serves exact prefixes only: %s", unavailable)
            blend = BlendScheduler(self.config, self.link, unavailable, lambda: _message_start_token(vllm_config))
            self._scheduler = SchedulerSide(self.config, self.shape, self.link, lora_identity, blend=blend,
                                            load_async=loads_in_background(self.config))
        else:
            self._worker = WorkerSide(self.config, self.shape, self.link, tensor_parallel_rank(self.shape.tp_world))
        self.link.connect_at_start()  # start or reach the daemon while vLLM starts, not in the first request

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """On CUDA, each layer's blocks whole and in order (``LBHNC``): a run of blocks is one DMA per layer."""
        from vllm.platforms import current_platform

        return "LBHNC" if current_platform.is_cuda() else None

    # ------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.matched(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        scheduled = [(r.req_id, r.num_computed_tokens, scheduler_output.num_scheduled_tokens.get(r.req_id, 0))
                     for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        scheduled += [(req_id, computed, scheduler_output.num_scheduled_tokens.get(req_id, 0))
                      for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens)]
        manager = getattr(self, "_kv_cache_manager", None)
        block_ids_of = manager.get_block_ids if manager is not None else None
        loads, saves = self._scheduler.build_meta(scheduled, block_ids_of)
        blends, passage_saves = self._scheduler.build_blend_meta(scheduled, block_ids_of)
        return KVMeshConnectorMetadata(loads=loads, saves=saves, blends=blends, passage_saves=passage_saves)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Nothing waits (saves ran step by step); a request that asked gets its explanation back."""
        params = request.kv_transfer_params or {}
        return False, self._scheduler.finished(request.request_id, remote_decode=bool(params.get("do_remote_decode")))

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's hybrid manager calls this instead of ``request_finished``: saves ran step by step, nothing waits."""
        return self.request_finished(request, block_ids[0] if block_ids else [])

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks = self._kv_cache_config.num_blocks if self._kv_cache_config else None
        self._worker.register(kv_caches, num_blocks)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, KVMeshConnectorMetadata)
        self._worker.load(metadata.loads, metadata.blends)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv: the CPU backend has nothing to overlap them with

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # saves happen for all layers at once in wait_for_save

    def wait_for_save(self) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, KVMeshConnectorMetadata)
        self._worker.save(metadata.saves, metadata.passage_saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose background loads are done (vLLM's ``load_async``); kvmesh sends nothing itself."""
        return None, self._worker.finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_blocks()

    def shutdown(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.finished_loads(wait=True)  # leases of background loads still copying: released
            worker.settle_saves(wait=True)  # device saves still copying: committed, not dropped
        self.link.close()
