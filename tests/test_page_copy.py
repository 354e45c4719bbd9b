import math

import pytest
import torch

from kvmesh.page_copy import move_pages, pages_for_tokens


def test_pages_round_trip_bit_exact_in_the_cpu_backend_layout() -> None:
    # vLLM-CPU: per layer [blocks, kv_heads, block_size, 2 * head_size]
    generator = torch.Generator().manual_seed(1)
    layers = [torch.randn(20, 3, 16, 8, generator=generator).to(torch.bfloat16) for _ in range(4)]
    blocks = torch.tensor([7, 2, 11])
    stored = torch.empty(4, 3, 3, 16, 8, dtype=torch.bfloat16)
    move_pages([(stored, blocks)], layers, into_engine=False)
    assert torch.equal(stored[2, 1], layers[2][2])
    target = [torch.zeros_like(layer) for layer in layers]
    other = torch.tensor([0, 5, 19])
    move_pages([(stored, other)], target, into_engine=True)
    for layer, copy in zip(layers, target):
        assert torch.equal(copy[other].view(torch.int16), layer[blocks].view(torch.int16))
        assert not copy[1].any()  # nothing else touched


def test_pages_for_tokens() -> None:
    assert pages_for_tokens(0, 256, 128) == range(0, 2)
    assert pages_for_tokens(256, 300, 128) == range(2, 3)
    assert pages_for_tokens(128, 129, 128) == range(1, 2)


def test_threaded_page_moves_equal_the_plain_ones() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from kvmesh.page_copy import move_pages

    generator = torch.Generator().manual_seed(2)
    with torch.inference_mode():  # as vLLM allocates its KV cache: updates only allowed in inference mode
        layers = [torch.randn(30, 3, 16, 8, generator=generator).to(torch.bfloat16) for _ in range(5)]
    jobs = [(torch.empty(5, 2, 3, 16, 8, dtype=torch.bfloat16), torch.tensor(ids)) for ids in ([3, 9], [0, 29])]
    with ThreadPoolExecutor(2) as pool:
        move_pages(jobs, layers, into_engine=False, pool=pool, workers=2)
        for pages, blocks in jobs:
            for index, layer in enumerate(layers):
                assert torch.equal(pages[index], layer[blocks])
        with torch.inference_mode():
            target = [torch.zeros_like(layer) for layer in layers]
        move_pages(jobs, target, into_engine=True, pool=pool, workers=3)
        for pages, blocks in jobs:
            for index, layer in enumerate(target):
                assert torch.equal(layer[blocks], pages[index])


def test_page_moves_without_a_pool_match_indexing() -> None:
    from kvmesh.page_copy import move_pages

    with torch.inference_mode():
        layers = [torch.randn(8, 2, 4, 4).to(torch.bfloat16) for _ in range(3)]
    pages = torch.empty(3, 2, 2, 4, 4, dtype=torch.bfloat16)
    blocks = torch.tensor([6, 1])
    move_pages([(pages, blocks)], layers, into_engine=False)
    assert all(torch.equal(pages[i], layer[blocks]) for i, layer in enumerate(layers))


def test_block_runs_split_at_every_gap() -> None:
    from kvmesh.page_copy import BlockRun, block_runs

    assert block_runs([4, 5, 6, 9, 10, 2]) == [BlockRun(0, 4, 3), BlockRun(3, 9, 2), BlockRun(5, 2, 1)]
    assert block_runs([7]) == [BlockRun(0, 7, 1)]
    assert block_runs([]) == []


@pytest.mark.parametrize("min_run_bytes", [0, 1 << 40], ids=["slices", "indexed"])
def test_runs_of_blocks_copy_as_slices_and_match_indexing_both_ways(monkeypatch: pytest.MonkeyPatch,
                                                                    min_run_bytes: int) -> None:
    # consecutive blocks, scattered ones and a mix, against plain indexing, each way of copying
    from kvmesh import page_copy

    monkeypatch.setattr(page_copy, "MIN_RUN_BYTES", min_run_bytes)
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        layers = [torch.randn(40, 3, 16, 8, generator=generator).to(torch.bfloat16) for _ in range(4)]
    for ids in ([10, 11, 12, 13], [30, 3, 17, 8], [5, 6, 7, 20, 21, 39]):
        blocks = torch.tensor(ids)
        pages = torch.empty(4, len(ids), 3, 16, 8, dtype=torch.bfloat16)
        move_pages([(pages, blocks)], layers, into_engine=False)
        assert all(torch.equal(pages[i].view(torch.int16), layer[blocks].view(torch.int16))
                   for i, layer in enumerate(layers))
        with torch.inference_mode():
            target = [torch.zeros_like(layer) for layer in layers]
        move_pages([(pages, blocks)], target, into_engine=True)
        untouched = sorted(set(range(40)) - set(ids))
        for layer, copy in zip(layers, target):
            assert torch.equal(copy[blocks].view(torch.int16), layer[blocks].view(torch.int16))
            assert not copy[untouched].any()  # nothing beyond the blocks written


