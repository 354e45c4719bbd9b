"""The typed wire protocol: every message round-trips, a malformed one is refused naming its field,
and a peer of another protocol version is refused on either side."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmesh import wire
from kvmesh.client import DaemonError, DaemonUnavailable, KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.daemon.service import NodeDaemon
from kvmesh.keys import chunk_keys, model_namespace

KEY, OTHER = bytes(range(16)), bytes(range(16, 32))
EXTENT = wire.ExtentRef(4096, 128, "bfloat16:4,2:chunk")

REQUESTS: list[wire.Request[Any]] = [
    wire.Hello(wire.PROTOCOL_VERSION, 123, {"model": "m", "role": "scheduler"}, "abcd"),
    wire.Hello(wire.PROTOCOL_VERSION, 5),
    wire.Lookup([wire.ChunkRef(KEY, 256), wire.ChunkRef(OTHER, 45)], partials=False, count=False),
    wire.Reserve([wire.ReserveItem(KEY, 128, EXTENT.meta), wire.ReserveItem(OTHER, 64, "m", KEY, 45)]),
    wire.Commit([KEY, OTHER]),
    wire.Abort([KEY]),
    wire.Acquire([KEY], lease=True, promote=False),
    wire.Release([wire.PinRef(KEY, 4096, 128, "m")]),
    wire.ReleaseLease("00ff"),
    wire.Commit([KEY], wire.StoreCost(0.25, 1 << 20, 512)),
    wire.ReleaseLease("00ff", wire.LoadCost(0.5, 4096, 256, verified=2, mismatches=1)),
    wire.ReleaseLease("00ff", wire.LoadCost(0.5, 4096, 256, request_id="cmpl-1-0-ab", rank=1)),
    wire.ReportError("lease_expired"),
    wire.ReportBlend(3000, 8, 612, 1.5),
    wire.RecordRequest("cmpl-1", {"prompt_tokens": 300, "reason": "why"}),
    wire.RecordRequest("cmpl-2", {"prompt_tokens": 300}, OTHER, {"model": "fp:1", "cache_salt": ""}, True),
    wire.RecentRequests("cmpl-1", 5),
    wire.DescribeEntries([KEY, OTHER]),
    wire.Delete([KEY]),
    wire.PinEntries([KEY], 60.0),
    wire.UnpinEntries([], every=True),
    wire.Stats(flush=True),
    wire.Shutdown(),
]

REPLIES: list[Any] = [
    wire.Done(),
    wire.ErrorReply("ProtocolError: x", pid=9),
    wire.HelloReply("0.1", wire.PROTOCOL_VERSION, 9, "e", "/kvmesh", 1 << 20, "d", {"l1_size": 1}),
    wire.LookupReply(2, [wire.PartialFound(OTHER, 45, True)], [1]),
    wire.LookupReply(3, [], [1, 2], [wire.GoneFrom("l1", "evicted", 12.5)], ["disk", "redis"], ["redis"]),
    wire.RecordRequestReply({"prompt_tokens": 300, "load_seconds": 0.01}),
    wire.DescribeEntriesReply([wire.EntryDescription("disk", 4096, 12.5, "lossless"), None]),
    wire.ReserveReply([wire.Reserved("ok", 0), wire.Reserved("exists")]),
    wire.AcquireReply([EXTENT], "00ff"),
    wire.AcquireReply([]),
    wire.ReleaseLeaseReply(False),
    wire.DeleteReply(3),
    wire.PinEntriesReply(1, 2, 3),
    wire.UnpinEntriesReply(4),
    wire.RecentRequestsReply([{"request_id": "cmpl-1", "prompt_tokens": 300}]),
    wire.StatsReply({"l1": {"entries": 1}}, {"kvmesh_lookups_total": 2.0}, 0, {"l1_size": 1}, [{"pid": 1}]),
]


def _through_json(message: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(message))


def test_every_op_has_a_daemon_handler_and_is_tested_here() -> None:
    assert {r.op for r in REQUESTS} == set(wire.REQUESTS)
    assert all(callable(getattr(NodeDaemon, f"_op_{op}", None)) for op in wire.REQUESTS)


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.op)
def test_requests_round_trip_through_json(request_: wire.Request[Any]) -> None:
    encoded = _through_json(wire.encode_request(request_))
    assert encoded["op"] == request_.op
    assert wire.decode_request(encoded) == request_


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_replies_round_trip_through_json(reply: Any) -> None:
    encoded = _through_json(wire.encode_reply(reply))
    assert encoded["ok"] is not isinstance(reply, wire.ErrorReply)
    assert wire.decode_reply(encoded, type(reply), "op") == reply


def test_keys_travel_as_hex_and_come_back_as_the_same_bytes() -> None:
    encoded = wire.encode_request(wire.Commit([KEY]))
    assert encoded == {"op": "commit", "keys": [KEY.hex()], "cost": None}
    assert wire.decode_request(encoded).keys == [KEY]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("change", "error"), [
    (lambda m: m["items"][1].update(nbytes="64"), r"reserve\.items\[1\]\.nbytes: expected int, got str '64'"),
    (lambda m: m["items"][0].update(nbytes=True), r"reserve\.items\[0\]\.nbytes: expected int, got bool"),
    (lambda m: m["items"][1].update(parent="zz"), r"reserve\.items\[1\]\.parent: expected hex bytes"),
    (lambda m: m["items"][0].pop("meta"), r"reserve\.items\[0\]\.meta: missing"),
    (lambda m: m["items"][0].update(extra=1), r"reserve\.items\[0\]\.extra: not a field"),
    (lambda m: m.update(items={"a": 1}), r"reserve\.items: expected a list, got dict"),
    (lambda m: m["items"].__setitem__(0, [KEY.hex(), 1, "m"]), r"reserve\.items\[0\]: expected an object, got list"),
    (lambda m: m.update(op="reserve_all"), r"op: unknown op 'reserve_all'"),
])
def test_a_malformed_request_is_refused_naming_the_field(change: Any, error: str) -> None:
    message = wire.encode_request(REQUESTS[3])
    change(message)
    with pytest.raises(wire.ProtocolError, match=error):
        wire.decode_request(message)


def test_a_malformed_reply_is_refused_naming_the_field() -> None:
    with pytest.raises(wire.ProtocolError, match=r"lookup reply\.partials\[0\]\.resident: expected bool"):
        wire.decode_reply({"ok": True, "hits": 1, "below_l1": [],
                           "partials": [{"key": OTHER.hex(), "tokens": 45, "resident": 1}]},
                          wire.LookupReply, "lookup")
    with pytest.raises(wire.ProtocolError, match=r"delete reply\.ok"):
        wire.decode_reply({"deleted": 1}, wire.DeleteReply, "delete")


# ----------------------------------------------------------------- against a daemon
def _config(tmp_path: Path) -> KVMeshConfig:
    return KVMeshConfig.from_mapping({"socket_dir": str(tmp_path), "instance": f"wire-{uuid.uuid4().hex[:8]}",
                                      "l1_size": "4MiB", "l1_prefault": False, "http_port": 0,
                                      "autostart_daemon": False})


@pytest.fixture
def served(tmp_path: Path) -> Iterator[KVMeshConfig]:
    """A real daemon serving in this process."""
    config = _config(tmp_path)
    daemon = NodeDaemon(config)
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        yield config
    finally:
        daemon.shutdown()
        thread.join(timeout=60)


def _exchange(config: KVMeshConfig, *messages: dict[str, Any]) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(config.socket_path()))
        replies = []
        for message in messages:
            wire.send_message(sock, message)
            replies.append(wire.receive_message(sock))
        return replies


def test_the_daemon_refuses_a_malformed_request_naming_the_field_and_keeps_serving(served: KVMeshConfig) -> None:
    keys = chunk_keys(list(range(300)), model_namespace("m", "L1"), 128)
    bad = wire.encode_request(wire.Lookup([wire.ChunkRef(k.digest, k.num_tokens) for k in keys]))
    bad["chunks"][1]["tokens"] = "128"
    hello = wire.encode_request(wire.Hello(wire.PROTOCOL_VERSION, 1))
    _, refused, again = _exchange(served, hello, bad, wire.encode_request(wire.Delete([keys[0].digest])))
    assert refused["ok"] is False and "lookup.chunks[1].tokens: expected int" in refused["error"]
    assert again == {"ok": True, "deleted": 0}  # the connection still serves
    with KVMeshClient(served) as client:
        assert client.lookup(keys) == 0


def test_the_daemon_refuses_an_old_client_and_says_its_protocol(served: KVMeshConfig) -> None:
    old_hello = {"op": "hello", "pid": 7, "engine": {}}  # protocol 3 sent no version: it read the daemon's
    [reply] = _exchange(served, old_hello)
    assert reply["ok"] is False and reply["protocol"] == wire.PROTOCOL_VERSION and reply["pid"] > 0
    assert "hello.protocol: missing" in reply["error"]
    [reply] = _exchange(served, {**old_hello, "protocol": wire.PROTOCOL_VERSION - 1})
    assert reply["ok"] is False
    assert f"speaks protocol {wire.PROTOCOL_VERSION - 1}, this daemon {wire.PROTOCOL_VERSION}" in reply["error"]


def test_a_request_the_daemon_refuses_is_a_daemon_error_in_the_client(served: KVMeshConfig) -> None:
    with KVMeshClient(served) as client:
        with pytest.raises(DaemonError, match=r"failed on 'report_error'.*report_error\.kind: expected str"):
            client.report_error(3)  # type: ignore[arg-type]
        assert client.delete([]) == 0  # and the connection still serves


def test_the_client_refuses_a_daemon_of_an_older_protocol(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.socket_path().parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(config.socket_path()))
    listener.listen()

    def old_daemon() -> None:  # answers every hello as a protocol-3 daemon did
        for _ in range(2):  # the client retries once
            conn, _ = listener.accept()
            with conn:
                wire.receive_message(conn)
                wire.send_message(conn, {"ok": True, "version": "0.0", "protocol": wire.PROTOCOL_VERSION - 1,
                                         "pid": 4242, "epoch": "e", "shm_name": "x", "shm_size": 1})

    thread = threading.Thread(target=old_daemon, daemon=True)
    thread.start()
    try:
        with pytest.raises(DaemonUnavailable,
                           match=rf"speaks protocol {wire.PROTOCOL_VERSION - 1}, this client "
                                 rf"{wire.PROTOCOL_VERSION}; stop it \(pid 4242\)"):
            KVMeshClient(config)
    finally:
        thread.join(timeout=10)
        listener.close()
