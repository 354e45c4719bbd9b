"""The optional libraries of the compressing codecs (the ``codecs`` extra), loaded only when a codec runs.

Engine processes describe and copy entries but never encode one, so importing :mod:`kvmesh.codecs` must not
load numba (and its LLVM) or a compressor.  A codec checks at construction that what it needs is installed
(without importing it), so a configured codec that cannot run fails when the config is read, naming the
extra; the libraries themselves are imported on the first encode or decode.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

INSTALL_HINT = "pip install 'kvmesh[codecs]'"
EXTRA_MODULES = frozenset({"numba", "llvmlite", "zstandard", "lz4"})


class MissingCodecDependency(ImportError):
    """A codec needs a library of the ``codecs`` extra that is not installed."""


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(codec: str, *modules: str) -> None:
    """Raise :class:`MissingCodecDependency` unless every top-level module in ``modules`` is installed."""
    missing = [module for module in modules if not _installed(module)]
    if missing:
        raise MissingCodecDependency(f"codec {codec!r} needs {', '.join(missing)}, which is not installed: "
                                     f"{INSTALL_HINT}")


def _load(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in EXTRA_MODULES:
            raise
        raise MissingCodecDependency(f"{module} needs {err.name}, which is not installed: {INSTALL_HINT}") from err


def kernels() -> ModuleType:
    """:mod:`kvmesh.codecs.kernels` (numba)."""
    return _load("kvmesh.codecs.kernels")


def zstandard() -> ModuleType:
    return _load("zstandard")


def lz4_block() -> ModuleType:
    return _load("lz4.block")