def test_loads_copy_as_slices_only_runs_that_hold_enough_bytes_and_saves_never() -> None:
    from kvmesh.page_copy import MIN_RUN_BYTES, _copy_plan

    page = (MIN_RUN_BYTES // 4 // 2,)  # bf16 pages of a quarter of the threshold
    pages = torch.zeros(2, 8, *page, dtype=torch.bfloat16)
    consecutive, scattered = torch.arange(10, 18), torch.tensor([3, 9, 1, 30, 7, 22, 5, 40])
    assert _copy_plan([(pages, consecutive)], into_engine=True)[0][2] is not None  # one run of 2x the bytes
    assert _copy_plan([(pages, scattered)], into_engine=True)[0][2] is None  # runs of a quarter: indexed
    assert _copy_plan([(pages, consecutive)], into_engine=False)[0][2] is None  # saves: index_select


# vLLM's GPU backends view each layer as [blocks, heads, tokens, keys then values]; the memory order is one
# KVCacheLayout for the engine (kv_cache_layout.py). These build CPU tensors with each layout's strides.
BLOCKS, LAYERS, HEADS, TOKENS, CONTENT = 12, 3, 2, 16, 8


def _gpu_layout_layers(layout: str, generator: torch.Generator) -> list[torch.Tensor]:
    if layout == "LBHNC":  # each layer's blocks whole: [B, H, N, C] contiguous (what kvmesh asks vLLM for)
        return [torch.randn(BLOCKS, HEADS, TOKENS, CONTENT, generator=generator) for _ in range(LAYERS)]
    if layout == "LBNHC":  # vLLM's default ("NHD"): a block's memory is [N, H, C]
        return [torch.randn(BLOCKS, TOKENS, HEADS, CONTENT, generator=generator).permute(0, 2, 1, 3)
                for _ in range(LAYERS)]
    if layout == "BLHNC":  # block outermost: one block holds every layer's page
        packed = torch.randn(BLOCKS, LAYERS, HEADS, TOKENS, CONTENT, generator=generator)
        return [packed[:, layer] for layer in range(LAYERS)]
    if layout == "MLA":  # one latent per token, one head
        return [torch.randn(BLOCKS, 1, TOKENS, 576, generator=generator) for _ in range(LAYERS)]
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "BLHNC", "MLA"])
@pytest.mark.parametrize("blocks", [[3, 4, 5, 6], [9, 1, 7]], ids=["a run", "scattered"])
@pytest.mark.parametrize("as_runs", [True, False], ids=["runs", "gathered"])
def test_device_page_moves_round_trip_every_gpu_layout_through_shared_memory(
        layout: str, blocks: list[int], as_runs: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copies a CUDA engine runs (``move_pages_device``), on CPU tensors, into a real shared-memory segment."""
    import uuid

    from kvmesh import page_copy
    from kvmesh.page_copy import move_pages_device, plan_device_copy
    from kvmesh.tiers.shm import SharedSegment

    monkeypatch.setattr(page_copy, "DEVICE_MIN_RUN_BYTES", 1 if as_runs else 1 << 40)

    source = _gpu_layout_layers(layout, torch.Generator().manual_seed(7))
    page = tuple(source[0].shape[1:])
    nbytes = LAYERS * len(blocks) * math.prod(page) * 4
    segment = SharedSegment.create(f"kvmesh-test-{uuid.uuid4().hex[:8]}", 1 << 20, prefault=False)
    try:
        stored = torch.frombuffer(segment.buffer, dtype=torch.float32, count=nbytes // 4).view(
            LAYERS, len(blocks), *page)
        index = torch.tensor(blocks)
        move_pages_device([(stored, index)], source, into_engine=False)
        for layer, pages in zip(source, stored):
            assert torch.equal(pages, layer[index])  # the logical page, whatever the memory order
        target = [torch.zeros_like(layer) for layer in source]
        other = torch.tensor([b + 1 for b in blocks]) if len(blocks) == 4 else torch.tensor([0, 11, 4])
        issued = move_pages_device([(stored, other)], target, into_engine=True)
        for layer, copy in zip(source, target):
            assert torch.equal(copy[other], layer[index])
            untouched = [b for b in range(BLOCKS) if b not in other.tolist()]
            assert not copy[untouched].any()
        plan = plan_device_copy(other.tolist(), math.prod(page) * 4)
        assert (plan.runs is not None) == as_runs and issued == LAYERS * plan.copies
        del stored
    finally:
        segment.close()
        segment.unlink()


def test_device_copies_take_runs_only_where_each_carries_enough_bytes() -> None:
    from kvmesh.page_copy import DEVICE_MIN_RUN_BYTES, BlockRun, plan_device_copy

    big = DEVICE_MIN_RUN_BYTES
    assert plan_device_copy([4, 5, 6, 9], big).runs == [BlockRun(0, 4, 3), BlockRun(3, 9, 1)]
    assert plan_device_copy([4, 5, 6, 9], big).copies == 2
    small = plan_device_copy([4, 5, 6, 9], 4096)  # 16 KiB in two runs: one gathered copy
    assert small.runs is None and small.copies == 1
    assert plan_device_copy([], big).copies == 0
