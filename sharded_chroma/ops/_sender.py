"""Sending a write's records to their parts: hidden keys stamped, batches cut to the cluster's
limit, parts concurrently, each part's chunks in order."""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from chromadb.api.types import Documents, Embeddings, IDs, Metadatas, URIs, serialize_metadata
from chromadb.errors import NotFoundError

from .._fanout import fan_out, raise_for_failures
from .._policies import TimePolicy
from ..catalog._layouts import PartLayouts, Target
from ..catalog._physical import PhysicalIds
from ..catalog._reserved import escape_metadata
from ..catalog._state import SEQ_KEY, VERSION_KEY, CollectionState
from ..cluster._cluster import Cluster
from ..control._served import served_map
from ._clock import HybridClock
from ._locator import stamp_of
from ._ordering import KeyedLocks
from ._partio import PartIO

__all__ = ["RecordSender", "Sequencing"]

logger = logging.getLogger("sharded_chroma.writes")

Sequencing = Literal["all", "new", "none"]


def _b64(rows: np.ndarray[Any, Any]) -> list[str]:
    """Chroma's base64 wire form: little-endian float32 per vector."""
    data = np.ascontiguousarray(rows, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in data]


class RecordSender:
    """Writes records to parts. Callers hold the ids' ordering stripes (see ``WritePath``)."""

    def __init__(
        self,
        cluster: Cluster,
        layouts: PartLayouts,
        physical: PhysicalIds,
        io: PartIO,
        clock: HybridClock,
    ) -> None:
        self._cluster = cluster
        self._layouts = layouts
        self._physical = physical
        self._io = io
        self._clock = clock
        # Sequenced writes of this client reach each part in the order their sequence values
        # were reserved (FIFO, across threads), so a part stores them in get() order.
        self._part_locks = KeyedLocks()

    async def send(
        self,
        op: str,
        state: CollectionState,
        ids: IDs,
        groups: Mapping[str, list[int]],
        parts: Mapping[str, Target],
        embeddings: Embeddings | None,
        metadatas: Metadatas | None,
        documents: Documents | None,
        uris: URIs | None,
        *,
        sequence: Sequencing,
        existing: Mapping[int, int | None] | None = None,
    ) -> int:
        """Send each part its records, parts concurrently, each part's chunks in order;
        returns the version this write stamped.

        ``groups`` holds input positions per part key and ``parts`` the part of each key.
        Every record gets this write's version. ``sequence`` says which records also get a
        fresh hidden sequence value: all (add, move), only those not stored yet (upsert: an
        existing record keeps its place in get() order, as on one server), or none (update).
        For ``"new"`` each part is asked which of its ids it holds, unless ``existing`` (input
        positions held, with the sequence value found) is known already; a part that cannot
        answer fails like its write would. An existing record is sent the sequence value it
        was found with, so one deleted meanwhile (by another process) comes back with one.
        """
        max_batch = await self._cluster.batch_limit()
        matrix = None if embeddings is None else np.asarray(embeddings)
        base = self._clock.reserve(len(ids)) if sequence != "none" else 0
        version = self._clock.reserve(1)

        def column(values: Sequence[Any] | None, pos: list[int]) -> list[Any] | None:
            return None if values is None else [values[i] for i in pos]

        def meta(i: int, fresh: bool, seq: int | None) -> Any:
            user = escape_metadata(metadatas[i]) if metadatas is not None else None
            hidden: dict[str, int] = {VERSION_KEY: version}
            if fresh:
                hidden[SEQ_KEY] = base + i
            elif seq is not None:
                hidden[SEQ_KEY] = seq
            return {**(user or {}), **hidden}

        async def send_part(key: str) -> None:
            target = parts[key]
            bucket = target.state.bucket
            if bucket is None:
                await in_order(key)
                return
            await self._layouts.ensure_bucket(state, target.shard, bucket)
            served = served_map(state)
            other = None if served is None else served.mirror_policy()
            if isinstance(other, TimePolicy) and other.shard_of(bucket) != target.shard:
                # A move mirrors this bucket's writes to its other place: it must exist there.
                await self._layouts.ensure_bucket(state, other.shard_of(bucket), bucket)
            try:
                await in_order(key)
            except NotFoundError:
                # Another client dropped the bucket since this one learnt its physical ids:
                # make it again, once (writes are idempotent by id).
                logger.info("bucket %s of %s was dropped; creating it again", bucket, state.name)
                self._physical.forget(target.state)
                await self._layouts.ensure_bucket(state, target.shard, bucket)
                await in_order(key)

        async def in_order(key: str) -> None:
            if sequence == "none":
                await unlocked(key)
                return
            async with self._part_locks.hold((parts[key].state.id, parts[key].shard)):
                await unlocked(key)

        async def unlocked(key: str) -> None:
            pos = groups[key]
            target = parts[key]
            held: Mapping[int, int | None] = existing or {}
            if sequence == "new" and existing is None:
                found = await self._io.read(
                    target, "/get", {"ids": [ids[i] for i in pos], "include": ["metadatas"]}
                )
                seqs = {
                    rid: stamp_of(m)[1]
                    for rid, m in zip(found["ids"], found.get("metadatas") or [], strict=False)
                }
                held = {i: seqs[ids[i]] for i in pos if ids[i] in seqs}
            fresh = [sequence == "all" or (sequence == "new" and i not in held) for i in pos]
            metas = [
                serialize_metadata(meta(i, f, held.get(i))) for i, f in zip(pos, fresh, strict=True)
            ]
            preflight = await self._cluster.preflight(target.shard)
            supports_b64 = bool(preflight.get("supports_base64_encoding"))
            step = max_batch if max_batch > 0 else len(pos)
            for start in range(0, len(pos), step):
                chunk = pos[start : start + step]
                emb: Any = None
                if matrix is not None:
                    rows = matrix[chunk]
                    emb = _b64(rows) if supports_b64 else rows.tolist()
                body = {
                    "ids": [ids[i] for i in chunk],
                    "embeddings": emb,
                    "metadatas": metas[start : start + step],
                    "documents": column(documents, chunk),
                    "uris": column(uris, chunk),
                }
                await self._io.write(target, op, body)

        _, failures = await fan_out({key: functools.partial(send_part, key) for key in groups})
        raise_for_failures(
            op,
            failures,
            unwritten_ids={k: [ids[i] for i in groups[k]] for k in failures},
            all_failed=len(failures) == len(groups),
        )
        if embeddings is not None and len(embeddings) and state.dimension is None:
            state.dimension = len(embeddings[0])
        return version
