"""The connector's failure contract, seam by seam, against a real node daemon (and real disk, Redis).

vLLM cannot be steered to let a lease expire between its scheduler and worker steps, or to restart the
daemon between a lookup and a load, so these tests drive kvmesh's scheduler and worker sides directly
with small stand-ins for vLLM's request and block objects and real CPU tensors as the engine's KV.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kvmesh.client import ConfigMismatch, DaemonUnavailable, KVMeshClient
from kvmesh.client.stop import stop_daemon
from kvmesh.config import KVMeshConfig
from kvmesh.integrations.vllm.engine_link import DaemonLink
from kvmesh.integrations.vllm.engine_shape import EngineKVShape
from kvmesh.integrations.vllm.scheduler import SchedulerSide
from kvmesh.integrations.vllm.worker import UnsupportedEngine, WorkerSide
from kvmesh.keys import chunk_keys, model_namespace
from kvmesh.layout import KVLayout
from redis_servers import RedisServer

BLOCK = 16
CHUNK = 32
BLOCKS = 64
SHAPE = EngineKVShape("test-model", KVLayout(num_layers=2, num_kv_heads=1, head_size=8, dtype="bfloat16",
                                              block_size=BLOCK, page_view="opaque"))


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    cache_salt: str | None = None
    lora_request: Any = None
    mm_features: Any = None
    prompt_embeds: Any = None
    kv_transfer_params: Any = None


@dataclass
class FakeBlocks:
    ids: list[int]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


class Engine:
    """One engine's connector sides over its own KV tensors (what vLLM would hold): a scheduler, and a
    worker per tensor-parallel rank, each with its own heads' KV."""

    def __init__(self, config: KVMeshConfig, seed: int | None = None, world: int = 1,
                 block_outermost: bool = False, model: str = SHAPE.model_identity, load_async: bool = False) -> None:
        shape = EngineKVShape(model, SHAPE.layout, world)
        generator = torch.Generator().manual_seed(seed or 0)
        layers = SHAPE.layout.num_layers

        def rank_tensors() -> dict[str, torch.Tensor]:
            if block_outermost:  # vLLM's block-outermost layouts (BLHNC): a block holds every layer's page
                packed = (torch.randn(BLOCKS, layers, 1, BLOCK, 16, generator=generator) if seed is not None
                          else torch.zeros(BLOCKS, layers, 1, BLOCK, 16)).to(torch.bfloat16)
                return {f"model.layers.{i}.attn": packed[:, i] for i in range(layers)}
            return {f"model.layers.{i}.attn": (torch.randn(BLOCKS, 1, BLOCK, 16, generator=generator)
                                               if seed is not None else torch.zeros(BLOCKS, 1, BLOCK, 16)
                                               ).to(torch.bfloat16) for i in range(layers)}

        self.rank_layers = [rank_tensors() for _ in range(world)]
        links = [DaemonLink(config) for _ in range(world + 1)]
        for link in links:  # as the connector does while vLLM starts: later calls never start a daemon
            link.connect_at_start()
        self.scheduler = SchedulerSide(config, shape, links[0], load_async=load_async)
        self.workers = [WorkerSide(config, shape, link, rank) for rank, link in enumerate(links[1:])]
        for worker, layers in zip(self.workers, self.rank_layers):
            worker.register(layers, BLOCKS)
        self.worker, self.layers = self.workers[0], self.rank_layers[0]

    def compute_and_save(self, request: FakeRequest, blocks: list[int], ranks: list[int] | None = None) -> None:
        """As a prefill of the whole prompt: no hit, every full chunk saved after the forward pass (by ``ranks``)."""
        assert self.scheduler.num_new_matched_tokens(request, 0) == 0
        loads, saves = self.scheduler.build_meta([(request.request_id, 0, len(request.prompt_token_ids))],
                                                 lambda _: (blocks,))
        assert not loads and saves
        for rank in range(len(self.workers)) if ranks is None else ranks:
            self.workers[rank].save(saves)
        self.scheduler.finished(request.request_id)

    def matched(self, request: FakeRequest, wait: float = 10.0) -> int:
        """Ask as vLLM's scheduler does, step after step, until the answer is not "ask again"."""
        deadline = time.monotonic() + wait
        while (tokens := self.scheduler.num_new_matched_tokens(request, 0)) is None:
            assert time.monotonic() < deadline, "still waiting for promotion"
            time.sleep(0.002)
        return tokens

    def plan_load(self, request: FakeRequest, blocks: list[int]) -> Any:
        tokens = self.matched(request)
        self.scheduler.after_alloc(request, FakeBlocks(blocks), tokens)
        loads, _ = self.scheduler.build_meta([], None)
        return tokens, loads

    def pages(self, blocks: list[int], rank: int = 0) -> list[torch.Tensor]:
        index = torch.tensor(blocks)
        return [layer.index_select(0, index) for layer in self.rank_layers[rank].values()]


def _config(tmp_path: Path, **extra: object) -> KVMeshConfig:
    return KVMeshConfig.from_mapping({
        "socket_dir": str(tmp_path / "sock"), "instance": f"contract-{uuid.uuid4().hex[:8]}",
        "l1_size": "16MiB", "l1_prefault": False, "http_port": 0, "chunk_size": CHUNK,
        "save_partial_chunks": False, **extra})


