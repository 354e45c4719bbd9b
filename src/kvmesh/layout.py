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
