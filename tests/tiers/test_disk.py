import errno
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvmesh.codecs import RawCodec
from kvmesh.store.partials import MAX_CHILDREN_PER_PARENT
from kvmesh.tiers import disk, disk_partials, legacy
from kvmesh.tiers.base import PartialIndexed, Tier
from kvmesh.tiers.disk import DiskTier, entry_size


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def _payload(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size)


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in _files(directory))


def _entry_file(directory: Path, key: bytes) -> Path:
    (path,) = [p for p in _files(directory) if p.name == key.hex() + disk.SUFFIX]
    return path


def test_implements_the_tier_protocol(tmp_path: Path) -> None:
    assert isinstance(DiskTier(tmp_path, 1 << 20), Tier)


@pytest.mark.parametrize("size", [0, 1, 4096, 1 << 20, 3 * 1024 * 1024 + 7])
def test_round_trip(tmp_path: Path, size: int) -> None:
    tier = DiskTier(tmp_path, 16 << 20)
    data = _payload(size, size)
    assert tier.put(_key(1), data)
    assert tier.contains(_key(1))
    assert tier.get(_key(1)) == data
    assert _disk_bytes(tmp_path) == entry_size(size) == tier.stats().bytes_used
    stats = tier.stats()
    assert (stats.entries, stats.stores, stats.hits, stats.errors) == (1, 1, 1, 0)