def _stop(config: KVMeshConfig) -> None:
    stop_daemon(config)


def _errors(config: KVMeshConfig, kind: str) -> float:
    with KVMeshClient(KVMeshConfig.from_mapping({"autostart_daemon": False}, base=config)) as client:
        return client.metrics().get(f"kvmesh_errors_total{{kind={kind}}}", 0.0)


def _metric(config: KVMeshConfig, name: str) -> float:
    with KVMeshClient(KVMeshConfig.from_mapping({"autostart_daemon": False}, base=config)) as client:
        return client.metrics().get(name, 0.0)


def _wait_until_gone(pid: int, timeout: float = 30.0) -> None:
    import os

    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process {pid} did not exit"
        time.sleep(0.02)


def _prompt(name: str, tokens: int = 4 * CHUNK + 5) -> FakeRequest:
    return FakeRequest(f"{name}-{uuid.uuid4().hex[:6]}", [1000 + (i * 7) % 5000 for i in range(tokens)])


def _store_then_restart(config: KVMeshConfig, source: Engine, request: FakeRequest) -> None:
    """Store the prompt, wait for its writes behind, stop the daemon: the next one starts with an empty L1."""
    source.compute_and_save(request, SOURCE_BLOCKS)
    with KVMeshClient(config) as client:
        client.flush()
        client.shutdown_daemon()


SOURCE_BLOCKS = list(range(0, 9))
TARGET_BLOCKS = list(range(20, 29))


@pytest.fixture
def config(tmp_path: Path, request: pytest.FixtureRequest):
    lease = {"lease_seconds": 1} if "expires" in request.node.name else {}  # short only where expiry is the point
    config = _config(tmp_path, **lease)
    yield config
    _stop(config)


@pytest.mark.parametrize("source_packed, target_packed", [(False, False), (True, False), (False, True)],
                         ids=["per-layer", "block-outermost source", "block-outermost target"])
def test_a_load_copies_the_stored_pages_into_the_engines_blocks(config: KVMeshConfig, source_packed: bool,
                                                                target_packed: bool) -> None:
    """Also where an engine keeps every layer's page of a block together (GPU engines' block-outermost layouts,
    strided layer views): the same pages, the same bytes."""
    source = Engine(config, seed=1, block_outermost=source_packed)
    target = Engine(config, block_outermost=target_packed)
    request = _prompt("a")
    source.compute_and_save(request, SOURCE_BLOCKS)
    tokens, loads = target.plan_load(FakeRequest(request.request_id + "-again", request.prompt_token_ids),
                                     TARGET_BLOCKS)
    assert tokens == 4 * CHUNK
    target.worker.load(loads)
    assert target.worker.take_failed_blocks() == set()
    for stored, loaded in zip(source.pages(SOURCE_BLOCKS[:8]), target.pages(TARGET_BLOCKS[:8])):
        assert torch.equal(stored, loaded)


EXPLAIN = {"kvmesh": {"explain": True}}


def test_a_request_that_asks_is_told_why_its_hit_ends_where_it_does(tmp_path: Path) -> None:
    config = _config(tmp_path, l1_size="1MiB", l1_eviction="lru")  # lru: the fillers push the prompt out
    try:
        source, target = Engine(config, seed=1), Engine(config)
        stored = _prompt("told")
        source.compute_and_save(stored, SOURCE_BLOCKS)
        again = FakeRequest(stored.request_id + "-again", stored.prompt_token_ids, kv_transfer_params=EXPLAIN)
        assert target.matched(again) == 4 * CHUNK
        target.scheduler.after_alloc(again, FakeBlocks(TARGET_BLOCKS), 4 * CHUNK)
        told = target.scheduler.finished(again.request_id)
        assert told is not None and told["kvmesh"]["kvmesh_hit_tokens"] == 4 * CHUNK
        assert told["kvmesh"]["loaded_tokens"] == 4 * CHUNK and told["kvmesh"]["chunks_found"] == 4
        assert "partial chunks are not stored" in told["kvmesh"]["reason"]
        loads, _ = target.scheduler.build_meta([], None)
        target.worker.load(loads)  # releases the lease: the chunks may be evicted again

        unseen = FakeRequest("unseen", [7] * 100, kv_transfer_params=EXPLAIN)
        assert target.matched(unseen) == 0
        reason = target.scheduler.finished(unseen.request_id)["kvmesh"]["reason"]  # type: ignore[index]
        assert reason.startswith("chunk 0 (tokens 0-31) is not stored: never seen under this namespace")

        with KVMeshClient(config) as client:  # other entries push the stored prompt out of a 1 MiB L1
            filler = chunk_keys(list(range(9000, 9000 + 64 * 32)), model_namespace("filler", "x"), 64)
            for key in filler:  # one at a time: each evicts the least recently used
                assert client.put([key], [torch.zeros(2, 2, 64, 8, 32, dtype=torch.bfloat16)]) == 1
        late = FakeRequest(stored.request_id + "-late", stored.prompt_token_ids, kv_transfer_params=EXPLAIN)
        assert target.matched(late) == 0
        reason = target.scheduler.finished(late.request_id)["kvmesh"]["reason"]  # type: ignore[index]
        assert re.fullmatch(r"chunk 0 \(tokens 0-31\) was evicted from L1 \d+ s ago and no lower tier holds it",
                            reason), reason
        plain = FakeRequest(stored.request_id + "-plain", stored.prompt_token_ids)
        target.matched(plain)
        assert target.scheduler.finished(plain.request_id) is None  # not asked: nothing returned
        with KVMeshClient(config) as client:  # ... but every request's summary is kept by the daemon
            recent = client.recent_requests(limit=3)
            assert [r["request_id"] for r in recent] == [unseen.request_id, late.request_id, plain.request_id]
            assert client.recent_requests(again.request_id)[0]["kvmesh_hit_tokens"] == 4 * CHUNK
            assert client.recent_requests("never-sent") == []

        _stop(config)  # no daemon: the first lookup fails, later ones find no daemon to ask; both say so
        told = []
        for name in ("gone", "still-gone"):
            request = FakeRequest(name, stored.prompt_token_ids, kv_transfer_params=EXPLAIN)
            assert target.scheduler.num_new_matched_tokens(request, 0) == 0
            told.append(target.scheduler.finished(name)["kvmesh"]["reason"])  # type: ignore[index]
        assert told[0].startswith("the kvmesh lookup failed (") and told[0].endswith("): a miss")
        assert told[1] == "the kvmesh daemon is not reachable: a miss, computed by the engine"
    finally:
        _stop(config)


