"""Token chunks and their chained content keys.

A prompt's token ids are cut into chunks of ``chunk_size`` tokens.  Chunk ``i``
is keyed by ``blake3(parent key || namespace || chunk length || token ids)``,
where the parent is chunk ``i-1``'s key (chunk 0's: the namespace's own root,
:func:`namespace_root`) and the namespace folds in the model's
identity, its page format (``layout.KVLayout.fingerprint``) and the tenant salt.  Because keys chain, a key names its
whole prefix: finding chunk ``i`` means chunks ``0..i`` were the same tokens, so a
hit is always a true prefix.  Keys depend only on these bytes (token ids as
little-endian uint32): identical in every process and machine, whatever
``PYTHONHASHSEED`` says.

Trailing partial chunk policy: a prompt of ``n`` tokens yields ``n // chunk_size``
full chunks; the remaining ``n % chunk_size`` tokens form a partial chunk that is
keyed only when ``include_partial`` is true.  Its key covers exactly its tokens
(the length is hashed), so it can never be mistaken for a full chunk that
happens to start with the same tokens; it hits only a prompt that holds the same
tokens at that place and is at least as long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

import blake3
import numpy as np

KEY_BYTES = 16  # 128-bit keys: collisions are out of reach for any cache size
HASH_VERSION = b"kvmesh-chunk-v1"
ROOT_VERSION = b"kvmesh-root-v1"

Namespace = NewType("Namespace", bytes)


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """The key of tokens ``start .. end`` (exclusive) of a prompt, with their prefix."""

    digest: bytes
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def hex(self) -> str:
        return self.digest.hex()


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32, what every key hashes (ids outside 0 .. 2**32-1 are refused)."""
    array = np.asarray(tokens)
    if array.size and (array.min() < 0 or array.max() > 0xFFFFFFFF):
        raise ValueError("token ids must lie in 0 .. 2**32-1")
    return array.astype("<u4", copy=False).tobytes()


def chunk_digest(parent: bytes, ns: Namespace, tokens: Sequence[int] | np.ndarray) -> bytes:
    """The key of one chunk given its parent's key: a pure function of its arguments."""
    data = token_bytes(tokens)
    hasher = blake3.blake3(parent)
    hasher.update(ns)
    hasher.update((len(data) // 4).to_bytes(4, "little"))
    hasher.update(data)
    return hasher.digest(KEY_BYTES)


def chunk_keys(tokens: Sequence[int] | np.ndarray, ns: Namespace, chunk_size: int,
               include_partial: bool = False) -> list[ChunkKey]:
    """Keys of the chunks of ``tokens``, first to last (see the module docstring for the tail)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    array = np.asarray(tokens, dtype=np.int64)
    keys: list[ChunkKey] = []
    parent = namespace_root(ns)
    total = len(array)
    stop = total if include_partial else total - total % chunk_size
    for start in range(0, stop, chunk_size):
        end = min(start + chunk_size, stop)
        parent = chunk_digest(parent, ns, array[start:end])
        keys.append(ChunkKey(parent, start, end))
    return keys


CONTENT_VERSION = b"kvmesh-content-v1"


def content_digest(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Tokens named without a namespace: the daemon remembers which namespaces stored a prompt's first chunk
    under this name, to tell a request that missed which part of its namespace differs.  Never a key."""
    data = token_bytes(tokens)
    return blake3.blake3(CONTENT_VERSION + (len(data) // 4).to_bytes(4, "little") + data).digest(KEY_BYTES)


def namespace_root(ns: Namespace) -> bytes:
    """The parent of a namespace's first chunk: where its chain of keys starts.

    Partial chunks are found by listing their parent's children, so a prompt shorter than a chunk is
    indexed under this root; one root shared by every model, tenant and LoRA (the all-zero parent keys
    once started from) mixed their candidates in one list (in Redis one hot key fleet-wide, its 64 slots
    for everyone).  Each namespace has its own.
    """
    return blake3.blake3(ROOT_VERSION + ns).digest(KEY_BYTES)


def model_namespace(model_id: str, layout_fingerprint: str, salt: str = "") -> Namespace:
    """The namespace of a model served in a given page format (``layout.KVLayout.fingerprint``), per tenant.

    Folds ``model_id|layout_fingerprint`` and the tenant salt into one fixed-size value; every key's
    namespace comes from here (``KVLayout.namespace`` for engines).
    """
    hasher = blake3.blake3(HASH_VERSION)
    for part in (f"{model_id}|{layout_fingerprint}", salt):
        encoded = part.encode("utf-8")
        hasher.update(len(encoded).to_bytes(8, "little"))
        hasher.update(encoded)
    return Namespace(hasher.digest(KEY_BYTES))


RANK_VERSION = b"kvmesh-rank-v1"
GROUP_VERSION = b"kvmesh-group-v1"


@dataclass(frozen=True, slots=True)
class PartKeys:
    """Where one part of a chunk is stored: one tensor-parallel rank's share of one KV cache group.

    With tensor parallelism each worker holds only its own heads' KV, so a chunk is ``world`` entries, one
    per rank, each keyed by the chunk's key, the rank and the world size: a rank never loads another
    rank's heads, and engines split another way never share an entry.  A model whose layers form several
    KV cache groups (sliding-window beside full attention, recurrent state beside attention:
    ``layout.KVGroup``) stores each group's pages as an entry of its own, keyed by the group's index too.
    With one worker, group 0's key is the chunk's key (nothing is mapped), so the keys of single-worker,
    single-group engines are what they always were.
    """

    rank: int
    world: int
    group: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not one of a world of {self.world}")
        if self.group < 0:
            raise ValueError(f"a KV cache group's index is not negative, got {self.group}")

    def __call__(self, digest: bytes) -> bytes:
        if self.world != 1:
            hasher = blake3.blake3(RANK_VERSION)
            hasher.update(digest)
            hasher.update(self.rank.to_bytes(4, "little") + self.world.to_bytes(4, "little"))
            digest = hasher.digest(KEY_BYTES)
        if self.group:
            hasher = blake3.blake3(GROUP_VERSION)
            hasher.update(digest)
            hasher.update(self.group.to_bytes(4, "little"))
            digest = hasher.digest(KEY_BYTES)
        return digest

    def key(self, key: ChunkKey) -> ChunkKey:
        return ChunkKey(self(key.digest), key.start, key.end)

    @classmethod
    def every_part(cls, world: int, groups: int = 1) -> list[PartKeys]:
        """Every rank's entry of every group, rank 0's group 0 first (the part whose lookups are counted)."""
        return [cls(rank, world, group) for rank in range(world) for group in range(groups)]
