"""Input checks done once for the cluster, before any part is written (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from chromadb.api.types import Embeddings, Metadatas
from chromadb.errors import InvalidArgumentError

from ..catalog._state import reject_reserved

__all__ = ["check_embeddings", "check_metadatas", "check_where", "dimension_error"]


def check_where(where: Any, what: str = "where") -> None:
    """Reserved keys are invisible: filtering on them is refused like an unknown operator."""
    if isinstance(where, Mapping):
        reject_reserved(where, f"{what} filter")
        for value in where.values():
            check_where(value, what)
    elif isinstance(where, list):
        for item in where:
            check_where(item, what)


def check_metadatas(metadatas: Metadatas | None) -> None:
    for meta in metadatas or ():
        reject_reserved(meta or {}, "metadata")


def dimension_error(expected: int, got: int) -> InvalidArgumentError:
    # Same text as a Chroma server's, so the error reads the same whichever shard it came from.
    return InvalidArgumentError(
        f"Collection expecting embedding with dimension of {expected}, got {got}"
    )


def check_embeddings(
    dimension: int | None, embeddings: Embeddings | None, *, finite: bool = True
) -> None:
    """Reject what a server would reject, before any shard stores part of the batch."""
    if embeddings is None or len(embeddings) == 0:
        return
    expected = dimension if dimension is not None else len(embeddings[0])
    for emb in embeddings:
        if len(emb) != expected:
            raise dimension_error(expected, len(emb))
    if not finite:
        return
    matrix = np.asarray(embeddings, dtype=np.float64)
    ok = np.isfinite(matrix)
    if not ok.all():
        row, col = np.argwhere(~ok)[0]
        value = matrix[row, col]
        text = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
        raise InvalidArgumentError(f"Non-finite float value at embedding index {col}: {text}")