def test_a_summary_gives_tokens_per_tier_the_promotions_wait_and_the_loads_copy(tmp_path: Path) -> None:
    """L1 holds the first chunks, disk the rest (evicted from L1 after they were written down): the summary
    credits each tier its tokens, says how long the promotion took, and the daemon adds the workers' copy time
    and bytes, reported when they gave the lease back."""
    config = _config(tmp_path, l1_size="1MiB", l1_eviction="lru", disk_path=str(tmp_path / "disk"),
                     disk_write_policy="write_through")
    try:
        source, target = Engine(config, seed=1), Engine(config)
        stored = _prompt("tiers")
        source.compute_and_save(stored, SOURCE_BLOCKS)
        with KVMeshClient(config) as client:  # fillers push the prompt out of a 1 MiB L1; disk keeps it
            filler = chunk_keys(list(range(9000, 9000 + 64 * 32)), model_namespace("filler", "x"), 64)
            for key in filler:
                assert client.put([key], [torch.zeros(2, 2, 64, 8, 32, dtype=torch.bfloat16)]) == 1
        again = FakeRequest(stored.request_id + "-again", stored.prompt_token_ids, kv_transfer_params=EXPLAIN)
        tokens, loads = target.plan_load(again, TARGET_BLOCKS)
        assert tokens == 4 * CHUNK
        target.worker.load(loads)
        told = target.scheduler.finished(again.request_id)["kvmesh"]  # type: ignore[index]
        assert told["hit_tokens_by_tier"] == {"disk": 4 * CHUNK}
        assert told["chunks_from_below_l1"] == 4 and told["promotion_seconds"] > 0
        page_bytes = SHAPE.layout.num_layers * BLOCK * 16 * 2  # a block's pages, every layer, bf16
        assert told["loaded_bytes"] == 4 * CHUNK // BLOCK * page_bytes and told["load_seconds"] > 0
        assert told["cause"] == "partial_off"
        # the same prompt again: in L1 now, no wait
        once_more = FakeRequest(stored.request_id + "-more", stored.prompt_token_ids, kv_transfer_params=EXPLAIN)
        tokens, loads = target.plan_load(once_more, TARGET_BLOCKS)
        target.worker.load(loads)
        told = target.scheduler.finished(once_more.request_id)["kvmesh"]  # type: ignore[index]
        assert told["hit_tokens_by_tier"] == {"l1": 4 * CHUNK} and told["promotion_seconds"] == 0
    finally:
        _stop(config)


def test_a_miss_under_another_namespace_names_the_part_that_differs(tmp_path: Path) -> None:
    """The same tokens stored by another model, or under another cache_salt: the miss says which part of the
    namespace differs (the fingerprints shown, a salt only said to differ)."""
    config = _config(tmp_path)
    try:
        ours, theirs = Engine(config, seed=1), Engine(config, seed=2, model="other-model")
        prompt = _prompt("ns")
        theirs.compute_and_save(prompt, SOURCE_BLOCKS)
        mine = FakeRequest("mine", prompt.prompt_token_ids, kv_transfer_params=EXPLAIN)
        assert ours.matched(mine) == 0
        told = ours.scheduler.finished(mine.request_id)["kvmesh"]  # type: ignore[index]
        assert told["cause"] == "namespace"
        assert re.fullmatch(r"chunk 0 is not stored under this request's namespace, but the same tokens were stored "
                            r"\d+ s ago under a namespace that differs in the model fingerprint \(this request's "
                            r"test-model, theirs other-model\)", told["reason"]), told["reason"]

        salted = FakeRequest("salted", prompt.prompt_token_ids, cache_salt="tenant-a-secret")
        ours.compute_and_save(salted, SOURCE_BLOCKS)
        other_salt = FakeRequest("other-salt", prompt.prompt_token_ids, cache_salt="tenant-b-secret",
                                 kv_transfer_params=EXPLAIN)
        assert ours.matched(other_salt) == 0
        told = ours.scheduler.finished(other_salt.request_id)["kvmesh"]  # type: ignore[index]
        assert told["reason"].endswith("differs in the request's cache_salt"), told["reason"]
        assert "secret" not in str(told)

        fresh = FakeRequest("fresh", [5] * 100, kv_transfer_params=EXPLAIN)  # stored by nobody
        assert ours.matched(fresh) == 0
        told = ours.scheduler.finished(fresh.request_id)["kvmesh"]  # type: ignore[index]
        assert told["cause"] == "not_stored" and "never seen under this namespace" in told["reason"]
    finally:
        _stop(config)


