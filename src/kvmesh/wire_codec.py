"""One generic encoder for the wire's frozen dataclasses: to JSON-ready dicts and back, checked field by field.

Why one generic codec and not a ``to_wire``/``from_wire`` per message: the field types already say
everything (``bytes`` travel as hex, nested records as objects, ``X | None`` may be null), so writing
them again per message would only add places to get a field wrong.  Decoding checks every field's
type and refuses missing and unknown fields with a :class:`ProtocolError` that names the field's
path (``reserve.items[1].nbytes``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Decode = Callable[[Any, str], Any]
_MISSING = dataclasses.MISSING
_Record = Callable[[Any, str, frozenset[str]], Any]
_FIELDS: dict[type, tuple[dataclasses.Field[Any], ...]] = {}
_RECORDS: dict[type, _Record] = {}


class ProtocolError(Exception):
    """A message that does not follow the protocol: malformed, of an unknown op, a field missing or mistyped."""


class ConnectionClosed(ProtocolError, ConnectionError):
    """The peer closed the socket, or what came is not a framed message: the connection is unusable."""


def encode(record: Any) -> dict[str, Any]:
    """A dataclass record as a JSON-ready dict (``bytes`` as hex, nested records as dicts)."""
    return {field.name: _encode_value(getattr(record, field.name)) for field in _fields(type(record))}


def _encode_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if dataclasses.is_dataclass(value):
        return encode(value)
    if isinstance(value, list | tuple):
        return [_encode_value(item) for item in value]
    return value


def decode(cls: type[T], data: Any, where: str, ignore: frozenset[str] = frozenset()) -> T:
    """``data`` read back as a ``cls``; ``where`` names it in errors, keys in ``ignore`` are not fields."""
    return _record_decoder(cls)(data, where, ignore)


def _fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = dataclasses.fields(cls)
    return fields


def _record_decoder(cls: type) -> _Record:
    """The checking reader of one record type, built once per type (the messages are a closed set)."""
    record = _RECORDS.get(cls)
    if record is None:
        record = _RECORDS[cls] = _build_record_decoder(cls)
    return record


def _build_record_decoder(cls: type) -> _Record:
    hints = typing.get_type_hints(cls)
    specs = [(f.name, _decoder(hints[f.name]),
              f.default is not _MISSING or f.default_factory is not _MISSING) for f in _fields(cls)]
    names = frozenset(name for name, _, _ in specs)

    def read(data: Any, where: str, ignore: frozenset[str] = frozenset()) -> Any:
        if not isinstance(data, dict):
            raise ProtocolError(f"{where}: expected an object, got {_shown(data)}")
        unknown = sorted(set(data) - names - ignore)
        if unknown:
            raise ProtocolError(f"{where}.{unknown[0]}: not a field of {where}")
        values = {}
        for name, read_field, optional in specs:
            if name in data:
                values[name] = read_field(data[name], f"{where}.{name}")
            elif not optional:
                raise ProtocolError(f"{where}.{name}: missing")
        return cls(**values)

    return read


def _decoder(hint: Any) -> _Decode:
    """A checking reader for one field type; the types a message may use are exactly the ones handled here."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return lambda value, where: value
    if hint in (bool, int, str):
        return _scalar(hint)
    if hint is float:
        return _float
    if hint is bytes:
        return _hex
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _decoder(next(a for a in args if a is not type(None)))
        return lambda value, where: None if value is None else inner(value, where)
    if origin in (list, tuple) and (origin is list or args[1:] == (Ellipsis,)):
        item = _decoder(args[0])
        return _sequence(origin, item)
    if origin is dict and args[0] is str:
        value_of = _decoder(args[1])
        return _mapping(value_of)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return lambda value, where: _record_decoder(hint)(value, where, frozenset())
    raise TypeError(f"no wire form for the type {hint!r}")


def _scalar(kind: type) -> _Decode:
    def read(value: Any, where: str) -> Any:
        if type(value) is not kind:  # bool is an int subclass: an int field must not take True
            raise ProtocolError(f"{where}: expected {kind.__name__}, got {_shown(value)}")
        return value
    return read


def _float(value: Any, where: str) -> float:
    if type(value) not in (int, float):
        raise ProtocolError(f"{where}: expected a number, got {_shown(value)}")
    return float(value)


def _hex(value: Any, where: str) -> bytes:
    if type(value) is not str:
        raise ProtocolError(f"{where}: expected hex bytes, got {_shown(value)}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f"{where}: expected hex bytes, got {_shown(value)}") from None


def _sequence(kind: type, item: _Decode) -> _Decode:
    def read(value: Any, where: str) -> Any:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {_shown(value)}")
        return kind(item(element, f"{where}[{index}]") for index, element in enumerate(value))
    return read


def _mapping(value_of: _Decode) -> _Decode:
    def read(value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected an object, got {_shown(value)}")
        return {key: value_of(element, f"{where}.{key}") for key, element in value.items()}
    return read


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
