import logging
import random
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis
import torch

from kvmesh.codecs import RawCodec
from kvmesh.tiers import legacy, redis_values
from kvmesh.tiers.base import PartialIndexed, Tier
from kvmesh.tiers.breaker import BreakerState, CircuitBreaker
from kvmesh.tiers.redis import RedisTier
from redis_servers import RedisClusterServers, RedisServer, free_port

SMALL_VALUES = 100_000  # max_value_bytes that splits a 1 MB value into 11 parts


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def _payload(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size)


def _namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _tier(server: RedisServer, **options: object) -> RedisTier:
    options.setdefault("namespace", _namespace())
    return RedisTier(server.url, **options)  # type: ignore[arg-type]


def test_implements_the_tier_protocol(redis_server: RedisServer) -> None:
    assert isinstance(_tier(redis_server), Tier)


@pytest.mark.parametrize("size", [0, 1, 5000, 99_000, 1_000_000])
def test_round_trip_inline_and_in_parts(redis_server: RedisServer, size: int) -> None:
    tier = _tier(redis_server, max_value_bytes=SMALL_VALUES)
    data = _payload(size, size)
    assert tier.put(_key(1), data)
    assert tier.contains(_key(1))
    assert tier.get(_key(1)) == data
    raw = redis_server.client()
    parts = -(-size // SMALL_VALUES) if size + 64 > SMALL_VALUES else 0
    head = f"{tier.namespace}:{_key(1).hex()}"
    assert raw.exists(head) == 1
    assert sorted(k.decode() for k in raw.keys(f"{tier.namespace}:*")) == sorted(
        [head] + [f"{head}:{i}" for i in range(parts)])
    assert all(len(raw.get(f"{head}:{i}")) <= SMALL_VALUES for i in range(parts))
    stats = tier.stats()
    assert (stats.stores, stats.hits, stats.misses, stats.errors) == (1, 1, 0, 0)


def test_repeated_put_is_a_no_op(redis_server: RedisServer) -> None:
    tier = _tier(redis_server, max_value_bytes=SMALL_VALUES)
    for size in (10, 300_000):
        key = _key(size)
        assert tier.put(key, memoryview(_payload(size, size)))
        assert tier.put(key, _payload(size, size))
        assert tier.get(key) == _payload(size, size)
    assert tier.stats().stores == 2


def test_get_many_put_many_lookup_delete(redis_server: RedisServer) -> None:
    tier = _tier(redis_server, max_value_bytes=SMALL_VALUES)
    items = [(_key(i), _payload(i, size)) for i, size in enumerate([10, 250_000, 0, 1_000_000])]
    assert tier.put_many(items) == [True] * 4
    assert tier.put_many(items[:2]) == [True, True]  # already there: no-ops
    assert tier.stats().stores == 4
    keys = [_key(i) for i in range(6)]
    assert tier.get_many(keys) == [data for _, data in items] + [None, None]
    assert tier.lookup(keys) == 4
    assert tier.lookup([_key(9), _key(0)]) == 0
    assert tier.delete(_key(1))
    assert not tier.delete(_key(1))
    assert tier.lookup(keys) == 1
    assert redis_server.client().keys(f"{tier.namespace}:{_key(1).hex()}*") == []  # parts gone too
    assert tier.get(_key(3)) == items[3][1]


@pytest.mark.parametrize("damage", ["garbage_split_head", "short_split_head", "short_part", "missing_part"])
def test_damaged_parts_are_a_miss_deleted_and_counted(redis_server: RedisServer, damage: str) -> None:
    """What the tier itself checks of an entry in parts: its head and that every part is there, whole."""
    tier = _tier(redis_server, max_value_bytes=SMALL_VALUES)
    raw = redis_server.client()
    inline, split = _payload(1, 5000), _payload(2, 1_000_000)
    tier.put(_key(1), inline)
    tier.put(_key(2), split)
    head = f"{tier.namespace}:{_key(2).hex()}"
    if damage == "garbage_split_head":
        raw.set(head, redis_values.MANIFEST_MAGIC + b"\xff" * 12)  # a part count over the bound
    elif damage == "short_split_head":
        raw.set(head, raw.get(head)[:-1])
    elif damage == "short_part":
        raw.set(f"{head}:3", raw.get(f"{head}:3")[:1000])
    else:
        raw.delete(f"{head}:5")

    assert tier.get(_key(2)) is None
    unreadable = damage in ("garbage_split_head", "short_split_head")  # no part count: only the head goes
    assert raw.keys(f"{head}*") == [] or unreadable
    assert raw.get(head) is None
    stats = tier.stats()
    assert (stats.errors, stats.misses) == (1, 1)
    assert tier.get(_key(1)) == inline
    assert tier.put(_key(2), split)  # can be stored again
    assert tier.get(_key(2)) == split
    assert tier.breaker.state is BreakerState.CLOSED  # bad data is not a sick server


def test_a_value_is_the_entry_itself_and_a_look_alike_of_a_head_goes_in_a_part(redis_server: RedisServer) -> None:
    tier = _tier(redis_server, max_value_bytes=SMALL_VALUES)
    raw = redis_server.client()
    entry = RawCodec().encode(torch.arange(100, dtype=torch.float32))
    assert tier.put(_key(1), entry)
    assert raw.get(f"{tier.namespace}:{_key(1).hex()}") == entry  # no framing of the tier's own
    for magic in (legacy.REDIS_MAGIC, redis_values.MANIFEST_MAGIC):
        look_alike = magic + b" but not a head"
        assert tier.put(_key(2), look_alike)
        assert tier.get(_key(2)) == look_alike
        assert tier.delete(_key(2)) and raw.keys(f"{tier.namespace}:{_key(2).hex()}*") == []


@pytest.mark.parametrize("size", [5000, 1_000_000])
def test_values_in_the_old_framing_still_read_and_are_checked(redis_server: RedisServer, size: int) -> None:
    tier = _tier(redis_server, max_value_bytes=SMALL_VALUES)
    raw = redis_server.client()
    data = _payload(size, size)
    head = f"{tier.namespace}:{_key(1).hex()}"
    if size < SMALL_VALUES:  # as kvmesh wrote them before: a KVMR header, then the payload or its parts
        raw.set(head, legacy.RedisHeader.of(data).pack() + data)
    else:
        step = SMALL_VALUES
        parts = -(-size // step)
        for i in range(parts):
            raw.set(f"{head}:{i}", data[i * step:(i + 1) * step])
        raw.set(head, legacy.RedisHeader.of(data, parts).pack())
    assert tier.get(_key(1)) == data
    assert tier.lookup([_key(1)]) == 1
    damaged_key = f"{head}:1" if size > SMALL_VALUES else head
    value = bytearray(raw.get(damaged_key))
    value[-1] ^= 0x01
    raw.set(damaged_key, bytes(value))
    assert tier.get(_key(1)) is None  # the old checksum still guards it
    assert raw.keys(f"{head}*") == []
    assert tier.stats().errors == 1


def test_corruption_is_logged_once(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    tier = _tier(redis_server)
    raw = redis_server.client()
    for i in range(3):
        tier.put(_key(i), b"x" * 100)
        raw.set(f"{tier.namespace}:{_key(i).hex()}", redis_values.MANIFEST_MAGIC + b"junk")
    with caplog.at_level(logging.WARNING, logger="kvmesh.tiers.redis"):
        assert tier.get(_key(0)) is None
        assert tier.get_many([_key(1), _key(2)]) == [None, None]
    assert tier.stats().errors == 3
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_namespaces_are_isolated(redis_server: RedisServer) -> None:
    first, second = _tier(redis_server), _tier(redis_server)
    first.put(_key(1), b"first")
    assert not second.contains(_key(1))
    assert second.get(_key(1)) is None
    assert second.lookup([_key(1)]) == 0
    assert not second.delete(_key(1))
    second.put(_key(1), b"second")
    assert first.get(_key(1)) == b"first"
    assert second.get(_key(1)) == b"second"
    assert redis_server.client().keys(f"{first.namespace}:*") == [
        f"{first.namespace}:{_key(1).hex()}".encode()]


def test_ttl_is_set_on_every_key_of_an_entry(redis_server: RedisServer) -> None:
    tier = _tier(redis_server, ttl_seconds=100, max_value_bytes=SMALL_VALUES)
    tier.put(_key(1), _payload(1, 300_000))
    raw = redis_server.client()
    head = f"{tier.namespace}:{_key(1).hex()}"
    assert 90 < raw.ttl(head) <= 100
    part_ttls = [raw.ttl(f"{head}:{i}") for i in range(3)]
    assert all(raw.ttl(head) <= t <= 110 for t in part_ttls)  # parts never expire before their head
    untimed = _tier(redis_server)
    untimed.put(_key(1), b"forever")
    assert raw.ttl(f"{untimed.namespace}:{_key(1).hex()}") == -1


def test_unreachable_server_is_a_miss_and_opens_the_breaker(caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_seconds=60)
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}", timeout_seconds=0.5, breaker=breaker)
    with caplog.at_level(logging.WARNING, logger="kvmesh.tiers.redis"):
        assert tier.get(_key(1)) is None
        assert tier.put(_key(1), b"x") is False
    assert breaker.state is BreakerState.OPEN
    assert tier.stats().errors == 2
    # open: no network, no errors; reads are misses, writes are rejected
    started = time.perf_counter()
    assert not tier.contains(_key(1))
    assert tier.lookup([_key(1), _key(2)]) == 0
    assert tier.get_many([_key(1), _key(2)]) == [None, None]
    assert tier.put_many([(_key(1), b"x"), (_key(2), b"y")]) == [False, False]
    assert not tier.delete(_key(1))
    assert time.perf_counter() - started < 0.1
    stats = tier.stats()
    assert (stats.errors, stats.misses, stats.rejected_stores) == (2, 4, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "ConnectionError" in w]) == 1  # one per kind of fault
    assert any("failures in a row" in w for w in warnings)


def test_server_stopped_and_restarted(redis_server_factory) -> None:
    server = redis_server_factory()
    breaker = CircuitBreaker(failure_threshold=3, reset_seconds=0.5)
    tier = RedisTier(server.url, namespace=_namespace(), timeout_seconds=0.5, breaker=breaker)
    assert tier.put(_key(1), b"before")
    assert tier.get(_key(1)) == b"before"

    server.stop()
    assert tier.get(_key(1)) is None
    assert tier.put(_key(2), b"down") is False
    assert tier.lookup([_key(1)]) == 0
    assert breaker.state is BreakerState.OPEN
    errors = tier.stats().errors
    assert errors == 3
    assert tier.get(_key(1)) is None  # refused by the breaker: not counted as an error
    assert tier.stats().errors == errors
    assert tier.stats().misses >= 3

    server.start()  # same port; the data is gone (no persistence)
    time.sleep(0.6)
    assert tier.put(_key(2), b"after")
    assert breaker.state is BreakerState.CLOSED
    assert tier.get(_key(2)) == b"after"
    assert tier.lookup([_key(2)]) == 1


def test_acl_user_and_password_in_the_url(redis_server_factory) -> None:
    server = redis_server_factory(extra_args=(
        "--user", "default", "off",
        "--user", "kvuser", "on", ">s3cret", "~*", "+@all"))
    tier = RedisTier(f"redis://kvuser:s3cret@127.0.0.1:{server.port}/3", namespace="acl")
    assert tier.put(_key(1), b"secret data")
    assert tier.get(_key(1)) == b"secret data"
    raw = redis.Redis(host="127.0.0.1", port=server.port, username="kvuser", password="s3cret", db=3)
    assert raw.exists(f"acl:{_key(1).hex()}") == 1  # in the database the URL names

    for url in (f"redis://kvuser:wrong@127.0.0.1:{server.port}/3", server.url):
        refused = RedisTier(url, namespace="acl")
        assert refused.get(_key(1)) is None
        assert refused.put(_key(2), b"x") is False
        assert refused.stats().errors == 2


def test_tls_url(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = RedisServer(tmp_path / "tls")
    server.extra_args = ("--port", "0", "--tls-port", str(server.port), "--tls-cert-file", str(cert),
                         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                         "--tls-auth-clients", "no")
    server.start()
    try:
        tier = RedisTier(f"rediss://127.0.0.1:{server.port}?ssl_ca_certs={cert}", namespace="tls")
        assert tier.put(_key(1), b"over tls")
        assert tier.get(_key(1)) == b"over tls"
        plain = RedisTier(f"redis://127.0.0.1:{server.port}", namespace="tls", timeout_seconds=0.5)
        assert plain.get(_key(1)) is None  # the port speaks only TLS
        assert plain.stats().errors == 1
    finally:
        server.stop()


def test_bad_settings_are_refused() -> None:
    for options in ({"url": "http://localhost"}, {"ttl_seconds": 0}, {"max_value_bytes": 10},
                    {"namespace": ""}, {"namespace": "a{b}"}):
        with pytest.raises(ValueError):
            RedisTier(**{"url": "redis://127.0.0.1:1", **options})  # type: ignore[arg-type]


@pytest.mark.slow
def test_cluster_spreads_and_serves_entries(redis_cluster: RedisClusterServers) -> None:
    tier = RedisTier(redis_cluster.url, namespace="cl", cluster=True, max_value_bytes=4096)
    items = [(_key(i), _payload(i, 1000 + 600 * i)) for i in range(30)]  # from inline to 5 parts
    for key, data in items[:15]:
        assert tier.put(key, data)
    assert tier.put_many(items[15:]) == [True] * 15
    assert tier.lookup([key for key, _ in items]) == 30
    for key, data in items:
        assert tier.get(key) == data
    assert tier.get_many([key for key, _ in items] + [_key(99)]) == [data for _, data in items] + [None]
    per_node = [node.client().dbsize() for node in redis_cluster.nodes]
    assert sum(per_node) > 30  # heads plus parts
    assert sum(1 for count in per_node if count) >= 2
    assert tier.delete(_key(29))
    assert tier.get(_key(29)) is None
    assert tier.stats().errors == 0
    tier.close()


# ------------------------------------------------------------ partial-chunk index
def test_partials_are_listed_newest_first_and_seen_by_another_node(redis_server: RedisServer) -> None:
    tier = _tier(redis_server, ttl_seconds=100)
    assert isinstance(tier, PartialIndexed)
    tier.put(_key(10), b"ten")
    tier.put(_key(11), b"eleven")
    assert tier.add_partial(_key(1), _key(10), 5)
    time.sleep(0.01)
    assert tier.add_partial(_key(1), _key(11), 9)
    assert tier.partials(_key(1)) == [(_key(11), 9), (_key(10), 5)]
    other_node = RedisTier(redis_server.url, namespace=tier.namespace)
    assert other_node.partials(_key(1)) == [(_key(11), 9), (_key(10), 5)]
    assert other_node.partials(_key(2)) == []
    raw = redis_server.client()
    index = f"{tier.namespace}:p:{_key(1).hex()}"
    assert set(raw.zrange(index, 0, -1)) == {f"{_key(10).hex()}:5".encode(), f"{_key(11).hex()}:9".encode()}
    assert 90 < raw.ttl(index) <= 100  # the entries' TTL


def test_the_partials_set_keeps_the_newest_children(redis_server: RedisServer) -> None:
    tier = _tier(redis_server, max_partials_per_parent=3)
    for i in range(6):
        tier.put(_key(100 + i), b"p")
        tier.add_partial(_key(1), _key(100 + i), i + 1)
        time.sleep(0.002)
    assert tier.partials(_key(1)) == [(_key(105), 6), (_key(104), 5), (_key(103), 4)]
    assert redis_server.client().zcard(f"{tier.namespace}:p:{_key(1).hex()}") == 3


def test_children_whose_entry_is_gone_and_bad_members_are_filtered_and_removed(redis_server: RedisServer) -> None:
    tier = _tier(redis_server)
    for child in (10, 11):
        tier.put(_key(child), b"x")
        tier.add_partial(_key(1), _key(child), child)
    index = f"{tier.namespace}:p:{_key(1).hex()}"
    raw = redis_server.client()
    raw.zadd(index, {b"zz-not-hex:3": 1.0, f"{_key(12).hex()}:0".encode(): 2.0, b"no-colon": 3.0})
    tier.delete(_key(10))  # expired or evicted, say
    assert tier.partials(_key(1)) == [(_key(11), 11)]
    assert raw.zrange(index, 0, -1) == [f"{_key(11).hex()}:11".encode()]
    assert tier.stats().errors == 0


def test_partials_with_redis_down_are_a_counted_miss(caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker(failure_threshold=5, reset_seconds=60)
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}", timeout_seconds=0.5, breaker=breaker)
    with caplog.at_level(logging.WARNING, logger="kvmesh.tiers.redis"):
        assert tier.partials(_key(1)) == []
        assert tier.add_partial(_key(1), _key(10), 5) is False
        assert tier.partials(_key(1)) == []
    assert tier.stats().errors == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "ConnectionError" in w]) == 1