def test_a_miss_behind_a_dead_redis_says_redis_could_not_be_asked(tmp_path: Path) -> None:
    from kvmesh.bench.servers import free_port

    config = _config(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_write_policy="write_through")
    try:
        engine = Engine(config, seed=1)
        request = FakeRequest("behind-dead-redis", _prompt("dead").prompt_token_ids, kv_transfer_params=EXPLAIN)
        assert engine.matched(request) == 0
        told = engine.scheduler.finished(request.request_id)["kvmesh"]  # type: ignore[index]
        assert told["cause"] == "tier_unavailable"
        assert told["reason"].startswith("chunk 0 (tokens 0-31) is not in the tiers that answered; redis could not "
                                         "be asked"), told["reason"]
    finally:
        _stop(config)


class _ManualEvent:
    """A device copy's event that completes when the test says (no GPU here: what cannot be made to happen)."""

    def __init__(self) -> None:
        self.completed = False

    def query(self) -> bool:
        return self.completed

    def synchronize(self) -> None:
        self.completed = True


class _DeviceLikeCopier:
    """The worker's CUDA copier, with CPU tensors: the same copy function, events the test completes."""

    def __init__(self) -> None:
        self.events: list[_ManualEvent] = []

    def pin(self, segment: object) -> None:
        return

    def move(self, jobs, layers, into_engine: bool, wait: bool = True, engine_waits: bool = True) -> _ManualEvent:
        from kvmesh.page_copy import move_pages_device

        move_pages_device(jobs, layers, into_engine)
        event = _ManualEvent()
        self.events.append(event)
        if wait:
            event.synchronize()
        return event


def test_a_device_save_is_committed_once_its_copies_complete_and_never_blocks_the_step(config: KVMeshConfig) -> None:
    source, target = Engine(config, seed=1), Engine(config)
    copier = source.worker.copier = _DeviceLikeCopier()  # type: ignore[assignment]
    request = _prompt("device")
    source.compute_and_save(request, SOURCE_BLOCKS)  # returns with the copies still "running"
    assert len(source.worker.pending_saves) == 1 and copier.events and not copier.events[-1].completed
    again = FakeRequest(request.request_id + "-again", request.prompt_token_ids)
    assert target.matched(again) == 0  # reserved, not committed: nothing to find yet
    target.scheduler.finished(again.request_id)
    source.worker.save([])  # the next step: the copies have not completed, still nothing committed
    assert len(source.worker.pending_saves) == 1
    copier.events[-1].completed = True
    source.worker.save([])  # the step after: committed
    assert not source.worker.pending_saves
    tokens, loads = target.plan_load(FakeRequest(request.request_id + "-third", request.prompt_token_ids),
                                     TARGET_BLOCKS)
    assert tokens == 4 * CHUNK
    target.worker.load(loads)
    for stored, loaded in zip(source.pages(SOURCE_BLOCKS[:8]), target.pages(TARGET_BLOCKS[:8])):
        assert torch.equal(stored, loaded)


def test_device_saves_still_copying_at_shutdown_are_committed(config: KVMeshConfig) -> None:
    source, target = Engine(config, seed=1), Engine(config)
    source.worker.copier = _DeviceLikeCopier()  # type: ignore[assignment]
    request = _prompt("shutdown")
    source.compute_and_save(request, SOURCE_BLOCKS)
    source.worker.settle_saves(wait=True)  # what the connector's shutdown does
    assert not source.worker.pending_saves
    assert target.matched(FakeRequest(request.request_id + "-again", request.prompt_token_ids)) == 4 * CHUNK


def _background_load(target: Engine, request: FakeRequest) -> list[Any]:
    """vLLM's calls for a load_async hit: matched (tokens, True), blocks for the hit, the plan in this step's
    metadata; later, once the load is done, blocks for the rest of the prompt with no tokens to load."""
    tokens, background = target.scheduler.matched(request, 0)
    assert (tokens, background) == (4 * CHUNK, True)
    target.scheduler.after_alloc(request, FakeBlocks(TARGET_BLOCKS), tokens)
    loads, _ = target.scheduler.build_meta([], None)
    assert loads and all(plan.background for plan in loads)
    return loads


