"""Eviction policy, kept apart from the medium it evicts from.

The policy only orders keys; the tier decides which of them may go (a pinned
entry may not) and frees the bytes.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Protocol


class EvictionPolicy(Protocol):
    """The order in which a tier gives entries up (the tier skips pinned ones and frees the bytes)."""

    def __len__(self) -> int: ...

    def __contains__(self, key: bytes) -> bool: ...

    def describe(self, key: bytes, nbytes: int, start: int, tokens: int, parent: bytes | None) -> None:
        """What a new entry holds (its position in its prompt, the chunk before it), before ``add``."""

    def add(self, key: bytes) -> None: ...

    def touch(self, key: bytes) -> None: ...

    def remove(self, key: bytes) -> None: ...

    def candidates(self) -> Iterator[bytes]: ...


class LRUPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: bytes) -> bool:
        return key in self._order

    def describe(self, key: bytes, nbytes: int, start: int, tokens: int, parent: bytes | None) -> None:
        """Recency alone decides: what an entry holds does not matter."""

    def add(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def candidates(self) -> Iterator[bytes]:
        """Keys from the first to evict to the last, taken lazily: safe to remove while iterating.

        An eviction usually needs the first key or few; copying the whole order (every entry of a full L1,
        under its lock, on every store) made each store O(entries).  Keys are read in growing prefixes and
        each yielded once, so taking ``k`` keys past ``p`` kept (pinned) ones costs O(k + p) amortized.
        """
        yielded: set[bytes] = set()
        width = 16
        while True:
            covered_all = width >= len(self._order)  # this prefix holds every key there is now
            fresh = [key for key in islice(self._order, width) if key not in yielded]
            for key in fresh:
                if key in self._order:  # not removed by the caller meanwhile
                    yielded.add(key)
                    yield key
            if covered_all:
                return
            width *= 2


# Attention makes a token's prefill cost grow with its position: relative to the per-token cost of the
# weights' matrix multiplies, the attention work at position p is about p / ATTENTION_TOKENS of it (for a
# dense model, 2 * parameters / (4 * layers * heads * head_size): ~3,900 for SmolLM2-135M, ~30,000 for a
# Llama-3.1-8B; the order of chunks matters more than the constant).
ATTENTION_TOKENS = 4096


def prefill_cost(start: int, tokens: int) -> float:
    """What computing ``tokens`` tokens from position ``start`` costs, in units of one token at position 0."""
    return tokens * (1.0 + (start + tokens / 2) / ATTENTION_TOKENS)


@dataclass
class _Valued:
    cost: float
    nbytes: int
    parent: bytes | None
    priority: float = 0.0
    uses: int = 1
    children: int = 0
    seq: int = 0
    linked: bool = False  # counted among its parent's children (the parent was cached when it came)


class ValuePolicy:
    """Greedy-dual eviction by value per byte, leaves of the prefix tree first.

    A chunk is worth the prefill it saves (``prefill_cost``: later chunks cost more) times how often it was
    used, per byte it takes; its priority is that value plus the priority of the last victim, so what has
    not been used for a long time ages out whatever it was once worth (GreedyDual-Size-Frequency).  A chunk
    serves only behind the chunks before it, so a chunk whose successors are cached is never a candidate:
    a prompt leaves from its end, never from its head (which would make the rest unreachable).
    An entry described without its tokens (a promotion from disk or Redis: an engine is about to load it;
    ``TieredStore.put``) is valued as the most valuable entry seen so far, as LRU would keep it.
    """

    def __init__(self) -> None:
        self._info: dict[bytes, _Valued] = {}
        self._heap: list[tuple[float, int, bytes]] = []  # leaves by priority; stale entries are skipped
        self._inflation = 0.0
        self._seq = 0
        self._pending: dict[bytes, _Valued] = {}  # described, not added yet (reserved, not committed)
        self._top = 1.0  # the highest value per byte described so far: what an entry of unknown worth gets

    def __len__(self) -> int:
        return len(self._info)

    def __contains__(self, key: bytes) -> bool:
        return key in self._info

    def describe(self, key: bytes, nbytes: int, start: int, tokens: int, parent: bytes | None) -> None:
        """What ``key`` holds and which chunk comes before it (called before ``add``)."""
        nbytes = max(nbytes, 1)
        if tokens < 1:  # worth unknown: as much as the best
            self._pending[key] = _Valued(self._top * nbytes, nbytes, parent)
            return
        cost = prefill_cost(start, tokens)
        self._top = max(self._top, cost / nbytes)
        self._pending[key] = _Valued(cost, nbytes, parent)

    def add(self, key: bytes) -> None:
        info = self._pending.pop(key, None) or _Valued(self._top, 1, None)
        if key in self._info:
            self.touch(key)
            return
        self._info[key] = info
        parent = self._info.get(info.parent) if info.parent is not None else None
        if parent is not None:
            parent.children += 1  # no longer a leaf: its heap entry goes stale
            info.linked = True
        self._reprioritize(key, info)

    def touch(self, key: bytes) -> None:
        info = self._info.get(key)
        if info is not None:
            info.uses += 1
            self._reprioritize(key, info)

    def remove(self, key: bytes) -> None:
        self._pending.pop(key, None)
        info = self._info.pop(key, None)
        if info is None:
            return
        self._inflation = max(self._inflation, info.priority)
        parent = self._info.get(info.parent) if info.linked and info.parent is not None else None
        if parent is not None and parent.children > 0:  # (a parent deleted and stored again lost its count)
            parent.children -= 1
            if parent.children == 0:  # a leaf again
                self._push(info.parent, parent)  # type: ignore[arg-type]

    def candidates(self) -> Iterator[bytes]:
        """Leaves, lowest priority first, each yielded once; those the caller keeps go back afterwards."""
        yielded: list[bytes] = []
        try:
            while self._heap:
                priority, seq, key = heapq.heappop(self._heap)
                info = self._info.get(key)
                if info is None or info.seq != seq or info.children:
                    continue  # stale: removed, re-prioritized, or not a leaf any more
                yielded.append(key)
                yield key
        finally:
            for key in yielded:  # still here: pinned, or the caller had room enough
                info = self._info.get(key)
                if info is not None and not info.children:
                    self._push(key, info)

    def _reprioritize(self, key: bytes, info: _Valued) -> None:
        info.priority = self._inflation + info.uses * info.cost / info.nbytes
        if not info.children:
            self._push(key, info)

    def _push(self, key: bytes, info: _Valued) -> None:
        self._seq += 1
        info.seq = self._seq
        heapq.heappush(self._heap, (info.priority, info.seq, key))
        if len(self._heap) > 4 * len(self._info) + 64:  # drop stale entries now and then
            self._heap = [(p, s, k) for p, s, k in self._heap
                          if k in self._info and self._info[k].seq == s and not self._info[k].children]
            heapq.heapify(self._heap)


EVICTION_POLICIES: dict[str, type[LRUPolicy] | type[ValuePolicy]] = {"lru": LRUPolicy, "value": ValuePolicy}
