"""Lazy merge of per-part paged streams, for scanning a whole collection in bounded memory."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio

from ._merge import RECORD_COLUMNS, order_key, visible_metadatas

__all__ = ["merged_rows"]


async def merged_rows(
    streams: Mapping[str, AsyncIterator[Mapping[str, Any]]],
    batch_size: int,
    seq_key: str,
    fields: Sequence[str],
    dedupe: bool = False,
    stamps: tuple[str, ...] = (),
) -> AsyncIterator[dict[str, Any]]:
    """Yield pages (column dicts like a get() result) in the same order ``merge_get`` gives.

    Each stream is one part's pages, each part in order (see ``PartIO.pages``). Each step
    takes the smallest head among the streams, so every non-exhausted stream must have a head
    before a pick; a stream is refilled (its next page) only when its buffer runs dry, which
    bounds memory by parts x page size records.

    With ``dedupe`` (collections whose records can be caught between two parts) an id is
    yielded once, at its first place; that costs the set of ids yielded so far. ``stamps``
    names hidden metadata keys to keep: each page then has a ``"stamps"`` column, one tuple of
    their values per record (a backup keeps each record's sequence and version).
    """
    shards = tuple(streams)
    buffers: dict[str, deque[tuple[Any, ...]]] = {s: deque() for s in shards}
    exhausted: set[str] = set()

    async def refill(shard: str) -> None:
        page: Mapping[str, Any] = {"ids": []}
        while not page["ids"]:  # a stream may yield an empty page; only its end is dry
            try:
                page = await anext(streams[shard])
            except StopAsyncIteration:
                exhausted.add(shard)
                return
        ids = page["ids"]
        cols = [page.get(c) for c in RECORD_COLUMNS]
        metas = page.get("metadatas") or [None] * len(ids)
        for i, record_id in enumerate(ids):
            meta = metas[i]
            buffers[shard].append(
                (
                    order_key(meta, record_id, seq_key),
                    record_id,
                    *[(c[i] if c else None) for c in cols],
                )
            )

    out: dict[str, list[Any]] = {"ids": [], **{c: [] for c in RECORD_COLUMNS}}
    seen: set[str] = set()

    def flush() -> dict[str, Any]:
        nonlocal out
        page: dict[str, Any] = {"ids": out["ids"]}
        for c in RECORD_COLUMNS:
            page[c] = out[c] if c in fields else None
        if stamps:
            page["stamps"] = [tuple((m or {}).get(k) for k in stamps) for m in out["metadatas"]]
        if page["metadatas"] is not None:
            page["metadatas"] = visible_metadatas(page["metadatas"])
        out = {"ids": [], **{c: [] for c in RECORD_COLUMNS}}
        return page

    while True:
        dry = [s for s in shards if not buffers[s] and s not in exhausted]
        if dry:
            async with anyio.create_task_group() as tg:
                for s in dry:
                    tg.start_soon(refill, s)
        live = [s for s in shards if buffers[s]]
        if not live:
            break
        shard = min(live, key=lambda s: buffers[s][0][0])
        _, record_id, *values = buffers[shard].popleft()
        if dedupe:
            if record_id in seen:
                continue
            seen.add(record_id)
        out["ids"].append(record_id)
        for c, v in zip(RECORD_COLUMNS, values, strict=True):
            out[c].append(v)
        if len(out["ids"]) >= batch_size:
            yield flush()
    if out["ids"]:
        yield flush()
