"""A deterministic sample corpus: clustered vectors with documents and metadata, no downloads."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["REGIONS", "TOPICS", "Batch", "batches", "query_vectors"]

TOPICS = ("databases", "networks", "compilers", "graphics", "security", "storage", "search")
REGIONS = ("eu", "us", "ap")
_WORDS = ("index", "replica", "shard", "vector", "cache", "query", "latency", "merge", "log")


@dataclass(frozen=True)
class Batch:
    ids: list[str]
    embeddings: np.ndarray[Any, np.dtype[np.float32]]
    documents: list[str]
    metadatas: list[dict[str, str | int]]


def _centres(dim: int, seed: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.random.default_rng(seed).normal(size=(len(TOPICS), dim)).astype(np.float32)


def batches(total: int, dim: int, batch_size: int, seed: int = 7) -> Iterator[Batch]:
    """Records ``doc-000000`` .. in order; each batch is generated from its own seed, so any
    batch can be regenerated alone and the corpus never sits in memory whole."""
    centres = _centres(dim, seed)
    for start in range(0, total, batch_size):
        n = min(batch_size, total - start)
        rng = np.random.default_rng((seed, start))
        topic = rng.integers(0, len(TOPICS), size=n)
        vectors = centres[topic] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
        words = rng.integers(0, len(_WORDS), size=(n, 3))
        ids: list[str] = []
        docs: list[str] = []
        metas: list[dict[str, str | int]] = []
        for i in range(n):
            k = start + i
            t = TOPICS[topic[i]]
            ids.append(f"doc-{k:06d}")
            docs.append(f"note {k} on {t}: " + " ".join(_WORDS[w] for w in words[i]))
            metas.append({"topic": t, "region": REGIONS[k % len(REGIONS)], "year": 2000 + k % 25})
        yield Batch(ids, vectors.astype(np.float32), docs, metas)


def query_vectors(n: int, dim: int, seed: int = 7) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Queries near the topic centres, held out from the corpus."""
    centres = _centres(dim, seed)
    rng = np.random.default_rng((seed, 2**31))
    picks = rng.integers(0, len(TOPICS), size=n)
    return (centres[picks] + 0.35 * rng.normal(size=(n, dim))).astype(np.float32)
