"""Framing of control messages on the daemon's Unix socket: a 4-byte length, then JSON.

Only small control messages travel here (keys, offsets, counts); KV bytes move
through the shared-memory segment.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

PROTOCOL_VERSION = 3  # bump on any change a client of the previous version would misread
_LENGTH = struct.Struct("<I")
MAX_MESSAGE = 64 * 1024 * 1024


class ProtocolError(ConnectionError):
    """The peer closed the socket or sent something that is not a message."""


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    parts = bytearray()
    while len(parts) < count:
        piece = sock.recv(count - len(parts))
        if not piece:
            raise ProtocolError("connection closed")
        parts += piece
    return bytes(parts)


def receive_message(sock: socket.socket) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size))
    if length > MAX_MESSAGE:
        raise ProtocolError(f"message of {length} bytes exceeds the limit of {MAX_MESSAGE}")
    message = json.loads(_receive_exactly(sock, length))
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    return message