@pytest.mark.slow
def test_partials_in_a_cluster(redis_cluster: RedisClusterServers) -> None:
    tier = RedisTier(redis_cluster.url, namespace=_namespace(), cluster=True)
    children = [_key(200 + i) for i in range(8)]  # spread over the shards
    for i, child in enumerate(children):
        assert tier.put(child, b"c")
        assert tier.add_partial(_key(1), child, i + 1)
        time.sleep(0.002)
    assert tier.partials(_key(1)) == [(child, i + 1) for i, child in reversed(list(enumerate(children)))]
    assert tier.partials_key(_key(1)) == f"{tier.namespace}:p:{{{_key(1).hex()}}}"
    assert tier.stats().errors == 0
    tier.close()


def test_a_slow_redis_is_a_miss_for_lookups_but_still_serves_reads(redis_server: RedisServer) -> None:
    """Lookups are on the scheduler's path: they wait at most their own deadline, reads keep theirs."""
    from kvmesh.bench.delay_proxy import DelayProxy

    proxy = DelayProxy(redis_server.port)
    try:
        tier = RedisTier(proxy.url, namespace=_namespace(), timeout_seconds=2.0, lookup_timeout_seconds=0.05,
                         breaker=CircuitBreaker(failure_threshold=3, reset_seconds=60))
        keys = [_key(i) for i in range(3)]
        assert all(tier.put_many([(k, _payload(i, 2000)) for i, k in enumerate(keys)]))
        deadline = time.monotonic() + 10  # a fast Redis: found (a busy machine may miss the first connect)
        while tier.lookup(keys) != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tier.lookup(keys) == 3
        errors = tier.stats().errors
        proxy.delay = 0.3  # now every answer comes 0.3 s late: past the lookup's deadline, within a read's
        assert tier.lookup(keys) == 0  # a miss, not a wait for the answer
        assert tier.stats().errors == errors + 1
        assert tier.get(keys[1]) == _payload(1, 2000)  # a promotion's read still gets its answer
        assert tier.lookup(keys) == 0
        assert tier.partials(keys[0]) == []  # the partial index is read on the lookup path too
        assert tier.lookup(keys) == 0
        assert tier.stats().errors == errors + 4
        assert tier.breaker.state is BreakerState.OPEN  # three slow lookups in a row: left alone a while
    finally:
        proxy.stop()


