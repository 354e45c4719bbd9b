"""The shape of a model's KV cache, and moves between an engine's paged KV and kvmesh chunks.

kvmesh stores a chunk of ``T`` tokens as one contiguous tensor shaped
``[layers, 2 (K,V), T, kv_heads, head_size]``.  Engines keep KV in pages
("blocks") of ``block_size`` token slots, one tensor per layer, and scatter a
request's tokens over blocks named by its block table.  :func:`gather_chunk`
copies a run of a request's tokens out of the pages into a chunk tensor (which
may be a view of shared memory: one copy), :func:`scatter_chunk` copies back.

Engines order the five axes of a layer's page tensor differently; ``PAGE_ORDERS``
names the ones we know, each as the permutation that turns it into the canonical
``[2, blocks, block_size, kv_heads, head_size]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}



def dtype_name(dtype: torch.dtype) -> str:
    """The layout name of a torch dtype ('bfloat16', ...)."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}")


# name -> permutation from the engine's axis order to [2, blocks, block_size, heads, head_size]
PAGE_ORDERS: dict[str, tuple[int, int, int, int, int]] = {
    # [2, num_blocks, block_size, kv_heads, head_size]: FlashAttention, vLLM's default
    "kv_block_slot_head": (0, 1, 2, 3, 4),
    # [num_blocks, 2, block_size, kv_heads, head_size]: FlashInfer
    "block_kv_slot_head": (1, 0, 2, 3, 4),
    # [2, num_blocks, kv_heads, block_size, head_size]: heads before slots (some CPU kernels)
    "kv_block_head_slot": (0, 1, 3, 2, 4),
}


