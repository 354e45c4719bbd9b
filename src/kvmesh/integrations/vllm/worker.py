"""The connector's worker side: copy pages between vLLM's KV blocks and the daemon's shared memory.

``load`` runs before the forward pass: the pages a lease pinned are copied into the engine's blocks; a
page that cannot be loaded (not pinned, lease expired, daemon restarted) is reported through
``take_failed_blocks`` so vLLM recomputes it.  A background load (vLLM's ``load_async``) is only started
there, on a copy thread (CPU) or a side stream (CUDA); ``finished_loads``, called every step, releases its
lease once its copies are done and tells vLLM the request may run, which it waits for alone.
``save`` runs right after the forward pass that computed a chunk, before vLLM may reuse its blocks: one
memcpy per layer into a reserved extent, then commit.  Only faults of the cache are absorbed (a miss, a
dropped store); a copy that fails is a bug and propagates.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from kvmesh import wire
from kvmesh.client import CacheFault, LeaseLost
from kvmesh.config import KVMeshConfig
from kvmesh.entry import EntryMeta, EntryMetaError
from kvmesh.integrations.vllm.blend_model import BlendUnavailable
from kvmesh.integrations.vllm.blend_plan import BlendPlan, PassageSave
from kvmesh.integrations.vllm.blend_worker import Blender, PagesAsTokens
from kvmesh.integrations.vllm.device_copy import DeviceCopier
from kvmesh.integrations.vllm.engine_link import ABSORBED, DaemonLink
from kvmesh.integrations.vllm.engine_shape import EngineKVShape, layer_order
from kvmesh.integrations.vllm.planner import LoadPlan, SavePlan
from kvmesh.keys import PartKeys
from kvmesh.layout import KVGroup
from kvmesh.page_copy import PageJob, move_pages
from kvmesh.wire import ExtentRef

log = logging.getLogger("kvmesh.vllm")


class StoredEntryMismatch(CacheFault):
    """An L1 entry whose description does not fit this engine's pages: corrupt, so a miss."""


class UnsupportedEngine(ValueError):
    """The engine's KV cache is of a kind kvmesh cannot copy (device, page shape, dtype)."""


@dataclass(slots=True)
class PendingSave:
    """A save whose copies are still running on the device: committed once ``done`` (an event) has completed."""

    done: Any  # torch.cuda.Event, or anything with query() and synchronize()
    client: Any
    slots: list[Any]
    started: float
    nbytes: int
    tokens: int


@dataclass(slots=True)
class PendingLoad:
    """A background load whose copies may still run: finished (lease released, request reported) once ``done``."""

    plan: LoadPlan
    client: Any
    jobs: list[PageJob]
    done: Any  # torch.cuda.Event, or a CopyDone; anything with query() and synchronize()
    started: float


class CopyDone:
    """A CPU copy running on the worker's copy thread, seen as a device event is: ``query`` and ``synchronize``.

    ``synchronize`` re-raises what the copy raised: a copy that fails is a bug, never a miss.
    """

    def __init__(self, future: Future[None]) -> None:
        self.future = future

    def query(self) -> bool:
        return self.future.done()

    def synchronize(self) -> None:
        self.future.result()


@dataclass(slots=True)
class GroupPages:
    """One KV cache group's layers in this worker, and what an entry of its pages looks like."""

    group: KVGroup
    layers: list[torch.Tensor]
    page_shape: tuple[int, ...]
    page_view: str  # the KV view its entries are stored in ("opaque" where codecs cannot read the pages)

    def meta(self, pages: int) -> EntryMeta:
        return EntryMeta(self.group.layout.dtype, (len(self.layers), pages, *self.page_shape), self.page_view)


