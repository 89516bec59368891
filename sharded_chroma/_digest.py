"""Per-record content digests for comparing copies without holding their data."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

__all__ = ["page_digests"]


def _embedding_rows(embeddings: Sequence[Any] | None, n: int) -> list[bytes | None]:
    """Embeddings as little-endian float32 bytes: what the server stores, so the JSON float
    text (and its float64 parse) cannot make equal vectors look different."""
    if embeddings is None:
        return [None] * n
    try:
        matrix = np.asarray(embeddings, dtype="<f4")
    except (TypeError, ValueError):  # ragged or holes: row by row
        matrix = None
    if matrix is not None and matrix.ndim == 2 and len(matrix) == n:
        return [row.tobytes() for row in matrix]
    return [None if e is None else np.asarray(e, dtype="<f4").tobytes() for e in embeddings]


def _text(value: Any) -> bytes | None:
    return None if value is None else str(value).encode()


def _digest(record_id: str, embedding: bytes | None, doc: Any, uri: Any, meta: Any) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    meta = None if meta is None else orjson.dumps(meta, option=orjson.OPT_SORT_KEYS)
    for part in (record_id.encode(), embedding, _text(doc), _text(uri), meta):
        # Length-prefixed with a presence byte, so None, "" and field boundaries never collide.
        if part is None:
            h.update(b"\x00")
        else:
            h.update(b"\x01" + len(part).to_bytes(8, "little") + part)
    return h.digest()


def page_digests(page: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """``(id, digest)`` for every record of a get() response with every field included."""
    ids: list[str] = page["ids"]
    n = len(ids)

    def column(name: str) -> Sequence[Any]:
        values = page.get(name)
        return [None] * n if values is None else values

    embeddings = _embedding_rows(page.get("embeddings"), n)
    docs, uris, metas = column("documents"), column("uris"), column("metadatas")
    return [(ids[i], _digest(ids[i], embeddings[i], docs[i], uris[i], metas[i])) for i in range(n)]
