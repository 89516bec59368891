"""Deterministic synthetic vectors for the benchmarks: no downloads, same data on every run.

Records and held-out queries are drawn around the same gaussian cluster centres, so nearest
neighbour search has real structure (an approximate index can miss neighbours, unlike on
uniform noise), and exact answers are computed with numpy for recall.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Dataset", "exact_top_k", "make_dataset", "recall_at_k"]


@dataclass(frozen=True)
class Dataset:
    """Records (``ids``, ``vectors``, ``clusters``) and held-out ``queries``, all float32."""

    ids: list[str]
    vectors: np.ndarray
    clusters: np.ndarray
    queries: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)


def make_dataset(
    records: int,
    dim: int,
    queries: int,
    *,
    centres: int = 50,
    noise: float = 0.35,
    seed: int = 20261126,
) -> Dataset:
    """``records`` vectors of ``dim`` float32s, each a random centre plus gaussian noise, and
    ``queries`` more from the same distribution that are not among the records.

    The same arguments always give the same arrays (numpy's PCG64 with a fixed seed).
    """
    if records < 1 or dim < 1 or queries < 1 or centres < 1:
        raise ValueError("records, dim, queries and centres must be positive")
    rng = np.random.default_rng(seed)
    centre_vectors = rng.standard_normal((centres, dim), dtype=np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, centres, size=n)
        points = centre_vectors[labels] + noise * rng.standard_normal((n, dim), dtype=np.float32)
        return points.astype(np.float32, copy=False), labels

    vectors, clusters = draw(records)
    query_vectors, _ = draw(queries)
    # Zero-padded ids sort like their numbers, which keeps tie-breaks readable in diffs.
    width = len(str(records - 1))
    ids = [f"rec-{i:0{width}d}" for i in range(records)]
    return Dataset(ids=ids, vectors=vectors, clusters=clusters, queries=query_vectors)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row indexes of the ``k`` nearest records (squared L2) for each query, nearest first."""
    k = min(k, len(vectors))
    base = vectors.astype(np.float64)
    q = queries.astype(np.float64)
    # |x - q|^2 = |x|^2 - 2 x.q + |q|^2; |q|^2 is constant per query and does not change order.
    dist = (base * base).sum(axis=1)[None, :] - 2.0 * (q @ base.T)
    part = np.argpartition(dist, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(dist, part, axis=1).argsort(axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def recall_at_k(found: list[list[str]], truth: list[list[str]], k: int) -> float:
    """Mean over queries of |found[:k] & truth[:k]| / k."""
    if len(found) != len(truth):
        raise ValueError(f"{len(found)} answers for {len(truth)} queries")
    if not truth:
        return float("nan")
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth))


async def add_all(collection: Any, data: Dataset, batch: int) -> float:
    """Insert every record (metadata ``{"cluster": c}``), one batch at a time; records/s."""
    t0 = time.perf_counter()
    for start in range(0, len(data), batch):
        stop = start + batch
        await collection.add(
            ids=data.ids[start:stop],
            embeddings=data.vectors[start:stop],
            metadatas=[{"cluster": int(c)} for c in data.clusters[start:stop]],
        )
    return len(data) / (time.perf_counter() - t0)
