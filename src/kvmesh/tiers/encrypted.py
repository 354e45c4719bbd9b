"""Encryption at rest for the tiers below L1: AES-256-GCM around every entry, bound to its key.

Why: a checksum tells damage from data, not a forger from the owner.  Anyone who can reach a Redis (or read
a disk directory) could read every tenant's KV, or plant a well-formed entry under any key and have engines
attend to it.  With a keyring configured (``encryption_keys`` or ``encryption_key_file``), every entry goes
down as ``KVMX | version | key id | nonce | ciphertext+tag``, with the entry's key as associated data: an
entry moved under another key, altered, or written by someone without the key fails authentication and is
a miss, counted (``stats().errors``) and logged once; a tampered entry is deleted.

Rotation: the first key of the ring encrypts, every key of the ring decrypts (chosen by the key id in the
header).  An entry under a key id this node does not hold (another node already rotated) is a miss, counted,
and kept for the nodes that can read it.

The wrapper sits around any tier (disk, Redis) and passes everything else (the partial-chunk index, which
holds only keys and token counts) through.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvmesh.tiers.base import Buffer, Tier, TierStats, Value
from kvmesh.tiers.buffers import joined, parts_of

log = logging.getLogger(__name__)

MAGIC = b"KVMX"
VERSION = 1
KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12
_HEAD = struct.Struct(f">4sB{KEY_ID_BYTES}s{NONCE_BYTES}s")


class KeyringError(ValueError):
    """An encryption key that cannot be used: it names what is wrong, never the key itself."""


def key_id(key: bytes) -> bytes:
    """A short public name of a key (a keyed digest: it does not reveal the key)."""
    return hashlib.blake2b(key, digest_size=KEY_ID_BYTES, person=b"kvmesh-key-id").digest()


def parse_keys(text: str, source: str) -> list[bytes]:
    """Keys of 32 bytes, as base64 or hex, one per line or separated by commas; the first encrypts."""
    keys = []
    for number, item in enumerate((part.strip() for part in text.replace(",", "\n").splitlines()), start=1):
        if not item or item.startswith("#"):
            continue
        key = _decode_key(item)
        if key is None:
            raise KeyringError(f"{source}: key {number} is neither base64 nor hex of {KEY_BYTES} bytes "
                               "(make one with: python -c \"import os, base64; "
                               "print(base64.b64encode(os.urandom(32)).decode())\")")
        keys.append(key)
    if not keys:
        raise KeyringError(f"{source}: no key in it")
    return keys


def _decode_key(item: str) -> bytes | None:
    for decode in (bytes.fromhex, lambda s: base64.b64decode(s, validate=True)):
        try:
            key = decode(item)
        except (ValueError, binascii.Error):
            continue
        if len(key) == KEY_BYTES:
            return key
    return None


def load_keyring(keys: str, key_file: str) -> Keyring | None:
    """The keyring the settings name (``encryption_keys`` first, then ``encryption_key_file``); None: off."""
    if keys:
        return Keyring(parse_keys(keys, "encryption_keys"))
    if key_file:
        path = Path(key_file).expanduser()
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as err:
            raise KeyringError(f"encryption_key_file {path}: {err.strerror or err}") from None
        if mode & 0o077:
            raise KeyringError(f"encryption_key_file {path}: readable by others (mode {mode & 0o777:o}); "
                               f"chmod 600 it")
        return Keyring(parse_keys(text, f"encryption_key_file {path}"))
    return None


@dataclass(frozen=True)
class Keyring:
    keys: list[bytes]

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != KEY_BYTES for k in self.keys):
            raise KeyringError(f"a keyring holds keys of {KEY_BYTES} bytes, the first for writing")

    @property
    def current(self) -> tuple[bytes, AESGCM]:
        return key_id(self.keys[0]), AESGCM(self.keys[0])

    def by_id(self) -> dict[bytes, AESGCM]:
        return {key_id(key): AESGCM(key) for key in self.keys}


class EncryptedTier:
    """``inner`` with every entry encrypted on the way down and authenticated on the way up."""

    def __init__(self, inner: Tier, keyring: Keyring) -> None:
        self.inner = inner
        self.name = inner.name
        self._write_id, self._writer = keyring.current
        self._readers = keyring.by_id()
        self._lock = threading.Lock()
        self._failures = 0
        self._warned: set[str] = set()

    def __getattr__(self, name: str) -> Any:  # the partial-chunk index, the breaker: the inner tier's own
        return getattr(self.inner, name)

    def lookup(self, keys: Sequence[bytes]) -> int:
        return self.inner.lookup(keys)

    def put_many(self, items: Sequence[tuple[bytes, Value]]) -> list[bool]:
        return self.inner.put_many([(key, self._seal(key, value)) for key, value in items])

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        values = self.inner.get_many(keys)
        return [None if value is None else self._open(key, value) for key, value in zip(keys, values)]

    def delete(self, key: bytes) -> bool:
        return self.inner.delete(key)

    def stats(self) -> TierStats:
        stats = self.inner.stats()
        with self._lock:
            stats.errors += self._failures
        return stats

    def close(self) -> None:
        self.inner.close()

    # ------------------------------------------------------------------ internals
    def _seal(self, key: bytes, value: Value) -> list[Buffer]:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._writer.encrypt(nonce, joined(parts_of(value)), key)
        return [_HEAD.pack(MAGIC, VERSION, self._write_id, nonce), sealed]

    def _open(self, key: bytes, value: Buffer) -> Buffer | None:
        view = memoryview(value)
        if view.nbytes < _HEAD.size or bytes(view[:4]) != MAGIC:
            self._failed(key, "not_encrypted", "an entry that is not encrypted (written without the key, or "
                         "planted): a miss", delete=True)
            return None
        magic, version, ident, nonce = _HEAD.unpack(view[:_HEAD.size])
        reader = self._readers.get(ident)
        if version != VERSION or reader is None:
            self._failed(key, "unknown_key", f"an entry under key id {ident.hex()} (version {version}), not in "
                         "this node's keyring: a miss (kept for nodes that hold that key)", delete=False)
            return None
        try:
            return reader.decrypt(nonce, view[_HEAD.size:], key)
        except InvalidTag:
            self._failed(key, "authentication", "an entry that fails authentication (altered, or moved "
                         "under another key): a miss", delete=True)
            return None

    def _failed(self, key: bytes, kind: str, message: str, delete: bool) -> None:
        with self._lock:
            self._failures += 1
            first = kind not in self._warned
            self._warned.add(kind)
        (log.warning if first else log.debug)("tier %s: %s; entry %s (further ones only counted)",
                                              self.name, message, key.hex())
        if delete:
            self.inner.delete(key)
