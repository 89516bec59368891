"""The reserved metadata namespace, made invisible: user keys that happen to begin with the
reserved prefix are stored under an escaped name and read back unchanged.

A user key ``_sc_x`` is stored as ``_sc_~_sc_x``, and a record (or collection) holding any
escaped key also carries the mark ``_sc_esc``, so a read needs one dictionary look-up per
record to know whether anything must be unescaped. Filters are translated the same way, so
``where={"_sc_x": 1}`` finds what one server would find.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._state import RESERVED_PREFIX, SEQ_KEY, VERSION_KEY

__all__ = [
    "ESCAPED_MARK",
    "ESCAPE_PREFIX",
    "escape_metadata",
    "escape_where",
    "visible_collection_metadata",
    "visible_metadata",
]

ESCAPE_PREFIX = RESERVED_PREFIX + "~"
ESCAPED_MARK = RESERVED_PREFIX + "esc"
_OPERATORS = frozenset({"$and", "$or"})


def _is_reserved(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(RESERVED_PREFIX)


def escape_metadata(metadata: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A user's metadata as stored: reserved-looking keys escaped (the input when none is)."""
    # One C-level scan of the keys first: almost no metadata holds the prefix anywhere.
    if not metadata:
        return metadata
    try:
        if RESERVED_PREFIX not in "".join(metadata):
            return metadata
    except TypeError:
        pass  # a key that is no string: the exact check below decides
    if not any(_is_reserved(k) for k in metadata):
        return metadata
    out: dict[str, Any] = {
        (ESCAPE_PREFIX + k if _is_reserved(k) else k): v for k, v in metadata.items()
    }
    out[ESCAPED_MARK] = 1
    return out


def visible_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A stored metadata as its user wrote it: hidden keys dropped, escaped keys restored;
    None when nothing is left (a record stored without user metadata reads back as None)."""
    if metadata is None:
        return None
    if ESCAPED_MARK in metadata:
        out = {}
        for k, v in metadata.items():
            if k.startswith(ESCAPE_PREFIX):
                out[k[len(ESCAPE_PREFIX) :]] = v
            elif not k.startswith(RESERVED_PREFIX):
                out[k] = v
        return out or None
    if SEQ_KEY in metadata or VERSION_KEY in metadata:
        # Without the escape mark no user key has the prefix: every such key is hidden (the
        # sequence, the version, a migration's marks).
        rest = {k: v for k, v in metadata.items() if not k.startswith(RESERVED_PREFIX)}
        return rest or None
    if not metadata:
        return None
    return metadata if isinstance(metadata, dict) else dict(metadata)


def visible_collection_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A collection's stored metadata as users see it: every reserved key dropped (policy,
    slots, cluster id), escaped user keys restored."""
    if metadata is None:
        return None
    out = {}
    for k, v in metadata.items():
        if k.startswith(ESCAPE_PREFIX):
            out[k[len(ESCAPE_PREFIX) :]] = v
        elif not k.startswith(RESERVED_PREFIX):
            out[k] = v
    return out or None


def escape_where(where: Any) -> Any:
    """A ``where`` filter over stored keys: field names that look reserved are escaped
    (``$and``/``$or`` are walked; operator dictionaries under a field are left as they are)."""
    if isinstance(where, Mapping):
        if not any(_is_reserved(k) or k in _OPERATORS for k in where):
            return where
        out = {}
        for key, value in where.items():
            if key in _OPERATORS and isinstance(value, list):
                out[key] = [escape_where(item) for item in value]
            elif _is_reserved(key):
                out[ESCAPE_PREFIX + key] = value
            else:
                out[key] = value
        return out
    return where