class WorkerSide:
    def __init__(self, config: KVMeshConfig, shape: EngineKVShape, link: DaemonLink, rank: int = 0) -> None:
        self.config = config
        self.shape = shape
        self.link = link
        self.rank = rank
        # this tensor-parallel rank's entries, one key per KV cache group
        self.entry_keys = [PartKeys(rank, shape.tp_world, group) for group in range(len(shape.groups))]
        self.groups: list[GroupPages] = []
        self.copier: DeviceCopier | None = None  # set for an engine whose KV is on a CUDA device
        self.pending_saves: deque[PendingSave] = deque()  # device saves not committed yet, oldest first
        self.pending_loads: list[PendingLoad] = []  # background loads still copying
        self.background_requests: set[str] = set()  # requests with background loads, not yet reported finished
        self._loader: ThreadPoolExecutor | None = None  # the CPU's background copy thread, made on first use
        self.failed_blocks: set[int] = set()
        self._blender: Blender | None = None
        self.pool = ThreadPoolExecutor(config.copy_threads, thread_name_prefix="kvmesh-copy") \
            if config.copy_threads > 1 else None

    @property
    def layers(self) -> list[torch.Tensor]:
        """The first group's layers (a model whose layers are all alike has only one group)."""
        return self.groups[0].layers

    @property
    def page_view(self) -> str:
        return self.groups[0].page_view

    def _move(self, jobs: list[PageJob], into_engine: bool, group: int, wait: bool = True) -> Any:
        """Copy pages; on a device without ``wait``, return the copies' event (None: they are done)."""
        if self.copier is None:
            move_pages(jobs, self.groups[group].layers, into_engine, self.pool, self.config.copy_threads)
            return None
        self._pin()
        return self.copier.move(jobs, self.groups[group].layers, into_engine, wait=wait)

    def _pin(self) -> None:
        client = self.link.client()
        if self.copier is not None and client is not None and client.segment is not None:
            self.copier.pin(client.segment)

    def _start_load(self, jobs: list[PageJob], group: int) -> Any:
        """Start a background load's copies and return what says when they are done; the engine does not wait
        for them (its request runs only after ``finished_loads`` has seen them done)."""
        layers = self.groups[group].layers
        if self.copier is not None:
            self._pin()
            return self.copier.move(jobs, layers, into_engine=True, wait=False, engine_waits=False)
        if self._loader is None:
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvmesh-load")
        return CopyDone(self._loader.submit(move_pages, jobs, layers, True, self.pool, self.config.copy_threads))

    def settle_saves(self, wait: bool = False) -> None:
        """Commit the device saves whose copies have completed (all of them, waiting, with ``wait``), in order."""
        while self.pending_saves:
            pending = self.pending_saves[0]
            if wait:
                pending.done.synchronize()
            elif not pending.done.query():
                return
            self.pending_saves.popleft()
            self._commit(pending.client, pending.slots,
                         wire.StoreCost(time.perf_counter() - pending.started, pending.nbytes, pending.tokens))

    def register(self, kv_caches: dict[str, torch.Tensor], num_blocks: int | None) -> None:
        """Take vLLM's per-layer KV tensors; refuse at start what the copy path does not support."""
        devices = sorted({str(tensor.device) for tensor in kv_caches.values()})
        if devices != ["cpu"]:
            self.copier = self._device_copier(devices)
        names = list(kv_caches)
        for group in self.shape.groups:
            if group.layer_names:
                missing = [name for name in group.layer_names if name not in kv_caches]
                if missing:
                    raise UnsupportedEngine(f"kvmesh: vLLM registered no KV cache for layers {', '.join(missing)}")
                layers = [kv_caches[name] for name in group.layer_names]
            else:  # one group of every layer, in the order of the numbers in their names
                ordered = sorted(names, key=layer_order)
                layers = [kv_caches[name] for name in ordered]
            self.groups.append(self._group_pages(group, layers, num_blocks))

    def _device_copier(self, devices: list[str]) -> DeviceCopier:
        """Copies for a CUDA engine, which starts only where the user opted in (not yet verified on a GPU)."""
        if len(devices) != 1 or not devices[0].startswith("cuda"):
            raise UnsupportedEngine(f"kvmesh: vLLM's KV cache is on {', '.join(devices)}; kvmesh copies KV between "
                                    "CPU memory or one CUDA device and its shared-memory cache")
        if not self.config.gpu_unverified:
            raise UnsupportedEngine(
                f"kvmesh: vLLM's KV cache is on {devices[0]}. kvmesh's GPU copy path is tested on CPU tensors in "
                "GPU layouts but not yet verified on a GPU: set gpu_unverified=true to run it (--set "
                "gpu_unverified=true, or KVMESH_GPU_UNVERIFIED=1), or remove the KVMeshConnector from "
                "--kv-transfer-config to run this engine without kvmesh.")
        log.warning("kvmesh: running on %s with gpu_unverified=true: the GPU copy path is tested on CPU tensors, "
                    "not yet verified on a GPU", devices[0])
        return DeviceCopier(torch.device(devices[0]))

    def _group_pages(self, group: KVGroup, layers: list[torch.Tensor], num_blocks: int | None) -> GroupPages:
        layout = group.layout
        if len(layers) != layout.num_layers:
            raise UnsupportedEngine(f"kvmesh expected {layout.num_layers} KV layers, "
                                    f"vLLM registered {len(layers)}")
        views = []
        for tensor in layers:
            if num_blocks and tensor.shape[0] != num_blocks and tensor.shape[0] % num_blocks == 0:
                try:  # kernel blocks inside manager blocks
                    tensor = tensor.view(num_blocks, -1, *tensor.shape[1:])
                except RuntimeError:
                    raise UnsupportedEngine(
                        f"kvmesh: vLLM's KV layer of shape {tuple(tensor.shape)} and strides {tensor.stride()} "
                        f"holds {tensor.shape[0] // num_blocks} kernel blocks per block in a memory order kvmesh "
                        "cannot page") from None
            if tensor[0].numel() != group.page_elements or tensor.dtype != layout.torch_dtype:
                raise UnsupportedEngine(f"kvmesh: KV page of shape {tuple(tensor.shape[1:])} {tensor.dtype} does "
                                        f"not hold a {group.kind} page of {group.fingerprint()} ({self.shape})")
            views.append(tensor)
        page_shape = tuple(views[0].shape[1:])
        expected = (layout.num_kv_heads, layout.block_size, layout.kv_parts * layout.head_size)
        # kernel blocks smaller than the manager's, an unexpected page shape, a state: the view would not fit
        page_view = layout.page_view if group.kind != "state" and page_shape == expected else "opaque"
        log.info("kvmesh: %d %s KV layers, pages of %s %s, in-page order %s", len(views), group.kind, page_shape,
                 views[0].dtype, page_view)
        return GroupPages(group, views, page_shape, page_view)

    def blender(self) -> Blender:
        """Blending over the first group's pages (an engine that blends has one group: ``why_not_blend``)."""
        if self._blender is None:
            from kvmesh.codecs.kvview import PAGE_VIEWS  # only in an engine that blends (see PagesAsTokens)

            pages = self.groups[0]
            if self.copier is not None or pages.page_view not in PAGE_VIEWS or len(self.groups) != 1:
                raise BlendUnavailable(f"kvmesh blends KV in CPU pages of one KV cache group whose order it knows; "
                                       f"this engine's are {pages.page_view} in {len(self.groups)} group(s)")
            self._blender = Blender(self.link, PagesAsTokens(pages.layers, pages.page_view,
                                                             pages.group.layout.block_size))
        return self._blender

    # -------------------------------------------------------------------- loads
    def load(self, plans: list[LoadPlan], blends: Sequence[BlendPlan] = ()) -> None:
        self.settle_saves()
        for plan in plans:
            if plan.rank == self.rank:
                self._load_one(plan)
        for blend in blends:  # after the exact prefixes they continue
            self.failed_blocks |= self.blender().run(blend, self.failed_blocks)

    def _load_one(self, plan: LoadPlan) -> None:
        started = time.perf_counter()
        if plan.background:
            self.background_requests.add(plan.req_id)  # reported finished even where nothing could be copied
        prepared = self._pinned_pages(plan)
        if prepared is None:
            return
        client, jobs = prepared
        if plan.background:
            self.pending_loads.append(PendingLoad(plan, client, jobs, self._start_load(jobs, plan.group), started))
            return
        self._move(jobs, into_engine=True, group=plan.group)
        self._finish_load(plan, client, jobs, started)

    def _pinned_pages(self, plan: LoadPlan) -> tuple[Any, list[PageJob]] | None:
        """The copies that bring the plan's pinned pages into the engine's blocks; None where there are none
        (every block the plan cannot bring is reported failed)."""
        client = self.link.client()
        jobs: list[PageJob] = []
        unpinned = plan.chunks if client is None else plan.unpinned
        if unpinned:  # evicted between lookup and lease, or no daemon: vLLM recomputes these
            self.link.fault("load_unpinned", "kvmesh: planned chunks were not in L1 at load time; vLLM "
                            "recomputes them", LeaseLost("entries not pinned"))
            for chunk in unpinned:
                self.failed_blocks.update(chunk.transfer.block_ids)
        if client is None or plan.lease is None:
            return None
        try:
            for chunk in plan.chunks:
                transfer, extent = chunk.transfer, chunk.extent
                if extent is None:
                    continue  # reported failed above
                wanted = transfer.entry_pages
                self._check_fits(extent, max(wanted) + 1, plan.group)
                entry = client.view(extent.offset, extent.meta, plan.lease.epoch)
                pages = entry[:, wanted[0]:wanted[-1] + 1] if transfer.page_index == () \
                    else entry[:, torch.tensor(wanted, dtype=torch.long)]
                jobs.append((pages, torch.tensor(transfer.block_ids, dtype=torch.long)))
        except ABSORBED as err:  # the daemon restarted since the lease: its offsets name nothing now
            self.link.fault("load", f"kvmesh load failed, vLLM will recompute: {err}", err)
            self._fail_all(plan)
            return None
        return client, jobs

    def _finish_load(self, plan: LoadPlan, client: Any, jobs: list[PageJob], started: float) -> None:
        """After the copies: verify them where asked, release the lease, and fail the plan's blocks where the
        lease expired before the copy was done (its pages may have been reused meanwhile)."""
        layers = self.groups[plan.group].layers
        loaded_bytes = sum(pages.numel() * pages.element_size() for pages, _ in jobs)
        verified = mismatches = 0
        if self.config.verify_loads:
            for pages, blocks in jobs:
                verified += 1
                mismatches += int(not all(torch.equal(layer.index_select(0, blocks.to(layer.device)).cpu(), pages[i])
                                          for i, layer in enumerate(layers)))
        assert plan.lease is not None
        cost = wire.LoadCost(time.perf_counter() - started, loaded_bytes, plan.num_tokens, verified, mismatches,
                             plan.req_id, plan.rank)
        try:
            known = client.release_lease(plan.lease.lease_id, cost)
        except ABSORBED as err:
            known = False
            self.link.fault("release", f"kvmesh could not release a lease: {err}", err)
        if not known:  # the lease expired before or during the copy: the pages may have been reused
            self.link.fault("lease_expired", "kvmesh: a lease expired before its load finished; vLLM "
                            "recomputes those tokens (raise lease_seconds if this repeats)",
                            LeaseLost(plan.lease.lease_id))
            self._fail_all(plan)

    def finished_loads(self, wait: bool = False) -> set[str]:
        """The requests whose background loads are done (all of them, waiting, with ``wait``): each lease is
        released and any failed blocks are reported before vLLM hears the request is done, as it requires."""
        still = []
        for pending in self.pending_loads:
            if not wait and not pending.done.query():
                still.append(pending)
                continue
            pending.done.synchronize()  # waits where asked; a CPU copy that raised raises here
            self._finish_load(pending.plan, pending.client, pending.jobs, pending.started)
        self.pending_loads = still
        copying = {pending.plan.req_id for pending in still}
        done = self.background_requests - copying
        self.background_requests = copying
        return done

    def _check_fits(self, extent: ExtentRef, pages_needed: int, group: int = 0) -> None:
        """The pinned entry's description against its extent and this engine's pages, before any copy.

        An entry that says it is larger than its extent, holds another dtype, other pages or fewer pages than
        the plan reads would make ``index_copy_`` read a neighbour's bytes or fail inside the engine: it is
        a corrupt entry (a client bug, version skew), so a load failure that vLLM recomputes.
        """
        try:
            meta = EntryMeta.decode(extent.meta)
        except EntryMetaError as err:
            raise StoredEntryMismatch(f"a stored entry's description is unreadable: {err}") from None
        shape, pages = meta.shape, self.groups[group]
        problems = []
        if meta.nbytes != extent.nbytes:
            problems.append(f"describes {meta.nbytes} bytes in an extent of {extent.nbytes}")
        if meta.dtype != pages.group.layout.dtype:
            problems.append(f"holds {meta.dtype}, the engine's pages {pages.group.layout.dtype}")
        if len(shape) != 2 + len(pages.page_shape) or shape[0] != len(pages.layers) \
                or tuple(shape[2:]) != pages.page_shape:
            problems.append(f"has shape {shape}, not [{len(pages.layers)}, pages, "
                            f"{', '.join(map(str, pages.page_shape))}]")
        elif shape[1] < pages_needed:
            problems.append(f"holds {shape[1]} pages where the load reads {pages_needed}")
        if problems:
            raise StoredEntryMismatch("a stored entry under this engine's namespace does not fit its pages: "
                                      + "; ".join(problems))

    def _fail_all(self, plan: LoadPlan) -> None:
        for chunk in plan.chunks:
            self.failed_blocks.update(chunk.transfer.block_ids)

    def take_failed_blocks(self) -> set[int]:
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed

    # -------------------------------------------------------------------- saves
    def save(self, plans: list[SavePlan], passages: Sequence[PassageSave] = ()) -> None:
        """Store every chunk that this step's requests completed: one reserve and one commit for them all."""
        self.settle_saves()
        for save in passages:
            self.blender().store_passages(save)
        chunks = [(plan.group, chunk) for plan in plans for chunk in plan.chunks]
        client = self.link.client() if chunks else None
        if client is None:
            return
        started = time.perf_counter()
        keys = self.entry_keys  # the scheduler names chunks; each rank stores each group's share under its own key
        try:
            slots = client.reserve([keys[g].key(c.key) for g, c in chunks],
                                   [self.groups[g].meta(len(c.block_ids)) for g, c in chunks],
                                   [None if c.parent is None else keys[g](c.parent) for g, c in chunks],
                                   [None if c.previous is None else keys[g](c.previous) for g, c in chunks])
        except ABSORBED as err:
            self.link.fault("save", f"kvmesh store failed, dropped: {err}", err)
            return
        written = [(slot, group, chunk) for slot, (group, chunk) in zip(slots, chunks) if slot is not None]
        done = None
        try:
            for group in sorted({group for _, group, _ in written}):
                done = self._move([(slot.tensor, torch.tensor(chunk.block_ids, dtype=torch.long))
                                   for slot, g, chunk in written if g == group], into_engine=False, group=group,
                                  wait=False) or done
        except BaseException:
            self._abort(client, [slot for slot, _, _ in written])
            raise
        nbytes = sum(slot.tensor.numel() * slot.tensor.element_size() for slot, _, _ in written)
        tokens = sum(chunk.key.num_tokens for _, group, chunk in written if group == self.shape.token_group)
        slots_written = [slot for slot, _, _ in written]
        if done is not None:  # device copies still running (one stream: the last event covers them all)
            self.pending_saves.append(PendingSave(done, client, slots_written, started, nbytes, tokens))
            return
        self._commit(client, slots_written, wire.StoreCost(time.perf_counter() - started, nbytes, tokens))

    def _commit(self, client: Any, slots: list[Any], cost: wire.StoreCost) -> None:
        try:  # the daemon gives reservations back when the connection drops
            client.commit(slots, cost)
        except ABSORBED as err:
            self.link.fault("save", f"kvmesh store failed, dropped: {err}", err)

    def _abort(self, client, slots) -> None:
        try:
            client.abort(slots)
        except ABSORBED:
            pass  # the daemon gives reservations back when the connection drops
