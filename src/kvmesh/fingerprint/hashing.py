"""Hashing model files: whole files, safetensors headers, and sampled tensor bytes.

The content digest of a large checkpoint is what makes an engine's start slow, so the sampled
mode reads only a few blocks of each large tensor (docs/benchmarks.md, "Model fingerprint").
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import blake3

DIGEST_BYTES = 16  # 128 bits, like the chunk keys: collisions are out of reach
#: Sampled digests read this many blocks of each tensor larger than their sum ...
SAMPLE_BLOCKS = 16
#: ... of this many bytes each, the first at the tensor's start and the last at its end.
SAMPLE_BLOCK_BYTES = 64 * 1024
_READ_BYTES = 16 * 1024 * 1024


class FingerprintError(ValueError):
    """The model (or adapter) cannot be fingerprinted; the message names it and what to do."""


def read_safetensors_header(path: Path) -> tuple[bytes, int, list[tuple[str, int, int]]]:
    """The raw header (length prefix included), where tensor data starts, and (name, begin, end) per tensor.

    Offsets are relative to the data start, as in the file; tensors come in file order.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise FingerprintError(f"{path} is not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise FingerprintError(f"{path} is not a safetensors file (header of {length} bytes in a "
                                   f"{size}-byte file)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        tensors = [(name, int(info["data_offsets"][0]), int(info["data_offsets"][1]))
                   for name, info in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise FingerprintError(f"{path} has a malformed safetensors header ({err})") from err
    data_start = 8 + length
    if any(not 0 <= begin <= end <= size - data_start for _, begin, end in tensors):
        raise FingerprintError(f"{path} has a tensor outside the file; is it truncated?")
    return prefix + raw, data_start, sorted(tensors, key=lambda t: (t[1], t[2], t[0]))


def sample_offsets(nbytes: int, blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BLOCK_BYTES) -> list[tuple[int, int]]:
    """(offset, length) of the blocks a sampled digest reads from a tensor of ``nbytes`` bytes.

    All of it when it is no bigger than the blocks together; else ``blocks``
    evenly spaced blocks, the first at byte 0 and the last ending at the end.
    """
    if nbytes <= blocks * block:
        return [(0, nbytes)]
    span = nbytes - block
    return [(span * i // (blocks - 1), block) for i in range(blocks)]


def sampled_tensors_digest(path: Path, data_start: int, tensors: list[tuple[str, int, int]]) -> str:
    hasher = blake3.blake3(b"sampled-v1")
    hasher.update(struct.pack("<QQ", SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES))
    fd = os.open(path, os.O_RDONLY)  # no POSIX_FADV_RANDOM: small tensors would lose read-ahead
    try:
        for name, begin, end in tensors:
            encoded = name.encode()
            hasher.update(struct.pack("<QQQ", len(encoded), begin, end))
            hasher.update(encoded)
            for offset, length in sample_offsets(end - begin):
                hasher.update(pread_exact(fd, length, data_start + begin + offset, path))
    finally:
        os.close(fd)
    return hasher.hexdigest(DIGEST_BYTES)


def pread_exact(fd: int, length: int, offset: int, path: Path) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise FingerprintError(f"{path} ended while its tensors were being read; is it truncated?")
        data += more
    return data


def hash_file(path: Path, max_threads: int = blake3.blake3.AUTO) -> str:
    """blake3 of a whole file: memory-mapped and hashed on every core unless told otherwise."""
    hasher = blake3.blake3(max_threads=max_threads)
    if path.stat().st_size:
        hasher.update_mmap(path)
    return hasher.hexdigest(DIGEST_BYTES)


def hash_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest(DIGEST_BYTES)


def combine(tag: bytes, *parts: str) -> str:
    """One digest of a tag and strings, each length-prefixed so no two sequences collide."""
    hasher = blake3.blake3(tag)
    for part in parts:
        encoded = part.encode()
        hasher.update(len(encoded).to_bytes(8, "little"))
        hasher.update(encoded)
    return hasher.hexdigest(DIGEST_BYTES)
