"""Input checks done once for the cluster, before any part is written (pure)."""

from __future__ import annotations

import numpy as np
from chromadb.api.types import Embeddings
from chromadb.errors import InvalidArgumentError

__all__ = ["check_embeddings", "dimension_error"]


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