def test_memoryview_put_and_repeated_put_is_a_no_op(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    data = _payload(1, 1000)
    assert tier.put(_key(1), memoryview(data))
    mtime = _entry_file(tmp_path, _key(1)).stat().st_mtime_ns
    assert tier.put(_key(1), data)
    assert tier.stats().stores == 1
    assert _entry_file(tmp_path, _key(1)).stat().st_mtime_ns == mtime  # not rewritten
    assert tier.get(_key(1)) == data


def test_lookup_counts_consecutive_hits_and_delete(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    for i in range(3):
        tier.put(_key(i), _payload(i, 100))
    assert tier.lookup([_key(0), _key(1), _key(2), _key(3), _key(0)]) == 3
    assert tier.lookup([_key(3), _key(0)]) == 0
    assert tier.lookup([]) == 0
    assert tier.get(_key(9)) is None
    assert tier.delete(_key(1))
    assert not tier.delete(_key(1))
    assert not tier.contains(_key(1))
    assert tier.lookup([_key(0), _key(1), _key(2)]) == 1
    assert len(_files(tmp_path)) == 2
    assert tier.stats().bytes_used == _disk_bytes(tmp_path)


def test_budget_is_never_exceeded_and_lru_goes_first(tmp_path: Path) -> None:
    capacity = 350_000
    tier = DiskTier(tmp_path, capacity)
    rng = random.Random(7)
    for i in range(40):
        assert tier.put(_key(i), _payload(i, rng.randrange(10_000, 150_000)))
        on_disk = _disk_bytes(tmp_path)
        assert on_disk <= capacity
        assert on_disk == tier.stats().bytes_used
    assert tier.stats().evictions > 0
    # LRU by access: reading the oldest entry keeps it while younger unread ones go
    present = [i for i in range(40) if tier.contains(_key(i))]
    oldest, younger = present[0], present[1:]
    assert tier.get(_key(oldest)) is not None
    for i in range(100, 110):  # small puts until the first younger entry goes
        tier.put(_key(i), _payload(i, 20_000))
        if not tier.contains(_key(younger[0])):
            break
    assert not tier.contains(_key(younger[0]))
    assert tier.contains(_key(oldest))


def test_entry_larger_than_the_budget_is_rejected(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 10_000)
    tier.put(_key(1), b"x" * 100)
    assert not tier.put(_key(2), b"x" * 10_001)
    assert tier.stats().rejected_stores == 1
    assert tier.contains(_key(1))  # nothing was evicted for a put that cannot fit


def test_warm_restart_rebuilds_index_and_lru_order(tmp_path: Path) -> None:
    size = 50_000
    capacity = 5 * entry_size(size)
    tier = DiskTier(tmp_path, capacity)
    for i in range(5):
        tier.put(_key(i), _payload(i, size))
    # last access order 3, 0, 4, 1, 2 (oldest first), as recorded in the files' mtimes
    for rank, i in enumerate([3, 0, 4, 1, 2]):
        stamp = time.time() - 1000 + rank
        os.utime(_entry_file(tmp_path, _key(i)), (stamp, stamp))
    (tmp_path / "README").write_text("not an entry")
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / "zz-not-hex.kv").write_bytes(b"junk")
    stray = _disk_bytes(tmp_path) - 5 * entry_size(size)

    restarted = DiskTier(tmp_path, capacity + stray)
    stats = restarted.stats()
    assert (stats.entries, stats.bytes_used) == (5, 5 * entry_size(size))
    assert restarted.lookup([_key(i) for i in range(5)]) == 5
    assert restarted.get(_key(2)) == _payload(2, size)
    restarted.put(_key(9), _payload(9, size))  # evicts the least recently used: 3
    assert not restarted.contains(_key(3))
    assert all(restarted.contains(_key(i)) for i in (0, 1, 2, 4, 9))

    smaller = DiskTier(tmp_path, 2 * entry_size(size))  # keeps the two most recent
    assert [i for i in (0, 1, 2, 4, 9) if smaller.contains(_key(i))] == [2, 9]
    assert smaller.stats().bytes_used == _disk_bytes(tmp_path) - stray


def test_restart_is_quick_and_reads_no_payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = DiskTier(tmp_path, 1 << 30)
    for i in range(200):
        tier.put(_key(i), b"p" * 1000)
    monkeypatch.setattr(DiskTier, "_read", lambda self, key: pytest.fail("payload read at start-up"))
    started = time.perf_counter()
    restarted = DiskTier(tmp_path, 1 << 30)
    assert time.perf_counter() - started < 1.0
    assert restarted.stats().entries == 200


def _write_old_file(directory: Path, key: bytes, payload: bytes) -> Path:
    """A file as kvmesh wrote it before entries lost their disk framing (KVMD header, key, payload)."""
    path = directory / key.hex()[:2] / (key.hex() + disk.SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(legacy.disk_header(key, [memoryview(payload)]) + payload)
    return path


def test_a_file_in_the_old_framing_still_reads(tmp_path: Path) -> None:
    entry = RawCodec().encode(torch.arange(1000, dtype=torch.float32))
    path = _write_old_file(tmp_path, _key(1), entry)
    tier = DiskTier(tmp_path, 1 << 20)
    assert tier.get(_key(1)) == entry  # the framing is checked and taken off
    assert torch.equal(RawCodec().decode(tier.get(_key(1))), torch.arange(1000, dtype=torch.float32))
    assert tier.stats().bytes_used == path.stat().st_size
    tier.put(_key(2), entry)
    assert _entry_file(tmp_path, _key(2)).read_bytes() == entry  # new files are the entry itself


def test_a_new_file_is_the_entry_and_a_look_alike_of_the_old_framing_stays_readable(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    look_alike = legacy.DISK_MAGIC + b" but not a header"
    assert tier.put(_key(1), look_alike) and tier.put(_key(2), b"plain")
    assert _entry_file(tmp_path, _key(2)).read_bytes() == b"plain"
    assert DiskTier(tmp_path, 1 << 20).get(_key(1)) == look_alike  # written in the old framing, read back


@pytest.mark.parametrize("damage", ["flip_payload_byte", "truncate", "foreign", "other_key", "empty"])
def test_a_damaged_file_in_the_old_framing_is_a_miss_deleted_and_counted(tmp_path: Path, damage: str) -> None:
    data = _payload(1, 10_000)
    path = _write_old_file(tmp_path, _key(1), data)
    other = _write_old_file(tmp_path, _key(2), _payload(2, 10_000))
    raw = bytearray(path.read_bytes())
    if damage == "flip_payload_byte":
        raw[-5000] ^= 0x01
    elif damage == "truncate":
        raw = raw[:len(raw) // 2]
    elif damage == "foreign":
        raw = bytearray(legacy.DISK_MAGIC + os.urandom(len(raw) - 4))
    elif damage == "other_key":
        raw = bytearray(other.read_bytes())
    else:
        raw = bytearray(legacy.DISK_MAGIC)
    path.write_bytes(bytes(raw))
    tier = DiskTier(tmp_path, 1 << 20)

    assert tier.get(_key(1)) is None
    assert not path.exists()
    assert not tier.contains(_key(1))
    stats = tier.stats()
    assert (stats.errors, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.bytes_used == _disk_bytes(tmp_path)
    assert tier.get(_key(2)) == _payload(2, 10_000)
    assert tier.put(_key(1), data) and tier.get(_key(1)) == data  # can be stored again


def test_corruption_is_logged_once_and_counted_always(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    for i in range(3):
        tier.put(_key(i), _payload(i, 1000))
        _entry_file(tmp_path, _key(i)).write_bytes(legacy.DISK_MAGIC + b"garbage")  # a damaged old file
    with caplog.at_level(logging.WARNING, logger="kvmesh.tiers.disk"):
        assert [tier.get(_key(i)) for i in range(3)] == [None, None, None]
    assert tier.stats().errors == 3
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_file_removed_behind_the_tiers_back_is_a_plain_miss(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put(_key(1), b"abc")
    _entry_file(tmp_path, _key(1)).unlink()
    assert tier.get(_key(1)) is None
    stats = tier.stats()
    assert (stats.errors, stats.entries, stats.bytes_used) == (0, 0, 0)


_KILLED_WRITER = """
import os, sys, time
from kvmesh.tiers import disk
tier = disk.DiskTier(sys.argv[1], 1 << 30)
tier.put(bytes(16), b"whole" * 1000)
writev_all = disk._writev_all
def slow_writev_all(fd, views):
    data = b"".join(views)
    if len(data) > 1_000_000:  # the big entry: write half, say so, then hang
        os.write(fd, data[: len(data) // 2])
        open(sys.argv[2], "w").close()
        time.sleep(60)
    writev_all(fd, views)
disk._writev_all = slow_writev_all
tier.put(b"\\xff" * 16, os.urandom(8 << 20))
"""


def test_kill_9_mid_write_leaves_no_readable_partial_entry(tmp_path: Path) -> None:
    store, ready = tmp_path / "store", tmp_path / "writing"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(store), str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert writer.poll() is None, "the writer exited before it started writing"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.02)
        temps = [p for p in _files(store) if p.name.endswith(disk.TEMP_SUFFIX)]
        assert len(temps) == 1 and temps[0].stat().st_size > 1_000_000  # half written, invisible
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()

    tier = DiskTier(store, 1 << 30)
    assert not tier.contains(b"\xff" * 16)
    assert tier.get(b"\xff" * 16) is None
    assert tier.get(bytes(16)) == b"whole" * 1000
    assert not temps[0].exists()
    assert [p.name for p in _files(store)] == [bytes(16).hex() + disk.SUFFIX]


def test_temp_file_of_a_live_writer_is_left_alone(tmp_path: Path) -> None:
    sub = tmp_path / "ff"
    sub.mkdir()
    mine = sub / f".{'ff' * 16}.{os.getpid()}.1{disk.TEMP_SUFFIX}"
    dead = sub / f".{'ff' * 16}.999999999.1{disk.TEMP_SUFFIX}"
    mine.write_bytes(b"partial")
    dead.write_bytes(b"partial")
    tier = DiskTier(tmp_path, 1 << 20)
    assert mine.exists() and not dead.exists()
    assert tier.stats().entries == 0


def test_disk_full_is_a_rejected_store_without_leftovers(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tier = DiskTier(tmp_path, 1 << 30)
    assert tier.put(_key(1), b"a" * 1000)

    def full(fd: int, views: list[memoryview]) -> None:
        os.write(fd, views[0][:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk, "_writev_all", full)
    assert tier.put(_key(2), b"b" * 1000) is False
    stats = tier.stats()
    assert (stats.rejected_stores, stats.errors, stats.entries) == (1, 0, 1)
    assert stats.bytes_used == _disk_bytes(tmp_path)
    assert [p.name for p in _files(tmp_path)] == [_key(1).hex() + disk.SUFFIX]


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root, as on CI); skipped where it cannot be mounted."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_really_full_disk_rejects_the_store(tiny_filesystem: Path) -> None:
    tier = DiskTier(tiny_filesystem, 100 << 20)  # the budget is larger than the file system
    assert tier.put(_key(1), _payload(1, 600_000))
    assert tier.put(_key(2), _payload(2, 600_000)) is False
    stats = tier.stats()
    assert (stats.rejected_stores, stats.errors, stats.entries) == (1, 0, 1)
    assert not [p for p in _files(tiny_filesystem) if p.name.endswith(disk.TEMP_SUFFIX)]
    assert tier.get(_key(1)) == _payload(1, 600_000)


def test_threads_keep_the_budget_and_the_bytes(tmp_path: Path) -> None:
    size = 40_000
    capacity = 6 * entry_size(size)
    tier = DiskTier(tmp_path, capacity)
    failures: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            i = rng.randrange(12)
            if rng.random() < 0.5:
                tier.put(_key(i), _payload(i, size))
            else:
                got = tier.get(_key(i))
                if got is not None and got != _payload(i, size):
                    failures.append(f"wrong bytes for {i}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert _disk_bytes(tmp_path) == tier.stats().bytes_used <= capacity
    assert tier.stats().errors == 0


def test_two_tiers_writing_the_same_key_at_once(tmp_path: Path) -> None:
    tiers = [DiskTier(tmp_path, 1 << 30), DiskTier(tmp_path, 1 << 30)]
    data = _payload(5, 2 << 20)
    barrier = threading.Barrier(2)
    results: list[bool] = []

    def write(tier: DiskTier) -> None:
        barrier.wait()
        results.append(tier.put(_key(5), data))

    threads = [threading.Thread(target=write, args=(tier,)) for tier in tiers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True, True]
    assert DiskTier(tmp_path, 1 << 30).get(_key(5)) == data
    assert [p.name for p in _files(tmp_path)] == [_key(5).hex() + disk.SUFFIX]


def test_fsync_mode_round_trip(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20, fsync=True)
    assert tier.put(_key(1), b"durable")
    assert DiskTier(tmp_path, 1 << 20).get(_key(1)) == b"durable"


def test_bad_keys_and_budgets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DiskTier(tmp_path, 0)
    tier = DiskTier(tmp_path, 1 << 20)
    with pytest.raises(ValueError):
        tier.put(b"", b"x")
    with pytest.raises(ValueError):
        tier.put(b"k" * 200, b"x")


# ------------------------------------------------------------ partial-chunk index
def _index_file(directory: Path, parent: bytes) -> Path:
    return directory / parent.hex()[:2] / (parent.hex() + disk_partials.INDEX_SUFFIX)


def test_a_partial_is_indexed_only_once_its_entry_is_on_disk(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    assert isinstance(tier, PartialIndexed)
    assert not tier.add_partial(_key(1), _key(10), 5)  # no entry: no index line
    assert tier.partials(_key(1)) == []
    assert not _index_file(tmp_path, _key(1)).exists()
    tier.put(_key(10), b"ten")
    tier.put(_key(11), b"eleven")
    assert tier.add_partial(_key(1), _key(10), 5) and tier.add_partial(_key(1), _key(11), 9)
    assert tier.partials(_key(1)) == [(_key(11), 9), (_key(10), 5)]
    data = _index_file(tmp_path, _key(1)).read_bytes()
    assert disk_partials.decode_index(data, _key(1)) == [(_key(10), 5), (_key(11), 9)]  # oldest first on disk


def test_the_partial_index_survives_a_restart_and_drops_children_that_are_gone(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    for child in (10, 11, 12):
        tier.put(_key(child), b"x" * child)
        tier.add_partial(_key(1), _key(child), child)
    tier.put(_key(20), b"y")
    tier.add_partial(_key(2), _key(20), 3)
    _entry_file(tmp_path, _key(11)).unlink()  # gone behind the tier's back
    _entry_file(tmp_path, _key(20)).unlink()
    again = DiskTier(tmp_path, 1 << 20)
    assert again.partials(_key(1)) == [(_key(12), 12), (_key(10), 10)]
    assert disk_partials.decode_index(_index_file(tmp_path, _key(1)).read_bytes(), _key(1)) == [
        (_key(10), 10), (_key(12), 12)]  # rewritten without the missing child
    assert again.partials(_key(2)) == []
    assert not _index_file(tmp_path, _key(2)).exists()  # nothing left: the file is removed
    assert again.stats().errors == 0


def test_an_evicted_child_is_filtered_out_and_the_empty_index_file_removed(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, entry_size(1000) * 2)
    tier.put(_key(10), _payload(10, 1000))
    tier.add_partial(_key(1), _key(10), 4)
    tier.put(_key(11), _payload(11, 1000))
    tier.put(_key(12), _payload(12, 1000))  # evicts key 10
    assert not tier.contains(_key(10))
    assert tier.partials(_key(1)) == []
    assert not _index_file(tmp_path, _key(1)).exists()


def test_the_partial_index_keeps_the_newest_children_of_a_parent(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    count = MAX_CHILDREN_PER_PARENT + 6
    for i in range(count):
        tier.put(_key(100 + i), b"p")
        tier.add_partial(_key(1), _key(100 + i), i + 1)
    newest = [(_key(100 + i), i + 1) for i in reversed(range(6, count))]
    assert tier.partials(_key(1)) == newest
    assert DiskTier(tmp_path, 1 << 20).partials(_key(1)) == newest
    on_disk = disk_partials.decode_index(_index_file(tmp_path, _key(1)).read_bytes(), _key(1))
    assert len(on_disk) == MAX_CHILDREN_PER_PARENT


@pytest.mark.parametrize("damage", ["truncate", "flip", "other_parent", "garbage"])
def test_a_corrupt_index_file_is_a_miss_removed_and_counted(tmp_path: Path, damage: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put(_key(10), b"ten")
    tier.add_partial(_key(1), _key(10), 5)
    path = _index_file(tmp_path, _key(1))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-3]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "other_parent":
        data = bytearray(disk_partials.encode_index(_key(2), [(_key(10), 5)]))
    else:
        data = bytearray(b"not an index at all")
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="kvmesh.tiers.disk"):
        again = DiskTier(tmp_path, 1 << 20)
    assert again.partials(_key(1)) == []
    assert not path.exists()
    assert again.stats().errors == 1
    assert again.get(_key(10)) == b"ten"  # the entry itself is untouched
    assert any("partial index" in record.getMessage() for record in caplog.records)


def test_an_index_write_fault_is_a_counted_miss(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put(_key(10), b"ten")
    blocker = _index_file(tmp_path, _key(1))
    blocker.mkdir(parents=True)  # a directory where the index file would go: the rename fails
    (blocker / "x").write_bytes(b"")
    assert not tier.add_partial(_key(1), _key(10), 5)
    assert tier.stats().errors == 1
    again = DiskTier(tmp_path, 1 << 20)  # the blocker is not an index: skipped, counted, no exception
    assert again.partials(_key(1)) == []
    assert again.get(_key(10)) == b"ten"


def test_a_put_of_parts_stores_their_concatenation(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 24)
    parts = [b"head", memoryview(_payload(1, 100_000)), bytearray(b""), _payload(2, 7)]
    assert tier.put(_key(1), parts)
    whole = b"".join(bytes(p) for p in parts)
    assert tier.get(_key(1)) == whole
    assert tier.stats().bytes_used == entry_size(len(whole)) == _disk_bytes(tmp_path)
    assert DiskTier(tmp_path, 1 << 24).get(_key(1)) == whole  # the same file a one-piece put writes


def test_writev_all_finishes_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.writev
    monkeypatch.setattr(disk.os, "writev", lambda fd, views: real(fd, [bytes(views[0])[:3]]))  # 3 bytes a call
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        disk._writev_all(fd, [memoryview(b"abcdefg"), memoryview(b""), memoryview(b"hij")])
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"abcdefghij"


def test_an_entry_being_written_is_invisible_until_renamed(tmp_path: Path, gated_disk_writes) -> None:
    tier = DiskTier(tmp_path, 1 << 24)
    writing, finish = gated_disk_writes.writing, gated_disk_writes.finish
    writer = threading.Thread(target=tier.put, args=(_key(1), [b"x" * 10, b"y" * 10]))
    writer.start()
    assert writing.wait(30)
    assert not tier.contains(_key(1)) and tier.get(_key(1)) is None
    assert [p.name for p in _files(tmp_path) if p.name.endswith(disk.SUFFIX)] == []
    finish.set()
    writer.join(30)
    assert tier.get(_key(1)) == b"x" * 10 + b"y" * 10


def test_entries_and_indexes_are_readable_by_their_user_alone(tmp_path: Path) -> None:
    """KV reveals prompts: no other local user may read a tenant's entries (files 0600, directories 0700)."""
    root = tmp_path / "kv"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)  # as an older kvmesh (or a umask of 022) left it
    tier = DiskTier(root, 1 << 20)
    assert tier.put(_key(1), _payload(1, 1000)) and tier.add_partial(_key(2), _key(1), 7)
    paths = [root, *root.rglob("*")]
    assert len(paths) >= 4  # the root, a subdirectory, the entry and the partial index
    for path in paths:
        mode = path.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


def test_files_are_deleted_outside_the_lock_that_lookups_take(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Evictions and deletes unlink files with the tier's lock released; the budget still holds on disk."""
    tier = DiskTier(tmp_path, 3 * entry_size(10_000))
    held_during_unlink = []
    real_unlink = os.unlink

    def watched_unlink(path, *args, **kwargs):
        held_during_unlink.append(tier._lock.locked())
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(disk.os, "unlink", watched_unlink)
    for i in range(6):  # the fourth and later evict the oldest
        assert tier.put(_key(i), _payload(i, 10_000))
        assert _disk_bytes(tmp_path) <= tier.capacity
    assert tier.delete(_key(5))
    assert len(held_during_unlink) >= 4 and not any(held_during_unlink)
    assert tier.stats().evictions == 3
