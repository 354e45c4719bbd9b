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
