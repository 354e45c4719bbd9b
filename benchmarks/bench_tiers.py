"""L2 (disk) and L3 (Redis) get/put throughput next to their physical references, in one run.

Usage:
    .venv/bin/python benchmarks/bench_tiers.py [--rounds 5] [--warmup 1] [--chunks N] [--tiers disk,redis]
        [--disk-dir /var/tmp] [--fsync] [--drop-caches] [--out results/bench_tiers.json]

What is measured, for 256-token chunks of two KV layouts (SmolLM2-135M, the demo
model: 30x3x64 bf16 = 23,040 B/token, 5.9 MB a chunk; Llama-3.1-8B: 32x8x128 bf16
= 131,072 B/token, 33.6 MB a chunk), encoded once with :class:`RawCodec` (not timed):

* **Disk tier** (:class:`DiskTier` in a fresh directory under ``--disk-dir``, by
  default ``/var/tmp``, which must not be tmpfs).  Put: ``tier.put(key, bytes)``
  for each chunk of a batch (16 demo / 6 Llama chunks unless ``--chunks``).
  Reference write: ``open(path, 'wb').write(bytes)`` of the same bytes, one
  plain file per chunk in a sibling directory of the same file system.  Neither
  fsyncs (the tier's default ``fsync=False``), unless ``--fsync`` turns it on for
  both.  Then, untimed, every tier file and reference file is ``fsync``-ed (so
  its pages are clean) and ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` asks
  the kernel to drop them from the page cache; no root is needed.  ``mincore``
  on an ``mmap`` of each file checks how much of it is still resident, which is
  reported.  ``--drop-caches`` additionally writes 1 to
  ``/proc/sys/vm/drop_caches`` when root (off by default: it is machine-wide and
  would disturb other benchmarks).  Get: ``tier.get(key)`` for the same keys,
  cold.  Reference read: one ``readinto`` per file into a preallocated, already
  touched buffer, cold too.  Target: disk get >= 70% of the reference read.
* **Redis tier** (:class:`RedisTier` with its default ``max_value_bytes``, 64 MiB,
  so both layouts' chunks are one value each; the run counts the keys written to
  check) against a private ``redis-server`` on a free loopback port, started with
  ``--save '' --appendonly no --maxmemory 0`` (no persistence, no memory limit).
  Put: ``tier.put_many`` of the batch (one pipeline); get: ``tier.get_many`` (one
  pipeline).  Reference: plain redis-py ``SET``/``GET`` of the same bytes, one
  key per chunk, pipelined the same way (one non-transactional pipeline per
  batch), through ``redis.Redis(host, port)`` with the same socket timeouts as
  the tier and the default parser (hiredis when it is installed; the output says
  which, since it changes GET speed a lot).  Target: >= 70% of the reference.

Each round runs tier and reference back to back, alternating which goes first,
so machine noise hits both alike; the table shows medians over ``--rounds``
rounds, after ``--warmup`` uncounted ones (first-use costs: new page-cache and
dentry allocations, first socket buffers).
Every get is checked byte for byte against what was put.  Data is deleted
between rounds (untimed), and the server and all files are removed at the end,
even on errors.  GB/s are 1e9 bytes of encoded entries per second.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import json
import mmap
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
import redis.utils
import torch

from kvmesh.codecs.raw import RawCodec
from kvmesh.layout import KVLayout
from kvmesh.tiers.disk import DiskTier
from kvmesh.tiers.redis import RedisTier

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from redis_servers import RedisServer  # noqa: E402  (the tests' real-server helper)

CHUNK_TOKENS = 256
# name -> (layout, default chunks per batch)
LAYOUTS: dict[str, tuple[KVLayout, int]] = {
    "SmolLM2-135M (30x3x64 bf16)": (KVLayout(30, 3, 64, "bfloat16"), 16),
    "Llama-3.1-8B (32x8x128 bf16)": (KVLayout(32, 8, 128, "bfloat16"), 6),
}
TARGET = 0.70
CACHE_DROP = ("fsync each file, then posix_fadvise(POSIX_FADV_DONTNEED) on it "
              "(no root needed); residency checked with mincore")


# ------------------------------------------------------------------ results
@dataclass
class Row:
    tier: str
    layout: str
    chunk_mb: float
    batch: int
    ref_read_gbps: float
    get_gbps: float
    ref_write_gbps: float
    put_gbps: float
    notes: dict[str, object] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)  # every round, for the record

    @property
    def get_ratio(self) -> float:
        return self.get_gbps / self.ref_read_gbps

    @property
    def put_ratio(self) -> float:
        return self.put_gbps / self.ref_write_gbps

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "get_ratio": self.get_ratio, "put_ratio": self.put_ratio}


@dataclass
class Timings:
    """Seconds per round for the four measurements of one (tier, layout) pair."""

    ref_read: list[float] = field(default_factory=list)
    get: list[float] = field(default_factory=list)
    ref_write: list[float] = field(default_factory=list)
    put: list[float] = field(default_factory=list)

    def row(self, tier: str, layout: str, entries: list[bytes], notes: dict[str, object],
            warmup: int) -> Row:
        """Medians over the rounds after the first ``warmup`` ones (those are dropped)."""
        for times in (self.ref_read, self.get, self.ref_write, self.put):
            del times[:warmup]
        nbytes = sum(len(e) for e in entries)

        def gbps(times: list[float]) -> float:
            return nbytes / statistics.median(times) / 1e9

        return Row(tier, layout, len(entries[0]) / 1e6, len(entries), gbps(self.ref_read),
                   gbps(self.get), gbps(self.ref_write), gbps(self.put), notes, asdict(self))


def timed(action: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def in_turn(first_is_tier: bool, tier: Callable[[], None], reference: Callable[[], None]) -> None:
    """Run the tier's and the reference's step, in the order this round uses."""
    for step in ((tier, reference) if first_is_tier else (reference, tier)):
        step()


# --------------------------------------------------------------------- data
def make_entries(layout: KVLayout, count: int, seed: int) -> list[bytes]:
    """``count`` encoded chunks of random bf16 KV (distinct, incompressible-ish bytes)."""
    generator = torch.Generator().manual_seed(seed)
    codec = RawCodec()
    shape = layout.chunk_shape(CHUNK_TOKENS)
    return [codec.encode(torch.randn(shape, generator=generator).to(torch.bfloat16)) for _ in range(count)]


def make_keys(tag: str, round_index: int, count: int) -> list[bytes]:
    """Fresh 32-byte digests for each round, like the chunk digests the store uses."""
    return [hashlib.sha256(f"{tag}/{round_index}/{i}".encode()).digest() for i in range(count)]


# ------------------------------------------------------------- file system
def filesystem_type(path: Path) -> str:
    """The type of the file system holding ``path`` (longest mount point in /proc/self/mounts)."""
    target = os.path.realpath(path)
    best, fstype = "", "unknown"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            mount_point = fields[1].replace("\\040", " ")
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, fstype = mount_point, fields[2]
    return fstype


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_bytes(path: Path) -> tuple[int, int]:
    """(bytes of ``path`` in the page cache, file size): ``mincore`` on a read-only mapping of it.

    Mapping a file does not read it, and ``mincore`` only looks at the page cache.
    """
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap({path}): {os.strerror(err)}")
        try:
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore({path}): {os.strerror(err)}")
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)
    return min(sum(v & 1 for v in vector) * mmap.PAGESIZE, size), size


def drop_from_cache(paths: list[Path], sync_dirs: bool = False) -> None:
    """Make each file's pages clean (fsync) and ask the kernel to evict them (fadvise)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if sync_dirs:
        for directory in {p.parent for p in paths}:
            fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def try_drop_caches() -> str:
    """Machine-wide cache drop (root only, opt-in); what happened, in words."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as knob:
            knob.write("1\n")
        return "also wrote 1 to /proc/sys/vm/drop_caches"
    except OSError as err:
        return f"writing /proc/sys/vm/drop_caches failed ({err.strerror}); fadvise only"


def entry_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.kv") if p.is_file())


def resident_fraction(paths: list[Path]) -> float:
    cached = total = 0
    for path in paths:
        c, t = resident_bytes(path)
        cached, total = cached + c, total + t
    return cached / total if total else 0.0


# --------------------------------------------------------------------- disk
def read_file_into(path: Path, buffer: bytearray) -> None:
    """The reference read: one ``readinto`` of the whole file (looped only if the kernel reads short)."""
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        done = file.readinto(view)
        while done < len(view):
            more = file.readinto(view[done:])
            if not more:
                raise EOFError(f"{path}: {done} of {len(view)} bytes")
            done += more


def write_file(path: Path, data: bytes, fsync: bool) -> None:
    """The reference write: a plain ``open(..., 'wb').write`` (plus fsync if asked)."""
    with open(path, "wb") as file:
        file.write(data)
        if fsync:
            file.flush()
            os.fsync(file.fileno())


def measure_disk(root: Path, name: str, entries: list[bytes], rounds: int, warmup: int, fsync: bool,
                 drop_caches: bool) -> Row:
    tier_dir, ref_dir = root / "tier", root / "ref"
    ref_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(e) for e in entries)
    tier = DiskTier(tier_dir, capacity_bytes=4 * total + (1 << 30), name="bench", fsync=fsync)
    buffers = [bytearray(len(e)) for e in entries]  # preallocated and touched (bytearray zero-fills)
    timings = Timings()
    residency: list[float] = []
    drop_note = "fadvise only"
    for r in range(warmup + rounds):
        keys = make_keys(f"disk/{name}", r, len(entries))
        ref_paths = [ref_dir / f"{k.hex()}.bin" for k in keys]

        def tier_put() -> None:
            seconds, _ = timed(lambda: [tier.put(k, e) for k, e in zip(keys, entries)])
            timings.put.append(seconds)

        def ref_write() -> None:
            def run() -> None:
                for path, entry in zip(ref_paths, entries):
                    write_file(path, entry, fsync)
                if fsync:  # the counterpart of the tier's directory fsync after its rename
                    fsync_dir(ref_dir)
            seconds, _ = timed(run)
            timings.ref_write.append(seconds)

        in_turn(r % 2 == 0, tier_put, ref_write)
        assert tier.stats().stores == (r + 1) * len(entries), tier.stats()
        tier_paths = entry_files(tier_dir)
        assert len(tier_paths) == len(entries)
        drop_from_cache(tier_paths + ref_paths, sync_dirs=True)
        if drop_caches:
            drop_note = try_drop_caches()
        residency.append(resident_fraction(tier_paths + ref_paths))

        def tier_get() -> None:
            seconds, got = timed(lambda: [tier.get(k) for k in keys])
            timings.get.append(seconds)
            assert got == entries, "disk tier returned other bytes"

        def ref_read() -> None:
            for buffer in buffers:
                buffer[:1] = b"\0"  # keep the buffers' pages mapped and warm, cheaply
            seconds, _ = timed(lambda: [read_file_into(p, b) for p, b in zip(ref_paths, buffers)])
            timings.ref_read.append(seconds)
            assert all(b == e for b, e in zip(buffers, entries)), "reference read other bytes"

        in_turn(r % 2 == 1, tier_get, ref_read)
        for key, path in zip(keys, ref_paths):  # untimed clean-up before the next round
            tier.delete(key)
            path.unlink()
    notes = {"fsync": fsync, "cache_drop": f"{CACHE_DROP}; {drop_note}",
             "max_resident_after_drop": max(residency)}
    return timings.row("disk", name, entries, notes, warmup)


# -------------------------------------------------------------------- redis
def measure_redis(server: RedisServer, name: str, entries: list[bytes], rounds: int, warmup: int) -> Row:
    tier = RedisTier(server.url, name="bench", namespace="bench-tier")
    # the reference client: same library, same host/port and socket timeouts, default parser
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=tier.timeout_seconds,
                         socket_connect_timeout=tier.timeout_seconds)
    timings = Timings()
    keys_per_entry: set[float] = set()
    try:
        for r in range(warmup + rounds):
            keys = make_keys(f"redis/{name}", r, len(entries))
            ref_keys = [f"bench-ref:{k.hex()}" for k in keys]
            before = client.dbsize()

            def tier_put() -> None:
                seconds, stored = timed(lambda: tier.put_many(list(zip(keys, entries))))
                timings.put.append(seconds)
                assert all(stored), f"tier stored {sum(stored)} of {len(entries)}"

            def ref_put() -> None:
                def run() -> list[object]:
                    pipe = client.pipeline(transaction=False)
                    for k, e in zip(ref_keys, entries):
                        pipe.set(k, e)
                    return pipe.execute()
                seconds, replies = timed(run)
                timings.ref_write.append(seconds)
                assert all(replies)

            in_turn(r % 2 == 0, tier_put, ref_put)
            # tier keys per entry: 1 means the head holds the payload (no parts)
            keys_per_entry.add((client.dbsize() - before - len(entries)) / len(entries))

            def tier_get() -> None:
                seconds, got = timed(lambda: tier.get_many(keys))
                timings.get.append(seconds)
                assert got == entries, "redis tier returned other bytes"

            def ref_get() -> None:
                def run() -> list[bytes]:
                    pipe = client.pipeline(transaction=False)
                    for k in ref_keys:
                        pipe.get(k)
                    return pipe.execute()
                seconds, got = timed(run)
                timings.ref_read.append(seconds)
                assert got == entries, "reference GET returned other bytes"

            in_turn(r % 2 == 1, tier_get, ref_get)
            client.flushdb()  # untimed
    finally:
        tier.close()
        client.close()
    parts = sorted(round(k) - 1 for k in keys_per_entry)  # 0: the value holds the whole entry
    notes = {"max_value_bytes": tier.max_value_bytes, "parts_per_entry": parts,
             "hiredis": bool(redis.utils.HIREDIS_AVAILABLE), "redis_py": redis.__version__}
    return timings.row("redis", name, entries, notes, warmup)


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    directory = Path(tempfile.mkdtemp(prefix="kvmesh-bench-redis-"))
    server = RedisServer(directory, extra_args=("--maxmemory", "0"))
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def disk_root(parent: Path, allow_tmpfs: bool) -> Iterator[tuple[Path, str]]:
    """A fresh directory under ``parent`` (refused on tmpfs), removed afterwards."""
    parent.mkdir(parents=True, exist_ok=True)
    fstype = filesystem_type(parent)
    if fstype in ("tmpfs", "ramfs") and not allow_tmpfs:
        raise SystemExit(f"{parent} is on {fstype}: a cold read cannot be measured there "
                         "(use --disk-dir on a real disk, or --allow-tmpfs)")
    root = Path(tempfile.mkdtemp(prefix="kvmesh-bench-tiers-", dir=parent))
    try:
        yield root, fstype
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------- output
def print_table(rows: list[Row]) -> None:
    print("| tier | layout | chunk MB | batch | reference GB/s (read) | tier get GB/s | get / ref "
          "| reference GB/s (write) | tier put GB/s | put / ref |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row.tier} | {row.layout} | {row.chunk_mb:.1f} | {row.batch} chunks | "
              f"{row.ref_read_gbps:.2f} | {row.get_gbps:.2f} | {row.get_ratio:.0%} | "
              f"{row.ref_write_gbps:.2f} | {row.put_gbps:.2f} | {row.put_ratio:.0%} |")


def print_targets(rows: list[Row]) -> None:
    for row in rows:
        checks = [("get", row.get_ratio)] + ([("put", row.put_ratio)] if row.tier == "redis" else [])
        for what, ratio in checks:
            verdict = "met" if ratio >= TARGET else "MISSED"
            print(f"target {row.tier} {what} >= {TARGET:.0%} of reference, {row.layout}: "
                  f"{ratio:.0%} -> {verdict}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1,
                        help="rounds run first and not counted (first-use costs: page cache, dentries, sockets)")
    parser.add_argument("--chunks", type=int, default=None,
                        help="chunks per batch for every layout (default: 16 demo, 6 Llama)")
    parser.add_argument("--tiers", default="disk,redis", help="comma-separated: disk, redis")
    parser.add_argument("--disk-dir", type=Path, default=Path("/var/tmp"),
                        help="parent of the disk tier's temp directory (not tmpfs)")
    parser.add_argument("--allow-tmpfs", action="store_true")
    parser.add_argument("--fsync", action="store_true",
                        help="DiskTier(fsync=True) and fsync in the reference write (default: neither)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="also write 1 to /proc/sys/vm/drop_caches (root; machine-wide, off by default)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_tiers.json")
    args = parser.parse_args()
    args.tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    unknown = set(args.tiers) - {"disk", "redis"}
    if unknown or args.rounds < 1 or args.warmup < 0 or (args.chunks is not None and args.chunks < 1):
        parser.error(f"bad --tiers {sorted(unknown)}, --rounds or --chunks")
    return args


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, object]]:
    rows: list[Row] = []
    meta: dict[str, object] = {"rounds": args.rounds, "warmup_rounds": args.warmup, "chunk_tokens": CHUNK_TOKENS,
                               "python": platform.python_version(), "redis_py": redis.__version__,
                               "hiredis": bool(redis.utils.HIREDIS_AVAILABLE)}
    batches = {name: (layout, args.chunks or count) for name, (layout, count) in LAYOUTS.items()}
    data = {name: make_entries(layout, count, seed=i) for i, (name, (layout, count)) in enumerate(batches.items())}
    if "disk" in args.tiers:
        with disk_root(args.disk_dir, args.allow_tmpfs) as (root, fstype):
            meta.update(disk_dir=str(root), filesystem=fstype, fsync=args.fsync, cache_drop=CACHE_DROP)
            print(f"disk: {root} on {fstype}; fsync {'on' if args.fsync else 'off'} for tier and reference; "
                  f"cold reads: {CACHE_DROP}")
            for name, entries in data.items():
                rows.append(measure_disk(root / "x", name, entries, args.rounds, args.warmup, args.fsync,
                                         args.drop_caches))
                shutil.rmtree(root / "x", ignore_errors=True)
    if "redis" in args.tiers:
        with redis_server() as server:
            version = redis.Redis(host="127.0.0.1", port=server.port).info("server")["redis_version"]
            meta.update(redis_server=version)
            print(f"redis: redis-server {version} on {server.url} (--save '' --appendonly no --maxmemory 0); "
                  f"redis-py {redis.__version__}, hiredis parser {'ON' if meta['hiredis'] else 'off'}")
            for name, entries in data.items():
                rows.append(measure_redis(server, name, entries, args.rounds, args.warmup))
    return rows, meta


def main() -> None:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so the server is stopped and the files removed
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(143)))
    rows, meta = run(args)
    print()
    print_table(rows)
    print()
    for row in rows:
        print(f"{row.tier} {row.layout}: {json.dumps(row.notes)}")
    print_targets(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": [r.to_dict() for r in rows]}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
