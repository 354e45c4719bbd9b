"""Partial chunks findable from their parent in Redis: a sorted set per parent key.

``<namespace>:p:<parent hex>`` (``<namespace>:p:{<parent hex>}`` in a cluster) holds
``<child hex>:<tokens>`` members scored by the time they were indexed.  A member is added only
after its entry's SET succeeded, the set is trimmed to the newest ``max_partials_per_parent`` in the
same pipeline and given the entries' TTL; members whose entry is gone are filtered out, and removed,
when the set is read.  Every node sharing the Redis sees the same sets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class RedisPartials:
    """The partial-chunk index of :class:`~kvmesh.tiers.redis.RedisTier` (mixed into it)."""

    # the tier's: its key names, client, breaker and fault bookkeeping
    namespace: str
    cluster: bool
    ttl_seconds: int | None
    max_partials_per_parent: int
    breaker: Any
    _client: Any
    _probe: Any  # lookups: a short deadline, no retry
    _FAULTS: tuple[type[BaseException], ...]
    redis_key: Callable[[bytes], str]
    _fault: Callable[[BaseException], None]
    _ok: Callable[[], None]

    def partials_key(self, parent: bytes) -> str:
        """The Redis key of the sorted set that lists ``parent``'s partial children."""
        hexkey = parent.hex()
        return f"{self.namespace}:p:{{{hexkey}}}" if self.cluster else f"{self.namespace}:p:{hexkey}"

    # --------------------------------------------------------- partial chunks
    def add_partial(self, parent: bytes, child: bytes, tokens: int) -> bool:
        """Index a partial chunk whose entry was just stored: one pipeline (add, trim, expire)."""
        if not self.breaker.allow():
            return False
        index = self.partials_key(parent)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.zadd(index, {f"{child.hex()}:{int(tokens)}": time.time()})
            pipe.zremrangebyrank(index, 0, -(self.max_partials_per_parent + 1))  # keep the newest
            if self.ttl_seconds is not None:
                pipe.expire(index, self.ttl_seconds)
            pipe.execute()
        except self._FAULTS as err:
            self._fault(err)
            return False
        self._ok()
        return True

    def partials(self, parent: bytes) -> list[tuple[bytes, int]]:
        """(child, tokens) of the partial chunks stored under ``parent``, newest first; [] on a fault.

        Two round trips: the set, then an EXISTS per child.  Members whose entry
        is gone, or that do not parse, are removed from the set.
        """
        if not self.breaker.allow():
            return []
        index = self.partials_key(parent)
        try:  # a lookup's read: the short deadline of ``_probe``
            members = self._probe.zrevrange(index, 0, self.max_partials_per_parent - 1)
            parsed = [(member, _parse_member(member)) for member in members]
            candidates = [(member, item) for member, item in parsed if item is not None]
            found: list[int] = []
            if candidates:
                pipe = self._probe.pipeline(transaction=False)
                for _, (child, _tokens) in candidates:
                    pipe.exists(self.redis_key(child))
                found = pipe.execute()
            stale = [member for member, item in parsed if item is None]
            stale += [member for (member, _), present in zip(candidates, found) if not present]
            if stale:
                self._probe.zrem(index, *stale)
        except self._FAULTS as err:
            self._fault(err)
            return []
        self._ok()
        return [item for (_, item), present in zip(candidates, found) if present]



def _parse_member(member: bytes) -> tuple[bytes, int] | None:
    """(child, tokens) from a ``<child hex>:<tokens>`` member of a partials set; None if it is not one."""
    hexkey, sep, count = member.partition(b":")
    try:
        child, tokens = bytes.fromhex(hexkey.decode("ascii")), int(count)
    except (UnicodeDecodeError, ValueError):
        return None
    return (child, tokens) if sep and child and tokens >= 1 else None
