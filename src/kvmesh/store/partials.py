"""Which partial chunks are stored under each parent key: a small, bounded, thread-safe index.

Why it exists: a partial chunk (a prompt's tail, shorter than a chunk) is keyed
by its exact tokens, so a longer prompt that continues those tokens cannot
compute its key.  It can only ask for the partial children of its last full
chunk and check each against its own tokens (``integrations.planner.match_prefix``).
This index answers that question for one tier; every tier that stores entries
keeps one (L1 in memory here, disk in a file per parent, Redis in a sorted set).

It remembers (child key, token count) per parent, newest last, and forgets on
its own: at most ``per_parent`` children per parent (the oldest goes first) and
at most ``total`` children in all (the parent added to least recently goes
first, whole).  It never checks that a child is still stored; callers filter
by presence and :meth:`discard` what is gone.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

MAX_CHILDREN_PER_PARENT = 64
MAX_CHILDREN = 1 << 16


class PartialIndex:
    """Partial children by parent key, bounded per parent and in all."""

    def __init__(self, per_parent: int = MAX_CHILDREN_PER_PARENT, total: int = MAX_CHILDREN) -> None:
        if per_parent < 1 or total < per_parent:
            raise ValueError(f"need 1 <= per_parent <= total, got per_parent={per_parent}, total={total}")
        self.per_parent = per_parent
        self.total = total
        self._lock = threading.Lock()
        # parents least recently added to first; each parent's children oldest first
        self._parents: OrderedDict[bytes, OrderedDict[bytes, int]] = OrderedDict()
        self._parent_of: dict[bytes, bytes] = {}

    def add(self, parent: bytes, child: bytes, tokens: int) -> list[bytes]:
        """Index ``child`` (``tokens`` long) under ``parent``; the parents dropped whole to stay in bounds."""
        if tokens < 1:
            raise ValueError(f"a partial chunk holds at least one token, got {tokens}")
        with self._lock:
            old_parent = self._parent_of.get(child)
            if old_parent is not None and old_parent != parent:
                self._remove(old_parent, [child])
            children = self._parents.setdefault(parent, OrderedDict())
            self._parents.move_to_end(parent)
            children[child] = tokens
            children.move_to_end(child)
            self._parent_of[child] = parent
            while len(children) > self.per_parent:
                oldest, _ = children.popitem(last=False)
                del self._parent_of[oldest]
            dropped = []
            while len(self._parent_of) > self.total:
                victim, victims = self._parents.popitem(last=False)
                for key in victims:
                    del self._parent_of[key]
                dropped.append(victim)
            return dropped

    def children(self, parent: bytes) -> list[tuple[bytes, int]]:
        """(child key, tokens) under ``parent``, newest first."""
        with self._lock:
            return list(reversed(self._parents.get(parent, {}).items()))

    def parent_of(self, child: bytes) -> tuple[bytes, int] | None:
        """(parent key, tokens) of an indexed child, None if it is not indexed."""
        with self._lock:
            parent = self._parent_of.get(child)
            return None if parent is None else (parent, self._parents[parent][child])

    def discard(self, parent: bytes, children: Iterable[bytes]) -> bool:
        """Forget these children of ``parent``; True if any was indexed there."""
        with self._lock:
            return self._remove(parent, children)

    def drop_parent(self, parent: bytes) -> None:
        with self._lock:
            for child in self._parents.pop(parent, {}):
                del self._parent_of[child]

    def parents(self) -> list[bytes]:
        with self._lock:
            return list(self._parents)

    def __len__(self) -> int:
        with self._lock:
            return len(self._parent_of)

    def _remove(self, parent: bytes, children: Iterable[bytes]) -> bool:
        indexed = self._parents.get(parent)
        if indexed is None:
            return False
        removed = False
        for child in children:
            if indexed.pop(child, None) is not None:
                del self._parent_of[child]
                removed = True
        if not indexed:
            del self._parents[parent]
        return removed