def test_a_background_load_is_reported_once_its_copies_are_done_and_never_blocks_the_step(
        config: KVMeshConfig) -> None:
    """vLLM's load_async with a device's copier (events the test completes): the step that starts the load does
    not wait for it; vLLM hears of the request once, after the copies, with its lease released and its pages
    the stored ones."""
    source, target = Engine(config, seed=1), Engine(config, load_async=True)
    copier = target.worker.copier = _DeviceLikeCopier()  # type: ignore[assignment]
    request = _prompt("background")
    source.compute_and_save(request, SOURCE_BLOCKS)
    again = FakeRequest(request.request_id + "-again", request.prompt_token_ids, kv_transfer_params=EXPLAIN)
    loads = _background_load(target, again)
    target.worker.load(loads)  # start_load_kv: returns with the copies still "running"
    assert copier.events and not copier.events[-1].completed
    assert target.worker.finished_loads() == set()  # this step's get_finished: not done yet
    assert _metric(config, "kvmesh_load_seconds_count") == 0  # the lease is held: not released before the copy
    copier.events[-1].completed = True
    assert target.worker.finished_loads() == {again.request_id}
    assert target.worker.take_failed_blocks() == set()
    assert target.worker.finished_loads() == set()  # reported once
    assert _metric(config, "kvmesh_load_seconds_count") == 1
    for stored, loaded in zip(source.pages(SOURCE_BLOCKS[:8]), target.pages(TARGET_BLOCKS[:8])):
        assert torch.equal(stored, loaded)
    # vLLM allocates the rest of the prompt once the load is done: nothing more to load, the summary keeps its count
    target.scheduler.after_alloc(again, FakeBlocks(TARGET_BLOCKS), 0)
    assert target.scheduler.build_meta([], None) == ([], [])
    summary = target.scheduler.finished(again.request_id)
    assert summary is not None
    assert summary["kvmesh"]["loaded_tokens"] == 4 * CHUNK and summary["kvmesh"]["loaded_in_background"] is True


def test_a_background_load_on_the_cpu_copies_on_its_own_thread(config: KVMeshConfig) -> None:
    source, target = Engine(config, seed=2), Engine(config, load_async=True)
    request = _prompt("cpu-background")
    source.compute_and_save(request, SOURCE_BLOCKS)
    again = FakeRequest(request.request_id + "-again", request.prompt_token_ids)
    target.worker.load(_background_load(target, again))
    assert target.worker.finished_loads(wait=True) == {again.request_id}
    assert target.worker._loader is not None  # the copy ran on the worker's copy thread
    assert target.worker.take_failed_blocks() == set()
    for stored, loaded in zip(source.pages(SOURCE_BLOCKS[:8]), target.pages(TARGET_BLOCKS[:8])):
        assert torch.equal(stored, loaded)


def test_a_background_load_whose_lease_expires_reports_its_blocks_failed_with_the_request(
        config: KVMeshConfig) -> None:
    """lease_seconds=1 here: the lease runs out while the copy "runs"; vLLM must hear of the failed blocks no later
    than of the request (its contract for async loads)."""
    source, target = Engine(config, seed=3), Engine(config, load_async=True)
    copier = target.worker.copier = _DeviceLikeCopier()  # type: ignore[assignment]
    request = _prompt("expires-background")
    source.compute_and_save(request, SOURCE_BLOCKS)
    again = FakeRequest(request.request_id + "-again", request.prompt_token_ids)
    target.worker.load(_background_load(target, again))
    time.sleep(1.2)
    assert _errors(config, "lease_expired") == 1
    copier.events[-1].completed = True
    assert target.worker.finished_loads() == {again.request_id}
    assert target.worker.take_failed_blocks() == set(TARGET_BLOCKS[:8])


def test_a_background_load_with_nothing_pinned_is_reported_at_once_and_its_retry_loads_before_its_step(
        config: KVMeshConfig) -> None:
    """Every chunk evicted between lookup and lease: the request is reported done in the same step (else it would
    wait forever) with every block failed; vLLM then frees its blocks and asks again, and the retry is not a
    background load, so a load that keeps failing is computed instead of retried forever."""
    source, target = Engine(config, seed=4), Engine(config, load_async=True)
    request = _prompt("unpinned-background")
    source.compute_and_save(request, SOURCE_BLOCKS)
    tokens, background = target.scheduler.matched(request, 0)
    assert background
    with KVMeshClient(config) as client:
        client.delete(target.scheduler.trackers[request.request_id].hit_keys)
    target.scheduler.after_alloc(request, FakeBlocks(TARGET_BLOCKS), tokens)
    loads, _ = target.scheduler.build_meta([], None)
    target.worker.load(loads)
    assert target.worker.finished_loads() == {request.request_id}
    assert target.worker.take_failed_blocks() == set(TARGET_BLOCKS[:8])
    source.compute_and_save(FakeRequest(request.request_id + "-stored", request.prompt_token_ids), SOURCE_BLOCKS)
    assert target.scheduler.matched(request, 0) == (4 * CHUNK, False)


def test_each_tensor_parallel_rank_loads_its_own_heads(config: KVMeshConfig) -> None:
    source, target = Engine(config, seed=1, world=2), Engine(config, world=2)
    request = _prompt("tp")
    source.compute_and_save(request, SOURCE_BLOCKS)
    tokens, loads = target.plan_load(FakeRequest(request.request_id + "-again", request.prompt_token_ids),
                                     TARGET_BLOCKS)
    assert tokens == 4 * CHUNK
    assert sorted(plan.rank for plan in loads) == [0, 1]
    for rank, worker in enumerate(target.workers):
        worker.load(loads)  # each worker gets every plan and takes its own rank's
        assert worker.take_failed_blocks() == set()
        for stored, loaded in zip(source.pages(SOURCE_BLOCKS[:8], rank), target.pages(TARGET_BLOCKS[:8], rank)):
            assert torch.equal(stored, loaded)
    assert not torch.equal(target.pages(TARGET_BLOCKS[:8], 0)[0], target.pages(TARGET_BLOCKS[:8], 1)[0])