class LayoutMismatch(ValueError):
    """Engine KV tensors do not have the shape or dtype the layout describes."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What one token's KV looks like in one model, plus the engine's page size."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: str = "bfloat16"
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVLayout.{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KVLayout.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_size * self.element_size

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_size)

    def chunk_bytes(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    def fingerprint(self) -> str:
        """What must match for two engines to share KV bytes (block size does not matter)."""
        return f"L{self.num_layers}.H{self.num_kv_heads}.D{self.head_size}.{self.dtype}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> KVLayout:
        return cls(**data)  # type: ignore[arg-type]


def slot_mapping(block_ids: Sequence[int] | torch.Tensor, start: int, num_tokens: int,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) of each token ``start .. start+num_tokens-1`` of a request.

    ``block_ids`` is the request's block table: token ``t`` lives in block
    ``block_ids[t // block_size]`` at offset ``t % block_size``.
    """
    table = torch.as_tensor(block_ids, dtype=torch.long)
    positions = torch.arange(start, start + num_tokens, dtype=torch.long)
    needed = (start + num_tokens + block_size - 1) // block_size
    if num_tokens and table.numel() < needed:
        raise ValueError(
            f"block table holds {table.numel()} blocks of {block_size} tokens, "
            f"but tokens up to {start + num_tokens} need {needed}")
    return table[positions // block_size], positions % block_size


def canonical_pages(layer: torch.Tensor, layout: KVLayout, page_order: str) -> torch.Tensor:
    """View one layer's page tensor as ``[2, blocks, block_size, kv_heads, head_size]``."""
    if page_order not in PAGE_ORDERS:
        raise ValueError(f"unknown page order {page_order!r}; known: {', '.join(PAGE_ORDERS)}")
    if layer.dim() != 5:
        raise LayoutMismatch(f"expected a 5-D page tensor, got shape {tuple(layer.shape)}")
    view = layer.permute(*PAGE_ORDERS[page_order])
    expected = (2, view.shape[1], layout.block_size, layout.num_kv_heads, layout.head_size)
    if tuple(view.shape) != expected:
        raise LayoutMismatch(
            f"page tensor {tuple(layer.shape)} in order {page_order} does not match {layout}")
    if layer.dtype != layout.torch_dtype:
        raise LayoutMismatch(f"page tensor dtype {layer.dtype} differs from layout dtype {layout.dtype}")
    return view


def _token_slots(layers: Sequence[torch.Tensor], layout: KVLayout, block_ids: Sequence[int] | torch.Tensor,
                 start: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the layer count and give (block, offset) per token on the layers' device."""
    if len(layers) != layout.num_layers:
        raise LayoutMismatch(f"got {len(layers)} layer tensors, layout has {layout.num_layers}")
    blocks, offsets = slot_mapping(block_ids, start, num_tokens, layout.block_size)
    return blocks.to(layers[0].device), offsets.to(layers[0].device)


def gather_chunk(layers: Sequence[torch.Tensor], layout: KVLayout, block_ids: Sequence[int] | torch.Tensor,
                 start: int, num_tokens: int, out: torch.Tensor | None = None,
                 page_order: str = "kv_block_slot_head") -> torch.Tensor:
    """Copy tokens ``start .. start+num_tokens`` of a request out of the engine's pages."""
    if out is None:
        out = torch.empty(layout.chunk_shape(num_tokens), dtype=layout.torch_dtype)
    elif tuple(out.shape) != layout.chunk_shape(num_tokens) or out.dtype != layout.torch_dtype:
        raise LayoutMismatch(f"out tensor {tuple(out.shape)} {out.dtype} does not fit {num_tokens} tokens")
    blocks, offsets = _token_slots(layers, layout, block_ids, start, num_tokens)
    for index, layer in enumerate(layers):
        pages = canonical_pages(layer, layout, page_order)
        out[index].copy_(pages[:, blocks, offsets])
    return out


def scatter_chunk(chunk: torch.Tensor, layers: Sequence[torch.Tensor], layout: KVLayout,
                  block_ids: Sequence[int] | torch.Tensor, start: int,
                  page_order: str = "kv_block_slot_head") -> None:
    """Copy a chunk tensor into the engine's pages at tokens ``start ..`` of a request."""
    num_tokens = chunk.shape[2]
    if tuple(chunk.shape) != layout.chunk_shape(num_tokens) or chunk.dtype != layout.torch_dtype:
        raise LayoutMismatch(f"chunk {tuple(chunk.shape)} {chunk.dtype} does not match {layout}")
    blocks, offsets = _token_slots(layers, layout, block_ids, start, num_tokens)
    for index, layer in enumerate(layers):
        pages = canonical_pages(layer, layout, page_order)
        pages[:, blocks, offsets] = chunk[index].to(layer.device, non_blocking=True)


# ---------------------------------------------------------------- engine pages
# vLLM hands kvmesh one tensor per layer whose first dimension is the block
# (page) index.  kvmesh's L1 keeps a chunk as the engine's own pages,
# ``[layers, pages, *page_shape]``: saving and loading are then one
# index_select / index_copy per layer, and the bytes are exactly the engine's.


def pages_for_tokens(start: int, end: int, block_size: int) -> range:
    """Indices (within a request's block table) of the blocks holding tokens ``start .. end-1``."""
    return range(start // block_size, -(-end // block_size))


PageJob = tuple[torch.Tensor, torch.Tensor]  # (stored pages [layers, n, *page], engine block ids [n])


def move_pages(jobs: Sequence[PageJob], layers: Sequence[torch.Tensor], into_engine: bool,
               pool: Executor | None = None, workers: int = 1) -> None:
    """Run many page copies, the layers split over ``workers`` threads of ``pool``.

    Each thread takes every job for its own layers, so two threads never touch
    one tensor; torch releases the GIL while it copies, and the engine's cores
    sit idle during a load anyway.
    """
    def run(layer_indices: range) -> None:
        # inference mode is per thread: engines keep KV in inference tensors, which only it may update
        with torch.inference_mode():
            for pages, blocks in jobs:
                for index in layer_indices:
                    if into_engine:
                        layers[index].index_copy_(0, blocks, pages[index])
                    else:
                        torch.index_select(layers[index], 0, blocks, out=pages[index])

    if pool is None or workers <= 1 or not jobs:
        run(range(len(layers)))
        return
    step = -(-len(layers) // workers)
    futures = [pool.submit(run, range(start, min(start + step, len(layers))))
               for start in range(0, len(layers), step)]
    for future in futures:
        future.result()
