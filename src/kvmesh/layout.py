"""The engine's page format: what one token's KV looks like in a model and how the engine pages it.

Two engines share stored entries only when their page formats agree, so :meth:`KVLayout.fingerprint`
(everything below) is part of every key's namespace.  The connector's entries are the engine's own pages
(``page_copy``); ``page_view`` names the order of K, V, tokens and channels inside a page (a
:mod:`kvmesh.entry` KV view), so that lossy codecs find them, and ``page_kernel`` the engine's kernel that
packed them, exactly, so that pages of kernels one view cannot tell apart never mix.  A caller that stores the canonical
``[layers, 2, tokens, kv_heads, head_size]`` tensor instead (the demo) says ``page_view="chunk"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmesh.entry import DTYPES, VIEWS
from kvmesh.keys import Namespace, model_namespace


@dataclass(frozen=True, slots=True)
class KVLayout:
    """A model's KV shape, the engine's page size and the in-page order: all part of the keys' namespace."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: str = "bfloat16"
    block_size: int = 16
    page_view: str = "opaque"  # a kvmesh.entry KV view name; "opaque": lower tiers store pages lossless
    # the engine's kernel that packed the pages, exactly ("vllm-cpu.vec16"); "": no engine kernel (canonical
    # chunks, tools).  Two kernels the view cannot tell apart (every "opaque" one) still never share keys.
    page_kernel: str = ""
    # values per head and token: 2, a key and a value; 1, one latent that both are computed from (MLA:
    # DeepSeek-V2/V3, whose page holds num_kv_heads=1 latent of head_size = kv_lora_rank + rope dims)
    kv_parts: int = 2

    def __post_init__(self) -> None:
        if self.kv_parts not in (1, 2):
            raise ValueError(f"KVLayout.kv_parts must be 2 (keys and values) or 1 (a latent), got {self.kv_parts!r}")
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVLayout.{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KVLayout.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.page_view not in VIEWS:
            raise ValueError(f"KVLayout.page_view must be one of {', '.join(VIEWS)}, got {self.page_view!r}")
        if not isinstance(self.page_kernel, str) or any(c.isspace() for c in self.page_kernel):
            raise ValueError(f"KVLayout.page_kernel must be a name without spaces, got {self.page_kernel!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.kv_parts * self.num_kv_heads * self.head_size * self.element_size

    @property
    def page_elements(self) -> int:
        """Values in one layer's page of ``block_size`` tokens (K and V, or the latent)."""
        return self.num_kv_heads * self.block_size * self.kv_parts * self.head_size

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """The shape of a ``chunk``-view entry of ``num_tokens`` tokens."""
        return (self.num_layers, self.kv_parts, num_tokens, self.num_kv_heads, self.head_size)

    def chunk_bytes(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    def fingerprint(self) -> str:
        """What must match for two engines to share stored KV: the part of the namespace the layout gives."""
        kernel = f".kernel={self.page_kernel}" if self.page_kernel else ""
        latent = ".latent" if self.kv_parts == 1 else ""
        return (f"L{self.num_layers}.H{self.num_kv_heads}.D{self.head_size}{latent}.{self.dtype}"
                f".pages{self.block_size}.{self.page_view}{kernel}")

    def namespace(self, model_identity: str, salt: str = "") -> Namespace:
        """The keys' namespace of a model (its identity) stored in this layout, for one tenant ``salt``."""
        return model_namespace(model_identity, self.fingerprint(), salt)


GROUP_KINDS = ("full", "window", "state")


@dataclass(frozen=True, slots=True)
class KVGroup:
    """One of the engine's KV cache groups (vLLM's ``kv_cache_groups``): layers that share a block table.

    A model whose layers are all alike has one ``full`` group.  vLLM's hybrid manager gives other layers
    groups of their own, and what a cache hit of L tokens needs from each differs:

    * ``full``: every token's pages, ``layout``'s.
    * ``window``: sliding-window attention; only the pages of the last ``window`` tokens before L (vLLM frees
      the others).  A chunk's entry keeps the pages of its last ``window`` tokens: any hit that ends in or at
      the end of the chunk, or ends later, needs nothing earlier of it.
    * ``state``: recurrent state (Mamba, gated delta nets, short convolutions).  vLLM keeps one block per
      ``layout.block_size`` tokens, each the whole state after exactly that many; a layer's block is
      ``state_bytes`` bytes.  A chunk's entry is the one block after its last token, and a hit is exact only
      where it ends at a stored state.

    Each group's entries are stored under keys of their own (``keys.PartKeys``), so a chunk is a hit only
    where every group's entry is there.
    """

    kind: str
    layout: KVLayout  # the group's pages (for ``state``: one int8 "head" of ``state_bytes`` per page)
    layer_names: tuple[str, ...] = ()  # vLLM's names of the group's layers, in the order entries hold them
    window: int = 0  # ``window``: the tokens before a hit's end that a hit needs of these layers
    state_format: str = ""  # ``state``: the state tensors' shapes and dtypes, as vLLM describes them

    def __post_init__(self) -> None:
        if self.kind not in GROUP_KINDS:
            raise ValueError(f"KVGroup.kind must be one of {', '.join(GROUP_KINDS)}, got {self.kind!r}")
        if (self.kind == "window") != (self.window > 0):
            raise ValueError(f"a {self.kind!r} KV group has window={self.window!r}: only 'window' groups have one")
        if self.kind == "state" and (self.layout.dtype != "int8" or not self.state_format):
            raise ValueError("a 'state' KV group pages int8 bytes and names its state_format")

    @classmethod
    def state(cls, num_layers: int, state_bytes: int, block_size: int, state_format: str,
              layer_names: tuple[str, ...] = ()) -> KVGroup:
        """A recurrent-state group: its layout's "head" is one layer's state, ``state_bytes`` bytes per block."""
        layout = KVLayout(num_layers, 1, state_bytes, "int8", block_size=block_size, kv_parts=1)
        return cls("state", layout, layer_names, state_format=state_format)

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def page_elements(self) -> int:
        """Values in one layer's page (one block)."""
        return self.layout.num_kv_heads * self.layout.head_size if self.kind == "state" else self.layout.page_elements

    def kept_tokens(self, start: int, end: int) -> tuple[int, int]:
        """The tokens of chunk ``[start, end)`` whose pages its entry keeps (``state``: none, one state block)."""
        if self.kind == "window":
            return max(start, end - self.window), end
        if self.kind == "state":
            return end, end
        return start, end

    def fingerprint(self) -> str:
        if self.kind == "state":
            return f"state.L{self.layout.num_layers}.B{self.layout.head_size}.per{self.block_size}.{self.state_format}"
        window = f".window{self.window}" if self.kind == "window" else ""
        return self.layout.fingerprint() + window
