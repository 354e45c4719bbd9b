import zlib

import pytest
import torch

from kvmesh.layout import PAGE_ORDERS, KVLayout, LayoutMismatch, gather_chunk, scatter_chunk


def _pages(layout: KVLayout, num_blocks: int, order: str, generator: torch.Generator) -> list[torch.Tensor]:
    canonical = (2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_size)
    inverse = [0] * 5
    for position, axis in enumerate(PAGE_ORDERS[order]):
        inverse[axis] = position
    shape = tuple(canonical[i] for i in inverse)
    return [torch.randn(shape, generator=generator).to(layout.torch_dtype) for _ in range(layout.num_layers)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("order", list(PAGE_ORDERS))
def test_paged_to_chunk_and_back_round_trips(dtype: str, order: str) -> None:
    seed = zlib.crc32(f"{dtype}/{order}".encode())  # the same in every run (Python's hash is salted)
    generator = torch.Generator().manual_seed(seed)
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_size=8, dtype=dtype, block_size=4)
    for trial in range(5):
        num_blocks = 32
        source = _pages(layout, num_blocks, order, generator)
        table = torch.randperm(num_blocks, generator=generator)[:10]
        start = int(torch.randint(0, 20, (1,), generator=generator))
        count = int(torch.randint(1, 40 - start + 1, (1,), generator=generator))
        chunk = gather_chunk(source, layout, table, start, count, page_order=order)
        assert chunk.shape == layout.chunk_shape(count)
        # each token of the chunk is the one at its slot in its block
        for t in (0, count - 1):
            position = start + t
            block, offset = int(table[position // 4]), position % 4
            canon = source[1].permute(*PAGE_ORDERS[order])
            assert torch.equal(chunk[1, :, t], canon[:, block, offset])
        # scatter into other pages through another block table, then gather back: same bytes
        target = _pages(layout, num_blocks, order, generator)
        other_table = torch.randperm(num_blocks, generator=generator)[:10]
        scatter_chunk(chunk, target, layout, other_table, start, page_order=order)
        again = gather_chunk(target, layout, other_table, start, count, page_order=order)
        assert torch.equal(again.view(torch.uint8), chunk.view(torch.uint8))


def test_gather_into_a_preallocated_view() -> None:
    layout = KVLayout(2, 1, 4, "bfloat16", block_size=2)
    source = _pages(layout, 8, "kv_block_slot_head", torch.Generator().manual_seed(0))
    storage = torch.zeros(layout.chunk_bytes(5), dtype=torch.uint8)
    out = storage.view(torch.bfloat16).view(layout.chunk_shape(5))
    gather_chunk(source, layout, [3, 1, 7], 1, 5, out=out)
    assert torch.equal(out, gather_chunk(source, layout, [3, 1, 7], 1, 5))
    assert storage.any()


def test_mismatches_are_refused() -> None:
    layout = KVLayout(2, 1, 4, "bfloat16", block_size=2)
    pages = _pages(layout, 4, "kv_block_slot_head", torch.Generator().manual_seed(0))
    with pytest.raises(LayoutMismatch):
        gather_chunk(pages[:1], layout, [0, 1], 0, 3)
    with pytest.raises(LayoutMismatch):
        gather_chunk([p.float() for p in pages], layout, [0, 1], 0, 3)
    with pytest.raises(ValueError, match="block table"):
        gather_chunk(pages, layout, [0], 0, 3)
    with pytest.raises(ValueError, match="dtype"):
        KVLayout(2, 1, 4, "int8")


def test_bytes_per_token_of_known_models() -> None:
    assert KVLayout(30, 3, 64, "bfloat16").bytes_per_token == 23_040
    assert KVLayout(32, 8, 128, "bfloat16").bytes_per_token == 131_072
