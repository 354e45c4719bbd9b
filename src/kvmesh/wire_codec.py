"""One generic encoder for the wire's frozen dataclasses: to JSON-ready dicts and back, checked field by field.

Why one generic codec and not a ``to_wire``/``from_wire`` per message: the field types already say
everything (``bytes`` travel as hex, nested records as objects, ``X | None`` may be null), so writing
them again per message would only add places to get a field wrong.  Decoding checks every field's
type and refuses missing and unknown fields with a :class:`ProtocolError` that names the field's
path (``reserve.items[1].nbytes``).  Readers and writers are built once per type from its hints,
and a path is only spelled out when something is wrong: a lookup is on every scheduler step.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Read = Callable[[Any], Any]
_Write = Callable[[Any], Any]
_MISSING = dataclasses.MISSING


class ProtocolError(Exception):
    """A message that does not follow the protocol: malformed, of an unknown op, a field missing or mistyped."""


class ConnectionClosed(ProtocolError, ConnectionError):
    """The peer closed the socket, or what came is not a framed message: the connection is unusable."""


class _Bad(Exception):
    """A field that does not fit; ``path`` grows on the way out (innermost first)."""

    def __init__(self, reason: str, *path: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = list(path)


def encode(record: Any) -> dict[str, Any]:
    """A dataclass record as a JSON-ready dict (``bytes`` as hex, nested records as dicts)."""
    return _record(type(record)).write(record)


def decode(cls: type[T], data: Any, where: str, ignore: frozenset[str] = frozenset()) -> T:
    """``data`` read back as a ``cls``; ``where`` names it in errors, keys in ``ignore`` are not fields."""
    try:
        return _record(cls).read(data, ignore)
    except _Bad as bad:
        raise ProtocolError(f"{where}{''.join(reversed(bad.path))}: {bad.reason}") from None


class _RecordCodec:
    """Reader and writer of one dataclass type, from its fields' type hints."""

    def __init__(self, cls: type) -> None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        self.cls = cls
        self.names = frozenset(f.name for f in fields)
        # a plain scalar is checked inline (its type in ``kind``), anything else by its reader
        self.specs = [(f.name, hints[f.name] if hints[f.name] in (bool, int, str) else None,
                       None if hints[f.name] in (bool, int, str) else _reader(hints[f.name]),
                       f.default is not _MISSING or f.default_factory is not _MISSING) for f in fields]
        # an empty collection in a field that defaults to one is left out: the reader restores the default,
        # and a lookup's reply is then no larger for the explanation fields it leaves empty (most of them)
        self.writers = [(f.name, _writer(hints[f.name]), f.default_factory in (list, dict, tuple)) for f in fields]
        self.allowed: dict[frozenset[str], frozenset[str]] = {}

    def write(self, record: Any) -> dict[str, Any]:
        out = {}
        for name, write, empty_by_default in self.writers:
            value = getattr(record, name)
            if empty_by_default and not value:
                continue
            out[name] = value if write is None else write(value)
        return out

    def read(self, data: Any, ignore: frozenset[str] = frozenset()) -> Any:
        if type(data) is not dict:
            raise _Bad(f"expected an object, got {_shown(data)}")
        allowed = self.allowed.get(ignore)
        if allowed is None:
            allowed = self.allowed[ignore] = self.names | ignore
        if not data.keys() <= allowed:
            unknown = min(set(data) - allowed)
            raise _Bad("not a field of this message", f".{unknown}")
        values = {}
        for name, kind, read, optional in self.specs:
            if name not in data:
                if optional:
                    continue
                raise _Bad("missing", f".{name}")
            value = data[name]
            try:
                if kind is not None:
                    if type(value) is not kind:  # bool is an int subclass: an int field must not take True
                        raise _Bad(f"expected {kind.__name__}, got {_shown(value)}")
                else:
                    value = read(value)  # type: ignore[misc]
            except _Bad as bad:
                bad.path.append(f".{name}")
                raise
            values[name] = value
        return self.cls(**values)


_RECORDS: dict[type, _RecordCodec] = {}


def _record(cls: type) -> _RecordCodec:
    codec = _RECORDS.get(cls)
    if codec is None:
        codec = _RECORDS[cls] = _RecordCodec(cls)
    return codec


def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _optional(hint: Any) -> Any | None:
    """``X`` for ``X | None``, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def _reader(hint: Any) -> _Read:
    """A checking reader for one field type; the types a message may use are exactly the ones handled here."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return lambda value: value
    if hint in (bool, int, str):
        return _scalar(hint)
    if hint is float:
        return _float
    if hint is bytes:
        return _hex
    inner = _optional(hint)
    if inner is not None:
        read_inner = _reader(inner)
        return lambda value: None if value is None else read_inner(value)
    if origin is list or (origin is tuple and args[1:] == (Ellipsis,)):
        return _sequence(origin, _reader(args[0]))
    if origin is dict and args[0] is str:
        return _mapping(None if args[1] is Any else _reader(args[1]))
    if _is_record(hint):
        return _record(hint).read
    raise TypeError(f"no wire form for the type {hint!r}")


def _writer(hint: Any) -> _Write | None:
    """How a field's value becomes JSON; None where it already is."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bytes:
        return bytes.hex
    inner = _optional(hint)
    if inner is not None:
        write_inner = _writer(inner)
        return None if write_inner is None else (lambda value: None if value is None else write_inner(value))
    if origin in (list, tuple):
        write_item = _writer(args[0])
        return list if write_item is None else (lambda value: [write_item(item) for item in value])
    if origin is dict:
        write_value = _writer(args[1])
        return None if write_value is None else (lambda value: {k: write_value(v) for k, v in value.items()})
    if _is_record(hint):
        return _record(hint).write
    return None


def _scalar(kind: type) -> _Read:
    def read(value: Any) -> Any:
        if type(value) is not kind:  # bool is an int subclass: an int field must not take True
            raise _Bad(f"expected {kind.__name__}, got {_shown(value)}")
        return value
    return read


def _float(value: Any) -> float:
    if type(value) not in (int, float):
        raise _Bad(f"expected a number, got {_shown(value)}")
    return float(value)


def _hex(value: Any) -> bytes:
    if type(value) is str:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise _Bad(f"expected hex bytes, got {_shown(value)}")


def _sequence(kind: type, item: _Read) -> _Read:
    def read(value: Any) -> Any:
        if type(value) is not list:
            raise _Bad(f"expected a list, got {_shown(value)}")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except _Bad as bad:
                bad.path.append(f"[{index}]")
                raise
        return out if kind is list else tuple(out)
    return read


def _mapping(value_of: _Read | None) -> _Read:
    """Objects with string keys; ``value_of`` None: values of any JSON type (settings, stats)."""
    def read(value: Any) -> Any:
        if type(value) is not dict:
            raise _Bad(f"expected an object, got {_shown(value)}")
        if value_of is None:
            return value
        out = {}
        for key, element in value.items():
            try:
                out[key] = value_of(element)
            except _Bad as bad:
                bad.path.append(f".{key}")
                raise
        return out
    return read


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
