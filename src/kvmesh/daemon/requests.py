"""What the daemon remembers of engines' requests: their summaries, their loads, and who stored which prompt.

* **Summaries** (``explain.Explanation`` as dicts): the last ``RECENT_REQUESTS``, what ``kvmesh explain``
  and the status page list.
* **Loads**: an engine's workers report each load's cost under its request's id (``wire.LoadCost``) when they
  give its lease back; the request's summary gets the time (the slowest rank's) and bytes when it is recorded.
  The scheduler, which writes the summary, never sees the workers' copies.
* **First chunks**: which namespaces stored a prompt's first chunk (named by its tokens alone,
  ``keys.content_digest``), with the parts of each namespace (``identity``).  A request that missed from its
  first chunk although those tokens were stored under another namespace is told which part differs: the
  model's fingerprint, the page format, the tenant salt, the request's cache salt, the LoRA adapter.  Salts
  are compared by digest, never shown.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RECENT_REQUESTS = 1000
LOADS_KEPT = 4096  # requests whose loads are waiting for their summary (a request that never finishes drops out)
FIRST_CHUNKS_KEPT = 65536
NAMESPACES_PER_CHUNK = 4

# the parts of a namespace as the scheduler names them (``SchedulerSide._identity``), in words
IDENTITY_PARTS = {
    "model": "the model fingerprint",
    "page_format": "the page format",
    "tenant_salt": "the tenant salt",
    "cache_salt": "the request's cache_salt",
    "lora": "the LoRA adapter",
}
SHOWN_PARTS = ("model", "page_format", "lora")  # the others are secrets: said to differ, never shown


@dataclass
class _Load:
    seconds: dict[int, float]  # per rank: the ranks copy in parallel, one rank's groups one after another
    nbytes: int = 0


def identity_difference(ours: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """The parts in which two namespaces differ, in words (values shown for those that are not secret)."""
    differences = []
    for part, words in IDENTITY_PARTS.items():
        mine, other = ours.get(part, ""), theirs.get(part, "")
        if mine == other:
            continue
        if part in SHOWN_PARTS:
            differences.append(f"{words} (this request's {mine or 'none'}, theirs {other or 'none'})")
        else:
            differences.append(words)
    return differences


class RequestBook:
    """Thread-safe.  Recording and load reports cost O(1); ``find`` and ``summaries`` copy the recent list."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)  # newest last
        self.recorded = 0
        self._loads: OrderedDict[str, _Load] = OrderedDict()
        self._first_chunks: OrderedDict[bytes, dict[tuple[tuple[str, str], ...], float]] = OrderedDict()

    def loaded(self, request_id: str, rank: int, seconds: float, nbytes: int) -> None:
        """A worker's load for ``request_id`` (one per rank and KV cache group)."""
        if not request_id:
            return
        with self._lock:
            load = self._loads.get(request_id)
            if load is None:
                load = self._loads[request_id] = _Load({})
                while len(self._loads) > LOADS_KEPT:
                    self._loads.popitem(last=False)
            load.seconds[rank] = load.seconds.get(rank, 0.0) + max(0.0, seconds)
            load.nbytes += max(0, nbytes)

    def record(self, request_id: str, engine: str, summary: dict[str, Any], first_chunk: bytes = b"",
               identity: dict[str, str] | None = None, stored_first_chunk: bool = False) -> dict[str, Any]:
        """Keep a finished request's summary, completed with its loads and, for a miss from the first chunk,
        the namespace part that differs from one that stored the same tokens; the summary as kept."""
        summary = dict(summary)
        identity = identity or {}
        now = self._clock()
        with self._lock:
            load = self._loads.pop(request_id, None)
            if load is not None:
                summary["load_seconds"] = round(max(load.seconds.values()), 6)
                summary["loaded_bytes"] = load.nbytes
            if first_chunk and summary.get("cause") == "not_stored" and summary.get("kvmesh_hit_tokens", 0) == 0:
                elsewhere = self._stored_elsewhere(first_chunk, identity, now)
                if elsewhere is not None:
                    differences, ago = elsewhere
                    summary["cause"] = "namespace"
                    summary["reason"] = (f"chunk 0 is not stored under this request's namespace, but the same tokens "
                                         f"were stored {ago:.0f} s ago under a namespace that differs in "
                                         f"{'; '.join(differences)}")
            if first_chunk and stored_first_chunk and identity:
                self._remember(first_chunk, identity, now)
            self.recent.append({"request_id": request_id[:200], "engine": engine, "finished": now, **summary})
            self.recorded += 1
        return summary

    def find(self, request_id: str = "", limit: int = 20) -> list[dict[str, Any]]:
        """The last ``limit`` summaries (``request_id``'s only, where given), newest last.

        vLLM's own id of a request is the response's id plus ``-<n>-<suffix>``: either finds it.
        """
        with self._lock:
            found = [s for s in self.recent
                     if not request_id or s["request_id"] == request_id or s["request_id"].startswith(request_id + "-")]
        return found[-max(1, limit):]

    def summaries(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.recent)

    # ------------------------------------------------------------------ internals (under the lock)
    def _remember(self, first_chunk: bytes, identity: dict[str, str], now: float) -> None:
        stored = self._first_chunks.get(first_chunk)
        if stored is None:
            stored = self._first_chunks[first_chunk] = {}
            while len(self._first_chunks) > FIRST_CHUNKS_KEPT:
                self._first_chunks.popitem(last=False)
        else:
            self._first_chunks.move_to_end(first_chunk)
        name = tuple(sorted(identity.items()))
        stored.pop(name, None)
        stored[name] = now
        while len(stored) > NAMESPACES_PER_CHUNK:
            del stored[next(iter(stored))]

    def _stored_elsewhere(self, first_chunk: bytes, identity: dict[str, str], now: float
                          ) -> tuple[list[str], float] | None:
        """The other namespace that stored these tokens last, and how it differs from ``identity``."""
        stored = self._first_chunks.get(first_chunk, {})
        ours = tuple(sorted(identity.items()))
        for name, when in reversed(stored.items()):
            differences = identity_difference(identity, dict(name)) if name != ours else []
            if differences:
                return differences, max(0.0, now - when)
        return None
