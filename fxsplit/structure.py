"""The structure of what a model returns: the containers fxsplit looks into and the key path of every leaf.

Mappings are read by key, lists and tuples by index, namedtuples and dataclasses by field name (``out.seg``), and
any other container ``torch.utils._pytree`` knows as it flattens it. A traced graph holds a namedtuple or a
dataclass that ``forward`` returns as a call of its class (``torch.fx`` records the construction): its fields are
the call's arguments, so a graph's output and a real output have the same keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import fx
from torch.utils import _pytree as pytree


def record_fields(value: Any) -> dict[str, Any] | None:
    """Field name -> value of a namedtuple or a dataclass instance, or of a graph node that constructs one; ``None``
    for anything else (a mapping that is also a dataclass, as HuggingFace's ``ModelOutput``, is a mapping)."""
    if isinstance(value, fx.Node):
        if value.op != "call_function" or not _record_class(value.target):
            return None
        return {**dict(zip(_field_names(value.target), value.args)), **value.kwargs}
    if isinstance(value, Mapping) or not _record_class(type(value)):
        return None
    return {name: getattr(value, name) for name in _field_names(type(value))}


def children(value: Any) -> list[tuple[Any, str, Any]] | None:
    """``(key, how the key reads, child)`` for each part of a container (``("seg", "['seg']", ...)``,
    ``("seg", ".seg", ...)`` for a field), or ``None`` for a leaf."""
    if isinstance(value, Mapping):
        return [(key, f"[{key!r}]", child) for key, child in value.items()]
    fields = record_fields(value)
    if fields is not None:
        return [(name, f".{name}", child) for name, child in fields.items()]
    if isinstance(value, (tuple, list)):
        return [(index, f"[{index}]", child) for index, child in enumerate(value)]
    node = pytree.SUPPORTED_NODES.get(type(value))
    if node is None or node.flatten_with_keys_fn is None:
        return None
    entries, _ = node.flatten_with_keys_fn(value)
    return [(plain_key(entry), str(entry), child) for entry, child in entries]


def leaves(value: Any, path: tuple = (), shown: str = "") -> list[tuple[tuple, str, Any]]:
    """``(key path, how it reads, leaf)`` for every leaf of ``value``, depth first:
    ``[(("seg",), "['seg']", tensor), (("aux", 0), "['aux'][0]", tensor)]``."""
    parts = children(value)
    if parts is None:
        return [(path, shown, value)]
    return [leaf for key, key_shown, child in parts for leaf in leaves(child, (*path, key), shown + key_shown)]


def part(value: Any, key: Any) -> Any:
    """The part of a container under ``key`` (an index or a field name for a namedtuple); raises ``KeyError``,
    ``IndexError`` or ``TypeError`` where there is none."""
    fields = record_fields(value)
    if fields is None:
        return value[key]
    if isinstance(key, int) and not isinstance(key, bool) and _is_namedtuple(record_class(value)):
        key = _field_names(record_class(value))[key]
    if key not in fields:
        raise KeyError(key)
    return fields[key]


def record_class(value: Any) -> type:
    """The class of a record, or of the record a graph node constructs."""
    return value.target if isinstance(value, fx.Node) else type(value)


def plain_key(entry: Any) -> Any:
    """A pytree key entry as the key, index or field name it stands for."""
    for attribute in ("key", "idx", "name"):
        if hasattr(entry, attribute):
            return getattr(entry, attribute)
    return entry


def _record_class(cls: Any) -> bool:
    return isinstance(cls, type) and (dataclasses.is_dataclass(cls) or _is_namedtuple(cls))


def _is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple) and hasattr(cls, "_fields")


def _field_names(cls: type) -> list[str]:
    return list(cls._fields) if _is_namedtuple(cls) else [field.name for field in dataclasses.fields(cls)]