def test_a_chunk_is_a_hit_only_where_every_rank_stored_it(config: KVMeshConfig) -> None:
    source, target = Engine(config, seed=2, world=2), Engine(config, world=2)
    request = _prompt("tp-one-rank")
    source.compute_and_save(request, SOURCE_BLOCKS, ranks=[0])  # rank 1's store was dropped
    again = FakeRequest(request.request_id + "-again", request.prompt_token_ids)
    assert target.matched(again) == 0
    target.scheduler.finished(again.request_id)
    source.compute_and_save(FakeRequest(request.request_id + "-2", request.prompt_token_ids), SOURCE_BLOCKS,
                            ranks=[1])
    assert target.matched(FakeRequest(request.request_id + "-3", request.prompt_token_ids)) == 4 * CHUNK


def test_engines_split_in_other_ways_never_share_an_entry(config: KVMeshConfig) -> None:
    split, whole = Engine(config, seed=3, world=2), Engine(config)
    request = _prompt("tp-whole")
    split.compute_and_save(request, SOURCE_BLOCKS)
    assert whole.matched(FakeRequest(request.request_id + "-whole", request.prompt_token_ids)) == 0
    whole.compute_and_save(FakeRequest(request.request_id + "-w2", request.prompt_token_ids), SOURCE_BLOCKS)
    four = Engine(config, world=4)
    assert four.matched(FakeRequest(request.request_id + "-four", request.prompt_token_ids)) == 0


@pytest.mark.parametrize("extra", [{"prompt_embeds": torch.zeros(4 * CHUNK + 5, 8)}, {"mm_features": ["image"]}])
def test_requests_whose_kv_is_not_named_by_their_tokens_are_neither_loaded_nor_saved(
        config: KVMeshConfig, extra: dict[str, Any]) -> None:
    """Prompt embeddings (or images) sit behind placeholder token ids: same ids, other KV, so no key."""
    source, target = Engine(config, seed=4), Engine(config)
    plain = _prompt("e")
    source.compute_and_save(plain, SOURCE_BLOCKS)
    embedded = FakeRequest(plain.request_id + "-embeds", plain.prompt_token_ids, **extra)
    assert target.scheduler.num_new_matched_tokens(embedded, 0) == 0  # the same ids are stored: no hit
    stored = _metric(config, "kvmesh_stored_tokens_total")
    _, saves = target.scheduler.build_meta([(embedded.request_id, 0, len(plain.prompt_token_ids))],
                                           lambda _: (TARGET_BLOCKS,))
    assert saves == []
    assert _metric(config, "kvmesh_stored_tokens_total") == stored


def test_loads_and_saves_report_their_own_metrics(config: KVMeshConfig) -> None:
    source, target = Engine(config, seed=9), Engine(config)
    request = _prompt("m")
    source.compute_and_save(request, SOURCE_BLOCKS)
    assert _metric(config, "kvmesh_stored_tokens_total") == 4 * CHUNK
    assert _metric(config, "kvmesh_stored_bytes_total") == 8 * 2 * BLOCK * 16 * 2  # pages * layers * page bytes
    _, loads = target.plan_load(request, TARGET_BLOCKS)
    target.worker.load(loads)
    assert target.worker.take_failed_blocks() == set()
    assert _metric(config, "kvmesh_loaded_tokens_total") == 4 * CHUNK
    assert _metric(config, "kvmesh_loaded_bytes_total") == 8 * 2 * BLOCK * 16 * 2
    assert _metric(config, "kvmesh_load_seconds_count") == 1


def test_a_lease_that_expires_before_the_load_reports_its_blocks_failed(config: KVMeshConfig) -> None:
    source, target = Engine(config, seed=2), Engine(config)
    request = _prompt("b")
    source.compute_and_save(request, SOURCE_BLOCKS)
    _, loads = target.plan_load(request, TARGET_BLOCKS)
    time.sleep(1.2)  # lease_seconds=1: the daemon drops the lease on its next request
    assert _errors(config, "lease_expired") == 1  # (the daemon counts what it expired)
    target.worker.load(loads)
    assert target.worker.take_failed_blocks() == set(TARGET_BLOCKS[:8])


def test_a_daemon_restart_between_lookup_and_load_reports_the_blocks_failed(config: KVMeshConfig) -> None:
    source, target = Engine(config, seed=3), Engine(config)
    request = _prompt("c")
    source.compute_and_save(request, SOURCE_BLOCKS)
    _, loads = target.plan_load(request, TARGET_BLOCKS)
    worker_client = target.worker.link.client()
    assert worker_client is not None
    _stop(config)  # the daemon the lease belongs to is gone (its segment still mapped here, unlinked)
    _wait_until_gone(worker_client.daemon_pid)  # not just its lock: a handler of its last connections too
    target.worker.load(loads)
    assert target.worker.take_failed_blocks() == set(TARGET_BLOCKS[:8])  # vLLM recomputes every planned block
    Engine(config)  # a new daemon: a new epoch, a new segment; the old plan can no longer be served
    target.worker.link.close()
    target.worker.link.connect_at_start()
    target.worker.load(loads)
    assert target.worker.take_failed_blocks() == set(TARGET_BLOCKS[:8])


