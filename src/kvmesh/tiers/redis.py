"""L3 in Redis (one server or a Redis Cluster), shared by every node of a deployment.

Why this shape:

* **Namespaced keys**: an entry lives under ``<namespace>:<hex key>`` so several
  models or deployments can share one Redis.  In cluster mode the hex key is a
  hash tag (``<namespace>:{<hex key>}``) so an entry's parts land on one shard
  and come back from one node in one pipelined round trip.
* **The value is the entry**: a codec's self-checking bytes (``codecs.base``)
  with no framing of its own, so a write is checksummed once; the store's decode
  finds a damaged one, deletes it through :meth:`delete` and counts it.  Values
  of older versions (``KVMR`` framing, ``tiers.legacy``) are still read and
  checked here.
* **Big values in parts**: an entry that does not fit in ``max_value_bytes``
  goes to ``<head>:0``, ``<head>:1``, ... written before the head in one
  pipeline, so a reader never finds a head whose parts are not there yet; the
  head then holds only the part count and length (``KVMS``).  A missing or
  short part is a miss; the entry is deleted and counted in ``stats().errors``.
* **Partial chunks findable from their parent**: a sorted set per parent key
  (``tiers.redis_partials``), seen by every node sharing the Redis.
* **A cache, never a dependency**: connection refused, timeouts and any other
  Redis or socket error make the call a miss (``get`` None, ``put`` False),
  counted in ``stats().errors`` and logged once per kind.  A
  :class:`~kvmesh.tiers.breaker.CircuitBreaker` stops calling a server that
  keeps failing, so an outage costs nothing per request until a probe succeeds.

While the breaker is open, refused reads count as ``misses`` and refused writes
as ``rejected_stores``; only calls that reached the network and failed count as
``errors``.  ``entries``/``bytes_used``/``capacity`` stay 0: the server is shared
and its memory is Redis's to manage.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

try:  # an optional extra: this module is imported only when a Redis tier is configured
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.exceptions import RedisClusterException, RedisError
    from redis.retry import Retry
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError("the Redis tier (redis_url) needs the redis package: pip install 'kvmesh[redis]'") from err

from kvmesh.codecs import codec_of
from kvmesh.codecs.base import HEADER_PEEK, CorruptEntry
from kvmesh.store.partials import MAX_CHILDREN_PER_PARENT
from kvmesh.tiers.base import EntryInfo, TierStats, Value
from kvmesh.tiers.breaker import BreakerState, CircuitBreaker
from kvmesh.tiers.buffers import joined, parts_of
from kvmesh.tiers.config import RedisTierConfig
from kvmesh.tiers.legacy import MAX_PARTS
from kvmesh.tiers.redis_partials import RedisPartials
from kvmesh.tiers.redis_values import HEAD_MAGICS, PEEK, SplitHead, parse_head

log = logging.getLogger(__name__)

# parts outlive their head by this much, so a head never outlives its parts under a TTL
PART_TTL_SLACK_SECONDS = 10
MIN_VALUE_BYTES = 1024
# what a failed call may raise: server errors, socket errors, cluster topology errors
_FAULTS = (RedisError, OSError, RedisClusterException)


class RedisTier(RedisPartials):
    """Entries in Redis at ``url`` (``redis://``, ``rediss://``, ``redis://user:password@host:port/db``)."""

    _FAULTS = _FAULTS

    def __init__(self, url: str, name: str = "redis", namespace: str = "kvmesh",
                 ttl_seconds: int | None = None, max_value_bytes: int = 64 * 1024 * 1024,
                 timeout_seconds: float = 2.0, cluster: bool = False,
                 breaker: CircuitBreaker | None = None,
                 max_partials_per_parent: int = MAX_CHILDREN_PER_PARENT,
                 lookup_timeout_seconds: float = 0.05) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"a Redis URL starts with redis://, rediss:// or unix://, got {url!r}")
        if cluster and url.startswith("unix://"):
            raise ValueError("a Redis Cluster is reached over TCP: use a redis:// or rediss:// URL")
        if not namespace or any(c in namespace for c in "{}"):
            raise ValueError(f"namespace must be non-empty and free of braces, got {namespace!r}")
        if ttl_seconds is not None and ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be at least 1 (or None for no expiry), got {ttl_seconds}")
        if max_value_bytes < MIN_VALUE_BYTES:
            raise ValueError(f"max_value_bytes must be at least {MIN_VALUE_BYTES}, got {max_value_bytes}")
        if max_partials_per_parent < 1:
            raise ValueError(f"max_partials_per_parent must be at least 1, got {max_partials_per_parent}")
        if not 0 < lookup_timeout_seconds <= timeout_seconds:
            raise ValueError(f"lookup_timeout_seconds must be in (0, timeout_seconds={timeout_seconds}], "
                             f"got {lookup_timeout_seconds}")
        self.name = name
        self.url = url
        self.namespace = namespace
        self.ttl_seconds = ttl_seconds
        self.max_value_bytes = max_value_bytes
        self.timeout_seconds = timeout_seconds
        self.lookup_timeout_seconds = lookup_timeout_seconds
        self.cluster = cluster
        self.max_partials_per_parent = max_partials_per_parent
        self.breaker = breaker or CircuitBreaker()
        self._lock = threading.Lock()  # guards the counters
        self._connect_lock = threading.Lock()
        self._stats = TierStats()
        self._warned: set[str] = set()
        self._client_obj: Any = None if cluster else self._connect()
        self._probe_obj: Any = None  # lookups' own connections, with their short deadline

    @classmethod
    def from_config(cls, config: RedisTierConfig, name: str = "redis") -> RedisTier:
        return cls(config.url, name=name, namespace=config.namespace, ttl_seconds=config.ttl_seconds,
                   timeout_seconds=config.timeout_seconds, cluster=config.cluster,
                   lookup_timeout_seconds=config.lookup_timeout_seconds)

    def warm_up(self) -> None:
        """Open the lookups' and the reads' connections now (the daemon calls this on a thread as it starts).

        redis-py connects on a client's first command, so without this a new daemon's first lookup also paid
        the connection (and a cluster's topology read) inside its short deadline, and on a busy machine missed.
        A Redis that is down is left to the first call that needs it, which counts the fault as any call does.
        """
        try:
            self._probe.ping()
            self._client.ping()
        except _FAULTS as err:
            log.info("redis tier %s: not reachable at start (%s); its calls are misses while that lasts",
                     self.name, type(err).__name__)

    # ------------------------------------------------------------------ keys
    def redis_key(self, key: bytes) -> str:
        """The Redis key of an entry's head (its parts add ``:<i>``)."""
        hexkey = key.hex()
        return f"{self.namespace}:{{{hexkey}}}" if self.cluster else f"{self.namespace}:{hexkey}"

    def part_keys(self, key: bytes, parts: int) -> list[str]:
        head = self.redis_key(key)
        return [f"{head}:{i}" for i in range(parts)]

    # ------------------------------------------------------------------ reads
    def contains(self, key: bytes) -> bool:
        if not self.breaker.allow():
            return False
        try:
            found = bool(self._probe.exists(self.redis_key(key)))
        except _FAULTS as err:
            self._fault(err)
            return False
        self._ok()
        return found

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, are present: one pipelined EXISTS batch.

        A lookup is on an engine's scheduler path: it waits at most ``lookup_timeout_seconds`` (its own
        connections, no retry); a Redis slower than that is a miss and a fault, and the breaker then
        keeps lookups away from it altogether.
        """
        if not keys:
            return 0
        count = 0
        if self.breaker.allow():
            try:
                pipe = self._probe.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(self.redis_key(key))
                found = pipe.execute()
            except _FAULTS as err:
                self._fault(err)
            else:
                self._ok()
                while count < len(keys) and found[count]:
                    count += 1
        with self._lock:
            self._stats.hits += count
            self._stats.misses += int(count < len(keys))
        return count

    def get(self, key: bytes) -> bytes | memoryview | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | memoryview | None]:
        """Entries for ``keys`` (None where absent or bad) in two round trips at most.

        The first pipeline reads every head; the second reads the parts of the
        entries that were split.  Parts are read with one GET each (a cluster
        pipeline refuses MGET); in a cluster the hash tag keeps all of them on
        their head's shard.
        """
        results: list[bytes | memoryview | None] = [None] * len(keys)
        if not keys:
            return results
        if not self.breaker.allow():
            self._count(misses=len(keys))
            return results
        corrupt: dict[int, tuple[str, SplitHead | None]] = {}
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(self.redis_key(key))
            heads = pipe.execute()
            split: dict[int, SplitHead] = {}
            for i, value in enumerate(heads):
                if value is None:
                    continue
                try:
                    head = parse_head(value)
                except CorruptEntry as err:
                    corrupt[i] = (str(err), None)
                    continue
                if isinstance(head, SplitHead):
                    split[i] = head
                else:
                    results[i] = head
            if split:
                pipe = self._client.pipeline(transaction=False)
                for i, head in split.items():
                    for part_key in self.part_keys(keys[i], head.parts):
                        pipe.get(part_key)
                replies = iter(pipe.execute())
                for i, head in split.items():
                    try:
                        results[i] = head.joined([next(replies) for _ in range(head.parts)])
                    except CorruptEntry as err:
                        corrupt[i] = (str(err), head)
            if corrupt:
                self._drop_corrupt([(keys[i], header) for i, (_, header) in corrupt.items()])
        except _FAULTS as err:
            self._fault(err)
            results = [None] * len(keys)
            corrupt = {}
        else:
            self._ok()
        if corrupt:
            i, (reason, _) = next(iter(corrupt.items()))
            self._warn_once("corrupt", "redis tier %s: dropped %d bad entries, e.g. %s: %s "
                            "(further bad entries are only counted)", self.name, len(corrupt),
                            keys[i].hex(), reason)
        hits = sum(r is not None for r in results)
        self._count(hits=hits, misses=len(keys) - hits, errors=len(corrupt))
        return results

    # ----------------------------------------------------------------- writes
    def put(self, key: bytes, data: Value) -> bool:
        return self.put_many([(key, data)])[0]

    def put_many(self, items: Sequence[tuple[bytes, Value]]) -> list[bool]:
        """Store entries in one pipeline (plus one EXISTS batch if any is split); per item, whether stored.

        Parts go first and each head last, with SET NX, so an entry that is
        already there is left as it is (content-addressed: same key, same bytes).
        """
        entries = []
        accepted: list[int] = []  # the items' indexes, for each entry
        for at, (key, data) in enumerate(items):
            payload = memoryview(joined(parts_of(data))).cast("B")
            if self._parts_for(payload) > MAX_PARTS:  # would need more keys than a reader accepts
                self._count(rejected_stores=1)
            else:
                entries.append((key, payload))
                accepted.append(at)
        stored = [False] * len(items)
        if not entries:
            return stored
        if not self.breaker.allow():
            self._count(rejected_stores=len(entries))
            return stored
        try:
            split = [i for i, (_, payload) in enumerate(entries) if self._parts_for(payload)]
            present: set[int] = set()
            if split:  # skip writing the parts of entries that are already whole
                pipe = self._client.pipeline(transaction=False)
                for i in split:
                    pipe.exists(self.redis_key(entries[i][0]))
                present = {i for i, found in zip(split, pipe.execute()) if found}
            pipe = self._client.pipeline(transaction=False)
            head_replies: list[int] = []  # where each head's SET NX reply lies among the replies
            queued = 0
            for i, (key, payload) in enumerate(entries):
                if i not in present:
                    queued += self._queue_writes(pipe, key, payload)
                    head_replies.append(queued - 1)
            replies = pipe.execute() if queued else []
        except _FAULTS as err:
            self._fault(err)
            return stored
        self._ok()
        # SET NX replies True only for a head that was not there: a new entry
        self._count(stores=sum(1 for at in head_replies if replies[at] is True))
        for at in accepted:
            stored[at] = True
        return stored

    def describe(self, key: bytes) -> EntryInfo | None:
        """The entry's bytes, the codec its first bytes name and, where entries expire, how long ago it was
        stored (its TTL's start); a fault is None, as a lookup would find it."""
        if not self.breaker.allow():
            return None
        head = self.redis_key(key)
        length = 0
        try:
            pipe = self._probe.pipeline(transaction=False)
            pipe.getrange(head, 0, HEADER_PEEK - 1)
            pipe.strlen(head)
            pipe.ttl(head)
            peeked, length, ttl = pipe.execute()
            if not length:
                self._ok()
                return None
            if peeked[:4] in HEAD_MAGICS:
                found = parse_head(peeked)
                if isinstance(found, SplitHead):  # the codec is in the first part's bytes
                    length = found.length
                    peeked = self._probe.getrange(self.part_keys(key, found.parts)[0], 0, HEADER_PEEK - 1)
        except CorruptEntry:
            return EntryInfo(self.name, int(length), -1.0, "?")
        except _FAULTS as err:
            self._fault(err)
            return None
        self._ok()
        age = float(self.ttl_seconds - ttl) if self.ttl_seconds and ttl >= 0 else -1.0
        return EntryInfo(self.name, int(length), age, codec_of(peeked))

    def delete(self, key: bytes) -> bool:
        if not self.breaker.allow():
            return False
        head = self.redis_key(key)
        try:
            peeked = self._client.getrange(head, 0, PEEK - 1)
            parts = 0
            if peeked[:4] in HEAD_MAGICS:
                try:  # the head of a split entry is short: what the peek read is all of it
                    found = parse_head(peeked)
                    parts = found.parts if isinstance(found, SplitHead) else 0
                except CorruptEntry:
                    parts = 0
            removed = self._delete_keys([head, *self.part_keys(key, parts)])[0]
        except _FAULTS as err:
            self._fault(err)
            return False
        self._ok()
        return bool(removed)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(**self._stats.to_dict())

    def close(self) -> None:
        for client in (self._client_obj, self._probe_obj):
            if client is not None:
                client.close()
        self._client_obj = self._probe_obj = None

    # -------------------------------------------------------------- internals
    @property
    def _client(self) -> Any:
        # A cluster client reads the topology when it is built, so it is built on first use:
        # a cluster that is down at start-up is then a miss like any other outage.
        if self._client_obj is None:
            with self._connect_lock:
                if self._client_obj is None:
                    self._client_obj = self._connect()
        return self._client_obj

    @property
    def _probe(self) -> Any:
        """The client of lookups (scheduler path): ``lookup_timeout_seconds`` per call, no retry."""
        if self._probe_obj is None:
            with self._connect_lock:
                if self._probe_obj is None:
                    self._probe_obj = self._connect(self.lookup_timeout_seconds, retries=0)
        return self._probe_obj

    def _connect(self, timeout: float | None = None, retries: int = 1) -> Any:
        timeout = self.timeout_seconds if timeout is None else timeout
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            # one immediate retry of connection errors: it replaces a pooled socket that a server
            # restart closed; longer outages are the breaker's business
            "retry": Retry(NoBackoff(), retries),
        }
        if self.cluster:
            return RedisCluster.from_url(self.url, **options)
        return redis.Redis.from_url(self.url, **options)

    def _parts_for(self, payload: memoryview) -> int:
        """How many parts an entry is split into (0: it is the head's value)."""
        magic = bytes(payload[:4])
        if payload.nbytes <= self.max_value_bytes and magic not in HEAD_MAGICS:
            return 0
        return max(1, -(-payload.nbytes // self.max_value_bytes))  # a look-alike of a head goes in a part

    def _queue_writes(self, pipe: Any, key: bytes, payload: memoryview) -> int:
        """Queue an entry's SETs, parts first and the head last; how many commands were queued."""
        parts = self._parts_for(payload)
        part_ttl = None if self.ttl_seconds is None else self.ttl_seconds + PART_TTL_SLACK_SECONDS
        step = self.max_value_bytes
        for i, part_key in enumerate(self.part_keys(key, parts)):
            pipe.set(part_key, payload[i * step:(i + 1) * step], ex=part_ttl)
        head = SplitHead(parts, payload.nbytes).pack() if parts else payload
        pipe.set(self.redis_key(key), head, ex=self.ttl_seconds, nx=True)
        return parts + 1

    def _drop_corrupt(self, bad: list[tuple[bytes, SplitHead | None]]) -> None:
        """Delete bad entries: the head, and the parts its header names (if it could be read)."""
        doomed = []
        for key, header in bad:
            doomed += [self.redis_key(key), *self.part_keys(key, header.parts if header else 0)]
        self._delete_keys(doomed)

    def _delete_keys(self, redis_keys: list[str]) -> list[int]:
        """DEL each key, in order, in one pipeline (a cluster pipeline takes one key per DEL)."""
        pipe = self._client.pipeline(transaction=False)
        for redis_key in redis_keys:
            pipe.delete(redis_key)
        return pipe.execute()

    def _ok(self) -> None:
        state = self.breaker.state
        self.breaker.record_success()
        if state is not BreakerState.CLOSED:
            log.info("redis tier %s: %s answers again", self.name, _safe_url(self.url))

    def _fault(self, err: BaseException) -> None:
        was_closed = self.breaker.state is BreakerState.CLOSED
        self.breaker.record_failure()
        self._count(errors=1)
        kind = type(err).__name__
        self._warn_once(kind, "redis tier %s: %s at %s; calls are misses while it lasts "
                        "(further %s faults are only counted)", self.name, kind,
                        _safe_url(self.url), kind)
        log.debug("redis tier %s: %s", self.name, err)
        if was_closed and self.breaker.state is BreakerState.OPEN:
            log.warning("redis tier %s: %d failures in a row; not calling %s for %.1f s",
                        self.name, self.breaker.failure_threshold, _safe_url(self.url),
                        self.breaker.reset_seconds)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for field, delta in deltas.items():
                setattr(self._stats, field, getattr(self._stats, field) + delta)

    def _warn_once(self, kind: str, message: str, *args: object) -> None:
        with self._lock:
            first = kind not in self._warned
            self._warned.add(kind)
        (log.warning if first else log.debug)(message, *args)


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user + '@' if user else ''}{hostpart}"
