"""msgpack encoding of our plain dataclasses, for the ZMQ wire between processes.

No pickle on the wire: a peer (or anything else that reaches the socket) can only make us
build the classes registered here, field by field, never run arbitrary code.

Encoding: a registered dataclass becomes a msgpack array whose first element is an ext marker
naming the class, followed by its field values in declaration order:

    SamplingParams(n=1, temperature=0.0, ...)  ->  [Ext(1, b"SamplingParams"), 1, 0.0, ...]

so nested dataclasses, lists and dicts pack in one pass of msgpack's C packer (no bytes within
bytes). Sets and frozensets travel the same way with their own marker. Tuples become lists.
Decoding never runs __post_init__: the sender built the objects, so the values were checked once
already (SamplingParams' validation, say, is not re-run per hop). A class without one is built
through its __init__, which only assigns the fields (several times faster than setting each
field from Python, and a step's outputs hold one object per running request).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import msgpack

_EXT_CLASS = 1
_EXT_SET = 2


class _ClassMarker:
    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls


class _SetMarker:
    __slots__ = ()


_SET_MARKER = _SetMarker()


class Serializer:
    """Encodes and decodes values built from msgpack's types plus the given dataclasses."""

    def __init__(self, classes: Iterable[type]) -> None:
        self._names: dict[type, bytes] = {}
        self._markers: dict[bytes, _ClassMarker] = {}
        self._fields: dict[type, tuple[str, ...]] = {}
        self._by_init: set[type] = set()  # built by cls(*values): no __post_init__ to skip
        for cls in classes:
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls.__qualname__} is not a dataclass")
            name = cls.__qualname__.encode()
            if name in self._markers:
                raise ValueError(f"two registered classes are named {cls.__qualname__}")
            self._names[cls] = name
            self._markers[name] = _ClassMarker(cls)
            self._fields[cls] = tuple(f.name for f in dataclasses.fields(cls))
            if not hasattr(cls, "__post_init__") and all(f.init for f in dataclasses.fields(cls)):
                self._by_init.add(cls)
        self._packer = msgpack.Packer(default=self._default, use_bin_type=True)

    def encode(self, obj: Any) -> bytes:
        return self._packer.pack(obj)

    def decode(self, data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=self._ext_hook,
                               list_hook=self._list_hook)

    # ---- hooks -----------------------------------------------------------------------------

    def _default(self, obj: Any) -> Any:
        cls = type(obj)
        name = self._names.get(cls)
        if name is not None:
            return [msgpack.ExtType(_EXT_CLASS, name), *(getattr(obj, f) for f in self._fields[cls])]
        if isinstance(obj, (set, frozenset)):
            return [msgpack.ExtType(_EXT_SET, b""), *obj]
        raise TypeError(f"cannot send a {cls.__qualname__} over the wire; register it with the "
                        "Serializer or convert it to plain types")

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code == _EXT_CLASS:
            marker = self._markers.get(data)
            if marker is None:
                raise ValueError(f"unknown class on the wire: {data!r}")
            return marker
        if code == _EXT_SET:
            return _SET_MARKER
        raise ValueError(f"unknown msgpack ext type {code}")

    def _list_hook(self, items: list[Any]) -> Any:
        if not items:
            return items
        head = items[0]
        if isinstance(head, _ClassMarker):
            cls = head.cls
            names = self._fields[cls]
            if len(items) - 1 != len(names):
                raise ValueError(f"{cls.__qualname__} on the wire has {len(items) - 1} fields, "
                                 f"expected {len(names)}")
            if cls in self._by_init:
                return cls(*items[1:])
            obj = object.__new__(cls)
            for name, value in zip(names, items[1:]):
                # object.__setattr__ also works for frozen and slots dataclasses.
                object.__setattr__(obj, name, value)
            return obj
        if head is _SET_MARKER:
            return set(items[1:])
        return items