def test_an_entry_evicted_before_the_lease_is_reported_failed(config: KVMeshConfig) -> None:
    source, target = Engine(config, seed=4), Engine(config)
    request = _prompt("d")
    source.compute_and_save(request, SOURCE_BLOCKS)
    tokens = target.matched(request)
    with KVMeshClient(config) as client:  # evicted (deleted) between the lookup and the lease
        client.delete(target.scheduler.trackers[request.request_id].hit_keys[2:])
    target.scheduler.after_alloc(request, FakeBlocks(TARGET_BLOCKS), tokens)
    loads, _ = target.scheduler.build_meta([], None)
    target.worker.load(loads)
    assert target.worker.take_failed_blocks() == set(TARGET_BLOCKS[4:8])  # chunks 2 and 3: blocks 4..7
    for stored, loaded in zip(source.pages(SOURCE_BLOCKS[:4]), target.pages(TARGET_BLOCKS[:4])):
        assert torch.equal(stored, loaded)


def test_a_failing_save_is_dropped_and_counted(config: KVMeshConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(config, seed=5)
    request = _prompt("e")
    client = engine.worker.link.client()
    assert client is not None

    def lost(*args: object, **kwargs: object) -> None:
        raise DaemonUnavailable("lost the kvmesh daemon: connection reset")

    monkeypatch.setattr(client, "commit", lost)
    engine.compute_and_save(request, SOURCE_BLOCKS)  # no exception: the request goes on
    monkeypatch.undo()
    assert engine.worker.link.client() is None  # the link was dropped; re-made in the background, after a pause
    deadline = time.monotonic() + 10
    while engine.worker.link.client() is None:
        assert time.monotonic() < deadline, "the link was not re-made"
        time.sleep(0.05)
    assert _errors(config, "save") == 1  # counted once the link was back
    assert Engine(config).matched(request) == 0  # nothing became visible


def test_a_corrupt_disk_entry_is_a_miss(tmp_path: Path) -> None:
    config = _config(tmp_path, disk_path=str(tmp_path / "disk"))
    try:
        source = Engine(config, seed=6)
        request = _prompt("f")
        _store_then_restart(config, source, request)
        files = sorted((tmp_path / "disk").rglob("*.kv"))
        assert len(files) == 4
        for path in files:  # flip a byte in the middle of every entry
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        target = Engine(config)  # a new daemon: empty L1, the disk as it is
        assert target.matched(request) == 0
        deadline = time.monotonic() + 30  # promotions already started finish on their own: each one drops
        while list((tmp_path / "disk").rglob("*.kv")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not list((tmp_path / "disk").rglob("*.kv"))  # every corrupt entry was dropped
        asked = FakeRequest("asked", request.prompt_token_ids, kv_transfer_params=EXPLAIN)
        assert target.matched(asked) == 0
        told = target.scheduler.finished(asked.request_id)["kvmesh"]  # type: ignore[index]
        assert told["cause"] == "dropped"
        assert re.fullmatch(r"chunk 0 \(tokens 0-31\) was dropped as corrupt from disk \d+ s ago and no tier holds it "
                            r"now", told["reason"]), told["reason"]
    finally:
        _stop(config)


def test_chunks_on_disk_are_loaded_once_promoted_and_the_scheduler_is_told_to_ask_again(tmp_path: Path) -> None:
    config = _config(tmp_path, disk_path=str(tmp_path / "disk"))
    try:
        source = Engine(config, seed=7)
        request = _prompt("g")
        _store_then_restart(config, source, request)
        target = Engine(config)  # a new daemon: the chunks are on disk only
        assert target.scheduler.num_new_matched_tokens(request, 0) is None  # promotion started, not awaited
        tokens, loads = target.plan_load(request, TARGET_BLOCKS)
        assert tokens == 4 * CHUNK
        target.worker.load(loads)
        assert target.worker.take_failed_blocks() == set()
        for stored, loaded in zip(source.pages(SOURCE_BLOCKS[:8]), target.pages(TARGET_BLOCKS[:8])):
            assert torch.equal(stored, loaded)
    finally:
        _stop(config)


def test_a_corrupt_redis_entry_is_a_miss(tmp_path: Path, redis_server: RedisServer) -> None:
    namespace = f"contract-{uuid.uuid4().hex[:6]}"
    config = _config(tmp_path, redis_url=redis_server.url, redis_namespace=namespace)
    try:
        source = Engine(config, seed=8)
        request = _prompt("h")
        _store_then_restart(config, source, request)
        redis = redis_server.client()
        keys = [key for key in redis.scan_iter(f"{namespace}*")]
        assert keys
        for key in keys:
            value = redis.get(key)
            if value and len(value) > 64:
                redis.setrange(key, len(value) // 2, bytes([value[len(value) // 2] ^ 0xFF]))
        assert Engine(config).matched(request) == 0
    finally:
        _stop(config)


def test_a_daemon_with_other_settings_is_refused_with_the_key_and_both_values(tmp_path: Path) -> None:
    config = _config(tmp_path)
    try:
        with KVMeshClient(config):
            pass
        other = KVMeshConfig.from_mapping({"l1_size": "32MiB", "redis_url": "redis://user:secret@host:1/0"},
                                          base=config)
        with pytest.raises(ConfigMismatch) as raised:
            KVMeshClient(other)
        message = str(raised.value)
        assert "l1_size=33554432 here, 16777216 in the daemon" in message
        assert "redis_url='redis://***@host:1/0' here, '' in the daemon" in message
        assert "secret" not in message
        assert "instance" in message
        # settings only the engine uses may differ; an observer may ignore the daemon's settings
        with KVMeshClient(KVMeshConfig.from_mapping({"chunk_size": 64, "verify_loads": True}, base=config)):
            pass
        with KVMeshClient(other, check_config=False) as observer:
            assert observer.info()["config"]["l1_size"] == 16 * 1024**2
    finally:
        _stop(config)


def test_kv_caches_off_the_cpu_are_refused_at_start(tmp_path: Path) -> None:
    config = _config(tmp_path, autostart_daemon=False)
    worker = WorkerSide(config, SHAPE, DaemonLink(config))
    layers = {f"layer.{i}": torch.empty(BLOCKS, 1, BLOCK, 16, dtype=torch.bfloat16, device="meta")
              for i in range(SHAPE.layout.num_layers)}
    with pytest.raises(UnsupportedEngine, match="KV cache is on meta; kvmesh copies KV between CPU memory or one "
                                                "CUDA device"):
        worker.register(layers, BLOCKS)


def test_a_cuda_engine_starts_only_where_the_user_opted_in(tmp_path: Path) -> None:
    """Not yet verified on a GPU: refused naming the key that opts in (the machine here has no CUDA device)."""
    config = _config(tmp_path, autostart_daemon=False)
    worker = WorkerSide(config, SHAPE, DaemonLink(config))
    with pytest.raises(UnsupportedEngine, match="cuda:0.*not yet verified on a GPU: set gpu_unverified=true"):
        worker._device_copier(["cuda:0"])
    with pytest.raises(UnsupportedEngine, match="one CUDA device"):
        worker._device_copier(["cuda:0", "cuda:1"])


def test_a_stored_entry_that_does_not_fit_the_engines_pages_is_a_load_failure(config: KVMeshConfig) -> None:
    """Its description is checked against its extent and the engine's pages before any page is copied."""
    from kvmesh.entry import EntryMeta
    from kvmesh.integrations.vllm.worker import StoredEntryMismatch
    from kvmesh.wire import ExtentRef

    engine = Engine(config)
    page = (1, BLOCK, 16)

    def extent(meta: EntryMeta, nbytes: int | None = None) -> ExtentRef:
        return ExtentRef(0, meta.nbytes if nbytes is None else nbytes, meta.encode())

    good = EntryMeta("bfloat16", (2, 2, *page), "opaque")
    engine.worker._check_fits(extent(good), 2)  # fits: no error
    for bad, needed, fragment in [
        (extent(good, good.nbytes * 2), 2, "describes"),  # the entry says it is smaller than its extent
        (extent(EntryMeta("float32", (2, 2, *page), "opaque")), 2, "holds float32"),
        (extent(EntryMeta("bfloat16", (2, 1, *page), "opaque")), 2, "holds 1 pages where the load reads 2"),
        (extent(EntryMeta("bfloat16", (3, 2, *page), "opaque")), 2, "has shape"),
    ]:
        with pytest.raises(StoredEntryMismatch, match=fragment):
            engine.worker._check_fits(bad, needed)


def test_the_daemon_refuses_a_reservation_whose_size_is_not_its_entrys(config: KVMeshConfig) -> None:
    from kvmesh import wire
    from kvmesh.client import DaemonError
    from kvmesh.entry import EntryMeta

    meta = EntryMeta("bfloat16", (2, 2, 1, BLOCK, 16), "opaque")
    with KVMeshClient(config) as client:
        item = wire.ReserveItem(b"r" * 16, meta.nbytes + 4096, meta.encode(), None, 0)
        with pytest.raises(DaemonError, match=r"reserve.items\[0\].nbytes"):
            client._call(wire.Reserve([item]))
        assert client.stats()["l1"]["entries"] == 0
        with pytest.raises(DaemonError, match=r"reserve.items\[0\].meta"):
            client._call(wire.Reserve([wire.ReserveItem(b"s" * 16, 64, "not a description", None, 0)]))


def test_a_stopped_daemon_costs_a_request_its_deadline_and_the_link_is_remade_in_the_background(
        tmp_path: Path) -> None:
    """A daemon stopped (SIGSTOP), swapping or stuck: the scheduler waits at most call_timeout_seconds."""
    import os
    import signal
    import threading

    config = _config(tmp_path, call_timeout_seconds=0.5)
    engine = Engine(config, seed=6)
    request = _prompt("s")
    engine.compute_and_save(request, SOURCE_BLOCKS)
    client = engine.scheduler.link.client()
    assert client is not None
    pid = client.daemon_pid
    answers: list[int | None] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        asking = threading.Thread(target=lambda: answers.append(
            engine.scheduler.num_new_matched_tokens(FakeRequest("again", request.prompt_token_ids), 0)))
        asking.start()
        asking.join(timeout=30)
        assert not asking.is_alive() and answers == [0]  # a miss, not a hang
        assert engine.scheduler.link.client() is None  # dropped; no daemon is started on this thread
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while engine.scheduler.link.client() is None:  # re-made in the background once the daemon answers
        assert time.monotonic() < deadline, "the link was not re-made"
        time.sleep(0.1)
    assert engine.matched(FakeRequest("later", request.prompt_token_ids)) == 4 * CHUNK
    _stop(config)
