"""The scheduler's side of blending against a real node daemon: what a request claims, plans and never stores."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvmesh.blend.segments import segment_digest
from kvmesh.client import KVMeshClient
from kvmesh.client.stop import stop_daemon
from kvmesh.config import KVMeshConfig
from kvmesh.integrations.vllm.blend_plan import BlendScheduler
from kvmesh.integrations.vllm.engine_link import DaemonLink
from kvmesh.integrations.vllm.engine_shape import EngineKVShape
from kvmesh.integrations.vllm.scheduler import SchedulerSide
from kvmesh.keys import ChunkKey, chunk_keys
from kvmesh.layout import KVLayout

BLOCK, CHUNK, START = 16, 32, 1  # START: the token each passage (message) begins with
SHAPE = EngineKVShape("test-model", KVLayout(num_layers=2, num_kv_heads=1, head_size=8, dtype="bfloat16",
                                              block_size=BLOCK, page_view="cpu-pages"))


class Request:
    def __init__(self, tokens: list[int], **kvmesh: Any) -> None:
        self.request_id = uuid.uuid4().hex
        self.prompt_token_ids = tokens
        self.cache_salt = self.lora_request = self.mm_features = self.prompt_embeds = None
        self.kv_transfer_params = {"kvmesh": kvmesh} if kvmesh else None


class Blocks:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


def _passage(seed: int, tokens: int = 40) -> list[int]:
    return [START] + torch.randint(10, 1000, (tokens - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def config(tmp_path: Path) -> Iterator[KVMeshConfig]:
    config = KVMeshConfig.from_mapping({
        "socket_dir": str(tmp_path / "sock"), "instance": f"blend-{uuid.uuid4().hex[:8]}", "l1_size": "16MiB",
        "l1_prefault": False, "http_port": 0, "chunk_size": CHUNK, "save_partial_chunks": False,
        "blend_boundary_token": START, "blend_min_passage_tokens": 8})
    yield config
    stop_daemon(config)


def _scheduler(config: KVMeshConfig, unavailable: str | None = None) -> SchedulerSide:
    link = DaemonLink(config)
    link.connect_at_start()
    return SchedulerSide(config, SHAPE, link, blend=BlendScheduler(config, link, unavailable, lambda: None))


def _store(config: KVMeshConfig, scheduler: SchedulerSide, passage: list[int]) -> None:
    """A passage's position-free KV under its key, as a worker stores it."""
    digest = segment_digest(SHAPE.namespace(""), passage)
    with KVMeshClient(config) as client:
        client.put([ChunkKey(digest, 0, len(passage))], [torch.zeros(2, 2, len(passage), 1, 8, dtype=torch.bfloat16)])


def test_stored_passages_in_another_order_are_claimed_and_planned_and_nothing_past_the_exact_prefix_is_saved(
        config: KVMeshConfig) -> None:
    scheduler = _scheduler(config)
    header = [7] * 8
    a, b, c = _passage(1), _passage(2), _passage(3)
    for passage in (a, b):
        _store(config, scheduler, passage)
    question = [START, 5, 6, 7, 8, 9]
    tokens = header + c + b + a + question  # c is not stored: computed inside the blended range
    request = Request(tokens, blend=True)
    claimed = scheduler.num_new_matched_tokens(request, 0)
    assert claimed == len(header) + 3 * 40  # up to the end of the last stored passage, a
    scheduler.after_alloc(request, Blocks(list(range(20))), claimed)
    plans, _ = scheduler.build_blend_meta([], None)
    (plan,) = plans
    assert (plan.fixed, plan.end) == (0, claimed) and plan.tokens == tokens[:claimed]
    assert [(p.start, p.end) for p in plan.passages] == [(48, 88), (88, 128)]
    # the forward pass computes the rest: no exact chunk of this prompt is stored, and once its prompt is
    # computed its passages not yet stored are (c, and the question's message is too short)
    step = [(request.request_id, claimed, len(tokens) - claimed)]
    _, saves = scheduler.build_meta(step, lambda _: (list(range(20)),))
    assert saves == []
    _, passage_saves = scheduler.build_blend_meta(step, lambda _: (list(range(20)),))
    assert [(p.start, p.end) for p in passage_saves[0].passages] == [(8, 48)]
    with KVMeshClient(config) as client:
        assert client.lookup(chunk_keys(tokens, SHAPE.namespace(""), CHUNK)) == 0


def test_exact_prefix_first_then_a_blend_after_it(config: KVMeshConfig) -> None:
    scheduler = _scheduler(config)
    a, b = _passage(4), _passage(5)
    _store(config, scheduler, b)
    first = Request(a + [9] * 24 + [START, 3, 3])  # stores its exact chunks: tokens 0..64
    assert scheduler.num_new_matched_tokens(first, 0) == 0
    _, saves = scheduler.build_meta([(first.request_id, 0, len(first.prompt_token_ids))], lambda _: (list(range(8)),))
    from kvmesh.integrations.vllm.worker import WorkerSide  # the worker stores the chunks' pages

    worker = WorkerSide(config, SHAPE, scheduler.link)
    worker.register({f"model.layers.{i}.attn": torch.zeros(40, 1, BLOCK, 16, dtype=torch.bfloat16)
                     for i in range(2)}, 40)
    worker.save(saves)
    scheduler.finished(first.request_id)
    tokens = a + [9] * 24 + b + [START, 3, 3]
    request = Request(tokens, blend=True)
    assert scheduler.num_new_matched_tokens(request, 0) == 64 + 40
    scheduler.after_alloc(request, Blocks(list(range(10, 20))), 64 + 40)
    loads, _ = scheduler.build_meta([], None)
    plans, _ = scheduler.build_blend_meta([], None)
    assert [(c.transfer.key.start, c.transfer.key.end) for c in loads[0].chunks] == [(0, 32), (32, 64)]
    assert (plans[0].fixed, plans[0].end, len(plans[0].passages)) == (64, 104, 1)


def test_no_blend_unless_asked_stored_enough_and_possible(config: KVMeshConfig, caplog) -> None:
    scheduler = _scheduler(config)
    a, b, c, d = (_passage(seed) for seed in (6, 7, 8, 9))
    _store(config, scheduler, a)
    assert scheduler.num_new_matched_tokens(Request(b + a + [START, 2]), 0) == 0  # not asked
    # asked, but the stored passage covers less than half of the range up to its end
    assert scheduler.num_new_matched_tokens(Request(b + c + a + [START, 2], blend=True), 0) == 0
    assert scheduler.num_new_matched_tokens(Request(b + a + [START, 2], blend=True), 0) == 80
    # explicit spans instead of message starts; a bad span is served without blending
    assert scheduler.num_new_matched_tokens(Request([2] + a + d[:3], blend=True, passages=[[1, 41]]), 0) == 41
    assert scheduler.num_new_matched_tokens(Request([2] + a + d[:3], blend=True, passages=[[1, 99]]), 0) == 0
    with caplog.at_level("INFO", logger="kvmesh.vllm"):
        refused = _scheduler(config, unavailable="vLLM's own prefix cache is on")
        assert refused.num_new_matched_tokens(Request(b + a + [START, 2], blend=True), 0) == 0
    assert "exact prefixes only: vLLM's own prefix cache is on" in caplog.text
