"""A running daemon fed garbage: it answers with an error or drops that connection, and serves everyone else."""

from __future__ import annotations

import json
import socket
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh import wire
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory):
    config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path_factory.mktemp("sock")),
                                        "instance": f"fz-{uuid.uuid4().hex[:6]}", "l1_size": "16MiB",
                                        "l1_prefault": False, "http_port": 0})
    client = KVMeshClient(config)
    yield config, client
    client.shutdown_daemon()
    client.close()


def _exchange(path: Path, payload: bytes) -> dict | None:
    """Send raw bytes, then read one reply if the daemon sends one before closing or 2 s pass."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(str(path))
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return wire.receive_message(sock)
        except (wire.ConnectionClosed, ConnectionError, TimeoutError):
            return None


def _framed(message: object) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack("<I", len(body)) + body


MESSAGES = st.one_of(
    st.binary(max_size=200),  # not even framing
    st.builds(_framed, st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3)),
    # every op but shutdown (a user's legitimate stop), with fields right, wrong or missing
    st.builds(lambda op, body: _framed({"op": op, **body}), st.sampled_from(sorted(set(wire.REQUESTS) - {"shutdown"})),
              st.dictionaries(st.sampled_from(["keys", "items", "lease", "protocol", "pid", "cost", "x"]),
                              st.integers() | st.text(max_size=4) | st.lists(st.integers(), max_size=2),
                              max_size=3)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(MESSAGES)
def test_garbage_gets_an_error_or_a_closed_connection_and_the_daemon_keeps_serving(running, payload: bytes) -> None:
    config, client = running
    reply = _exchange(config.socket_path(), payload)
    if reply is not None and reply.get("ok") is not False:  # a success only for a well-formed request
        wire.decode_request(json.loads(payload[4:]))
    assert "l1" in client.stats()  # another connection is served as before
