"""Sending records to parts: validated elsewhere, chunked by the batch limit, sequenced, and
written to every copy of a shard under the call's write concern."""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import orjson
from chromadb.api.types import Documents, Embeddings, IDs, Metadatas, URIs, serialize_metadata
from chromadb.errors import NotFoundError

from ._backend import SEQ_KEY, CollectionState
from ._fanout import fan_out, raise_for_failures
from ._options import current_options
from ._parts import Target, parts_database
from ._policies import TimePolicy
from ._reads import ReadOps
from ._replicas import HintTarget, Node

__all__ = ["WriteOps"]

logger = logging.getLogger("sharded_chroma.client")


def _b64(matrix: np.ndarray[Any, Any]) -> list[str]:
    """Chroma's base64 wire form: little-endian float32 per vector."""
    data = np.ascontiguousarray(matrix, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in data]


class WriteOps(ReadOps):
    """Writes of records to the parts a policy names."""

    async def _refresh_dimension(self, state: CollectionState) -> None:
        """Learn the cluster's dimension from the shards while this client has not seen it:
        another process may have fixed it since this handle was fetched."""
        if state.dimension is not None:
            return

        async def model(node: Node) -> Any:
            if isinstance(state.policy, TimePolicy):
                # The root collections of a time-placed collection hold no records: ask its
                # buckets on this node until one has a dimension.
                base = f"{self._base(state.tenant, parts_database(state.database))}/collections"
                for _, name in await self._buckets_on(node, state.tenant, state.database, state.id):
                    raw = await node.transport.request("GET", f"{base}/{name}")
                    if raw.get("dimension") is not None:
                        return raw
                return {}
            await self.node_path(state, node)
            return await node.transport.request(
                "GET", f"{state.base}/by-id/{state.physical[node.url]}"
            )

        # Shards that cannot answer now are left out: a write routed to live shards must not
        # fail because another shard is down.
        answers, _ = await fan_out(
            {n: functools.partial(self.shards[n].read, model) for n in self.shard_names}
        )
        models = answers
        dims = {int(m["dimension"]) for m in models.values() if m.get("dimension") is not None}
        if dims:
            state.dimension = min(dims) if len(dims) == 1 else None

    async def _write_to(self, shard: str, state: CollectionState, op: str, body: Any) -> Any:
        """Send a write to every copy of a shard under the call's write concern."""
        content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        target = HintTarget(state.tenant, state.database, str(state.id), state.name, op)
        concern = current_options().write_concern or self.replication.write_concern
        return await self.shards[shard].write(
            lambda node: self.node_path(state, node, f"/{op}"), content, target, concern
        )

    # -- writes -----------------------------------------------------------------------------

    async def _write(
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
        sequence: Literal["all", "new", "none"],
        existing: set[int] | None = None,
    ) -> None:
        """Send each part its records, parts concurrently, each part's chunks in order.

        ``groups`` holds input positions per part key and ``parts`` the part of each key.

        ``sequence`` says which records get a fresh hidden sequence value: all (add), only
        those not stored yet (upsert: an existing record keeps its place in get() order, as
        on one server, where an upsert merges metadata into the stored record), or none.
        For ``"new"`` each shard is asked which of its ids it holds, unless ``existing`` (input
        positions) is known already; a shard that cannot answer fails like its write would.
        """
        max_batch = await self._batch_limit()
        matrix = None if embeddings is None else np.asarray(embeddings)
        base = self.clock.reserve(len(ids)) if sequence != "none" else 0

        def column(values: Sequence[Any] | None, pos: list[int]) -> list[Any] | None:
            return None if values is None else [values[i] for i in pos]

        def meta(i: int, fresh: bool) -> Any:
            user = metadatas[i] if metadatas is not None else None
            return {**(user or {}), SEQ_KEY: base + i} if fresh else user

        async def send(key: str) -> None:
            target = parts[key]
            bucket = target.state.bucket
            if bucket is None:
                await send_in_order(key)
                return
            await self.ensure_bucket(state, target.shard, bucket)
            try:
                await send_in_order(key)
            except NotFoundError:
                # Another client dropped the bucket since this one learnt its physical ids:
                # make it again, once (writes are idempotent by id).
                logger.info("bucket %s of %s was dropped; creating it again", bucket, state.name)
                target.state.physical.clear()
                await self.ensure_bucket(state, target.shard, bucket)
                await send_in_order(key)

        async def send_in_order(key: str) -> None:
            if sequence == "none":
                await send_unlocked(key)
                return
            # Sequenced writes from this client reach each part in sequence order: the lock
            # is FIFO and each part's task is queued right after the sequence was reserved, so
            # a part stores this client's records in the order get() will merge them.
            async with self._write_lock(parts[key].state, parts[key].shard):
                await send_unlocked(key)

        async def send_unlocked(key: str) -> None:
            pos = groups[key]
            shard, sub = parts[key].shard, parts[key].state
            if sequence == "new" and existing is None:
                found = await self._read_from(
                    shard, sub, "/get", {"ids": [ids[i] for i in pos], "include": []}
                )
                present = set(found["ids"])
                fresh = [ids[i] not in present for i in pos]
            else:
                fresh = [
                    sequence == "all" or (sequence == "new" and i not in (existing or ()))
                    for i in pos
                ]
            metas = None
            if sequence != "none" or metadatas is not None:
                metas = [serialize_metadata(meta(i, f)) for i, f in zip(pos, fresh, strict=True)]
            supports_b64 = bool((await self.preflight(shard)).get("supports_base64_encoding"))
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
                    "metadatas": None if metas is None else metas[start : start + step],
                    "documents": column(documents, chunk),
                    "uris": column(uris, chunk),
                }
                await self._write_to(shard, sub, op, body)

        _, failures = await fan_out({key: functools.partial(send, key) for key in groups})
        raise_for_failures(
            op,
            failures,
            unwritten_ids={k: [ids[i] for i in groups[k]] for k in failures},
            all_failed=len(failures) == len(groups),
        )
        if embeddings is not None and len(embeddings) and state.dimension is None:
            state.dimension = len(embeddings[0])
