"""The configuration a rebuild makes its new generation with (pure): the collection's own,
with the index parameters the operator changes, checked before anything is written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._errors import ConfigurationError

__all__ = ["HNSW_PARAMETERS", "rebuilt_configuration"]

HNSW_PARAMETERS: dict[str, type] = {
    "ef_construction": int,
    "max_neighbors": int,
    "ef_search": int,
    "num_threads": int,
    "batch_size": int,
    "sync_threshold": int,
    "resize_factor": float,
}
"""What a rebuild may change, by the name Chroma's collection configuration gives it."""


def rebuilt_configuration(current: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` (a collection's ``configuration_json``) with ``changes`` (``{"hnsw":
    {...}}``) applied. The distance space cannot change: the client merges shards' results
    by distance, and a collection's reported configuration is its root's."""
    if not isinstance(changes, Mapping) or set(changes) - {"hnsw"}:
        raise ConfigurationError(
            f"a rebuild changes index parameters given as {{'hnsw': {{...}}}}, got {changes!r}"
        )
    hnsw = changes.get("hnsw") or {}
    if not isinstance(hnsw, Mapping):
        raise ConfigurationError(f"hnsw parameters must be a table, got {hnsw!r}")
    old = dict(current.get("hnsw") or {})
    for key, value in hnsw.items():
        if key == "space":
            if value != old.get("space", "l2"):
                raise ConfigurationError(
                    f"a rebuild keeps the distance space ({old.get('space', 'l2')!r}); "
                    f"{value!r} would need a new collection"
                )
            continue
        kind = HNSW_PARAMETERS.get(key)
        if kind is None:
            raise ConfigurationError(
                f"unknown hnsw parameter {key!r}; a rebuild can set "
                f"{', '.join(sorted(HNSW_PARAMETERS))}"
            )
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (kind is int and not isinstance(value, int)) or value <= 0:
            raise ConfigurationError(
                f"hnsw parameter {key!r} must be a positive {kind.__name__}, got {value!r}"
            )
        if key == "resize_factor" and value < 1:
            raise ConfigurationError(f"hnsw resize_factor must be at least 1, got {value!r}")
    return {**current, "hnsw": {**old, **hnsw}}