def test_the_lookup_deadline_is_checked_against_the_call_deadline() -> None:
    with pytest.raises(ValueError, match="lookup_timeout_seconds"):
        RedisTier("redis://127.0.0.1:1", timeout_seconds=0.5, lookup_timeout_seconds=1.0)


def test_describe_gives_an_entrys_bytes_codec_and_age_whole_or_split(redis_server: RedisServer) -> None:
    tier = _tier(redis_server, max_value_bytes=SMALL_VALUES, ttl_seconds=3600)
    chunk = torch.randn(2, 1000, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    encoded = RawCodec().encode(chunk, key=_key(1))  # 256,000 bytes and a header: three parts
    small = RawCodec().encode(chunk[:, :10], key=_key(2))
    assert tier.put_many([(_key(1), encoded), (_key(2), small)]) == [True, True]
    split, whole = tier.describe(_key(1)), tier.describe(_key(2))
    assert split is not None and (split.tier, split.nbytes, split.codec) == ("redis", len(encoded), "raw")
    assert whole is not None and (whole.nbytes, whole.codec) == (len(small), "raw")
    assert 0 <= split.age < 60  # from the TTL's start
    assert tier.describe(_key(3)) is None
    untimed = _tier(redis_server)
    assert untimed.put_many([(_key(4), small)]) == [True]
    described = untimed.describe(_key(4))
    assert described is not None and described.age == -1.0  # no TTL: Redis does not say when it was stored


def test_warm_up_opens_the_lookups_and_the_reads_connections_before_any_call(redis_server: RedisServer) -> None:
    """A new daemon's first lookup (50 ms deadline) must not also pay for connecting: the daemon warms up."""
    admin = redis.Redis.from_url(redis_server.url)
    before = int(admin.info("clients")["connected_clients"])
    tier = _tier(redis_server)
    assert int(admin.info("clients")["connected_clients"]) == before  # redis-py connects on first use
    tier.warm_up()
    assert int(admin.info("clients")["connected_clients"]) == before + 2  # the lookups' and the reads' own
    tier.close()


def test_warm_up_of_an_unreachable_redis_is_left_to_the_calls(caplog: pytest.LogCaptureFixture) -> None:
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}/0", namespace=_namespace(), timeout_seconds=0.5)
    with caplog.at_level(logging.INFO, logger="kvmesh.tiers.redis"):
        tier.warm_up()  # no exception: a Redis down at start is not the daemon's end
    assert "not reachable at start" in caplog.text
    assert tier.breaker.state is BreakerState.CLOSED and tier.stats().errors == 0
    assert tier.lookup([_key(1)]) == 0 and tier.stats().errors == 1  # the first call counts the fault
