"""Fuzzing the daemon's message parsers: whatever arrives is a request, or a ``ProtocolError`` naming why not."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh import wire

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                  max_size=4), max_leaves=12)
OPS = st.sampled_from(sorted(wire.REQUESTS) + ["nope", ""])


def _fields(op: str) -> list[str]:
    cls = wire.REQUESTS.get(op)
    return list(getattr(cls, "__dataclass_fields__", {})) if cls else []


@FUZZ
@given(OPS, st.data())
def test_a_malformed_request_is_a_protocol_error(op: str, data: st.DataObject) -> None:
    message: dict[str, Any] = {"op": op}
    for name in _fields(op):  # each field present or not, with any JSON value
        if data.draw(st.booleans()):
            message[name] = data.draw(JSON)
    message.update(data.draw(st.dictionaries(st.text(max_size=8), JSON, max_size=2)))
    try:
        request = wire.decode_request(message)
    except wire.ProtocolError:
        return
    assert wire.decode_request(wire.encode_request(request)) == request  # what decodes, round-trips


@FUZZ
@given(st.binary(max_size=256))
def test_arbitrary_bytes_on_the_socket_are_a_message_or_a_closed_connection(data: bytes) -> None:
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)  # then nothing more: a parser must not wait for ever
        try:
            message = wire.receive_message(ours)
        except wire.ConnectionClosed:
            return
        assert isinstance(message, dict)
    finally:
        ours.close()
        theirs.close()


def test_a_length_beyond_the_limit_is_refused_before_reading_it() -> None:
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(struct.pack(">I", 0xFFFFFFFF) + json.dumps({}).encode())
        try:
            wire.receive_message(ours)
        except wire.ConnectionClosed as err:
            assert "exceeds the limit" in str(err)
        else:
            raise AssertionError("a 4 GiB message was accepted")
    finally:
        ours.close()
        theirs.close()
