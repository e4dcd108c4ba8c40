"""Field-by-field conversion between the protocol's dataclasses and Flower records.

A dataclass field is a record key (``server_round`` travels as ``server-round``, or its ``key``
metadata); scalars go in the message's ``config`` or ``metrics`` record, an ``ArrayRecord`` field
in a record of its own. Decoding checks the protocol version, every required field, every value's
type and refuses unknown fields, with a :class:`ProtocolError` naming the field.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, ClassVar, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.config import Config, config_from_toml_text
from fedtune.errors import FedtuneError
from fedtune.scalars import NO_MATCH, match_scalar

PROTOCOL = 2  # bump when a field changes meaning: peers of another version are then refused


class ProtocolError(FedtuneError):
    """A message that does not follow this protocol (foreign app, older version, bad field)."""


_PROTOCOL_KEY = "fedtune-protocol"
T = TypeVar("T", bound="Wire")


def _key(f: dataclasses.Field[Any]) -> str:
    """A field's record key: its ``key`` metadata, else its name with dashes."""
    return str(f.metadata.get("key", f.name.replace("_", "-")))


# Flower's own strategies and mods look for the model in the ArrayRecord named "arrays"
ARRAYS = {"key": "arrays"}


class _Field(typing.NamedTuple):
    """One dataclass field as the wire sees it."""

    name: str
    key: str  # its record key
    hint: Any  # its resolved annotation
    arrays: bool  # travels as an ArrayRecord of its own
    required: bool
    default: Any  # left off the wire when the value equals it


_SCHEMAS: dict[type, tuple[_Field, ...]] = {}


def schema(cls: type) -> tuple[_Field, ...]:
    """``cls``'s fields, resolved once per class (not per message)."""
    if cls not in _SCHEMAS:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            tp, factory = hints[f.name], f.default_factory
            default = factory() if callable(factory) else None
            if f.default is not dataclasses.MISSING:
                default = f.default
            required = f.default is dataclasses.MISSING and not callable(factory)
            arrays = tp is ArrayRecord or ArrayRecord in typing.get_args(tp)
            out.append(_Field(f.name, _key(f), tp, arrays, required, default))
        _SCHEMAS[cls] = tuple(out)
    return _SCHEMAS[cls]


@functools.lru_cache(maxsize=4)
def _toml(cfg: Config) -> str:
    """A config as TOML, once per config (every instruction of a run carries the same one)."""
    return cfg.to_toml()


class Wire:
    """Field-by-field conversion between a dataclass and a Flower RecordDict."""

    scalars: ClassVar[str]  # the record that holds the scalar fields: "config" or "metrics"

    def to_content(self) -> RecordDict:
        scalars: dict[str, Any] = {_PROTOCOL_KEY: PROTOCOL}
        arrays: dict[str, ArrayRecord] = {}
        for f in schema(type(self)):
            value = getattr(self, f.name)
            if value is None or value == f.default:  # absent means the default (Flower refuses [])
                continue
            if isinstance(value, ArrayRecord):
                arrays[f.key] = value
            elif isinstance(value, Config):
                scalars[f.key] = _toml(value)
            elif isinstance(value, tuple):
                scalars[f.key] = list(value)
            else:
                scalars[f.key] = value.value if isinstance(value, enum.Enum) else value
        record = ConfigRecord(scalars) if self.scalars == "config" else MetricRecord(scalars)
        return RecordDict({self.scalars: record, **arrays})

    @classmethod
    def from_content(cls: type[T], content: RecordDict, *, where: str = "message") -> T:
        scalars = content.get(cls.scalars)
        if not isinstance(scalars, ConfigRecord | MetricRecord):
            raise ProtocolError(f"{where}: not a fedtune message (no {cls.scalars!r} record)")
        version = scalars.get(_PROTOCOL_KEY)
        if version is None:
            raise ProtocolError(f"{where}: not a fedtune message (no field {_PROTOCOL_KEY!r})")
        if version != PROTOCOL:
            raise ProtocolError(
                f"{where}: field {_PROTOCOL_KEY!r} is {version!r}, this side speaks {PROTOCOL!r}"
            )
        fields = schema(cls)
        known = {f.key for f in fields}
        unknown = sorted(set(scalars) - known - {_PROTOCOL_KEY})
        unknown += sorted(k for k in content if k != cls.scalars and k not in known)
        if unknown:
            raise ProtocolError(f"{where}: unknown field {unknown[0]!r} ({cls.__name__})")
        values = {}
        for f in fields:
            raw = content.get(f.key) if f.arrays else scalars.get(f.key)
            if raw is None:
                if f.required:
                    raise ProtocolError(f"{where}: missing field {f.key!r} ({cls.__name__})")
                continue
            values[f.name] = _decode(raw, f.hint, f"{where}: field {f.key!r}")
        return cls(**values)


def _decode(raw: Any, tp: Any, where: str) -> Any:
    """``raw`` as type ``tp`` (a field's annotation), or a ProtocolError naming the field."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    options = tuple(o for o in options if o is not type(None))
    for option in options:
        if option is ArrayRecord and isinstance(raw, ArrayRecord):
            return raw
        if option is Config and isinstance(raw, str):
            try:
                return config_from_toml_text(raw, source=where)
            except FedtuneError as err:  # a config this version does not accept
                raise ProtocolError(str(err)) from None
        if isinstance(option, type) and issubclass(option, enum.Enum) and isinstance(raw, str):
            try:
                return option(raw)
            except ValueError:
                raise ProtocolError(f"{where}: unknown value {raw!r}") from None
        if (got := match_scalar(raw, [option])) is not NO_MATCH:
            return got
        if typing.get_origin(option) is tuple and isinstance(raw, list):  # tuple[str, ...], tuple[int, ...]
            items = [match_scalar(v, typing.get_args(option)[:1]) for v in raw]
            if NO_MATCH not in items:
                return tuple(items)
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ProtocolError(f"{where}: expected {names}, got {type(raw).__name__} {raw!r}"[:300])
