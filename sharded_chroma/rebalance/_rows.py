"""Rows of get answers as the data passes compare them: split into records, digested
without the migration marks, and stamped by version and sequence."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ..catalog._state import SEQ_KEY, VERSION_KEY
from ..ops._locator import FULL
from ..ops._migrating import strip_marks

__all__ = ["digest", "rows_of", "stamp_of", "version_of"]


def digest(row: Mapping[str, Any]) -> bytes:
    """What a copy is compared by: content and metadata, without the marks."""
    meta = strip_marks(row.get("metadatas"))
    return orjson.dumps(
        [
            row.get("embeddings"),
            row.get("documents"),
            row.get("uris"),
            None if meta is None else sorted(meta.items()),
        ],
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def rows_of(page: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A page's records, one dict of columns each."""
    ids = page["ids"]
    out = []
    for n, rid in enumerate(ids):
        row = {"ids": rid}
        for column in FULL:
            values = page.get(column)
            row[column] = None if values is None else values[n]
        out.append(row)
    return out


def version_of(meta: Mapping[str, Any] | None) -> int | None:
    value = None if meta is None else meta.get(VERSION_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def stamp_of(meta: Mapping[str, Any] | None) -> tuple[int, int]:
    """(version, sequence): the newest copy of a record held twice has the highest."""
    return (version_of(meta) or 0, int((meta or {}).get(SEQ_KEY) or 0))
