"""The digest cache: a weight file's digest, kept by resolved path, size, ``mtime_ns`` and inode.

Weight digests are slow to compute and never change for a file that has not changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("kvmesh.fingerprint")

CACHE_ENV = "KVMESH_FINGERPRINT_CACHE"  # listed in config.OTHER_ENV_VARS: not a configuration key
DEFAULT_CACHE_PATH = "~/.cache/kvmesh/fingerprints.json"
_CACHE_FORMAT = 1


@dataclass
class DigestCache:
    """File digests by (resolved path, size, mtime_ns, inode), in one small JSON file.

    Rewriting a file changes its mtime (and usually its inode), so a stale
    entry is never used; the price is that a file edited in place with its
    mtime restored by hand keeps its old digest.  The file is written
    atomically (temporary file + rename) and merged with what other processes
    wrote meanwhile; an unreadable or corrupt one is ignored and rewritten; a
    cache that cannot be written (read-only home) only costs re-hashing.
    ``path`` defaults to ``$KVMESH_FINGERPRINT_CACHE``, else
    ``~/.cache/kvmesh/fingerprints.json``; ``None`` disables the cache.
    """

    path: Path | None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)

    @classmethod
    def disabled(cls) -> DigestCache:
        return cls(path=None)

    @classmethod
    def default_path(cls) -> Path:
        return Path(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_PATH))

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str | os.PathLike[str] | None = None, *, enabled: bool = True) -> Iterator[DigestCache]:
        """The cache at ``path`` (or the default), saved when the block ends without an error."""
        if not enabled:
            yield cls.disabled()
            return
        where = Path(path).expanduser() if path is not None else cls.default_path()
        cache = cls(path=where)
        cache.files = _load_cache_files(where)
        yield cache
        cache.save()

    def get(self, file: Path, kind: str) -> str | None:
        if self.path is None:
            return None
        resolved, stamp = _stamp(file)
        entry = self.files.get(resolved)
        if entry is None or entry.get("stat") != stamp:
            return None
        digest = entry.get("digests", {}).get(kind)
        return digest if isinstance(digest, str) else None

    def put(self, file: Path, kind: str, digest: str) -> None:
        if self.path is None:
            return
        resolved, stamp = _stamp(file)
        entry = self.files.get(resolved)
        if entry is None or entry.get("stat") != stamp:  # a changed file's old digests are dropped
            entry = self.files[resolved] = {"stat": stamp, "digests": {}}
        entry["digests"][kind] = digest
        self.changed.add(resolved)

    def save(self) -> None:
        """Write this process's new entries over what is on disk now; a failure is only logged."""
        if self.path is None or not self.changed:
            return
        merged = _load_cache_files(self.path)
        merged.update({name: self.files[name] for name in self.changed})
        try:
            _write_atomically(self.path, json.dumps({"format": _CACHE_FORMAT, "files": merged}, indent=0))
        except OSError as err:
            log.warning("kvmesh: cannot write the fingerprint cache %s (%s); weights will be re-hashed",
                        self.path, err)
            return
        self.files, self.changed = merged, set()


def _stamp(file: Path) -> tuple[str, list[int]]:
    resolved = file.resolve()
    st = resolved.stat()
    return str(resolved), [st.st_size, st.st_mtime_ns, st.st_ino]


def _load_cache_files(path: Path) -> dict[str, dict[str, Any]]:
    """The cache's entries; an absent, unreadable or malformed file (or entry) reads as empty."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("kvmesh: ignoring the unreadable fingerprint cache %s (%s)", path, err)
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("format") == _CACHE_FORMAT else None
    if not isinstance(files, dict):
        return {}
    return {name: entry for name, entry in files.items() if _valid_entry(entry)}


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("digests"), dict)
            and isinstance(entry.get("stat"), list) and len(entry["stat"]) == 3
            and all(isinstance(v, int) for v in entry["stat"]))


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
